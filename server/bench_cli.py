"""`localcoder bench`: cold and typing-replay latency of `localcoder serve` and of llama-cpp-python's
server on the same GGUF, in one run; writes bench.json, bench.md and bench.png."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default="qwen2.5-coder-0.5b", help="registry name or GGUF path (or 'fake')")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for both servers")
    p.add_argument("--ctx", type=int, default=4096, help="context window for both servers")
    p.add_argument("--contexts", default="256,1024,2048", help="cold-request context sizes in tokens")
    p.add_argument("--repeats", type=int, default=2, help="cold requests per context size")
    p.add_argument("--typing-file", default="", help="source file to type (default: the stdlib's textwrap.py)")
    p.add_argument("--typing-chars", type=int, default=200, help="characters to type")
    p.add_argument("--debounce-ms", type=int, default=150, help="editor debounce added to each pause")
    p.add_argument("--max-tokens", type=int, default=24, help="generated-token limit per request (both targets)")
    p.add_argument("--suffix-tokens", type=int, default=64, help="localcoder's suffix budget")
    p.add_argument("--no-peer", action="store_true", help="skip llama-cpp-python's server")
    p.add_argument("--url", default="", help="bench a running `localcoder serve` at this URL instead of starting one")
    p.add_argument("--api-key", default="", help="key for --url")
    p.add_argument("--quick", action="store_true", help="tiny run (tests): contexts 64,128, 1 repeat, 40 chars")
    p.add_argument("--out", default="bench-out", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace):
    from localcoder.bench import BenchConfig

    model = args.model
    if model != "fake" and not Path(model).is_file():
        from localcoder.models import resolve

        model = str(resolve(model, pull_if_missing=True).path)
    cfg = BenchConfig(model=model, threads=args.threads, ctx=args.ctx,
                      contexts=tuple(int(x) for x in args.contexts.split(",") if x),
                      cold_repeats=args.repeats, typing_file=args.typing_file, typing_chars=args.typing_chars,
                      debounce_ms=args.debounce_ms, max_tokens=args.max_tokens, suffix_tokens=args.suffix_tokens,
                      peer=not args.no_peer, url=args.url, api_key=args.api_key)
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
