"""`localcoder bench --workloads formats`: one model in several formats side by side, interleaved.

Each artifact (the bench's ``--model`` GGUF first, then every ``--formats LABEL=PATH``: a GGUF file, an
ONNX export directory from ``localcoder quantize --to onnx``, an HF directory) is loaded in this process
with the engine ``localcoder serve`` would give it (llama.cpp, onnxruntime, torch) and the bench's
``--threads``. Round r measures every artifact once before round r+1 starts, so a change of machine load
hits all rows alike: a cold prefill of ``format_prompt_tokens`` tokens of real code (no KV reuse), then
``format_decode_tokens`` greedy tokens. Reported per artifact: medians over the rounds, the weight bytes a
decode step reads (everything but the embedding table, ``localcoder.quantize.gate``), the decode bound
(read bandwidth measured in the same run / those bytes), the fraction of it reached, and the ratios to
the first row.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localcoder.errors import InvalidRequest


@dataclass
class FormatRow:
    label: str
    kind: str  # gguf | onnx | hf
    path: str
    weight_bytes: int
    load_s: float
    prefill: list[float] = field(default_factory=list)  # tok/s per round
    decode: list[float] = field(default_factory=list)


def parse_formats(reference: str, specs: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """``[(label, path)]``: the reference model first, then ``LABEL=PATH`` (or a bare PATH, labelled by name)."""
    out = [(f"{Path(reference).name} (--model)", reference)]
    for spec in specs:
        label, sep, path = spec.partition("=")
        label, path = (label, path) if sep else (Path(spec).name, spec)
        if not Path(path).exists():
            raise InvalidRequest(f"--formats {spec!r}: {path} does not exist", param="formats")
        out.append((label, path))
    return out


def run_formats(cfg, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    from localcoder.bench import read_bandwidth_gbs
    from localcoder.config import ModelConfig
    from localcoder.engines import load_engine
    from localcoder.models import resolve
    from localcoder.quantize.calib import calibration_ids
    from localcoder.quantize.gate import Artifact, measure_speed, weight_bytes_per_token

    arts = parse_formats(cfg.model, cfg.formats)
    # the same weights in every row: no layout adapter on the GGUF (the ONNX and HF rows have none)
    mcfg = ModelConfig(threads=cfg.threads, ctx=max(cfg.ctx, cfg.format_prompt_tokens + cfg.format_decode_tokens + 8),
                       adapter="off")
    rows, engines = [], []
    for label, path in arts:
        model = resolve(path)
        t0 = time.perf_counter()
        engine = load_engine(model, mcfg)
        load_s = time.perf_counter() - t0
        kind = model.kind if model.kind in ("gguf", "onnx") else "hf"
        rows.append(FormatRow(label, kind, str(model.path), weight_bytes_per_token(Artifact(label, kind, Path(model.path), "")),
                              round(load_s, 2)))
        engines.append(engine)
    tok = engines[0].tokenizer
    prompt = calibration_ids(lambda t: tok.tokenize(t), None, n_seqs=1, seq_len=cfg.format_prompt_tokens,
                             seed=cfg.format_seed)[0]
    bandwidth = read_bandwidth_gbs(max(1, cfg.threads))
    bar = tqdm(total=cfg.format_rounds * len(rows), desc="formats", unit="run", file=sys.stderr, disable=not progress)
    for _ in range(cfg.format_rounds):
        for row, engine in zip(rows, engines):
            prefill, decode = measure_speed(engine, prompt, cfg.format_decode_tokens)
            row.prefill.append(prefill)
            row.decode.append(decode)
            bar.update()
    bar.close()
    bandwidth = max(bandwidth, read_bandwidth_gbs(max(1, cfg.threads)))  # best of before and after
    for engine in engines:
        engine.close()
    return summarize(rows, bandwidth, cfg)


def summarize(rows: list[FormatRow], bandwidth_gbs: float, cfg) -> dict[str, Any]:
    out = []
    ref_prefill = statistics.median(rows[0].prefill) if rows[0].prefill else 0.0
    ref_decode = statistics.median(rows[0].decode) if rows[0].decode else 0.0
    for r in rows:
        prefill, decode = statistics.median(r.prefill), statistics.median(r.decode)
        bound = bandwidth_gbs * 1e9 / r.weight_bytes if r.weight_bytes else float("nan")
        out.append({"label": r.label, "kind": r.kind, "path": r.path, "weights_per_token_mb": round(r.weight_bytes / 1e6, 1),
                    "load_s": r.load_s, "prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 2),
                    "decode_bound_tok_s": round(bound, 1), "of_bound": round(decode / bound, 3),
                    "prefill_vs_first": round(prefill / ref_prefill, 3) if ref_prefill else None,
                    "decode_vs_first": round(decode / ref_decode, 3) if ref_decode else None,
                    "prefill_rounds": r.prefill, "decode_rounds": r.decode})
    return {"read_bandwidth_gbs": round(bandwidth_gbs, 2), "threads": cfg.threads, "rounds": cfg.format_rounds,
            "prompt_tokens": cfg.format_prompt_tokens, "decode_tokens": cfg.format_decode_tokens, "rows": out}


def markdown(formats: dict[str, Any]) -> str:
    lines = [f"Formats, interleaved ({formats['rounds']} rounds, {formats['threads']} threads; cold prefill of "
             f"{formats['prompt_tokens']} tokens, then {formats['decode_tokens']} decoded; medians; bound = "
             f"{formats['read_bandwidth_gbs']} GB/s read bandwidth / weights read per token):", "",
             f"| artifact | engine | weights/token MB | load s | prefill tok/s | decode tok/s | decode bound tok/s | "
             f"of bound | prefill vs row 1 | decode vs row 1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in formats["rows"]:
        lines.append(f"| {r['label']} | {r['kind']} | {r['weights_per_token_mb']:.0f} | {r['load_s']:.1f} | "
                     f"{r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['decode_bound_tok_s']:.1f} | "
                     f"{r['of_bound']:.0%} | {r['prefill_vs_first']:.2f}× | {r['decode_vs_first']:.2f}× |")
    return "\n".join(lines) + "\n"


def plot(formats: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = formats["rows"]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar(x, [r["prefill_tok_s"] for r in rows])
    ax1.set(title=f"prefill ({formats['prompt_tokens']} tokens, cold)", ylabel="tok/s")
    ax2.bar(x - 0.2, [r["decode_tok_s"] for r in rows], 0.4, label="measured")
    ax2.bar(x + 0.2, [r["decode_bound_tok_s"] for r in rows], 0.4, label="bandwidth bound", alpha=0.5)
    ax2.set(title="decode", ylabel="tok/s")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(x, [r["label"] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
