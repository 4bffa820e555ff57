"""Greedy whole-function HumanEval pass@1 of the default config under several ``gguf_type`` values,
interleaved per problem (the order alternates), paired bootstrap of each against the first.

    python docs/measure_weight_types.py iq4_nl,original [LIMIT] [OUT.json]

docs/latency.md, "The weight type served": IQ4_NL 0.341 vs the shipped weights 0.439 on all 164.
"""

from __future__ import annotations

import json
import sys
import time

from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.eval.humaneval_function import hidden_test, load_problems
from localcoder.eval.metrics import paired_bootstrap
from localcoder.eval.sandbox import run_program


def main(arms: list[str], limit: int | None, out: str) -> None:
    completers = {}
    for arm in arms:
        cfg = Config()
        cfg.model.threads, cfg.model.gguf_type, cfg.completion.jump_prefix_tokens = 2, arm, 0
        completers[arm] = Completer.from_config(cfg, pull=True, progress=False)
    rows = []
    for i, p in enumerate(load_problems(limit)):
        req = InfillRequest(p["prompt"], "", path=f"{p['entry_point']}.py", mode="multi", max_tokens=256)
        row = {"id": p["task_id"]}
        for arm in arms if i % 2 == 0 else arms[::-1]:
            t0 = time.perf_counter()
            r = completers[arm].complete(req)
            row[arm] = {"pass": run_program(hidden_test(p, r.text), 10.0).passed,
                        "ms": round((time.perf_counter() - t0) * 1000, 1), "tokens": r.timings.predicted_n, "text": r.text}
        rows.append(row)
        print(i, row["id"], {a: row[a]["pass"] for a in arms}, flush=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=1)
    first = [float(r[arms[0]]["pass"]) for r in rows]
    for arm in arms[1:]:
        other = [float(r[arm]["pass"]) for r in rows]
        diff, lo, hi = paired_bootstrap(first, other)
        print(f"{arms[0]} {sum(first) / len(rows):.3f} vs {arm} {sum(other) / len(rows):.3f}: "
              f"{diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}), n={len(rows)}")


if __name__ == "__main__":
    main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else None,
         sys.argv[3] if len(sys.argv) > 3 else "weight-types.json")
