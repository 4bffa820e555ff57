"""The ``localcoder`` command. Subcommands load lazily: ``localcoder lsp`` never imports torch.

Each subcommand lives in a module with ``add_arguments(parser)`` and ``run(args) -> int``; the
modules import nothing heavy at import time. Errors are mapped here, once, to one clear line on
stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import errno
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
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # a full disk under stdout fails here, inside the error mapping
        return code
    except LocalcoderError as exc:
        print(f"localcoder {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as exc:
        full = _disk_full(exc)
        if full is None:
            raise
        where = f" ({full.filename})" if full.filename else ""
        _quiet_stdout()
        print(f"localcoder {args.command}: error: no space left on device{where}: free some space, or point "
              "LOCALCODER_HOME / TMPDIR at a larger disk", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"localcoder {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_stdout() -> None:
    """After ENOSPC on stdout, drop what it still buffers (else the exit-time flush fails again)."""
    try:
        sys.stdout.flush()
    except OSError:
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC error in ``exc`` or in what caused it, if any."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per ``ModelConfig`` field, for every subcommand that loads a model."""
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.config import ModelConfig

    g = p.add_argument_group("model")
    g.add_argument("--config", help="TOML config file (default: $XDG_CONFIG_HOME/localcoder/config.toml)")
    add_dataclass_arguments(g, ModelConfig, overrides={"model": {"flags": ("--model", "-m")}})


def config_from_args(args: argparse.Namespace):
    """The one Config: defaults < file < env < the flags the user gave. Every Config field that is a
    flag of this subcommand (``add_dataclass_arguments``) is read; a flag left at None overrides nothing."""
    from localcoder.cliargs import values_from_args
    from localcoder.config import Config, load_config

    overrides: dict = {}
    for section in Config().sections().values():
        overrides.update(values_from_args(args, type(section)))
    return load_config(getattr(args, "config", None), overrides)


if __name__ == "__main__":
    sys.exit(main())
