"""Greedy whole-function HumanEval pass@1 of the default config under several ``gguf_type`` values or kernel
sets, interleaved per problem (the order alternates), paired bootstrap of each against the first.

    python docs/measure_weight_types.py iq4_nl,original [LIMIT] [OUT.json]
    python docs/measure_weight_types.py kernels=avx512,kernels=portable [LIMIT] [OUT.json]

An arm is a ``gguf_type`` value or ``FIELD=VALUE[+FIELD=VALUE]`` of ModelConfig, e.g.
``model=qwen2.5-coder-1.5b+speculation=off`` (docs/latency.md, "The 1.5B in the editor replay"). Each arm
runs in its own worker process (llama.cpp's libraries load once per process, so kernel sets cannot share
one), one problem at a time: the arms never run side by side, and each problem's timings are comparable.

docs/latency.md, "The weight type served": IQ4_NL 0.341 vs the shipped weights 0.439 on all 164;
"What the portable build costs": the AVX-512 kernels against the portable ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time


def worker(arm: str) -> None:
    from localcoder.completion import Completer, InfillRequest
    from localcoder.config import Config
    from localcoder.eval.humaneval_function import hidden_test, load_problems
    from localcoder.eval.sandbox import run_program

    cfg = Config()
    cfg.model.threads, cfg.completion.jump_prefix_tokens = 2, 0
    for setting in arm.split("+"):
        field, _, value = setting.rpartition("=")
        setattr(cfg.model, field or "gguf_type", value)
    completer = Completer.from_config(cfg, pull=True, progress=False)
    problems = load_problems(None)
    print(json.dumps({"ready": getattr(completer.engine, "weights", {})}), flush=True)
    for line in sys.stdin:
        p = problems[int(line)]
        req = InfillRequest(p["prompt"], "", path=f"{p['entry_point']}.py", mode="multi", max_tokens=256)
        t0 = time.perf_counter()
        r = completer.complete(req)
        t = r.timings
        print(json.dumps({"pass": run_program(hidden_test(p, r.text), 10.0).passed,
                          "ms": round((time.perf_counter() - t0) * 1000, 1), "tokens": t.predicted_n, "text": r.text,
                          "prompt_tok_s": round(t.prompt_n / t.prompt_ms * 1000, 1) if t.prompt_ms else None,
                          "decode_tok_s": round(t.predicted_n / t.predicted_ms * 1000, 1) if t.predicted_ms else None}),
              flush=True)


def main(arms: list[str], limit: int | None, out: str) -> None:
    from localcoder.eval.humaneval_function import load_problems
    from localcoder.eval.metrics import paired_bootstrap

    procs = {arm: subprocess.Popen([sys.executable, __file__, "--worker", arm], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True) for arm in arms}
    served = {arm: json.loads(p.stdout.readline())["ready"] for arm, p in procs.items()}
    print(served, flush=True)
    rows = []
    for i, p in enumerate(load_problems(limit)):
        row = {"id": p["task_id"]}
        for arm in arms if i % 2 == 0 else arms[::-1]:
            procs[arm].stdin.write(f"{int(p['task_id'].split('/')[1])}\n")
            procs[arm].stdin.flush()
            row[arm] = json.loads(procs[arm].stdout.readline())
        rows.append(row)
        print(i, row["id"], {a: row[a]["pass"] for a in arms}, flush=True)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()
    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"served": served, "rows": rows}, fh, indent=1)
    first = [float(r[arms[0]]["pass"]) for r in rows]
    for arm in arms[1:]:
        other = [float(r[arm]["pass"]) for r in rows]
        diff, lo, hi = paired_bootstrap(first, other)
        same = sum(r[arm]["text"] == r[arms[0]]["text"] for r in rows)
        print(f"{arms[0]} {sum(first) / len(rows):.3f} vs {arm} {sum(other) / len(rows):.3f}: "
              f"{diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}), n={len(rows)}; identical bodies {same}")
    for arm in arms:
        for key in ("prompt_tok_s", "decode_tok_s"):
            vals = sorted(r[arm][key] for r in rows if r[arm][key])
            print(f"{arm} {key} median {vals[len(vals) // 2] if vals else '-'}")


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main(sys.argv[1].split(","), int(sys.argv[2]) if len(sys.argv) > 2 else None,
             sys.argv[3] if len(sys.argv) > 3 else "weight-types.json")
