"""Checked completions: the candidates' and the test-writing sequences' decode, apart (two batched calls, one
after the other, as before 2026-12-04) and together (one batched call, ``sample_groups``), interleaved per
HumanEval problem in one process on one loaded engine; then the whole ``check`` (execution included).

    python docs/measure_checked.py --limit 10 --seed 1 --candidates 8 --tests 8
    python docs/measure_checked.py --limit 16 --seed 1 --compare-straggler   # check with the straggler cut
        off (factor 0) and at the default, alternating per problem: seconds, stragglers cut, and whether the
        top-ranked candidate passes the problem's hidden tests (HumanEval's own check) in each

Prints per problem and the medians (seconds), JSON with --out. Say the machine's load next to any number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

from localcoder.checked import CheckOptions, candidates_group, check, require_function, sample_groups, tests_group
from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import CancelToken
from localcoder.eval.humaneval_function import load_problems


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--tests", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-straggler", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    cfg = Config()
    cfg.apply({"model": args.model, "threads": args.threads})
    completer = Completer.from_config(cfg, pull=True)
    opts = CheckOptions.from_config(cfg.check)
    opts.candidates, opts.tests = args.candidates, args.tests
    if args.compare_straggler:
        return compare_straggler(completer, opts, args)
    rows = []
    for i, p in enumerate(load_problems(args.limit, args.seed)):
        req = InfillRequest(p["prompt"], "", path=f"{p['entry_point']}.py", mode="multi", max_tokens=opts.max_tokens)
        fn = require_function(req.prefix, req.suffix)

        def groups():  # fresh stop-rule state for every call
            cand = candidates_group(completer, req, opts)[0]
            writing = tests_group(completer, req, fn, opts)
            return cand, writing[0] if writing else None

        def apart():
            cand, tests = groups()
            sample_groups(completer.engine, [cand], CancelToken())
            if tests is not None:
                sample_groups(completer.engine, [tests], CancelToken())

        def together():
            cand, tests = groups()
            sample_groups(completer.engine, [cand] + ([tests] if tests is not None else []), CancelToken())

        cand, _ = groups()  # untimed: the problem's prompt into the cache, so neither order pays its prefill
        sample_groups(completer.engine, [dataclasses.replace(cand, n=1, max_tokens=1)], CancelToken())
        order = [("apart", apart), ("together", together)]
        times = dict((name, timed(f)) for name, f in (order if i % 2 == 0 else order[::-1]))
        times["check"] = timed(lambda: check(completer, req, opts))
        rows.append({"id": p["task_id"], **{k: round(v, 2) for k, v in times.items()}})
        print(json.dumps(rows[-1]), flush=True)
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in ("apart", "together", "check")}
    result = {"model": args.model, "n": len(rows), "N": args.candidates, "M": args.tests, "median_s": med,
              "ratio_together_over_apart": round(statistics.median(r["together"] / r["apart"] for r in rows), 3),
              "rows": rows, "load": os.getloadavg()}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


def compare_straggler(completer, opts: CheckOptions, args) -> None:
    from localcoder.eval.humaneval_function import hidden_test
    from localcoder.eval.sandbox import run_program

    rows = []
    variants = [("off", dataclasses.replace(opts, straggler=0.0)), ("cut", opts)]
    for i, p in enumerate(load_problems(args.limit, args.seed)):
        req = InfillRequest(p["prompt"], "", path=f"{p['entry_point']}.py", mode="multi", max_tokens=opts.max_tokens)
        cand = candidates_group(completer, req, opts)[0]  # untimed: the prompt into the cache
        sample_groups(completer.engine, [dataclasses.replace(cand, n=1, max_tokens=1)], CancelToken())
        row = {"id": p["task_id"]}
        for name, o in (variants if i % 2 == 0 else variants[::-1]):
            t0 = time.perf_counter()
            out = check(completer, req, o)
            row[name] = round(time.perf_counter() - t0, 2)
            top = out.candidates[0].text if out.candidates else ""
            row[f"{name}_pass"] = run_program(hidden_test(p, top), 10.0).passed
            row[f"{name}_cut"] = len(out.evidence.get("stragglers_cut", []))
        rows.append(row)
        print(json.dumps(row), flush=True)
    med = {k: round(statistics.median(r[k] for r in rows), 2) for k in ("off", "cut")}
    result = {"model": args.model, "n": len(rows), "N": opts.candidates, "M": opts.tests, "straggler": opts.straggler,
              "median_s": med, "ratio_cut_over_off": round(statistics.median(r["cut"] / r["off"] for r in rows), 3),
              "pass_off": sum(r["off_pass"] for r in rows), "pass_cut": sum(r["cut_pass"] for r in rows),
              "rows": rows, "load": os.getloadavg()}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
