"""`localcoder distill`: flags are generated from ``DistillConfig`` (one source of truth).

    localcoder distill --teacher qwen2.5-coder-0.5b --student-layers 12 --data ~/src/myrepo --out runs/s12 \\
        --preset laptop
    localcoder distill --config distill.toml --resume
    torchrun --nproc_per_node 2 -m localcoder.distill.cli ... [--parallel fsdp]   (DDP or FSDP2; gloo on CPU)
"""

from __future__ import annotations

import argparse
import sys

from localcoder.cliargs import add_dataclass_arguments
from localcoder.distill.config import PRESETS, DistillConfig

# help where the field's comment in config.py is missing or terse; every other flag's help is that comment
_HELP = {
    "teacher": "teacher model: name, path or hub id",
    "student": "start from this model (same tokenizer; `teacher`: the teacher itself) instead of pruning the teacher",
    "student_layers": "keep N of the teacher's blocks, chosen by measured importance",
    "data": "corpus directories (repeatable; default: the Python standard library source)",
    "out": "output directory (checkpoints, model/, report.md, metrics.jsonl)",
    "steps": "optimizer steps (the schedule ends at steps or max-minutes, whichever first)",
    "max_minutes": "wall-clock budget of the training loop in minutes (0 = none)",
    "budget_minutes": "budget of the whole run in minutes: where this CPU is too slow for the schedule, the run reads "
                      "fewer rows (said before it starts, refit once the teacher's first rows are timed; 0 = none)",
    "loss": "ce | fkl | rkl | jsd",
    "teacher_mode": "cached (top-k logits on disk, reused) | online",
    "fim_order": "student FIM order: psm | spm (cache-friendly)",
    "loss_positions": "all | middle",
    "autocast": "bf16 autocast of the forwards: auto (CUDA, and CPUs with AVX512-BF16/AMX) | bf16 | off",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="defaults for a machine class")
    p.add_argument("--config", help="TOML file with the same keys (optionally under [distill])")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_dataclass_arguments(p, DistillConfig, exclude=("preset",),
                            overrides={name: {"help": text} for name, text in _HELP.items()})


def config_from_args(args: argparse.Namespace) -> DistillConfig:
    from localcoder.cliargs import values_from_args
    from localcoder.distill.config import load

    overrides = values_from_args(args, DistillConfig)
    overrides.pop("preset", None)  # --preset picks the defaults; it is not an override
    return load(args.preset or "", args.config, overrides)


def run(args: argparse.Namespace) -> int:
    from localcoder.distill.train import train

    cfg = config_from_args(args)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    import os

    if cfg.specialists and int(os.environ.get("RANK", "0")) == 0:
        name = cfg.register_as or result.out.resolve().name
        print(f"specialists: {result.model_dir / 'bundle.json'} ({result.out / 'report.md'}); "
              f"serve them with `localcoder serve --model {name}`")
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"student: {result.model_dir}  (steps {result.state.step}, stopped by {result.state.stopped}; "
              f"report {result.out / 'report.md'})")
        if cfg.lora_rank:  # the adapter alone, for llama.cpp next to the base GGUF (`serve --adapter`)
            from localcoder.distill.layout import export_adapter

            adapter = export_adapter(cfg, result.out)
            print(f"adapter: {adapter.path} ({adapter.size / 1e6:.1f} MB, {cfg.fim_order} order; "
                  f"serve it with --model {cfg.student} --adapter {adapter.path})")
        if cfg.export_gguf:
            return publish_ggufs(cfg, result, progress=not args.quiet)
    return 0


def publish_ggufs(cfg, result, *, progress: bool) -> int:
    """The merged student as GGUF files through `localcoder quantize` (gate + registration), then the
    run's estimate against what each stage took. Exit 1 when a gate failed (that file is not registered)."""
    from localcoder.distill.plan import Stages
    from localcoder.distill.publish import publish

    stages = Stages(result.out)
    with stages.stage("publish"):
        done = publish(cfg, result.out, result.model_dir, threads=cfg.threads, progress=progress)
    for p in done:
        verdict = "gate passed, registered" if p.passed else "gate FAILED: kept, not registered"
        print(f"gguf {p.type}: {p.path} ({verdict}; serve it with `localcoder serve --model {p.name}`)")
    table = stages.compare()
    print(table)
    with open(result.out / "report.md", "a", encoding="utf-8") as fh:
        notes = "".join(f"- {note}\n" for note in (stages.est.notes if stages.est else []))
        fh.write(f"\n## Time: estimate vs actual\n\nThe estimate is the one printed before the run, or its revision "
                 f"where a note below says so.\n\n{table}\n" + (f"\n{notes}" if notes else ""))
    return 0 if all(p.passed for p in done) else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m localcoder.distill.cli`` (torchrun), with the CLI's error mapping."""
    from localcoder.cli import main as cli_main

    return cli_main(["distill", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
