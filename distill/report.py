"""Run report: markdown summary + PNG curves (training loss, validation CE / KL / top-1) from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records); a resumed run's repeated steps keep the last record."""
    train: dict[int, dict] = {}
    val: dict[tuple, dict] = {}
    if not path.exists():
        return [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by kill -9
        if rec.get("split") == "val":
            val[(rec["step"], rec.get("final", False))] = rec
        elif "loss" in rec:
            train[rec["step"]] = rec
    return [train[k] for k in sorted(train)], [val[k] for k in sorted(val)]


def plot_curves(train: list[dict], val: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("ce", "kl", "top1_agree", "fim_es") if any(k in r for r in val)]
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4 * (1 + len(keys)), 3.2))
    axes = axes if hasattr(axes, "__len__") else [axes]
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set_title("training loss")
    axes[0].set_xlabel("step")
    for ax, k in zip(axes[1:], keys):
        pts = [(r["step"], r[k]) for r in val if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
        ax.set_title(f"validation {k}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def write_report(out: Path) -> Path:
    out = Path(out)
    train, val = read_metrics(out / "metrics.jsonl")
    prov_file = out / "model" / "localcoder.json"
    prov = json.loads(prov_file.read_text()) if prov_file.exists() else {}
    lines = [f"# Distillation report: {out.name}", ""]
    if prov:
        init = prov.get("student_init", {})
        lines += [f"- teacher: `{prov.get('teacher')}`",
                  f"- student init: {init.get('method')} from `{init.get('source')}`, layers kept {init.get('layers_kept')}",
                  f"- data: {prov.get('data', {}).get('describe')} (fingerprint {prov.get('data', {}).get('fingerprint')})",
                  f"- steps {prov.get('steps')}, loss tokens {prov.get('tokens'):,}, training time "
                  f"{prov.get('train_seconds')} s, stopped by: {prov.get('stopped')}", ""]
    if train:
        last = train[-1]
        lines += [f"Last training record: step {last['step']}, loss {last['loss']:.4f}, {last.get('tok_s')} tok/s", ""]
    if val:
        keys = [k for k in ("ce", "kl", "top1_agree", "fim_em", "fim_es") if any(k in r for r in val)]
        lines += ["| step | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in val:
            lines.append(f"| {r['step']}{' (final)' if r.get('final') else ''} | "
                         + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
        lines.append("")
    if train or val:
        plot_curves(train, val, out / "curves.png")
        lines += ["![curves](curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
