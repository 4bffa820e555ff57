"""Typing replay through the language server: what an editor sees, keystroke to ghost text.

Same workload as ``localcoder bench``'s typing replay (``localcoder.bench.typing_cases``: a stdlib
file typed character by character from its middle, a completion requested at each word end), but
driven through ``localcoder lsp`` the way an editor drives it: one ``didChange`` per keystroke, an
automatic ``textDocument/inlineCompletion`` at each pause (the server's debounce included in the
latency). Also reports start-up (process start to the ``initialize`` answer, and to the engine
being loaded) and the server process's memory (RSS now and peak).

    python -m localcoder.lsp.bench --model qwen2.5-coder-0.5b --chars 120 --out lsp-bench.json

With ``--iki-ms`` the keystrokes come at a typist's pace and the client asks after *every* keystroke,
as VS Code asks its inline-completion provider and llama.vim its server: the requests from inside a
word run until the next keystroke supersedes them, so what a shorter server debounce costs (the
generations it starts that nobody sees, and their delay to the request that is seen) is in the
numbers. Several debounces are run interleaved (a fresh server each, the order alternating)::

    python -m localcoder.lsp.bench --iki-ms 240 --debounce-ms 150,50 --repeats 2 --out debounce.json
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

from localcoder.bench import keystrokes, pauses
from localcoder.config import LspConfig
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


def asks_at(typed: str, iki_ms: float) -> list[tuple[int, bool, bool]]:
    """The keystrokes as (characters typed so far, whether the client asks, whether it waits for the
    answer): at a pause the typist waits for the suggestion; with a typing pace (``iki_ms`` > 0) the
    client also asks after every other keystroke and types on without waiting (the server supersedes
    that request at the next one)."""
    stops = set(pauses(typed))
    return [(i, i in stops or iki_ms > 0, i in stops) for i in keystrokes(typed)]


async def run(cmd: list[str], source: str, chars: int, settings: dict[str, Any],
              log_path: str = "/dev/null", iki_ms: float = 0.0) -> dict[str, Any]:
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
    latencies, texts, unseen = [], [], []
    stats0 = await _stats(client)
    done = 0
    for end, ask_now, wait in asks_at(typed, iki_ms):
        edit, done = typed[done:end], end
        line, col = doc.position_at(cursor)
        pos = types.Position(line, col)
        t = time.perf_counter()  # the keystroke: the clock runs from here
        doc.apply(pos, pos, edit, version=doc.version + 1)
        client.text_document_did_change(types.DidChangeTextDocumentParams(
            types.VersionedTextDocumentIdentifier(version=doc.version, uri=uri),
            [types.TextDocumentContentChangePartial(range=types.Range(pos, pos), text=edit)]))
        cursor += len(edit)
        if ask_now:
            line, col = doc.position_at(cursor)
            ask = client.text_document_inline_completion_async(types.InlineCompletionParams(
                context=types.InlineCompletionContext(types.InlineCompletionTriggerKind.Automatic),
                text_document=types.TextDocumentIdentifier(uri), position=types.Position(line, col)))
            if wait:
                res = await asyncio.wait_for(ask, 300)
                latencies.append((time.perf_counter() - t) * 1000)
                texts.append(res.items[0].insert_text if res and res.items else "")
            else:
                unseen.append(asyncio.ensure_future(ask))
        if iki_ms > 0:
            await asyncio.sleep(max(0.0, iki_ms / 1000 - (time.perf_counter() - t)))
    await asyncio.wait_for(asyncio.gather(*unseen), 300)  # superseded: each answers null
    stats = await _stats(client)
    delta = {k: int(stats.get(k, 0)) - int(stats0.get(k, 0)) for k in ("requests", "generations", "skipped",
                                                                         "superseded", "typed_through")}
    mem_after = proc_memory_mib(pid)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {
        "command": cmd, "settings": settings, "iki_ms": iki_ms, "typed": typed, "typed_chars": len(typed),
        "keystrokes": len(keystrokes(typed)), "requests": len(latencies), "requests_unseen": len(unseen),
        "replay_stats": delta,
        "start_to_initialize_ms": round(t_init * 1000, 1), "start_to_engine_ready_ms": round(t_ready * 1000, 1),
        "latency_ms_p50": round(percentile(latencies, 50), 1), "latency_ms_p95": round(percentile(latencies, 95), 1),
        "latency_ms_mean": round(statistics.fmean(latencies), 1) if latencies else None,
        "non_empty": sum(1 for t in texts if t), "memory_after_load": mem_loaded, "memory_after_replay": mem_after,
        "server_stats": stats, "latencies_ms": [round(x, 1) for x in latencies], "samples": texts[:10],
    }


async def _stats(client) -> dict[str, Any]:
    res = await client.protocol.send_request_async("localcoder/stats", {})
    return {k: getattr(res, k) for k in res._fields} if hasattr(res, "_fields") else dict(res)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per debounce, its runs pooled: the awaited keystrokes' p50 / p95, and per keystroke
    how many requests went to the engine (the cost of asking inside words)."""
    rows = []
    for d in dict.fromkeys(r["settings"]["debounceMs"] for r in runs):
        mine = [r for r in runs if r["settings"]["debounceMs"] == d]
        lat = [x for r in mine for x in r["latencies_ms"]]
        keys = sum(r["keystrokes"] for r in mine)
        st = {k: sum(r["replay_stats"][k] for r in mine) for k in mine[0]["replay_stats"]}
        rows.append({"debounce_ms": d, "runs": len(mine), "awaited": len(lat),
                     "p50_ms": round(percentile(lat, 50), 1), "p95_ms": round(percentile(lat, 95), 1),
                     "requests_per_key": round(st["requests"] / keys, 2),
                     "generations_per_key": round(st["generations"] / keys, 2),
                     "typed_through": st["typed_through"]})
    return rows


def table(rows: list[dict[str, Any]], iki_ms: float) -> str:
    pace = f"a keystroke every {iki_ms:.0f} ms, a request after each" if iki_ms else "a request at each pause only"
    out = [f"LSP typing replay ({pace}); latency = keystroke to answer at the pauses, the server's debounce "
           "included", "",
           "| server debounce | runs | pauses | p50 | p95 | requests / keystroke | generations / keystroke "
           "| typed through |", "|---|---|---|---|---|---|---|---|"]
    out += [f"| {r['debounce_ms']} ms | {r['runs']} | {r['awaited']} | {r['p50_ms']:.0f} ms | {r['p95_ms']:.0f} ms "
            f"| {r['requests_per_key']} | {r['generations_per_key']} | {r['typed_through']} |" for r in rows]
    return "\n".join(out)


def plot(runs: list[dict[str, Any]], iki_ms: float, path: Path) -> None:
    """Each awaited keystroke's latency by server debounce (a strip per debounce, p50 and p95 marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    for x, row in enumerate(rows):
        lat = [v for r in runs if r["settings"]["debounceMs"] == row["debounce_ms"] for v in r["latencies_ms"]]
        ax.scatter([x + (i % 7 - 3) * 0.03 for i in range(len(lat))], lat, s=10, alpha=0.5)
        for q, style in (("p50_ms", "-"), ("p95_ms", "--")):
            ax.hlines(row[q], x - 0.3, x + 0.3, colors="k", linestyles=style, label=q[:3] if x == 0 else None)
    ax.set_xticks(range(len(rows)), [f"{r['debounce_ms']} ms" for r in rows])
    ax.set(xlabel="server debounce", ylabel="keystroke to answer at a pause (ms)", yscale="log",
           title=f"LSP typing replay, a keystroke every {iki_ms:.0f} ms" if iki_ms else "LSP typing replay")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--engine", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chars", type=int, default=120)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--suffix-tokens", type=int, default=64)
    p.add_argument("--debounce-ms", default=str(LspConfig().debounce_ms),
                   help="the server's debounce (default: its default); several, comma-separated, run interleaved")
    p.add_argument("--iki-ms", type=float, default=0.0, help="typing pace: ms from one keystroke to the next, and "
                                                             "a request after every keystroke (0: type at once, ask "
                                                             "at pauses only)")
    p.add_argument("--repeats", type=int, default=1, help="replays per debounce (a fresh server each)")
    p.add_argument("--file", default="", help="file to type (default: the stdlib's textwrap.py)")
    p.add_argument("--out", default="")
    p.add_argument("--server-log", default="/dev/null", help="file for the server's stderr")
    args = p.parse_args(argv)
    try:
        debounces = [int(x) for x in args.debounce_ms.split(",")]
    except ValueError:
        p.error(f"--debounce-ms: comma-separated integers, got {args.debounce_ms!r}")
    if min(debounces) < 0 or args.iki_ms < 0 or args.repeats < 1:
        p.error("--debounce-ms and --iki-ms must be >= 0, --repeats >= 1")

    source = Path(args.file or Path(os.__file__).parent / "textwrap.py").read_text(encoding="utf-8")
    cmd = [sys.executable, "-m", "localcoder.cli", "lsp", "--model", args.model, "--engine", args.engine,
           "--threads", str(args.threads), "--log-level", "INFO"]
    runs = []
    for r in range(args.repeats):
        for d in debounces if r % 2 == 0 else debounces[::-1]:  # the order alternates
            settings = {"maxTokens": args.max_tokens, "suffixTokens": args.suffix_tokens, "debounceMs": d}
            runs.append(asyncio.run(run(cmd, source, args.chars, settings, args.server_log, args.iki_ms)))
    report = runs[0] if len(runs) == 1 else {"iki_ms": args.iki_ms, "summary": summarize(runs), "runs": runs}
    text = json.dumps(report, indent=2)
    if args.out:
        out = Path(args.out)
        out.write_text(text + "\n")
        if len(runs) > 1:  # a comparison: its table and plot beside the JSON
            out.with_suffix(".md").write_text(table(report["summary"], args.iki_ms) + "\n")
            plot(runs, args.iki_ms, out.with_suffix(".png"))
    print(text if len(runs) == 1 else table(report["summary"], args.iki_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
