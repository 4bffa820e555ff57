"""Quantization reports (markdown + JSON) and the machine facts they are read against:
memory read bandwidth (the decode bound) measured with numpy, CPU count, library versions."""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def measure_read_bandwidth(threads: int = 1, size_mb: int = 512, repeats: int = 3) -> float:
    """GB/s of streaming reads: ``threads`` workers each take the dot product of their own slice of a
    ``size_mb`` float32 array with itself (one read stream; BLAS releases the GIL). Best of ``repeats``."""
    a = np.ones(size_mb * (1 << 20) // 4, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = 0.0
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats + 1):  # the first round warms pages and threads
            t0 = time.perf_counter()
            list(pool.map(lambda p: float(np.dot(p, p)), parts))
            best = max(best, a.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def machine_info() -> dict:
    import importlib.metadata as md

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    return {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.machine(),
            "python": platform.python_version(),
            **{d: version(d) for d in ("torch", "transformers", "onnxruntime", "optimum-onnx", "llama-cpp-python",
                                       "gguf")}}


def _fmt(v, spec: str = "") -> str:
    if v is None:
        return "–"
    return format(v, spec) if spec else str(v)


def _mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.0f}"


def markdown(report: dict, title: str = "localcoder quantize report") -> str:
    """Markdown from a GateReport.to_dict()."""
    cfg = report["config"]
    lines = [f"# {title}", "",
             f"Gate: **{'PASSED' if report['passed'] else 'FAILED'}** — fails when ES drops > "
             f"{100 * cfg['threshold']:.1f} points, top-1 agreement < {cfg['min_top1']} or KL > {cfg['max_kl']} nats.",
             "",
             f"FIM cases: {cfg['n_humaneval']} HumanEval single-line + {cfg['n_heldout']} held-out lines "
             f"(seed {cfg['seed']}, greedy, cold cache); calibration: {cfg['calib_seqs']}×{cfg['calib_len']} tokens; "
             f"speed: {cfg['speed_prompt']}-token cold prefill, {cfg['speed_decode']} decoded tokens; "
             f"threads: {cfg['threads'] or 'all'}.",
             f"Read bandwidth measured with numpy: **{report['bandwidth_gb_s']:.1f} GB/s** "
             f"({report['machine'].get('cpus')} CPUs, load average {report['machine'].get('load_avg_1m', '?')} when "
             f"measured). Decode bound = bandwidth ÷ weight bytes per token.",
             "",
             "| artifact | size MB | weights/token MB | load s | prefill tok/s | decode tok/s | bound tok/s | "
             "of bound | KL | top-1 | ES | EM | pass@1 | ES drop (95% CI) | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in [report["source"], *report["artifacts"]]:
        ci = a.get("es_diff_ci")
        drop = "–" if a.get("es_drop") is None else (
            f"{100 * a['es_drop']:+.1f}" + (f" ({-100 * ci[1]:+.1f}..{-100 * ci[0]:+.1f})" if ci else ""))
        gate = "–" if a.get("passed") is None else ("pass" if a["passed"] else "FAIL: " + "; ".join(a["reasons"]))
        lines.append(
            f"| {a['label']} | {_mb(a['size_bytes'])} | {_mb(a['weight_bytes_per_token'])} | {a['load_s']:.1f} | "
            f"{a['prefill_tok_s']:.1f} | {a['decode_tok_s']:.1f} | {_fmt(a['bound_tok_s'])} | "
            f"{_fmt(a['bound_fraction'], '.0%')} | {_fmt(a['kl'], '.4f')} | {_fmt(a['top1'], '.3f')} | "
            f"{_fmt(a['es'], '.3f')} | {_fmt(a['em'], '.3f')} | {_fmt(a['pass_at_1'], '.3f')} | {drop} | {gate} |")
    lines += ["", "ES drop is source minus artifact in points (positive = worse), with the 95% paired bootstrap interval "
              "of that drop over the cases."]
    for key in ("prune", "sparsity"):
        if report.get(key):
            lines += ["", f"## {key}", "", "```json", json.dumps(report[key], indent=2), "```"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, base: str | os.PathLike, title: str = "localcoder quantize report") -> tuple[Path, Path]:
    """Write ``<base>.md`` and ``<base>.json``; returns both paths."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    md, js = base.with_name(base.name + ".md"), base.with_name(base.name + ".json")
    md.write_text(markdown(report, title), encoding="utf-8")
    js.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return md, js
