"""What one llama.cpp forward of n tokens costs after a 600-token context, per model: the price of
verifying a speculative draft of n - 1 tokens (and of a draft model's own steps).

    python docs/measure_verify_cost.py qwen2.5-coder-1.5b qwen2.5-coder-0.5b

Medians of 2-3 repetitions per n, milliseconds, 2 threads. Say the machine's load next to any number.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import llama_cpp

from localcoder import models


def main() -> None:
    text = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py"), encoding="utf-8").read()
    for name in sys.argv[1:] or ["qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"]:
        llm = llama_cpp.Llama(str(models.resolve(name, pull_if_missing=True).path), n_ctx=2048, n_threads=2,
                              n_batch=512, logits_all=True, verbose=False)
        ids = llm.tokenize(text.encode())[:600]
        llm.eval(ids)
        base = llm.n_tokens
        times: dict[int, list[float]] = {}
        for n in (1, 2, 4, 8, 1, 2, 4, 8, 1, 4, 8):
            t = time.perf_counter()
            llm.eval(ids[100 : 100 + n])  # logits for every position, as a verify batch needs
            times.setdefault(n, []).append((time.perf_counter() - t) * 1000)
            llm.n_tokens = base
            llm._ctx.kv_cache_seq_rm(-1, base, -1)  # back to the context alone
        print(name, {n: round(statistics.median(v), 1) for n, v in sorted(times.items())},
              "ms; load", round(os.getloadavg()[0], 2))


if __name__ == "__main__":
    main()
