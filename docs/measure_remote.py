"""Overhead of ``localcoder serve --engine remote`` against a direct request to the same server.

    python docs/measure_remote.py --remote http://127.0.0.1:8080 --serve http://127.0.0.1:8765 -n 30

For each round: one ``POST /infill`` through localcoder (prompt built, tokenized, sent as token ids,
streamed back, stop rules applied) and one direct streamed request to the remote with the same token
prompt and as many tokens as localcoder's request generated (so both do the same work; the prompt is
cached by the remote after the first round in both paths), in an order that rotates. Reports p50 of
each and the p50 of the per-round difference: the latency the remote path adds. ``--serve`` repeated
puts several serves (before/after a change) in the same interleaved run; ``--pid`` with each adds
its CPU time per request.

    python docs/measure_remote.py --serve http://127.0.0.1:8765 --direct http://127.0.0.1:8081 --typing

The typing replay of ``localcoder bench`` (llama.vim's exact ``/infill`` bodies, a file typed character
by character, mid-file / end-of-file / two files) sent, interleaved, to localcoder serve --engine remote
(in front of one llama-server) and straight to a second llama-server on the same GGUF (its own
``/infill``), so the two paths never share a cache: what a user typing feels through each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import httpx

PREFIX = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    "
SUFFIX = "\n\n\ndef main():\n    print(fibonacci(10))\n"


def token_prompt(model: str, prefix: str, suffix: str) -> list[int]:
    """The token ids localcoder sends for this request (the model's FIM format, budgets as default)."""
    from localcoder.completion import Completer, InfillRequest
    from localcoder.engines.remote import local_tokenizer
    from localcoder.models import resolve

    tok = local_tokenizer(resolve(model))

    class _TokenizerOnly:  # Completer.prompt needs only the tokenizer
        name, model_name, device, n_ctx, tokenizer = "remote", model, "remote", 4096, tok

    ids, _ = Completer(_TokenizerOnly(), None).prompt(InfillRequest(prefix=prefix, suffix=suffix))  # type: ignore[arg-type]
    return ids


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _direct_body(remote: str, http: httpx.Client, ids: list[int], max_tokens: int) -> tuple[str, dict[str, Any]]:
    """The direct request: llama-server's native ``/completion`` (the endpoint the remote engine uses
    there, found the same way, by ``/props``), else OpenAI ``/v1/completions``."""
    body: dict[str, Any] = {"prompt": ids, "temperature": 0, "top_k": 1, "stream": True, "cache_prompt": True}
    if http.get(f"{remote}/props").status_code == 200:
        return "/completion", {**body, "n_predict": max_tokens, "return_tokens": True}
    return "/v1/completions", {**body, "max_tokens": max_tokens}


def _cpu_ms(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 without a pid."""
    if not pid:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")


def measure(remote: str, serves: list[str], model: str = "qwen2.5-coder-0.5b", n: int = 30, max_tokens: int = 16,
            prefix: str = PREFIX, suffix: str = SUFFIX, pids: list[int] | None = None) -> dict[str, Any]:
    """Each round: one direct request and one ``/infill`` through every serve, in a rotating order."""
    ids = token_prompt(model, prefix, suffix)
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_tokens, "temperature": 0}
    pids = list(pids or []) + [0] * (len(serves) - len(pids or []))
    times: dict[str, list[float]] = {"direct": [], **{s: [] for s in serves}}
    added: dict[str, list[float]] = {s: [] for s in serves}
    # one connection per path; llama-server may close a keep-alive connection after a stream, so the
    # direct path asks for a fresh one each time (TCP on loopback: well under 1 ms)
    with httpx.Client(timeout=60) as http, httpx.Client(timeout=60, headers={"Connection": "close"}) as raw:
        predicted = [max(1, int(http.post(f"{s}/infill", json=body).json()["timings"]["predicted_n"])) for s in serves]
        if len(set(predicted)) != 1:
            raise SystemExit(f"the serves generated different numbers of tokens: {predicted}")
        path, direct_body = _direct_body(remote, raw, ids, predicted[0])

        def through(serve: str) -> float:
            t0 = time.perf_counter()
            r = http.post(f"{serve}/infill", json=body)
            r.raise_for_status()
            return _ms(t0)

        def direct() -> float:
            t0 = time.perf_counter()
            with raw.stream("POST", f"{remote}{path}", json=direct_body) as d:
                for _line in d.iter_lines():
                    pass
            return _ms(t0)

        direct()  # warms the direct path's connection and cache
        cpu0 = [_cpu_ms(p) for p in pids]
        paths = ["direct", *serves]
        for i in range(n):  # rotate which path goes first, so none always follows another
            order = paths[i % len(paths):] + paths[:i % len(paths)]
            got = {p: direct() if p == "direct" else through(p) for p in order}
            for p, ms in got.items():
                times[p].append(ms)
            for s in serves:
                added[s].append(got[s] - got["direct"])
        cpu = [(_cpu_ms(p) - c) / n for p, c in zip(pids, cpu0)]
    return {"n": n, "prompt_tokens": len(ids), "generated_tokens": predicted[0], "direct_endpoint": path,
            "p50_direct_ms": round(statistics.median(times["direct"]), 2),
            "serves": [{"serve": s, "p50_serve_ms": round(statistics.median(times[s]), 2),
                        "p50_added_ms": round(statistics.median(added[s]), 2),
                        **({"cpu_ms_per_request": round(c, 2)} if pid else {})}
                       for s, c, pid in zip(serves, cpu, pids)],
            "load": os.getloadavg()}


def typing(serve: str, direct: str, file_a: str = "", file_b: str = "", chars: int = 40,
           max_tokens: int = 16) -> list[dict[str, Any]]:
    from localcoder import bench_editor as ed
    from localcoder.bench import default_typing_file

    workloads = ed.editor_workloads(file_a or str(default_typing_file()),
                                    file_b or os.path.join(os.path.dirname(os.__file__), "shlex.py"), chars, max_tokens)
    targets = [ed.InfillTarget("localcoder --engine remote", serve), ed.InfillTarget("llama-server /infill", direct)]
    results = ed.run_replay(targets, workloads, lambda: None)
    return [{"target": r.target, "workload": r.workload, **r.summary(), "load": os.getloadavg()} for r in results]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--remote", help="the llama-server behind localcoder serve --engine remote")
    p.add_argument("--serve", required=True, action="append",
                   help="localcoder serve --engine remote (repeat: several serves, interleaved in one run)")
    p.add_argument("--pid", type=int, action="append", default=[],
                   help="the process id of each --serve, in order: reports its CPU time per request")
    p.add_argument("--direct", help="a second llama-server on the same GGUF, for --typing")
    p.add_argument("--typing", action="store_true", help="the editor typing replay through both paths")
    p.add_argument("--chars", type=int, default=40, help="characters typed per replay (--typing)")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("-n", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens generated per round (1: the fixed cost)")
    args = p.parse_args()
    if args.typing:
        if not args.direct:
            p.error("--typing needs --direct URL (a second llama-server)")
        print(json.dumps(typing(args.serve[0], args.direct, chars=args.chars), indent=2))
    elif not args.remote:
        p.error("--remote URL is required (or --typing with --direct)")
    else:
        print(json.dumps(measure(args.remote, args.serve, args.model, args.n, args.max_tokens, pids=args.pid), indent=2))


if __name__ == "__main__":
    main()
