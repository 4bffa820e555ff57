"""Bar chart (PNG) of an ``localcoder eval --out`` JSON: EM, ES and pass@1 per report, next to each
other (e.g. a run and its ``--baseline``).

    python docs/plot_eval.py docs/layout-results/eval-0.5b.json   # writes eval-0.5b.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = json.loads(Path(path).read_text(encoding="utf-8"))
    names = list(reports)
    metrics = [m for m in ("em", "es", "pass_at_1") if any(reports[n]["summary"].get(m) is not None for n in names)]
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
    print(main(sys.argv[1]))
