"""The acceptance experiment's measurements: the same held-out cases for every model, then paired stats.

    # one process per model (they can run side by side), each writes OUT/NAME.json
    python -m localcoder.distill.experiment score --name kd --model runs/exp/kd/model --splits runs/exp/kd/splits.json \\
        --out runs/exp/eval --n 300 --humaneval 100
    # table + paired bootstrap of every model against a baseline
    python -m localcoder.distill.experiment combine --out runs/exp/eval --a kd --b ce --b untrained
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def held_out_cases(splits: Path, n: int, seed: int = 0):
    from localcoder.eval.heldout import sample_cases

    test_files = json.loads(splits.read_text())["test"]
    return sample_cases(test_files, n, seed=seed, max_prefix_chars=1500, max_suffix_chars=400)


def score(args) -> int:
    import torch

    from localcoder.distill import evaluate
    from localcoder.distill.students import load_causal_lm
    from localcoder.engines.torch import HFTokenizer
    from localcoder.fim.formats import detect_format

    if args.threads:
        torch.set_num_threads(args.threads)
    model, hf_tok = load_causal_lm(args.model)
    model.eval()
    tok = HFTokenizer(hf_tok)
    fmt = detect_format(tok)
    res: dict = {"name": args.name, "model": args.model, "layers": model.config.num_hidden_layers,
                 "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    cases = held_out_cases(Path(args.splits), args.n, args.seed)
    budget = dict(max_prefix_tokens=args.prefix_tokens, max_suffix_tokens=args.suffix_tokens)
    r = evaluate.fim_generate(model, tok, fmt, cases, order=args.order, batch_size=args.batch_size, **budget)
    res["heldout"] = {"ids": [c.id for c in cases], "es": r.es, "em": r.em, "texts": r.texts, "seconds": r.seconds}
    print(f"[{args.name}] held-out n={len(cases)} ES={sum(r.es) / len(r.es):.4f} ({r.seconds:.0f} s)", file=sys.stderr)
    if args.humaneval:
        from localcoder.eval.humaneval_infill import load_tasks

        tasks = load_tasks(kind="single", limit=args.humaneval, seed=0)
        h = evaluate.fim_generate(model, tok, fmt, tasks, order=args.order, batch_size=args.batch_size, **budget)
        res["humaneval"] = {"ids": [c.id for c in tasks], "es": h.es, "em": h.em, "texts": h.texts, "seconds": h.seconds}
        print(f"[{args.name}] humaneval n={len(tasks)} ES={sum(h.es) / len(h.es):.4f}", file=sys.stderr)
    if not args.no_speed:
        res["speed"] = evaluate.speed(model, repeats=2)
    res["seconds"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res))
    return 0


def speed(args) -> int:
    """Prefill/decode tok/s of the scored models measured in one process, interleaved (round-robin over
    ``--repeats`` rounds, best of each), so the ratios between models share the machine's state."""
    import torch

    from localcoder.distill import evaluate
    from localcoder.distill.students import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    runs = {n: json.loads((out / f"{n}.json").read_text()) for n in args.name}
    models = {n: load_causal_lm(r["model"])[0].eval() for n, r in runs.items()}
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for n, m in models.items():
            s = evaluate.speed(m, prompt_len=args.prompt, decode=args.decode)
            b = best.setdefault(n, s)
            best[n] = {k: max(b[k], s[k]) for k in s}
    for n, r in runs.items():
        r["speed"] = best[n] | {"threads": torch.get_num_threads(), "prompt": args.prompt, "decode": args.decode}
        (out / f"{n}.json").write_text(json.dumps(r))
        print(f"{n}: prefill {best[n]['prefill_tok_s']:.1f} tok/s, decode {best[n]['decode_tok_s']:.2f} tok/s")
    return 0


def _mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def _bars(runs: dict, path: Path) -> None:
    """ES per model (held-out and HumanEval-1L side by side) as a bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.8))
    for i, split in enumerate(("heldout", "humaneval")):
        vals = [_mean(runs[n].get(split, {}).get("es", [])) for n in names]
        bars = ax.bar([x + 0.38 * i for x in range(len(names))], vals, width=0.38,
                      label={"heldout": "held-out", "humaneval": "HumanEval-1L"}[split])
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([x + 0.19 for x in range(len(names))], names)
    ax.set_ylabel("edit similarity")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def combine(args) -> int:
    from localcoder.eval.metrics import paired_bootstrap

    out = Path(args.out)
    runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
    teacher_es = _mean(runs[args.teacher]["heldout"]["es"]) if args.teacher in runs else None
    t_speed = runs.get(args.teacher, {}).get("speed", {})
    lines = ["| model | layers | held-out ES | held-out EM | HumanEval-1L ES | HumanEval-1L EM | prefill tok/s | "
             "decode tok/s | decode × teacher | % teacher ES |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        es = _mean(r["heldout"]["es"])
        he = r.get("humaneval", {})
        sp = r.get("speed", {})
        frac = f"{100 * es / teacher_es:.0f}%" if teacher_es else ""
        ratio = f"{sp['decode_tok_s'] / t_speed['decode_tok_s']:.2f}" if sp and t_speed else ""
        lines.append(f"| {name} | {r['layers']} | {es:.4f} | {_mean(r['heldout']['em']):.4f} | "
                     f"{_mean(he.get('es', [])):.4f} | {_mean(he.get('em', [])):.4f} | "
                     f"{sp.get('prefill_tok_s', float('nan')):.0f} | {sp.get('decode_tok_s', float('nan')):.1f} | "
                     f"{ratio} | {frac} |")
    lines.append("")
    for b in args.b:
        for split in ("heldout", "humaneval"):
            if split not in runs[args.a] or split not in runs[b]:
                continue
            assert runs[args.a][split]["ids"] == runs[b][split]["ids"], "cases differ between runs"
            d, lo, hi = paired_bootstrap(runs[args.a][split]["es"], runs[b][split]["es"])
            lines.append(f"- {split} ES {args.a} − {b}: {d:+.4f} (95% paired bootstrap CI {lo:+.4f} .. {hi:+.4f}, "
                         f"n={len(runs[b][split]['es'])})")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    _bars(runs, out / "summary.png")
    print(text)
    return 0


def depth(args) -> int:
    """Quality and speed against student depth: a table (depth.md) and a plot (depth.png) from score JSONs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    runs = sorted((json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "summary"),
                  key=lambda r: r["layers"])
    teacher = json.loads(Path(args.teacher).read_text()) if args.teacher else None
    t_es = _mean(teacher["heldout"]["es"]) if teacher else None
    t_dec = teacher.get("speed", {}).get("decode_tok_s") if teacher else None
    lines = ["| student | layers | params (M) | held-out ES | % teacher ES | HumanEval-1L ES | prefill tok/s | "
             "decode tok/s | decode × teacher |", "|---|---|---|---|---|---|---|---|---|"]
    rows = [teacher | {"name": "teacher"}] if teacher else []
    for r in rows + runs:
        es, sp = _mean(r["heldout"]["es"]), r.get("speed", {})
        frac = f"{100 * es / t_es:.0f}%" if t_es else ""
        ratio = f"{sp['decode_tok_s'] / t_dec:.2f}" if sp and t_dec else ""
        lines.append(f"| {r['name']} | {r['layers']} | {r['params'] / 1e6:.0f} | {es:.4f} | {frac} | "
                     f"{_mean(r.get('humaneval', {}).get('es', [])):.4f} | {sp.get('prefill_tok_s', float('nan')):.0f} | "
                     f"{sp.get('decode_tok_s', float('nan')):.1f} | {ratio} |")
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = [r["layers"] for r in runs]
    ax.plot(xs, [_mean(r["heldout"]["es"]) for r in runs], "o-", label="held-out ES")
    if all("humaneval" in r for r in runs):
        ax.plot(xs, [_mean(r["humaneval"]["es"]) for r in runs], "s-", label="HumanEval-1L ES")
    if t_es:
        ax.axhline(t_es, color="grey", ls="--", label=f"teacher held-out ES ({teacher['layers']} layers)")
    ax.set_xlabel("student layers (kept of the teacher's)")
    ax.set_ylabel("edit similarity")
    ax.set_xticks(xs)
    if all(r.get("speed") for r in runs):
        ax2 = ax.twinx()
        ax2.plot(xs, [r["speed"]["decode_tok_s"] for r in runs], "^:", color="tab:red", label="decode tok/s")
        ax2.set_ylabel("decode tok/s (torch, batch 1)", color="tab:red")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper left")
    ax.set_title("distilled student: quality and speed vs depth")
    fig.tight_layout()
    fig.savefig(out / "depth.png", dpi=120)
    return 0


def at_step(args) -> int:
    """An HF model directory from a run's checkpoint (init weights + the checkpoint's trainable tensors), to
    score two arms at an equal number of steps."""
    import torch

    from localcoder.distill.students import load_causal_lm

    run = Path(args.run)
    model, tok = load_causal_lm(run / "init")
    blob = torch.load(run / "checkpoints" / f"step-{args.step:07d}" / "state.pt", map_location="cpu", weights_only=False)
    _, unexpected = model.load_state_dict(blob["model"], strict=False)
    if unexpected:
        raise SystemExit(f"checkpoint tensors do not fit {run / 'init'}: {unexpected[:3]}")
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    print(f"{run} step {args.step}: {len(blob['model'])} tensors -> {args.out}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m localcoder.distill.experiment")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--name", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--splits", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--humaneval", type=int, default=0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--order", default="psm")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--threads", type=int, default=0)
    s.add_argument("--prefix-tokens", type=int, default=192)
    s.add_argument("--suffix-tokens", type=int, default=64)
    s.add_argument("--no-speed", action="store_true", help="skip speed (measure it later with `speed`, idle)")
    v = sub.add_parser("speed")
    v.add_argument("--out", required=True)
    v.add_argument("--name", action="append", required=True)
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--prompt", type=int, default=256)
    v.add_argument("--decode", type=int, default=32)
    d = sub.add_parser("depth")
    d.add_argument("--out", required=True, help="directory of score JSONs, one per depth")
    d.add_argument("--teacher", help="the teacher's score JSON")
    a = sub.add_parser("at-step")
    a.add_argument("run")
    a.add_argument("step", type=int)
    a.add_argument("out")
    c = sub.add_parser("combine")
    c.add_argument("--out", required=True)
    c.add_argument("--a", required=True)
    c.add_argument("--b", action="append", default=[])
    c.add_argument("--teacher", default="teacher")
    args = ap.parse_args(argv)
    return {"score": score, "speed": speed, "combine": combine, "depth": depth, "at-step": at_step}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
