"""`localcoder eval`: FIM quality of any model/engine in one harness."""

from __future__ import annotations

import argparse
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
                        "several baselines on the same cases (e.g. the stock model and the bigger one)")
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
    baselines = [(spec, baseline_completer(cfg, spec)) for spec in args.baseline or []]
    reports = []
    checked = []
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
        for spec, baseline in baselines:
            reports.append(against_baseline(baseline, spec, cases, suite, args, ours))
    print(f"model: {cfg.model.model}  engine: {completer.engine.name}  format: {completer.format.name}"
          f"  order: {completer.order}", file=sys.stderr)
    if reports:
        print(table(reports))
    if completer.router is not None and reports:  # a specialist bundle: the cases by the specialist they went to
        from localcoder.eval.runner import specialist_table

        print(specialist_table(completer.router, reports, Path(args.out).with_suffix(".specialists.png")
                               if args.out else None))
    for report in checked:
        print(report.table(cfg.model.model))
    if args.out:
        write_reports([*reports, *checked], Path(args.out))
        if checked:
            from localcoder.eval.humaneval_function import rows_path

            rows_path(Path(args.out)).unlink(missing_ok=True)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def baseline_completer(cfg, spec: str):
    """A second Completer from ``cfg`` with ``field=value`` settings changed (any Config field)."""
    import copy

    from localcoder.completion import Completer
    from localcoder.errors import InvalidRequest

    try:
        changes = dict(item.split("=", 1) for item in spec.split(",") if item)
    except ValueError:
        raise InvalidRequest(f"--baseline takes field=value pairs separated by commas, got {spec!r}",
                             param="baseline") from None
    other = copy.deepcopy(cfg).apply(changes)
    return Completer.from_config(other, pull=True)


def against_baseline(baseline, spec: str, cases, suite: str, args: argparse.Namespace, report):
    """The same cases through the baseline, and the paired ES (and EM) difference this run - baseline."""
    from localcoder.eval.metrics import paired_bootstrap
    from localcoder.eval.runner import evaluate

    base = evaluate(baseline, cases, execute=not args.no_exec, progress=not args.quiet,
                    name=f"{suite} (baseline: {spec}, order {baseline.order})", max_tokens=args.max_tokens,
                    cold=args.cold)
    for metric in ("es", "em"):
        diff, lo, hi = paired_bootstrap([getattr(r, metric) for r in report.rows], [getattr(r, metric) for r in base.rows])
        print(f"{suite}: {metric.upper()} vs baseline {spec}: {diff:+.3f} (95% CI {lo:+.3f}..{hi:+.3f}, n={len(cases)})",
              file=sys.stderr)
    return base


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
