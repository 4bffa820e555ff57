"""`localcoder eval`: FIM quality of any model/engine in one harness."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from localcoder.cli import add_model_arguments, config_from_args

SUITES = ("humaneval-single", "humaneval-multi", "humaneval-partial", "heldout", "docstrings", "humaneval-function")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", action="append", choices=SUITES,
                   help="what to run (repeatable; default humaneval-single)")
    p.add_argument("--limit", type=int, help="sample N cases per suite (deterministic, --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", action="extend", nargs="+", default=[], help="source directories/files for held-out cases (several, or repeated)")
    p.add_argument("--heldout-kinds", default="line", help="comma list of line,partial,block")
    p.add_argument("--no-exec", action="store_true", help="skip running tests (no pass@1)")
    p.add_argument("--cold", action="store_true", help="no KV reuse between cases (cold latency)")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, help="override generated tokens per case")
    p.add_argument("--out", help="write JSON results here (humaneval-function: finished problems are kept in "
                                 "OUT.rows.jsonl as it runs; the same command resumes a killed run)")
    p.add_argument("--paired-healing", action="store_true",
                   help="run each suite again without token healing; print the paired ES difference (95%% CI)")
    p.add_argument("--baseline", metavar="FIELD=VALUE,...", action="append",
                   help="run each suite again with these settings changed (e.g. adapter=off,fim_order=psm) and "
                        "print the paired ES difference, this run minus the baseline (95%% CI); repeatable: "
                        "several baselines on the same cases (e.g. the stock model and the bigger one; with "
                        "two or more, the share of the ES gap from the first to each later one that this run "
                        "closes is printed too); cases=N runs a costly baseline on the first N cases only; "
                        "label=NAME names it on the ES-vs-latency chart")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    from localcoder.cliargs import add_dataclass_arguments
    from localcoder.config import CheckConfig

    add_dataclass_arguments(p.add_argument_group("humaneval-function (sampled + checked)"), CheckConfig,
                            exclude=("check",), overrides={"candidates": {"help": "samples per problem (default here: 10)"}})
    add_model_arguments(p)


def cases_for(suite: str, args: argparse.Namespace):
    from localcoder.errors import InvalidRequest
    from localcoder.eval import heldout, humaneval_infill

    if suite == "humaneval-partial":
        return humaneval_infill.load_partial_tasks(args.limit, args.seed)
    if suite.startswith("humaneval"):
        return humaneval_infill.load_tasks(suite.split("-")[1], args.limit, args.seed)
    if not args.data:
        raise InvalidRequest(f"the {suite} suite needs --data DIR (a directory of source files)", param="data")
    if suite == "docstrings":
        from localcoder.eval import docstrings

        return docstrings.sample_cases(args.data, args.limit or 100, args.seed)
    return heldout.sample_cases(args.data, args.limit or 200, args.seed, tuple(args.heldout_kinds.split(",")))


def run(args: argparse.Namespace) -> int:
    from localcoder.completion import Completer
    from localcoder.errors import InvalidRequest
    from localcoder.eval.runner import evaluate, table, write_reports

    if args.limit is not None and args.limit <= 0:
        raise InvalidRequest("--limit must be a positive number", param="limit")
    cfg = config_from_args(args)
    # every case is a new file, so the jump window would answer all of them: eval measures the full window
    # (the jump window's cost is a budget baseline: --baseline completion.prefix_tokens=256,... docs/latency.md)
    cfg.completion.jump_prefix_tokens = 0
    completer = Completer.from_config(cfg, pull=True, progress=not args.quiet)
    baselines = [(spec, baseline_completer(cfg, spec), baseline_cases(spec)) for spec in args.baseline or []]
    reports = []
    checked = []
    paired: list[dict] = []
    compared = []  # per suite: (this run's report and its baselines', their labels)
    for suite in args.suite or ["humaneval-single"]:
        if suite == "humaneval-function":  # sampled and execution-checked (localcoder.checked)
            from localcoder.eval.humaneval_function import run_suite

            checked.append(run_suite(completer, cfg, args))
            continue
        cases = cases_for(suite, args)
        reports.append(evaluate(completer, cases, execute=not args.no_exec, progress=not args.quiet, name=suite,
                                max_tokens=args.max_tokens, cold=args.cold))
        if args.paired_healing:
            reports.append(healing_off(completer, cases, suite, args, reports[-1]))
        ours = reports[-1]
        bases = []
        for spec, baseline, n_cases in baselines:
            bases.append(against_baseline(baseline, spec, cases[:n_cases], suite, args, ours, paired))
        reports.extend(bases)
        if bases:
            compared.append(([ours, *bases], [f"{cfg.model.model}, {completer.order} (this run)",
                                              *(baseline_label(spec, b.order) for spec, b, _ in baselines)]))
        paired.extend(gap_closed(suite, ours, [spec for spec, _, _ in baselines], bases))
    print(f"model: {cfg.model.model}  engine: {completer.engine.name}  format: {completer.format.name}"
          f"  order: {completer.order}", file=sys.stderr)
    if reports:
        print(table(reports))
    if completer.router is not None and reports:  # a specialist bundle: the cases by the specialist they went to
        from localcoder.eval.runner import specialist_table

        print(specialist_table(completer.router, reports, Path(args.out).with_suffix(".specialists.png")
                               if args.out else None))
    for group, labels in compared:  # the same cases through several models: ES against latency
        from localcoder.eval.runner import tradeoff

        png = Path(args.out).with_suffix(f".{group[0].name}.png") if args.out else None
        print(tradeoff(group, labels, png))
    for report in checked:
        print(report.table(cfg.model.model))
    if args.out:
        write_reports([*reports, *checked], Path(args.out), paired)
        if checked:
            from localcoder.eval.humaneval_function import rows_path

            rows_path(Path(args.out)).unlink(missing_ok=True)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def baseline_completer(cfg, spec: str):
    """A second Completer from ``cfg`` with ``field=value`` settings changed (any Config field)."""
    import copy

    from localcoder.completion import Completer

    changes = baseline_changes(spec)
    changes.pop("cases", None)
    changes.pop("label", None)
    other = copy.deepcopy(cfg).apply(changes)
    return Completer.from_config(other, pull=True)


def baseline_changes(spec: str) -> dict[str, str]:
    from localcoder.errors import InvalidRequest

    try:
        return dict(item.split("=", 1) for item in spec.split(",") if item)
    except ValueError:
        raise InvalidRequest(f"--baseline takes field=value pairs separated by commas, got {spec!r}",
                             param="baseline") from None


def baseline_label(spec: str, order: str) -> str:
    """A baseline's name on the ES-vs-latency chart: ``label=...`` in its spec (e.g. ``label=stock 0.5B``), else
    the spec and the prompt order it ran in."""
    return baseline_changes(spec).get("label") or f"{spec}, {order}"


def baseline_cases(spec: str) -> int | None:
    """``cases=N`` in a baseline spec: run that baseline on the first N cases only (None: all of them).
    Held-out and HumanEval samples grow by appending, so these N are also what ``--limit N`` draws."""
    from localcoder.errors import InvalidRequest

    value = baseline_changes(spec).get("cases")
    if value is None:
        return None
    if not value.isdigit() or int(value) <= 0:
        raise InvalidRequest(f"--baseline cases= takes a positive number of cases, got {value!r}", param="baseline")
    return int(value)


def against_baseline(baseline, spec: str, cases, suite: str, args: argparse.Namespace, report,
                     paired: list[dict] | None = None):
    """The same cases (or the first of them: ``cases=N``) through the baseline, and the paired ES (and EM)
    difference this run - baseline, printed and appended to ``paired``."""
    from localcoder.eval.metrics import paired_bootstrap
    from localcoder.eval.runner import evaluate

    base = evaluate(baseline, cases, execute=not args.no_exec, progress=not args.quiet,
                    name=f"{suite} (baseline: {spec}, order {baseline.order})", max_tokens=args.max_tokens,
                    cold=args.cold)
    ours = report.rows[:len(base.rows)]
    for metric in ("es", "em"):
        diff, lo, hi = paired_bootstrap([getattr(r, metric) for r in ours], [getattr(r, metric) for r in base.rows])
        print(f"{suite}: {metric.upper()} vs baseline {spec}: {diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}, n={len(cases)})",
              file=sys.stderr)
        if paired is not None:
            paired.append({"suite": suite, "baseline": spec, "metric": metric, "n": len(cases),
                           "diff": round(diff, 4), "ci95": [round(lo, 4), round(hi, 4)]})
    return base


def gap_closed(suite: str, report, specs: list[str], bases: list) -> list[dict]:
    """With two or more baselines, the first is the floor (the stock model) and each later one a ceiling
    (the bigger model): the share of the ES gap between them that this run closes, on the cases all three
    ran, printed with its 95% CI."""
    from localcoder.eval.metrics import gap_share

    out = []
    for spec, top in zip(specs[1:], bases[1:]):
        n = min(len(report.rows), len(bases[0].rows), len(top.rows))
        es = [[r.es for r in rows[:n]] for rows in (report.rows, bases[0].rows, top.rows)]
        share = gap_share(*es)
        means = " / ".join(f"{sum(x) / n:.3f}" for x in es)
        if share is None:
            print(f"{suite}: ES this run / {specs[0]} / {spec}: {means}, n={n}: {spec} is not above {specs[0]} "
                  "here, so there is no gap to close", file=sys.stderr)
            out.append({"suite": suite, "floor": specs[0], "ceiling": spec, "n": n, "gap_share": None})
            continue
        mid, lo, hi = share
        print(f"{suite}: this run closes {mid:.0%} (95% CI {lo:.0%}..{hi:.0%}) of the ES gap from {specs[0]} "
              f"to {spec} (ES {means}, n={n})", file=sys.stderr)
        out.append({"suite": suite, "floor": specs[0], "ceiling": spec, "n": n, "es": [round(sum(x) / n, 4) for x in es],
                    "gap_share": round(mid, 4),  # an unbounded end of the interval: null
                    "ci95": [None if math.isinf(x) else round(x, 4) for x in (lo, hi)]})
    return out


def healing_off(completer, cases, suite: str, args: argparse.Namespace, healed):
    """The same cases without token healing, and the paired ES difference healed - not healed."""
    from localcoder.eval.metrics import paired_bootstrap
    from localcoder.eval.runner import evaluate

    completer.token_healing = False
    try:
        plain = evaluate(completer, cases, execute=not args.no_exec, progress=not args.quiet,
                         name=f"{suite} (no healing)", max_tokens=args.max_tokens, cold=args.cold)
    finally:
        completer.token_healing = True
    diff, lo, hi = paired_bootstrap([r.es for r in healed.rows], [r.es for r in plain.rows])
    print(f"{suite}: token healing ES {diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}, n={len(cases)})", file=sys.stderr)
    return plain
