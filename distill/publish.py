"""After a run: the merged student quantized to GGUF through `localcoder quantize` (export, quality gate, registration),
one file per ``DistillConfig.export_gguf`` type, gated on the run's own held-out files, and registered as
``<name>-<type>`` with the run's provenance (teacher, data roots and fingerprint, order), so that
``localcoder serve --model <name>-q4_k_m`` (and ``make serve MODEL=...``) serves it in the order it was taught.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from localcoder.distill.config import DistillConfig
from localcoder.errors import InvalidRequest

# the gate's FIM sample for a student: its own held-out files first (HumanEval as a no-forgetting check)
GATE_HELDOUT = 40
GATE_HUMANEVAL = 20


@dataclass
class Published:
    type: str
    name: str
    path: Path
    passed: bool
    exit_code: int


def gguf_name(cfg: DistillConfig, out: Path, type: str) -> str:
    return f"{cfg.register_as or out.resolve().name}-{type}"


def publish(cfg: DistillConfig, out: Path, model_dir: Path, *, threads: int = 0, progress: bool = True) -> list[Published]:
    """Each ``cfg.export_gguf`` type through ``localcoder quantize`` (its exit code: 0 passed and registered,
    1 gate failed, kept but not registered); ``adapter`` is the student's own packaged GGUF with the run's LoRA
    applied at run time (no second quantization). The registered entries get the run's provenance."""
    from localcoder import models
    from localcoder.quantize import cli as quantize_cli

    splits = json.loads((out / "splits.json").read_text(encoding="utf-8"))
    heldout = splits.get("test") or splits.get("val") or []
    prov = json.loads((model_dir / "localcoder.json").read_text(encoding="utf-8"))
    meta = dict(orders=[cfg.fim_order], teacher=prov.get("teacher"), data=prov.get("data"), student_init=cfg.student,
                preset=cfg.preset)
    done = []
    for type in cfg.export_gguf:
        if type == "adapter":
            done.append(publish_adapter(cfg, out, model_dir, heldout, meta, threads=threads, progress=progress))
            continue
        name = gguf_name(cfg, out, type)
        path = out / f"{name}.gguf"
        argv = [str(model_dir), "--to", "gguf", "--type", type, "--out", str(path), "--name", name,
                "--n-humaneval", str(GATE_HUMANEVAL), "--n-heldout", str(GATE_HELDOUT), "--threads", str(threads)]
        if heldout:
            argv += ["--heldout", *heldout]
        if not progress:
            argv.append("--quiet")
        parser = argparse.ArgumentParser(prog="localcoder quantize")
        quantize_cli.add_arguments(parser)
        print(f"[distill] publish: localcoder quantize {' '.join(argv[:8])} ... (gate on {len(heldout)} held-out "
              "files)", file=sys.stderr, flush=True)
        code = quantize_cli.run(parser.parse_args(argv))
        if code == 0:  # registered by quantize: add where it came from
            entry = models.resolve(name).meta
            models.register(name, path, **{k: v for k, v in entry.items() if k not in ("path", "kind")}, **meta)
        done.append(Published(type, name, path, code == 0, code))
    return done


def publish_adapter(cfg: DistillConfig, out: Path, model_dir: Path, heldout: list[str], meta: dict, *,
                    threads: int, progress: bool) -> Published:
    """The run's LoRA (``out/adapter.gguf``) on the student's own GGUF, gated against the merged model and
    registered as ``<name>``: llama.cpp applies the adapter at run time, so the base keeps its original
    quantization (a merged model re-quantized to Q4_K_M is rounded twice: 7.8 ES points lost, docs/distill.md)."""
    from localcoder import models
    from localcoder.quantize.gate import Artifact, GateConfig, run_gate
    from localcoder.quantize.report import write_report

    base = models.resolve(cfg.student, pull_if_missing=True)
    name = cfg.register_as or out.resolve().name
    adapter = out / "adapter.gguf"
    if base.kind != "gguf" or not adapter.is_file():
        raise InvalidRequest(f"the adapter export needs a GGUF student and {adapter}", param="export_gguf")
    art = Artifact(f"gguf {base.name} + LoRA", "gguf", base.path, "base+lora", adapter=adapter)
    gate = GateConfig(n_humaneval=GATE_HUMANEVAL, n_heldout=GATE_HELDOUT, heldout_paths=heldout or None,
                      threads=threads, progress=progress)
    report = run_gate(model_dir, [art], gate, cache_dir=models.home() / "gate-cache").to_dict()
    md, _ = write_report(report, out / f"{name}.report", f"localcoder distill: {name} = {base.name} + its LoRA")
    print(md.read_text(encoding="utf-8"))
    if report["passed"]:
        models.register(name, base.path, adapter=str(adapter.resolve()), type="base+lora", gate=True, source=base.name,
                        format="gguf", **meta)
    return Published("adapter", name, adapter, bool(report["passed"]), 0 if report["passed"] else 1)
