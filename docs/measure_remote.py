"""Overhead of ``localcoder serve --engine remote`` against a direct request to the same server.

    python docs/measure_remote.py --remote http://127.0.0.1:8080 --serve http://127.0.0.1:8765 -n 30

For each round: one ``POST /infill`` through localcoder (prompt built, tokenized, sent as token ids,
streamed back, stop rules applied), then one direct ``POST /v1/completions`` to the remote with the
same token prompt and ``max_tokens`` equal to the tokens localcoder's request generated (so both do
the same work; the prompt is cached by the remote after the first round in both paths). Reports p50
of each and the p50 of the per-round difference: the latency the remote path adds.

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


def measure(remote: str, serve: str, model: str = "qwen2.5-coder-0.5b", n: int = 30, max_tokens: int = 16,
            prefix: str = PREFIX, suffix: str = SUFFIX) -> dict[str, Any]:
    ids = token_prompt(model, prefix, suffix)
    body = {"input_prefix": prefix, "input_suffix": suffix, "n_predict": max_tokens, "temperature": 0}
    serve_ms, direct_ms, added = [], [], []
    # one connection per path; llama-server may close a keep-alive connection after a stream, so the
    # direct path asks for a fresh one each time (TCP on loopback: well under 1 ms)
    with httpx.Client(timeout=60) as http, httpx.Client(timeout=60, headers={"Connection": "close"}) as raw:
        predicted = max(1, int(http.post(f"{serve}/infill", json=body).json()["timings"]["predicted_n"]))
        path, direct_body = _direct_body(remote, raw, ids, predicted)

        def through() -> float:
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
        for i in range(n):  # alternate which path goes first, so neither always follows the other
            a, b = (through(), direct()) if i % 2 == 0 else tuple(reversed((direct(), through())))
            serve_ms.append(a)
            direct_ms.append(b)
            added.append(a - b)
    return {"n": n, "prompt_tokens": len(ids), "generated_tokens": predicted, "direct_endpoint": path,
            "p50_serve_ms": round(statistics.median(serve_ms), 2),
            "p50_direct_ms": round(statistics.median(direct_ms), 2),
            "p50_added_ms": round(statistics.median(added), 2), "load": os.getloadavg()}


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
    p.add_argument("--serve", required=True, help="localcoder serve --engine remote")
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
        print(json.dumps(typing(args.serve, args.direct, chars=args.chars), indent=2))
    elif not args.remote:
        p.error("--remote URL is required (or --typing with --direct)")
    else:
        print(json.dumps(measure(args.remote, args.serve, args.model, args.n, args.max_tokens), indent=2))


if __name__ == "__main__":
    main()
