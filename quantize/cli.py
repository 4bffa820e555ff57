"""`localcoder quantize MODEL --to gguf|onnx|hf|bnb --type TYPE [--prune SPEC] --out PATH`.

Pipeline: resolve MODEL to an fp32 HF directory (a packaged GGUF is dequantized once and cached)
-> optional pruning (saved as an HF directory that `localcoder distill` can heal) -> export ->
quality gate against the source -> report (markdown + JSON) -> registration in `localcoder models`.
Exit status 1 when the gate fails (the artifact is kept but not registered) unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_GATE_FAILED = 1
DEFAULT_TYPE = {"gguf": "q8_0", "onnx": "int8", "hf": "fp32", "bnb": "nf4"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.quantize.gate import GateConfig  # numpy, but no torch

    p.add_argument("model", help="source: model name, GGUF file or HF directory (e.g. qwen2.5-coder-0.5b)")
    p.add_argument("--to", required=True, choices=["gguf", "onnx", "hf", "bnb"],
                   help="gguf (llama.cpp) | onnx (onnxruntime) | hf (pruned safetensors) | bnb (CUDA torch config)")
    p.add_argument("--type", help="gguf: f32 f16 bf16 q8_0 q6_k q5_k_m q4_k_m …; onnx: fp32 fp16 int8 int4; "
                                  "bnb: int8 nf4 (default: q8_0 / int8 / nf4)")
    p.add_argument("--out", required=True, help="output file (.gguf) or directory")
    p.add_argument("--prune", help="e.g. layers=12,heads=0.75,mlp=0.5,sparsity=0.5 (layers: count or fraction kept)")
    p.add_argument("--name", help="register the artifact under this name (default: the output's stem)")
    p.add_argument("--no-register", action="store_true", help="do not add the artifact to `localcoder models`")
    p.add_argument("--keep", default=None,
                   help="onnx: comma-separated node-name patterns kept in fp32 ('' = none; default: none for int8, "
                        "lm_head for int4)")
    from localcoder.quantize.onnx import OnnxQuantConfig  # light: no onnx/onnxruntime import at parse time

    add_dataclass_arguments(p.add_argument_group("onnx quantizer (--to onnx --type int8|int4)"), OnnxQuantConfig)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    g = p.add_argument_group("quality gate")
    g.add_argument("--no-gate", action="store_true", help="skip the quality gate (no report numbers)")
    g.add_argument("--force", action="store_true", help="register and exit 0 even when the gate fails")
    g.add_argument("--threshold", type=float,
                   help=f"max ES drop in points (default {100 * GateConfig.threshold:g})")
    add_dataclass_arguments(g, GateConfig, exclude=("threshold", "progress"))
    g.add_argument("--report", help="report path without extension (default: <out>.report)")


def gate_config(args: argparse.Namespace):
    """The gate's settings (GateConfig): its defaults < the flags given (--threshold is in points)."""
    from localcoder.cliargs import values_from_args
    from localcoder.quantize.gate import GateConfig

    values = values_from_args(args, GateConfig)
    if args.threshold is not None:
        values["threshold"] = args.threshold / 100.0
    return GateConfig(**values, progress=not args.quiet)


def source_hf_dir(spec: str, progress: bool):
    """(resolved model, fp32 HF directory) for any source spec."""
    from localcoder.errors import InvalidRequest
    from localcoder.models import resolve

    model = resolve(spec, pull_if_missing=True, progress=progress)
    if model.kind == "gguf":
        from localcoder.engines.torch import convert_gguf_to_hf

        if progress:
            print(f"dequantizing {model.name} to an fp32 HF directory (cached after the first time)…",
                  file=sys.stderr)
        return model, convert_gguf_to_hf(model)
    if model.kind != "hf":
        raise InvalidRequest(f"quantize needs an HF or GGUF source; {model.name} is {model.kind}", param="model")
    return model, model.path


def prune_to(src: Path, out: Path, spec: str, calib_paths, threads: int, progress: bool) -> dict:
    """Load ``src``, apply the pruning plan measured on calibration code, save to ``out``."""
    import torch
    import transformers

    from localcoder.errors import InvalidRequest
    from localcoder.quantize.calib import calibration_ids
    from localcoder.quantize.prune import PrunePlan, apply_plan

    try:
        plan = PrunePlan.parse(spec)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="prune") from exc
    if threads:
        torch.set_num_threads(threads)
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    calib = calibration_ids(lambda t: tok.encode(t, add_special_tokens=False), calib_paths, n_seqs=8,
                            seq_len=256, seed=0)
    result = apply_plan(model, plan, calib, progress=progress)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if progress:
        print(f"pruned: kept layers {result.layers_kept}, params {result.params_before:,} -> "
              f"{result.params_after:,}; saved {out}", file=sys.stderr)
    return result.to_dict()


def export(to: str, type: str, model_dir: Path, out: Path, args, threads: int, progress: bool):
    """Write the artifact; returns (Artifact for the gate or None, extra report fields)."""
    from localcoder.quantize.gate import Artifact

    if to == "gguf":
        from localcoder.quantize.gguf import export_gguf

        res = export_gguf(model_dir, out, type, name=args.name or out.stem, threads=threads, progress=progress)
        return Artifact(f"gguf {type}", "gguf", res.path, type)
    if to == "onnx":
        from localcoder.cliargs import values_from_args
        from localcoder.quantize.onnx import OnnxQuantConfig, export_onnx

        keep = None if args.keep is None else [k.strip() for k in args.keep.split(",") if k.strip()]
        onnx_cfg = OnnxQuantConfig(**values_from_args(args, OnnxQuantConfig))
        res = export_onnx(model_dir, out, type, keep=keep, config=onnx_cfg, progress=progress)
        label = f"onnx {onnx_cfg.describe(type)}" if type in ("int8", "int4") else f"onnx {type}"
        return Artifact(label, "onnx", res.path, type)
    if to == "bnb":
        from localcoder.quantize.bnb import save_bnb

        return Artifact(f"torch bnb {type}", "hf", save_bnb(model_dir, out, type), type)
    return Artifact("hf fp32 (pruned)" if args.prune else "hf fp32", "hf", model_dir, "fp32")


def run(args: argparse.Namespace) -> int:
    from localcoder import models
    from localcoder.quantize.bnb import cuda_status
    from localcoder.quantize.gate import run_gate
    from localcoder.quantize.report import write_report

    progress = not args.quiet
    gate = gate_config(args)
    type = (args.type or DEFAULT_TYPE[args.to]).lower()
    out = Path(args.out).expanduser().resolve()
    source, src_dir = source_hf_dir(args.model, progress)
    extra: dict = {}
    model_dir = src_dir
    if args.prune:
        model_dir = out if args.to == "hf" else out.with_name(f"{out.stem}-pruned-hf")
        extra["prune"] = prune_to(src_dir, model_dir, args.prune, gate.calib_paths, gate.threads, progress)
    elif args.to == "hf":
        from localcoder.errors import InvalidRequest

        raise InvalidRequest("--to hf writes a pruned HF model; give --prune", param="prune")
    artifact = export(args.to, type, model_dir, out, args, gate.threads, progress)
    print(f"wrote {artifact.path}", file=sys.stderr)

    passed: bool | None = None
    no_cuda = cuda_status() if args.to == "bnb" else None
    if no_cuda:
        print(f"localcoder quantize: saved the bitsandbytes {type} configuration in {artifact.path}, but {no_cuda}; "
              "the quality gate needs to load it, so it was skipped. Load it on a CUDA machine with "
              "`localcoder serve --engine torch --device cuda`.", file=sys.stderr)
    elif not args.no_gate:
        report = run_gate(src_dir, [artifact], gate, cache_dir=models.home() / "gate-cache").to_dict()
        report.update(extra)
        md, _ = write_report(report, args.report or out.with_name(out.name + ".report"),
                             f"localcoder quantize: {source.name} -> {artifact.label}")
        passed = report["passed"]
        print(md.read_text(encoding="utf-8"), file=sys.stdout)
    if passed is False and not args.force:
        print("localcoder quantize: quality gate FAILED; the artifact was kept but not registered "
              "(use --force to register it anyway)", file=sys.stderr)
        return EXIT_GATE_FAILED
    if not args.no_register:
        name = args.name or out.stem
        models.register(name, artifact.path, type=type, source=source.name, gate=passed,
                        fim_format=source.fim_format, format=args.to)
        print(f"registered as {name!r} (localcoder models)", file=sys.stderr)
    return 0
