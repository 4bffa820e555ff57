"""Gate several existing exports of one source in one run and write one table (markdown + JSON + the gate's
report), the way docs/quantize.md's tables were made.

    # quality (KL, top-1, ES/EM/pass@1) on 60 HumanEval single-line tasks + 30 held-out stdlib lines:
    .venv/bin/python docs/quantize_table.py --source qwen2.5-coder-0.5b --n-humaneval 60 --n-heldout 30 \\
        --threads 1 --out /tmp/q_05b/quality \\
        --art "gguf f16=gguf:/tmp/q_05b/qwen05b-f16.gguf:f16" --art "onnx int8=onnx:/tmp/q_05b/onnx-int8:int8"
    # speed only (size, load, prefill/decode tok/s, fraction of the bandwidth bound), idle machine, 2 threads:
    .venv/bin/python docs/quantize_table.py ... --n-humaneval 0 --n-heldout 0 --calib-seqs 2 --threads 2 --out ...

The artifacts are made with `localcoder quantize SOURCE --to gguf|onnx --type T --out PATH --no-gate`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--source", required=True, help="model name, GGUF or HF directory (as `localcoder quantize`)")
    ap.add_argument("--art", action="append", default=[], help="LABEL=KIND:PATH:TYPE, kind gguf|onnx|hf")
    ap.add_argument("--n-humaneval", type=int, default=60)
    ap.add_argument("--n-heldout", type=int, default=30)
    ap.add_argument("--calib-seqs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", required=True, help="report path without extension")
    a = ap.parse_args()

    from localcoder.quantize.cli import source_hf_dir
    from localcoder.quantize.gate import Artifact, GateConfig, run_gate
    from localcoder.quantize.report import write_report

    arts = []
    for spec in a.art:
        label, rest = spec.split("=", 1)
        kind, path, fmt = rest.split(":")
        arts.append(Artifact(label, kind, Path(path), fmt))
    cfg = GateConfig(n_humaneval=a.n_humaneval, n_heldout=a.n_heldout, calib_seqs=a.calib_seqs, threads=a.threads)
    rep = run_gate(source_hf_dir(a.source, progress=True)[1], arts, cfg, cache_dir=Path(a.out).parent).to_dict()
    md, js = write_report(rep, Path(a.out))
    print(md.read_text())
    print(json.dumps({"report": str(js)}))


if __name__ == "__main__":
    main()
