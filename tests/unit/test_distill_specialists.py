"""`--specialists K`: the training rows are clustered by what they contain and each cluster trains its own
LoRA from the same start; the bundle routes a new document to the specialist of its kind of code; a killed
run resumes where it was; a K the data cannot give is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from localcoder.distill.train import train
from localcoder.errors import InvalidRequest
from localcoder.specialists import Router, choose_k, kmeans, load_bundle, silhouette

from tests.unit.distill_helpers import STDLIB, cfg_of, flags, home  # noqa: F401 (fixtures)

PY_MODULES = ["textwrap", "shlex", "bisect", "heapq", "fnmatch", "glob"]


def _js_file(i: int) -> str:
    """Plain JavaScript in a web-handler style: nothing of it reads like the Python half of the corpus."""
    body = []
    for j in range(14):
        body.append(f"""
export async function handle{i}x{j}(req, res) {{
  const {{ userId, items = [] }} = req.body ?? {{}};
  if (!userId) {{
    return res.status(400).json({{ error: 'userId is required' }});
  }}
  const total = items.reduce((acc, item) => acc + item.price * item.qty, 0);
  const result = await db.collection('orders{j}').insertOne({{ userId, items, total, createdAt: Date.now() }});
  console.log(`order ${{result.insertedId}} for ${{userId}}: ${{total}}`);
  return res.json({{ id: result.insertedId, total }});
}}
""")
    return "'use strict';\nimport { db } from './db.js';\n" + "".join(body)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    (d / "py").mkdir()
    (d / "web").mkdir()
    for m in PY_MODULES:
        shutil.copy(STDLIB / f"{m}.py", d / "py" / f"{m}.py")
    for i in range(6):
        (d / "web" / f"handlers{i}.js").write_text(_js_file(i))
    return d


def _argv(tiny, corpus, out, cache, **kw):
    base = {"student": "teacher", "lora-rank": 4, "train-rows": 24, "steps": 8, "specialists": 2,
            "specialist-min-rows": 2, "val-every": 100, "test-fraction": 0.0, "val-fraction": 0.1}
    base.update(kw)
    return flags(tiny, corpus, out, cache, **base)


def test_kmeans_is_seeded_and_finds_the_obvious_groups():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.05, (20, 8)) + np.eye(8)[0]
    b = rng.normal(0, 0.05, (12, 8)) + np.eye(8)[3]
    x = np.vstack([a, b])
    labels, cent = kmeans(x, 2, seed=3)
    assert labels[:20].tolist() == [0] * 20 and labels[20:].tolist() == [1] * 12  # numbered by size
    assert np.array_equal(labels, kmeans(x, 2, seed=3)[0])
    assert np.allclose(np.linalg.norm(cent, axis=1), 1.0, atol=1e-5)
    assert silhouette(x, labels) > 0.8 > silhouette(x, np.arange(32) % 2)
    k, scores = choose_k(x, min_size=5, k_max=4)
    assert k == 2 and scores[2] == max(scores.values())
    assert choose_k(x, min_size=20)[0] == 1  # no split leaves every cluster 20 rows
    with pytest.raises(InvalidRequest) as e:
        kmeans(x, 40)
    assert e.value.param == "specialists"


def test_two_specialists_train_on_their_own_clusters_and_route_new_code_to_them(tiny_qwen_dir, mixed, tmp_path):
    out = tmp_path / "spec"
    cfg = cfg_of(_argv(tiny_qwen_dir, mixed, out, tmp_path / "cache"))
    result = train(cfg, progress=False)
    clusters = json.loads((out / "clusters.json").read_text())
    assert clusters["k"] == 2 and sum(clusters["sizes"]) == 24
    # the clusters split the languages: each cluster's rows come from one kind of file only
    kinds = [{Path(p).suffix for p, _ in top} for top in clusters["top_paths"]]
    assert sorted(map(sorted, kinds)) == [[".js"], [".py"]]

    bundle = load_bundle(result.model_dir)
    assert len(bundle) == 2 and bundle.base["name"] == tiny_qwen_dir.name
    doc = json.loads((out / "bundle.json").read_text())
    steps = [s["steps"] for s in doc["specialists"]]
    assert sum(steps) == cfg.steps and steps[0] >= steps[1]  # the budget is shared by cluster size
    for s in doc["specialists"]:
        assert (out / s["adapter"]).stat().st_size > 1000
        assert (out / s["peft"] / "adapter_model.safetensors").is_file()
        assert "kl" in s["val"]
    a0 = load_file(str(out / doc["specialists"][0]["peft"] / "adapter_model.safetensors"))
    a1 = load_file(str(out / doc["specialists"][1]["peft"] / "adapter_model.safetensors"))
    assert a0.keys() == a1.keys()
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)  # two different adapters, not one copied

    router = Router(bundle)
    js = next(i for i, kind in enumerate(kinds) if kind == {".js"})
    idx, ms = router.route("new.js", "web/new.js", _js_file(99)[:1500], "")
    assert idx == js and ms > 0
    py, _ = router.route("new.py", "lib/new.py", (STDLIB / "colorsys.py").read_text()[:2000], "")
    assert py == 1 - js
    assert router.route("new.js", "web/new.js", "def python_now():\n", "") == (js, 0.0)  # sticky per document


def test_a_killed_run_keeps_finished_specialists_and_resumes_the_current_one(tiny_qwen_dir, mixed, tmp_path):
    out, cache = tmp_path / "spec", tmp_path / "cache"
    argv = _argv(tiny_qwen_dir, mixed, out, cache)
    train(cfg_of(argv), progress=False)
    first = (out / "specialist-0" / "adapter.gguf").read_bytes()
    # as if the run died while training specialist 1 (after a checkpoint): no adapter, no PEFT export yet
    (out / "specialist-1" / "adapter.gguf").unlink()
    shutil.rmtree(out / "specialist-1" / "peft")
    with pytest.raises(InvalidRequest) as e:
        train(cfg_of(argv), progress=False)  # without --resume the run refuses to overwrite
    assert e.value.param == "out"
    train(cfg_of(argv), resume=True, progress=False)
    assert (out / "specialist-0" / "adapter.gguf").read_bytes() == first
    assert (out / "specialist-1" / "adapter.gguf").is_file()
    assert len(load_bundle(out)) == 2


@pytest.mark.parametrize("kw, param, match", [
    ({"specialists": 100}, "specialists", "more than the 24 training chunks"),
    ({"specialist-min-rows": 20}, "specialists", "fewer than --specialist-min-rows 20"),
])
def test_a_k_the_data_cannot_give_is_refused_by_name(tiny_qwen_dir, mixed, tmp_path, kw, param, match):
    with pytest.raises(InvalidRequest, match=match) as e:
        train(cfg_of(_argv(tiny_qwen_dir, mixed, tmp_path / "o", tmp_path / "cache", **kw)), progress=False)
    assert e.value.param == param


def test_bad_specialist_flags_are_refused_before_anything_runs(tiny_qwen_dir, mixed, tmp_path):
    for kw, match in (({"specialists": 1}, ">= 2"), ({"specialists": "many"}, "number >= 2 or auto"),
                      ({"lora-rank": 0}, "give --lora-rank")):
        with pytest.raises(InvalidRequest, match=match) as e:
            cfg_of(_argv(tiny_qwen_dir, mixed, tmp_path / "o", tmp_path / "cache", **kw))
        assert e.value.param == "specialists"
