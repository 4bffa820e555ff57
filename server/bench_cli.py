"""`localcoder bench`: cold and typing-replay latency of `localcoder serve` and of llama-cpp-python's
server on the same GGUF, in one run; writes bench.json, bench.md and bench.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _int_list(value: str) -> tuple[int, ...]:
    return tuple(int(x) for x in value.split(",") if x)


# BenchConfig (localcoder.bench) documents few of its fields; their flag help lives here.
_FLAGS = {
    "model": {"flags": ("--model", "-m"), "help": "registry name or GGUF path (or 'fake')",
              "show_default": "qwen2.5-coder-0.5b"},
    "threads": {"help": "CPU threads for both servers"},
    "ctx": {"help": "context window for both servers"},
    "contexts": {"type": _int_list, "nargs": None, "metavar": "N,N,...",
                 "help": "cold-request context sizes in tokens", "show_default": "256,1024,2048"},
    "cold_repeats": {"flags": ("--repeats",), "help": "cold requests per context size"},
    "cold_suffix_tokens": {"help": "suffix tokens of each cold request"},
    "typing_file": {"help": "source file to type (default: the stdlib's textwrap.py)"},
    "typing_chars": {"help": "characters to type"},
    "window_lines_before": {"help": "lines above the typing cursor sent as prefix"},
    "window_lines_after": {"help": "lines below the typing cursor sent as suffix"},
    "debounce_ms": {"help": "the editor's wait added to each pause (the Neovim plugin's debounce; the LSP adds none)"},
    "max_tokens": {"help": "generated-token limit per request (both targets)"},
    "peer": {"help": "also bench llama-cpp-python's server (--no-peer skips it)"},
    "url": {"help": "bench a running `localcoder serve` at this URL instead of starting one"},
    "api_key": {"help": "key for --url"},
    "workloads": {"help": "comma-separated: cold, typing, editor (llama.vim's bodies vs llama-server), formats "
                          "(--model and --formats side by side in-process: prefill, decode, bandwidth bound)"},
    "editor_baseline": {"action": "append", "nargs": None, "metavar": "FLAGS",
                        "help": "editor replay: one more `localcoder serve` with these flags added to the default "
                                "config, interleaved with the others (repeatable: a before/after, several drafts)"},
    "formats": {"metavar": "LABEL=PATH", "help": "formats workload: more artifacts of the model (GGUF file, ONNX "
                                                 "export dir, HF dir) measured next to --model, interleaved"},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field (localcoder.cliargs), plus how to run and where to write."""
    from localcoder.bench import BenchConfig
    from localcoder.cliargs import add_dataclass_arguments

    add_dataclass_arguments(p, BenchConfig, overrides=_FLAGS)
    p.add_argument("--quick", action="store_true", help="tiny run (tests): contexts 64,128, 1 repeat, 40 chars")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace):
    from localcoder.bench import BenchConfig
    from localcoder.cliargs import values_from_args
    from localcoder.config import ModelConfig

    values = values_from_args(args, BenchConfig)
    model = values.pop("model", ModelConfig().model)
    if model != "fake" and not Path(model).is_file():
        from localcoder.models import resolve

        model = str(resolve(model, pull_if_missing=True).path)
    cfg = BenchConfig(model=model, **values)
    if cfg.formats and "formats" not in cfg.workloads.split(","):
        cfg.workloads += ",formats"  # naming artifacts asks for their comparison
    if "formats" in cfg.workloads.split(","):
        from localcoder.bench_formats import parse_formats

        parse_formats(cfg.model, cfg.formats)  # a wrong path fails before any server starts
    if args.quick:
        cfg.contexts, cfg.cold_repeats, cfg.typing_chars, cfg.max_tokens = (64, 128), 1, 40, 8
    return cfg


def run(args: argparse.Namespace) -> int:
    from localcoder.bench import markdown, run_bench, write_outputs

    report = run_bench(config_from(args), progress=not args.no_progress)
    paths = write_outputs(report, Path(args.out))
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
