"""Run a Completer over FIM cases: EM, ES (or BLEU), pass@1 by executing tests, latency."""

from __future__ import annotations

import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from localcoder.completion import Completer, InfillRequest
from localcoder.eval import metrics
from localcoder.eval.humaneval_infill import program
from localcoder.eval.sandbox import run_program
from localcoder.eval.tasks import FimCase


@dataclass
class Row:
    id: str
    em: float
    es: float
    passed: bool | None
    latency_ms: float
    prompt_tokens: int
    cached_tokens: int
    stop_type: str
    text: str
    reference: str
    specialist: str | None = None  # a specialist bundle: the adapter the case was routed to
    route_ms: float = 0.0  # its routing time (0: the file was routed before, sticky)


@dataclass
class EvalReport:
    name: str
    rows: list[Row] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        rows = self.rows
        if not rows:
            return {"name": self.name, "n": 0}
        executed = [r.passed for r in rows if r.passed is not None]
        return {
            "name": self.name,
            "n": len(rows),
            "em": round(statistics.fmean(r.em for r in rows), 4),
            "es": round(statistics.fmean(r.es for r in rows), 4),
            "pass_at_1": round(statistics.fmean(executed), 4) if executed else None,
            "median_latency_ms": round(statistics.median(r.latency_ms for r in rows), 1),
            "p95_latency_ms": round(sorted(r.latency_ms for r in rows)[int(0.95 * (len(rows) - 1))], 1),
            "mean_prompt_tokens": round(statistics.fmean(r.prompt_tokens for r in rows), 1),
        }

    def to_json(self) -> dict:
        return {"summary": self.summary, "rows": [asdict(r) for r in self.rows]}


def evaluate(completer: Completer, cases: Sequence[FimCase], *, execute: bool = True, progress: bool = True,
             name: str = "eval", max_tokens: int | None = None, cold: bool = False,
             timeout_s: float = 10.0) -> EvalReport:
    """Complete every case (greedy), score it, and run its test (if any) in the sandbox.
    ``cold`` evaluates every prompt from scratch (no KV reuse between cases)."""
    from tqdm import tqdm

    report = EvalReport(name)
    pool = ThreadPoolExecutor(max_workers=2)
    pending = []
    for case in tqdm(cases, desc=name, unit="case", disable=not progress, dynamic_ncols=True):
        req = InfillRequest(case.prefix, case.suffix, path=case.path, language=case.language, mode=case.mode,
                            max_tokens=max_tokens or (48 if case.mode == "single" else 160),
                            stop=('"""', "'''") if case.metric == "bleu" else (), cache_prompt=not cold)
        t0 = time.perf_counter()
        result = completer.complete(req)
        latency = (time.perf_counter() - t0) * 1000
        score = metrics.bleu if case.metric == "bleu" else metrics.edit_similarity
        row = Row(case.id, metrics.exact_match(result.text, case.reference), score(result.text, case.reference),
                  None, latency, result.prompt_tokens, result.tokens_cached, result.stop_type, result.text,
                  case.reference, result.timings.specialist, result.timings.route_ms)
        report.rows.append(row)
        if execute and case.test:
            pending.append((row, pool.submit(run_program, program(case, result.text), timeout_s)))
    for row, fut in pending:
        row.passed = fut.result().passed
    pool.shutdown()
    return report


def write_reports(reports: Sequence[EvalReport], out: Path, paired: Sequence[dict] = ()) -> None:
    """``{report name: summary and rows}``, plus ``paired``: the paired differences and gap shares printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {r.name: r.to_json() for r in reports}
    if paired:
        body["paired"] = list(paired)
    out.write_text(json.dumps(body, indent=2), encoding="utf-8")


def table(reports: Sequence[EvalReport]) -> str:
    head = ("| suite | n | EM | ES (BLEU for docstrings) | pass@1 | median latency | p95 latency | prompt tokens |\n"
            "|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in reports:
        s = r.summary
        if not s["n"]:
            continue
        p = "–" if s["pass_at_1"] is None else f"{s['pass_at_1']:.3f}"
        lines.append(f"| {s['name']} | {s['n']} | {s['em']:.3f} | {s['es']:.3f} | {p} | "
                     f"{s['median_latency_ms'] / 1000:.2f} s | {s['p95_latency_ms'] / 1000:.2f} s | {s['mean_prompt_tokens']:.0f} |")
    return "\n".join(lines)


def specialist_table(router, reports: Sequence[EvalReport], png: Path | None = None) -> str:
    """ES per specialist (the one each case of the first report, a bundle's run, was routed to) for every
    report on the same cases (its baselines), routing time and adapter size; a grouped bar chart to ``png``."""
    ours = reports[0]
    same = [r for r in reports if [x.id for x in r.rows] == [x.id for x in ours.rows]]
    names = router.names
    groups = {n: [i for i, row in enumerate(ours.rows) if row.specialist == n] for n in names}
    routed = [row.route_ms for row in ours.rows if row.route_ms > 0]
    lines = ["| specialist | cases | adapter MB | " + " | ".join(f"ES {r.name}" for r in same) + " |",
             "|---|---:|---:|" + "---:|" * len(same)]
    per: dict[str, list[float]] = {r.name: [] for r in same}
    for spec, name in zip(router.bundle.specialists, names):
        idx = groups[name]
        cells = []
        for r in same:
            es = statistics.fmean(r.rows[i].es for i in idx) if idx else float("nan")
            per[r.name].append(es)
            cells.append(f"{es:.3f}" if idx else "–")
        lines.append(f"| {name} | {len(idx)} | {spec.adapter.stat().st_size / 1e6:.1f} | " + " | ".join(cells) + " |")
    med = statistics.median(routed) if routed else 0.0
    lines.append(f"\nrouting: {len(routed)} documents routed, median {med:.2f} ms (the other cases were sticky: 0 ms)")
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        w = 0.8 / max(len(same), 1)
        for j, r in enumerate(same):
            ax.bar([i + j * w for i in range(len(names))], per[r.name], w, label=r.name[:40])
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(names))],
                      [f"{n} (n={len(groups[n])})" for n in names])
        ax.set_ylabel("ES")
        ax.set_title("ES per specialist (cases by the specialist they were routed to)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        plt.close(fig)
    return "\n".join(lines)


def tradeoff(reports: Sequence[EvalReport], labels: Sequence[str], png: Path | None = None) -> str:
    """ES against median latency for reports on the same cases (a run and its baselines, e.g. every preset's
    model beside the stock ones): a table and a scatter plot to ``png``. Only the cases every report ran count
    (a costly baseline may have run the first N: ``cases=N``), so each point is the same cases. The ES bars
    are 95% bootstrap intervals of each mean; the paired differences are what to compare models by."""
    ids = set.intersection(*({row.id for row in r.rows} for r in reports))
    points = []
    for r, label in zip(reports, labels):
        rows = [row for row in r.rows if row.id in ids]
        es = [row.es for row in rows]
        _, lo, hi = metrics.paired_bootstrap(es, [0.0] * len(es))
        points.append((label, statistics.median(row.latency_ms for row in rows), statistics.fmean(es), lo, hi))
    lines = [f"ES and median latency on the {len(ids)} cases every model ran:", "",
             "| model | median latency (ms) | ES (95% CI) |", "|---|---:|---|"]
    lines += [f"| {label} | {ms:.0f} | {es:.3f} ({lo:.3f}..{hi:.3f}) |" for label, ms, es, lo, hi in points]
    if png is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
        placed: list[tuple[float, float]] = []
        for label, ms, es, lo, hi in points:
            ax.errorbar([ms], [es], yerr=[[es - lo], [hi - es]], fmt="o", capsize=3, label=label[:60])
            short = label.split(",")[0].removeprefix("model=")[:36]  # the model's name; the legend has the rest
            # near the right edge: the name to the left of its point (inside the axes); a point next to ones
            # already named gets its name a line lower for each of them instead of on top of theirs
            near = sum(abs(ms - x) < 0.2 * span_x and abs(es - y) < 0.1 * span_y for x, y in placed)
            dy = 4 - 12 * near
            placed.append((ms, es))
            right = ms > max(xs) - 0.3 * span_x
            ax.annotate(short, (ms, es), textcoords="offset points", xytext=(-5 if right else 5, dy), fontsize=7,
                        ha="right" if right else "left")
        ax.set_xlabel("median latency of a completion (ms; the whole prompt, as in a cold file)")
        ax.set_ylabel("ES (mean, 95% CI)")
        ax.set_title(f"{reports[0].name}: ES against latency, the same {len(ids)} cases")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        png.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png, dpi=110)
        plt.close(fig)
    return "\n".join(lines)
