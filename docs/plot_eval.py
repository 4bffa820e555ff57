"""Bar chart (PNG) of ``localcoder eval --out`` JSONs: EM, ES and pass@1 per report (the function suite:
greedy, sampled and checked pass@1, pass@10), next to each other (e.g. a run and its ``--baseline``, or
one file per model).

    python docs/plot_eval.py docs/layout-results/eval-0.5b.json   # writes eval-0.5b.png beside it
    python docs/plot_eval.py he-0.5b.json he-1.5b.json            # one chart, reports labelled by file
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


METRICS = ("em", "es", "pass_at_1", "pass_at_1_greedy", "pass_at_1_sampled", "pass_at_10_sampled",
           "pass_at_1_checked", "pass_at_1_codet_only", "pass_at_1_best_candidate")


def main(path: str, *more: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = {}
    for p in (path, *more):
        for name, report in json.loads(Path(p).read_text(encoding="utf-8")).items():
            if name == "paired":  # the paired differences `localcoder eval` printed, not a report
                continue
            reports[f"{Path(p).stem}: {name}" if more else name] = report
    names = list(reports)
    metrics = [m for m in METRICS if any(reports[n]["summary"].get(m) is not None for n in names)]
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(names), 4))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        values = [reports[n]["summary"].get(m) or 0.0 for n in names]
        bars = ax.bar([x + i * width for x in range(len(names))], values, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([x + width * (len(metrics) - 1) / 2 for x in range(len(names))])
    ax.set_xticklabels([n.replace(" (baseline: ", "\nbaseline: ").replace(", order", "\norder") +
                        f"\nn={reports[n]['summary']['n']}" for n in names], fontsize=7)
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:]))
