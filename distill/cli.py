"""`localcoder distill`: flags are generated from ``DistillConfig`` (one source of truth).

    localcoder distill --teacher qwen2.5-coder-0.5b --student-layers 12 --data ~/src/myrepo --out runs/s12 \\
        --preset laptop
    localcoder distill --config distill.toml --resume
    torchrun --nproc_per_node 2 -m localcoder.distill.cli ... [--parallel fsdp]   (DDP or FSDP2; gloo on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from localcoder.distill.config import PRESETS, DistillConfig

_HELP = {
    "teacher": "teacher model: name, path or hub id",
    "student": "start from this HF model (same tokenizer) instead of pruning the teacher",
    "student_layers": "keep N of the teacher's blocks, chosen by measured importance",
    "data": "corpus directories (repeatable; default: the Python standard library source)",
    "out": "output directory (checkpoints, model/, report.md, metrics.jsonl)",
    "steps": "optimizer steps (the schedule ends at steps or max-minutes, whichever first)",
    "max_minutes": "wall-clock budget of the training loop in minutes (0 = none)",
    "loss": "ce | fkl | rkl | jsd",
    "teacher_mode": "cached (top-k logits on disk, reused) | online",
    "fim_order": "student FIM order: psm | spm (cache-friendly)",
    "loss_positions": "all | middle",
}


def _field_comments() -> dict[str, str]:
    """The ``# comment`` after each DistillConfig field (config.py documents every field once, there)."""
    import inspect
    import re

    src = inspect.getsource(DistillConfig)
    return {m[1]: m[2].strip() for m in re.finditer(r"^\s+(\w+): [^#\n]*#\s*(.+)$", src, re.M)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a machine class")
    p.add_argument("--config", help="TOML file with the same keys (optionally under [distill])")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    hints = typing.get_type_hints(DistillConfig)
    comments = _field_comments()
    for f in dataclasses.fields(DistillConfig):
        if f.name == "preset":
            continue
        flag = "--" + f.name.replace("_", "-")
        typ = hints[f.name]
        help_text = _HELP.get(f.name) or comments.get(f.name) or f.name.replace("_", " ")
        help_text = help_text.replace("%", "%%")
        if typ is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(typ) is list:
            p.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_text)
        else:
            p.add_argument(flag, dest=f.name, type=typ, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    from localcoder.distill.config import field_names, load

    overrides = {k: getattr(args, k, None) for k in field_names() if k != "preset"}
    return load(args.preset or "", args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from localcoder.distill.train import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"student: {result.model_dir}  (steps {result.state.step}, stopped by {result.state.stopped}; "
              f"report {result.out / 'report.md'})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m localcoder.distill.cli`` (torchrun), with the CLI's error mapping."""
    from localcoder.cli import main as cli_main

    return cli_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
