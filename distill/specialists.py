"""``localcoder distill --preset adapt --specialists K|auto``: K LoRA specialists instead of one adapter.

The run prepares data, teacher and student exactly as the adapt preset does (the same packed rows, so the
teacher's top-k cache is computed once and shared with a plain adapt run on the same repository), then:
embed every training row (a chunk of one file, or a few small ones) with TF-IDF over code tokens, cluster
the rows with spherical k-means (seeded; ``auto``: the silhouette rule), and train one LoRA per cluster on
its rows only, each from the same start (the shipped layout adapter) with the same recipe and a share of
the step and time budget proportional to its rows (K specialists cost what one adapter costs). Each
specialist is exported as a llama.cpp GGUF LoRA and in PEFT form; ``bundle.json`` + ``router.json`` +
``centroids.npy`` in the output directory make the bundle that ``serve`` routes with
(``localcoder.specialists``), registered under the run's name.

A killed run resumes with ``--resume``: finished specialists are kept (their adapter exists), the current
one continues from its newest checkpoint (``out/specialist-<k>/checkpoints``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from localcoder.distill import checkpoint
from localcoder.distill.checkpoint import RunState, load_checkpoint, seed_everything
from localcoder.errors import InvalidRequest
from localcoder.specialists import TfidfEmbedder, choose_k, kmeans, silhouette, write_bundle

K_MAX_AUTO = 8


def parse_k(setting: str) -> int | None:
    """``--specialists``: '' (off) -> None, ``auto`` -> 0, else K >= 2."""
    if not setting:
        return None
    if setting == "auto":
        return 0
    try:
        k = int(setting)
    except ValueError:
        raise InvalidRequest(f"--specialists must be a number >= 2 or auto, got {setting!r}",
                             param="specialists") from None
    if k < 2:
        raise InvalidRequest(f"--specialists must be >= 2 (K=1 is the adapt preset itself), got {k}",
                             param="specialists")
    return k


def row_texts(tok, packed) -> list[str]:
    """The code of each packed row, as the teacher reads it (markers and padding dropped)."""
    hf = tok.tok if hasattr(tok, "tok") else tok
    return [hf.decode([int(t) for t in row], skip_special_tokens=True) for row in packed.teacher_ids]


def cluster_rows(texts: list[str], setting: str, *, min_rows: int, seed: int
                 ) -> tuple[TfidfEmbedder, np.ndarray, np.ndarray, dict]:
    """(embedder, labels, centroids, info) for ``--specialists``; clear errors for a K the data cannot give."""
    k = parse_k(setting)
    n = len(texts)
    embedder = TfidfEmbedder.fit(texts)
    x = embedder.embed(texts)
    scores: dict[int, float] = {}
    if k == 0:
        k, scores = choose_k(x, min_size=min_rows, k_max=K_MAX_AUTO, seed=seed)
        if k < 2:
            raise InvalidRequest(f"--specialists auto found no split of the {n} training chunks into clusters of "
                                 f">= {min_rows} (--specialist-min-rows)", param="specialists",
                                 hint="use the adapt preset without --specialists, or give more code")
    if k > n:
        raise InvalidRequest(f"--specialists {k} is more than the {n} training chunks", param="specialists",
                             hint="use a smaller K, auto, or raise --train-rows")
    labels, centroids = kmeans(x, k, seed=seed)
    sizes = np.bincount(labels, minlength=k)
    small = [int(j) for j in np.nonzero(sizes < min_rows)[0]]
    if small:
        raise InvalidRequest(f"--specialists {k}: cluster {small[0]} has {int(sizes[small[0]])} training chunks, "
                             f"fewer than --specialist-min-rows {min_rows} (cluster sizes {sizes.tolist()})",
                             param="specialists", hint="use a smaller K or auto")
    info = {"k": k, "sizes": sizes.tolist(), "silhouette": round(silhouette(x, labels), 4),
            "silhouette_by_k": {str(a): round(b, 4) for a, b in scores.items()}, "embedding": "tfidf",
            "terms": embedder.dim}
    return embedder, labels, centroids, info


def top_paths(labels: np.ndarray, sources: list[str], k: int, n: int = 8) -> list[list]:
    """Per cluster, its most frequent source files (path, rows)."""
    out = []
    for j in range(k):
        c = Counter(s for s, lab in zip(sources, labels) if lab == j and s)
        out.append([[p, m] for p, m in c.most_common(n)])
    return out


def train_specialists(run, *, resume: bool, progress: bool):
    """Cluster the run's training rows and train one LoRA per cluster; returns the train module's Result
    with ``model_dir`` = the bundle directory (the run's output directory)."""
    from tqdm import tqdm

    from localcoder.distill import train as T
    from localcoder.distill.layout import export_adapter
    from localcoder.models import BUILTIN, register, resolve

    cfg, out, dist = run.cfg, run.out, run.dist
    if dist.world > 1:
        raise InvalidRequest("--specialists trains on one process; run it without torchrun", param="specialists")
    done_before = [p for p in out.glob("specialist-*") if checkpoint.has_checkpoints(p) or (p / "adapter.gguf").exists()]
    if done_before and not resume:
        raise InvalidRequest(f"{out} already holds specialists of a run ({done_before[0].name})", param="out",
                             hint="pass --resume to continue it, or choose another --out")
    texts = row_texts(run.tok, run.data.train)
    embedder, labels, centroids, info = cluster_rows(texts, cfg.specialists, min_rows=cfg.specialist_min_rows,
                                                     seed=cfg.seed)
    k, n = info["k"], len(texts)
    sources = run.data.train_sources
    info["top_paths"] = top_paths(labels, sources, k)
    (out / "clusters.json").write_text(json.dumps(info | {"labels": labels.tolist()}, indent=0))
    T.log(f"specialists: {k} clusters of {info['sizes']} rows (silhouette {info['silhouette']}, "
          f"{embedder.dim} TF-IDF terms)", dist)
    start = checkpoint.trainable_state(run.student)  # every specialist starts here (the init adapter)
    specs, states = [], []
    for j in range(k):
        rows = [int(i) for i in np.nonzero(labels == j)[0]]
        share = len(rows) / n
        cfg_j = dataclasses.replace(cfg, steps=max(1, round(cfg.steps * share)),
                                    max_minutes=cfg.max_minutes * share, out=str(out / f"specialist-{j}"))
        out_j = Path(cfg_j.out)
        out_j.mkdir(parents=True, exist_ok=True)
        if (out_j / "adapter.gguf").exists() and (out_j / "peft").exists():
            T.log(f"specialist {j}: done before, kept ({out_j / 'adapter.gguf'})", dist)
            states.append(json.loads((out_j / "specialist.json").read_text()))
        else:
            states.append(_train_one(T, run, cfg_j, out_j, rows, start, j, k, resume, progress, tqdm))
            adapter = export_adapter(cfg_j, out_j, init_dir=out / "init")
            run.student.save_pretrained(str(out_j / "peft"))  # adapter_model.safetensors + adapter_config.json
            T.log(f"specialist {j}: {adapter.path} ({adapter.size / 1e6:.1f} MB)", dist)
            (out_j / "specialist.json").write_text(json.dumps(states[-1], indent=1))
        specs.append({"name": f"s{j}", "adapter": f"specialist-{j}/adapter.gguf", "peft": f"specialist-{j}/peft",
                      "rows": len(rows), "top_paths": info["top_paths"][j], **states[-1]})
    base = resolve(cfg.student)
    known = BUILTIN.get(base.name)
    base_info = {"name": base.name, "sha256": known.sha256 if known else "",
                 "size": base.path.stat().st_size if base.path is not None and base.path.is_file() else 0}
    prov = {"teacher": run.teacher_name, "data": {"roots": cfg.data, "fingerprint": run.data.fingerprint,
                                                  "describe": run.data.describe},
            "clusters": {k2: v for k2, v in info.items() if k2 != "top_paths"}, "config": cfg.to_dict(),
            "fim": {"order": cfg.fim_order}}
    bundle = write_bundle(out, base=base_info, embedder=embedder, centroids=centroids, specialists=specs,
                          provenance=prov)
    name = cfg.register_as or out.resolve().name
    if base.kind == "gguf" and base.path is not None:
        register(name, base.path, type="specialists", bundle=str(out.resolve()), source=base.name,
                 specialists=k, orders=[cfg.fim_order])
    _write_report(out, info, specs, name)
    st = RunState(step=sum(s["steps"] for s in states), stopped="specialists")
    return T.Result(out, bundle.parent, st, prov)


def _train_one(T, run, cfg_j, out_j: Path, rows: list[int], start: dict, j: int, k: int, resume: bool,
               progress: bool, tqdm) -> dict:
    """One specialist: the init weights, a fresh optimizer, its rows only, its share of the budget."""
    import torch

    seed_everything(cfg_j.seed + j)
    with torch.no_grad():
        named = dict(run.student.named_parameters())
        for name, t in start.items():
            named[name].copy_(t)
    sub = dataclasses.replace(run, cfg=cfg_j, out=out_j, opt=T.make_optimizer(cfg_j, run.student), row_ids=rows)
    st = RunState()
    if resume and (loaded := load_checkpoint(out_j, run.student, sub.opt)) is not None:
        st = loaded
        T.log(f"specialist {j}: resumed at step {st.step}", run.dist)
    bar = tqdm(total=cfg_j.steps, initial=st.step, desc=f"specialist {j + 1}/{k}", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    T.train_loop(sub, st, bar)
    bar.close()
    T.validate(sub, st, final=True)
    sub.checkpoint(st)
    val = st.history[-1] if st.history else {}
    return {"steps": st.step, "train_seconds": round(st.elapsed, 1), "stopped": st.stopped,
            "val": {key: v for key, v in val.items() if key not in ("step", "split", "final")}}


def _write_report(out: Path, info: dict, specs: list[dict], name: str) -> None:
    lines = [f"# Specialists: {name}", "", f"{info['k']} clusters of the training rows (TF-IDF over code tokens, "
             f"{info['terms']} terms; spherical k-means; silhouette {info['silhouette']}).", "",
             "| specialist | rows | steps | val KL | top files |", "|---|---:|---:|---:|---|"]
    for s in specs:
        files = ", ".join(f"{p} ({c})" for p, c in s["top_paths"][:3])
        lines.append(f"| {s['name']} | {s['rows']} | {s['steps']} | {s.get('val', {}).get('kl', '')} | {files} |")
    lines += ["", f"Serve: `localcoder serve --model {name}` (routes each document to its specialist)."]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
