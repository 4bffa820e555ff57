"""Typing replay through the language server: what an editor sees, keystroke to ghost text.

Same workload as ``localcoder bench``'s typing replay (``localcoder.bench.typing_cases``: a stdlib
file typed character by character from its middle, a completion requested at each word end), but
driven through ``localcoder lsp`` the way an editor drives it: one ``didChange`` per keystroke, an
automatic ``textDocument/inlineCompletion`` at each pause (the server's debounce included in the
latency). Also reports start-up (process start to the ``initialize`` answer, and to the engine
being loaded) and the server process's memory (RSS now and peak).

    python -m localcoder.lsp.bench --model qwen2.5-coder-0.5b --chars 120 --out lsp-bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types

from localcoder.bench import pauses
from localcoder.lsp.documents import Document
from localcoder.stats import percentile


def proc_memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mib": fields.get("VmRSS", 0.0), "peak_rss_mib": fields.get("VmHWM", 0.0)}


def window(text: str, before: int = 48, after: int = 24, chars: int = 120) -> tuple[str, str, str]:
    """(anchor above the cursor, text to type, tail below): the same editor window as `localcoder bench`."""
    from localcoder.bench import typing_window

    return typing_window(text, chars, before, after)


async def run(cmd: list[str], source: str, chars: int, settings: dict[str, Any],
              log_path: str = "/dev/null") -> dict[str, Any]:
    from pygls.lsp.client import LanguageClient

    anchor, typed, tail = window(source, chars=chars)
    client = LanguageClient("localcoder-lsp-bench", "0")
    t0 = time.perf_counter()
    # the server's stderr goes to a file (pygls' client pipes it and never reads it)
    await client.start_io("sh", "-c", 'exec "$@" 2>>"$LOCALCODER_LSP_BENCH_LOG"', "sh", *cmd,
                          env={**os.environ, "LOCALCODER_LSP_BENCH_LOG": log_path})
    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        inline_completion=types.InlineCompletionClientCapabilities()))
    await client.initialize_async(types.InitializeParams(capabilities=caps, root_uri="file:///bench",
                                                         initialization_options=settings))
    t_init = time.perf_counter() - t0
    client.initialized(types.InitializedParams())
    stats = await _stats(client)
    while "engine" not in stats and time.perf_counter() - t0 < 300:
        await asyncio.sleep(0.05)
        stats = await _stats(client)
    t_ready = time.perf_counter() - t0
    pid = client._server.pid  # type: ignore[union-attr]  (sh exec'd the server: same pid)
    mem_loaded = proc_memory_mib(pid)

    uri = "file:///bench/typed.py"
    doc = Document(uri, anchor + tail, "python", 1)
    client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=doc.text)))
    cursor = len(anchor)
    asks = set(pauses(typed))  # offsets after which the client asks (1-based: after that many characters)
    latencies, texts = [], []
    for i, ch in enumerate(typed):
        line, col = doc.position_at(cursor)
        pos = types.Position(line, col)
        doc.apply(pos, pos, ch, version=doc.version + 1)
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(version=doc.version, uri=uri),
            [types.TextDocumentContentChangePartial(range=types.Range(pos, pos), text=ch)]))
        cursor += 1
        if i + 1 in asks:
            line, col = doc.position_at(cursor)
            t = time.perf_counter()
            res = await asyncio.wait_for(client.text_document_inline_completion_async(types.InlineCompletionParams(
                context=types.InlineCompletionContext(types.InlineCompletionTriggerKind.Automatic),
                text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, col))), 300)
            latencies.append((time.perf_counter() - t) * 1000)
            texts.append(res.items[0].insert_text if res and res.items else "")
    stats = await _stats(client)
    mem_after = proc_memory_mib(pid)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {
        "command": cmd, "settings": settings, "typed_chars": len(typed), "requests": len(latencies),
        "start_to_initialize_ms": round(t_init * 1000, 1), "start_to_engine_ready_ms": round(t_ready * 1000, 1),
        "latency_ms_p50": round(percentile(latencies, 50), 1), "latency_ms_p95": round(percentile(latencies, 95), 1),
        "latency_ms_mean": round(statistics.fmean(latencies), 1) if latencies else None,
        "non_empty": sum(1 for t in texts if t), "memory_after_load": mem_loaded, "memory_after_replay": mem_after,
        "server_stats": stats, "latencies_ms": [round(x, 1) for x in latencies], "samples": texts[:10],
    }


async def _stats(client) -> dict[str, Any]:
    res = await client.protocol.send_request_async("localcoder/stats", {})
    return {k: getattr(res, k) for k in res._fields} if hasattr(res, "_fields") else dict(res)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--engine", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chars", type=int, default=120)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--suffix-tokens", type=int, default=64)
    p.add_argument("--debounce-ms", type=int, default=150)
    p.add_argument("--file", default="", help="file to type (default: the stdlib's textwrap.py)")
    p.add_argument("--out", default="")
    p.add_argument("--server-log", default="/dev/null", help="file for the server's stderr")
    args = p.parse_args(argv)

    source = Path(args.file or Path(os.__file__).parent / "textwrap.py").read_text(encoding="utf-8")
    cmd = [sys.executable, "-m", "localcoder.cli", "lsp", "--model", args.model, "--engine", args.engine,
           "--threads", str(args.threads), "--log-level", "INFO"]
    settings = {"maxTokens": args.max_tokens, "suffixTokens": args.suffix_tokens, "debounceMs": args.debounce_ms}
    report = asyncio.run(run(cmd, source, args.chars, settings, args.server_log))
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
