"""`localcoder lsp`: run the language server over stdio (default) or TCP.

Only what the configured engine needs is imported: with a GGUF model that is llama.cpp, never
torch; with ``--server-url`` nothing heavy at all. Logs go to stderr (stdout carries the protocol).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import BinaryIO

from localcoder.cli import add_model_arguments, config_from_args
from localcoder.errors import InvalidRequest


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Transport flags, then one flag per LspConfig and CompletionConfig field, then the model flags."""
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.config import CompletionConfig, LspConfig

    p.add_argument("--stdio", action="store_true", help="talk LSP over stdin/stdout (the default)")
    p.add_argument("--tcp", metavar="HOST:PORT", help="listen on a TCP socket instead of stdio")
    p.add_argument("--log-level", dest="log_level", default="INFO", help="DEBUG | INFO | WARNING | ERROR")
    add_dataclass_arguments(p.add_argument_group("language server"), LspConfig)
    add_dataclass_arguments(p.add_argument_group("completion"), CompletionConfig)
    add_model_arguments(p)


def parse_tcp(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidRequest(f"--tcp wants HOST:PORT, got {value!r}", param="tcp")
    return host or "127.0.0.1", int(port)


def setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pygls").setLevel(max(logging.WARNING, logging.getLogger().level))


def protocol_streams() -> tuple[BinaryIO, BinaryIO]:
    """stdin and a private copy of stdout for the protocol; fd 1 then points at stderr.

    Libraries write to fd 1 behind our back: llama.cpp logs, and llama-cpp-python points fd 1 at
    /dev/null while it loads a model (``suppress_stdout_stderr``), which would swallow any LSP
    message written meanwhile. With the protocol on its own descriptor neither can touch it.
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin.buffer, out


def run(args: argparse.Namespace) -> int:
    from localcoder.lsp.server import create_server

    cfg = config_from_args(args)
    tcp = parse_tcp(args.tcp) if args.tcp else None
    setup_logging(args.log_level)
    server = create_server(cfg)
    if tcp:
        logging.getLogger("localcoder.lsp").info("listening on %s:%d", *tcp)
        server.start_tcp(*tcp)
    else:
        server.start_io(*protocol_streams())
    return 0
