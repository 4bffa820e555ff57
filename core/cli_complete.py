"""`localcoder complete FILE --line L --column C`: the smallest proof that the whole path works."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from localcoder.cli import add_model_arguments, config_from_args
from localcoder.errors import InputFileError, InvalidRequest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.config import CheckConfig, CompletionConfig

    p.add_argument("file", nargs="?", help="source file (or --stdin)")
    p.add_argument("--line", "-l", type=int, required=True, help="1-based line of the cursor")
    p.add_argument("--column", "-c", type=int, required=True, help="1-based column (characters) of the cursor")
    p.add_argument("--stdin", action="store_true", help="read the source from standard input")
    p.add_argument("--json", action="store_true", help="print text, stop reason and timings as JSON")
    add_dataclass_arguments(p.add_argument_group("completion"), CompletionConfig)
    add_dataclass_arguments(p.add_argument_group("checked completion (localcoder.checked)"), CheckConfig)
    add_model_arguments(p)


def read_source(args: argparse.Namespace) -> tuple[str, str]:
    if args.stdin:
        data, name = sys.stdin.buffer.read(), "<stdin>"
    else:
        if not args.file:
            raise InvalidRequest("give a FILE or --stdin", param="file")
        path = Path(args.file)
        if not path.is_file():
            raise InputFileError(f"{path}: no such file")
        data, name = path.read_bytes(), str(path)
    if not data:
        raise InputFileError(f"{name} is empty: there is nothing to complete")
    if b"\0" in data[:8192]:
        raise InputFileError(f"{name} looks binary (NUL bytes): only text files can be completed")
    try:
        return data.decode("utf-8"), name
    except UnicodeDecodeError as exc:
        raise InputFileError(f"{name} is not UTF-8 text (byte {exc.start})") from None


def split_at(text: str, line: int, column: int, name: str) -> tuple[str, str]:
    """1-based line/column (columns count characters) -> (prefix, suffix)."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise InputFileError(f"{name}: line {line} is outside the file (1..{len(lines)})")
    current = lines[line - 1].rstrip("\r")
    if not 1 <= column <= len(current) + 1:
        raise InputFileError(f"{name}:{line}: column {column} is outside the line (1..{len(current) + 1})")
    offset = sum(len(x) + 1 for x in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def run(args: argparse.Namespace) -> int:
    from localcoder.completion import Completer, InfillRequest

    text, name = read_source(args)
    prefix, suffix = split_at(text, args.line, args.column, name)
    cfg = config_from_args(args)
    cfg.completion.jump_prefix_tokens = 0  # one completion, nothing typed next: the full window, never the jump one
    completer = Completer.from_config(cfg, pull=True, progress=True)
    req = InfillRequest(prefix, suffix, path=None if args.stdin else args.file,
                        mode=cfg.completion.mode, max_tokens=cfg.completion.max_tokens,
                        time_budget_ms=cfg.completion.time_budget_ms)
    if cfg.check.check == "tests":
        from localcoder.checked import run_cli

        return run_cli(completer, req, cfg.check, as_json=args.json)
    result = completer.complete(req)
    if args.json:
        print(json.dumps({"text": result.text, "mode": result.mode, "stop_type": result.stop_type,
                          "truncated": result.truncated, "prompt_tokens": result.prompt_tokens,
                          "timings": result.timings.to_dict()}, indent=2))
    else:
        print(result.text)
    return 0
