"""K specialists vs one adapter vs none, on the same held-out cases (docs/specialists.md).

    python docs/measure_specialists.py --bundle runs/mix-spec --k1-adapter runs/mix-k1/adapter.gguf \\
        --limit 60 --out docs/bench-results/specialists-2026-12-05

The held-out files are the run's own test split (``splits.json``: no file of it was trained on). Variants,
each greedy through the product's ``Completer`` (llama.cpp, the packaged 0.5B Q4_K_M, its served order):
``base`` (the packaged model with its shipped layout adapter), ``k1`` (one adapter trained on all rows, the
adapt preset with the same rows and teacher cache), ``specialists`` (the bundle, routed and sticky per file
as ``serve`` does it) and ``forced-s<j>`` (every case with specialist j: the oracle router's raw material).
Writes <out>.json, <out>.md (tables, paired CIs) and <out>.png (ES per routed cluster for each variant).

It also measures which embedding routes better (``--compare-embeddings``): TF-IDF over code tokens (what
the bundle ships) against mean-pooled last hidden states of the base model itself, with centroids of the
same clusters; "better" = the mean ES of the specialists it picks, and its agreement with the oracle (the
specialist with the higher ES) on the cases where the specialists differ.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def completer(**changes):
    from localcoder.completion import Completer
    from localcoder.config import Config

    return Completer.from_config(Config().apply(changes), pull=False)


def run_variant(name: str, comp, cases) -> dict:
    from localcoder.eval.runner import evaluate

    t0 = time.perf_counter()
    rep = evaluate(comp, cases, execute=False, progress=True, name=name)
    comp.engine.close()
    return {"name": name, "es": [r.es for r in rep.rows], "em": [r.em for r in rep.rows],
            "latency_ms": [r.latency_ms for r in rep.rows], "seconds": round(time.perf_counter() - t0, 1)}


def paired(a: list[float], b: list[float]) -> tuple[float, float, float]:
    from localcoder.eval.metrics import paired_bootstrap

    return paired_bootstrap(a, b)


def hidden_router(bundle_dir: Path, texts_train: list[str], labels: np.ndarray, texts_cases: list[str], k: int):
    """Nearest centroid of mean-pooled last hidden states (the base model, HF weights), same clusters."""
    import torch
    import transformers

    from localcoder.models import hf_cache_path

    path = hf_cache_path("qwen2.5-coder-0.5b")
    tok = transformers.AutoTokenizer.from_pretrained(str(path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def embed(texts):
        out = []
        with torch.no_grad():
            for t in texts:
                ids = tok(t, return_tensors="pt", truncation=True, max_length=512)["input_ids"]
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                v = h.mean(0).numpy()
                out.append(v / np.linalg.norm(v))
        return np.stack(out)

    t0 = time.perf_counter()
    xt = embed(texts_train)
    cent = np.stack([xt[labels == j].mean(0) for j in range(k)])
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    t1 = time.perf_counter()
    xc = embed(texts_cases)
    per_case_ms = (time.perf_counter() - t1) * 1000 / max(len(texts_cases), 1)
    return np.argmax(xc @ cent.T, axis=1), per_case_ms, t1 - t0


def train_texts(bundle_dir: Path, n_rows: int) -> list[str]:
    """The run's training rows from the tokenized cache (the newest train-*.npz with the run's rows)."""
    import transformers

    from localcoder.distill.specialists import row_texts
    from localcoder.models import hf_cache_path, home

    cfg = json.loads((bundle_dir / "bundle.json").read_text())["provenance"]["config"]
    cache = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else home() / "distill-cache"
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_cache_path("qwen2.5-coder-1.5b")))
    for f in sorted(cache.glob("train-*.npz"), key=lambda p: p.stat().st_mtime, reverse=True):
        with np.load(f) as z:
            if len(z["t"]) >= n_rows and z["t"].shape[1] == cfg["seq_len"]:
                class P:  # noqa: D401 - the one field row_texts reads
                    teacher_ids = z["t"][:n_rows]
                return row_texts(tok, P)
    raise SystemExit(f"no tokenized training rows in {cache}")


def heldout_files(bdir: Path, texts: list[str]) -> tuple[list[str], dict]:
    """Files no training row saw: the run's test and validation splits, plus training-split files that none
    of the rows the run trained on contains (checked line by line against the decoded rows: a file with more
    than 2% of its lines in them is dropped)."""
    from localcoder.distill import data as D
    from localcoder.distill.config import DistillConfig
    from localcoder.distill.dedup import dedup

    cfg = DistillConfig(**json.loads((bdir / "config.json").read_text())) if (bdir / "config.json").exists() else None
    if cfg is None:
        cfg = DistillConfig(**json.loads((bdir / "bundle.json").read_text())["provenance"]["config"])
    splits = json.loads((bdir / "splits.json").read_text())
    files, _ = dedup(D.walk_corpus(cfg.data, max_bytes=cfg.max_file_bytes).files, near=cfg.near_dedup)
    train = D.split_by_file(files, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.seed)["train"]
    seen = set()
    for t in texts:
        seen.update(line.strip() for line in t.splitlines() if len(line.strip()) >= 25)
    extra, dropped = [], []
    for f in train:
        lines = [line.strip() for line in f.text.splitlines() if len(line.strip()) >= 25]
        share = sum(line in seen for line in lines) / max(len(lines), 1)
        (extra if share <= 0.02 else dropped).append(str(f.path))
    out = list(splits["test"]) + list(splits["val"]) + extra
    return out, {"test": len(splits["test"]), "val": len(splits["val"]), "unseen_train_split": len(extra),
                 "seen_train_split": len(dropped)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="the specialists run's output directory")
    ap.add_argument("--k1-adapter", required=True, help="adapter.gguf of the plain adapt run on the same rows")
    ap.add_argument("--limit", type=int, default=60)
    ap.add_argument("--kinds", default="line,block")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-embeddings", action="store_true")
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()

    from localcoder.eval.heldout import sample_cases
    from localcoder.specialists import Router, load_bundle, routing_text

    bdir = Path(args.bundle)
    bundle = load_bundle(bdir)
    k = len(bundle)
    texts = train_texts(bdir, len(json.loads((bdir / "clusters.json").read_text())["labels"]))
    test_files, held = heldout_files(bdir, texts)
    # the same number of cases for each specialist: files grouped by the specialist their text routes to
    by_spec: dict[int, list[str]] = {}
    for f in test_files:
        text = Path(f).read_text(encoding="utf-8", errors="replace")
        by_spec.setdefault(Router(bundle).nearest(routing_text(f, text[:4000], ""))[0], []).append(f)
    cases = []
    for j in range(k):
        if by_spec.get(j):
            cases += sample_cases(by_spec[j], args.limit // k, args.seed, tuple(args.kinds.split(",")))
    router = Router(bundle)
    route_ms, routed = [], []
    for c in cases:  # sticky per file, as serving routes
        idx, ms = router.route(c.path, c.path, c.prefix, c.suffix)
        routed.append(idx)
        if ms:
            route_ms.append(ms)
    cold = [Router(bundle).route(None, c.path, c.prefix, c.suffix)[1] for c in cases]
    print(f"{len(cases)} cases from {len(test_files)} held-out files; routed {np.bincount(routed, minlength=k)}",
          file=sys.stderr)

    name = json.loads((bdir / "bundle.json").read_text())
    reg = name["provenance"]["config"].get("register_as") or bdir.resolve().name
    variants = [("base", dict(model="qwen2.5-coder-0.5b", specialists="off")),
                ("k1", dict(model="qwen2.5-coder-0.5b", adapter=args.k1_adapter, specialists="off")),
                ("specialists", dict(model=reg))]
    variants += [(f"forced-s{j}", dict(model="qwen2.5-coder-0.5b", adapter=str(s.adapter), specialists="off"))
                 for j, s in enumerate(bundle.specialists)]
    results = {}
    for vname, changes in variants:
        results[vname] = run_variant(vname, completer(**changes), cases)
    kinds = [c.mode for c in cases]
    forced = np.array([results[f"forced-s{j}"]["es"] for j in range(k)])  # (k, n)
    rep: dict = {"cases": len(cases), "held_out_files": len(test_files), "held_out": held, "k": k,
                 "files_per_specialist": {j: len(v) for j, v in by_spec.items()},
                 "routed_counts": np.bincount(routed, minlength=k).tolist(),
                 "route_ms_median": statistics.median(cold), "route_ms_sticky_median": 0.0,
                 "adapter_mb": [round(s.adapter.stat().st_size / 1e6, 2) for s in bundle.specialists],
                 "variants": {v: {"es": float(np.mean(r["es"])), "em": float(np.mean(r["em"])),
                                  "median_latency_ms": statistics.median(r["latency_ms"]), "seconds": r["seconds"]}
                              for v, r in results.items()}}
    # routing actually served must equal the forced specialist on every case (same greedy output)
    served = np.array(results["specialists"]["es"])
    rep["served_equals_forced"] = float(np.mean(np.isclose(served, forced[routed, np.arange(len(cases))])))
    comps = [("specialists", "k1"), ("specialists", "base"), ("k1", "base")]
    rep["paired"] = {}
    for kind in ("all", "single", "multi"):
        idx = [i for i, m in enumerate(kinds) if kind == "all" or m == kind]
        if not idx:
            continue
        for a, b in comps:
            for metric in ("es", "em"):
                d = paired([results[a][metric][i] for i in idx], [results[b][metric][i] for i in idx])
                rep["paired"][f"{kind}:{metric}:{a}-{b}"] = {"diff": d[0], "lo": d[1], "hi": d[2], "n": len(idx)}
    oracle = forced.max(0)
    rep["oracle_es"] = float(oracle.mean())
    differ = [i for i in range(len(cases)) if forced[:, i].max() - forced[:, i].min() > 1e-9]
    rep["routers"] = {"tfidf": {"mean_es": float(forced[routed, np.arange(len(cases))].mean()),
                                "oracle_agreement": (float(np.mean([forced[routed[i], i] == oracle[i] for i in differ]))
                                                     if differ else None),
                                "ms_per_request": statistics.median(cold)}}
    if args.compare_embeddings:
        clusters = json.loads((bdir / "clusters.json").read_text())
        labels = np.array(clusters["labels"])
        hid, ms, fit_s = hidden_router(bdir, texts, labels, [routing_text(c.path, c.prefix, c.suffix) for c in cases], k)
        rep["routers"]["hidden"] = {"mean_es": float(forced[hid, np.arange(len(cases))].mean()),
                                    "oracle_agreement": (float(np.mean([forced[hid[i], i] == oracle[i] for i in differ]))
                                                         if differ else None),
                                    "ms_per_request": ms, "agreement_with_tfidf": float(np.mean(hid == np.array(routed)))}
    rep["cases_where_specialists_differ"] = len(differ)
    rep["per_cluster"] = {v: [float(np.mean([r["es"][i] for i in range(len(cases)) if routed[i] == j]) if routed.count(j) else 0.0)
                              for j in range(k)] for v, r in results.items()}
    rep["rows"] = {v: r for v, r in results.items()}
    rep["case_ids"] = [c.id for c in cases]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1))
    md = [f"n = {len(cases)} held-out cases ({kinds.count('single')} single-line, {kinds.count('multi')} multi-line) "
          f"from {len(test_files)} held-out files; routed per specialist {rep['routed_counts']}", "",
          "| variant | ES | EM | median latency |", "|---|---:|---:|---:|"]
    for v, s in rep["variants"].items():
        md.append(f"| {v} | {s['es']:.3f} | {s['em']:.3f} | {s['median_latency_ms']:.0f} ms |")
    md += ["", "| paired difference | mean | 95% CI | n |", "|---|---:|---|---:|"]
    for key, d in rep["paired"].items():
        md.append(f"| {key} | {d['diff']:+.3f} | {d['lo']:+.3f}..{d['hi']:+.3f} | {d['n']} |")
    md += ["", "| router | mean ES of the picked specialist | agreement with the oracle | ms per request |",
           "|---|---:|---:|---:|"]
    for rname, r in rep["routers"].items():
        agree = "–" if r["oracle_agreement"] is None else f"{r['oracle_agreement']:.2f}"
        md.append(f"| {rname} | {r['mean_es']:.3f} | {agree} (of {len(differ)} cases) | {r['ms_per_request']:.1f} |")
    md.append(f"| oracle | {rep['oracle_es']:.3f} | 1 | – |")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(rep, out.with_suffix(".png"))
    return 0


def plot(rep: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in rep["per_cluster"] if not v.startswith("forced")]
    k = rep["k"]
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(variants)
    for i, v in enumerate(variants):
        ax.bar(np.arange(k) + i * w, rep["per_cluster"][v], w, label=v)
    ax.set_xticks(np.arange(k) + 0.4 - w / 2, [f"s{j} (n={n})" for j, n in enumerate(rep["routed_counts"])])
    ax.set_ylabel("held-out ES")
    ax.set_title("ES per routed cluster")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
