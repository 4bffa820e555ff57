"""Serving a specialist bundle, the parts that need no model: the router (nearest centroid, sticky per
document), the bundle's checks (each names the broken file), the base-model check, which bundle a model is
served with, the KV-cache slots tagged by adapter, and how a routed request reports itself (timings,
/metrics). The engine side (real adapters in llama.cpp) is tests/integration/test_specialists_real.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from specialist_bundles import JAVASCRIPT, PYTHON, make_bundle

from localcoder.completion import CompletionResult, Completer, InfillRequest
from localcoder.config import ModelConfig
from localcoder.engines.base import Timings
from localcoder.engines.fake import FakeEngine
from localcoder.engines.kvcache import SlotTable
from localcoder.errors import InvalidRequest, ModelCorrupt
from localcoder.models import ResolvedModel
from localcoder.server.metrics import Metrics
from localcoder.specialists import Router, check_base, load_bundle, open_bundle, with_bundle

ADAPTER = b"GGUF" + bytes(252)  # load_bundle checks presence and size; llama.cpp checks the rest (integration)

PY_CONTEXT = ("import sys\n\ndef parse(argv):\n    options = {}\n    for arg in argv[1:]:\n"
              "        key, _, value = arg.partition('=')\n        options[key] = value\n    return ")
JS_CONTEXT = ("const express = require('express');\nconst app = express();\n\n"
              "app.get('/items', async (req, res) => {\n  const items = await db.find({});\n  res.json(")


@pytest.fixture
def bundle_dir(tmp_path) -> Path:
    return make_bundle(tmp_path / "bundle", [ADAPTER, ADAPTER])


def test_python_and_javascript_contexts_route_to_different_specialists(bundle_dir):
    router = Router(load_bundle(bundle_dir))
    py, py_ms = router.route(None, "tool/cli.py", PY_CONTEXT, "\n")
    js, _ = router.route(None, "web/server.js", JS_CONTEXT, ");\n});\n")
    assert router.names[py] == "python" and router.names[js] == "javascript"
    assert py_ms > 0 and router.routed == 2 and router.counts == [1, 1]
    # the centroids are the corpora's own: each training text is nearest its corpus's centroid
    assert {router.nearest(t)[0] for t in PYTHON} == {py} and {router.nearest(t)[0] for t in JAVASCRIPT} == {js}


def test_a_document_keeps_its_specialist_while_its_text_changes_until_forgotten(bundle_dir):
    router = Router(load_bundle(bundle_dir))
    first, _ = router.route("a.py", "a.py", PY_CONTEXT, "")
    again, ms = router.route("a.py", "a.py", JS_CONTEXT, "")  # the user pasted JavaScript into a.py
    assert router.names[first] == "python" and again == first and ms == 0.0
    other, _ = router.route("b.js", "b.js", JS_CONTEXT, "")
    assert router.names[other] == "javascript"
    router.forget("a.py")
    moved, ms = router.route("a.py", "a.py", JS_CONTEXT, "")
    assert router.names[moved] == "javascript" and ms > 0
    assert router.routed == 3 and sum(router.counts) == 4
    summary = router.summary()
    assert [s["name"] for s in summary["specialists"]] == ["python", "javascript"]
    assert [s["requests"] for s in summary["specialists"]] == router.counts and summary["documents"] == 2


def test_a_bundle_with_a_missing_adapter_is_refused_naming_the_file(bundle_dir):
    (bundle_dir / "specialist-1" / "adapter.gguf").unlink()
    with pytest.raises(ModelCorrupt) as err:
        load_bundle(bundle_dir)
    assert "specialist-1/adapter.gguf" in str(err.value) and "missing" in str(err.value)


def test_a_bundle_with_a_truncated_adapter_is_refused_naming_the_file(bundle_dir):
    (bundle_dir / "specialist-0" / "adapter.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelCorrupt) as err:
        load_bundle(bundle_dir / "bundle.json")
    assert "adapter.gguf" in str(err.value) and "specialist 0" in str(err.value) and "truncated" in str(err.value)


def test_a_bundle_json_that_is_not_json_is_refused_naming_it(bundle_dir):
    (bundle_dir / "bundle.json").write_text('{"format": "localcoder-specialists", ', encoding="utf-8")
    with pytest.raises(ModelCorrupt) as err:
        load_bundle(bundle_dir)
    assert "bundle.json" in str(err.value) and "not valid JSON" in str(err.value)


def test_centroids_of_the_wrong_shape_are_refused_naming_the_file(bundle_dir):
    cent = np.load(bundle_dir / "centroids.npy")
    np.save(bundle_dir / "centroids.npy", np.concatenate([cent, cent[:1]]))  # 3 centroids for 2 specialists
    with pytest.raises(ModelCorrupt) as err:
        load_bundle(bundle_dir)
    assert "centroids.npy" in str(err.value) and f"(3, {cent.shape[1]})" in str(err.value)


def test_a_bundle_trained_on_another_base_is_refused(tmp_path):
    model = tmp_path / "base.gguf"
    model.write_bytes(b"GGUF" + bytes(1000))
    bundle = load_bundle(make_bundle(tmp_path / "b", [ADAPTER, ADAPTER], base={"name": "qwen2.5-coder-0.5b",
                                                                               "size": 1004}))
    check_base(bundle, "qwen2.5-coder-0.5b", model)  # same name and size: served
    with pytest.raises(InvalidRequest) as err:
        check_base(bundle, "qwen2.5-coder-1.5b", model)
    assert err.value.param == "model" and "qwen2.5-coder-0.5b" in str(err.value)
    model.write_bytes(b"GGUF" + bytes(2000))  # same name, another file
    with pytest.raises(InvalidRequest):
        check_base(bundle, "qwen2.5-coder-0.5b", model)


def test_which_bundle_a_model_is_served_with(tmp_path, bundle_dir):
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + bytes(60))
    registered = ResolvedModel("mine", "gguf", base, meta={"type": "specialists", "bundle": str(bundle_dir),
                                                           "source": "qwen2.5-coder-0.5b", "adapter": "layout.gguf"})
    auto = with_bundle(registered, ModelConfig())
    assert auto.meta["bundle"] == str(bundle_dir) and "adapter" not in auto.meta  # it replaces the default adapter
    assert open_bundle(auto).root == bundle_dir  # the entry's source names the base: no mismatch
    assert "bundle" not in with_bundle(registered, ModelConfig(specialists="off")).meta
    # --specialists off on the registered bundle serves its base as the base is served: with the base's
    # shipped layout adapter (the bundle's own name ships none)
    from localcoder.models import shipped_adapter, with_adapter

    bare = ResolvedModel("mine", "gguf", base, meta={"type": "specialists", "source": "qwen2.5-coder-0.5b"})
    assert with_adapter(bare, "auto").meta["adapter"] == str(shipped_adapter("qwen2.5-coder-0.5b"))
    plain = ResolvedModel("qwen2.5-coder-0.5b", "gguf", base)
    assert with_bundle(plain, ModelConfig()) is plain and open_bundle(plain) is None
    assert with_bundle(plain, ModelConfig(specialists=str(bundle_dir))).meta["bundle"] == str(bundle_dir)
    for engine in ("torch", "onnx", "remote"):
        with pytest.raises(InvalidRequest) as err:
            with_bundle(registered, ModelConfig(engine=engine))
        assert err.value.param == "specialists" and engine in str(err.value)
    with pytest.raises(InvalidRequest) as err:
        with_bundle(plain, ModelConfig(specialists=str(bundle_dir), adapter=str(base)))
    assert err.value.param == "specialists"


def test_a_slot_computed_under_one_adapter_is_never_reused_under_another():
    table = SlotTable(2)
    prompt = list(range(100))
    a = table.choose(prompt, tag=0)
    table.slots[a].extend(prompt)
    b = table.choose(prompt + [7], tag=1)  # the same tokens under adapter 1: not slot a
    assert b != a and table.slots[a].tokens == prompt
    table.slots[b].extend(prompt + [7])
    assert table.choose(prompt + [8], tag=0) == a and table.slots[a].plan(prompt + [8]) == 100
    one = SlotTable(1)
    one.choose(prompt, tag=0)
    one.slots[0].extend(prompt)
    assert one.choose(prompt, tag=1) == 0 and one.slots[0].tokens == []  # taken under 1: its tokens dropped
    assert one.slots[0].plan(prompt) == 0 and one.tags == [1]
    one.clear()
    assert one.tags == [None]


def test_untagged_slots_behave_as_before():
    table = SlotTable(2)
    a = table.choose([1, 2, 3, 4])
    table.slots[a].extend([1, 2, 3, 4])
    assert table.choose([1, 2, 3, 4, 5]) == a and table.tags == [None, None]


def test_the_completer_routes_by_path_else_by_the_clients_key_and_labels_the_timings(bundle_dir):
    engine = FakeEngine(completion="x\n")
    engine.bundle = load_bundle(bundle_dir)  # what LlamaCppEngine holds when it loaded a bundle
    completer = Completer(engine, "qwen")
    first = completer.complete(InfillRequest(PY_CONTEXT, "", path="tool/cli.py", max_tokens=2))
    assert first.timings.specialist == "python" and first.timings.route_ms > 0
    typed = completer.complete(InfillRequest(JS_CONTEXT, "", path="tool/cli.py", max_tokens=2))
    assert typed.timings.specialist == "python" and typed.timings.route_ms == 0  # sticky by path
    by_key = completer.complete(InfillRequest(JS_CONTEXT, "", max_tokens=2), key="lane-1")
    assert by_key.timings.specialist == "javascript"
    again = completer.complete(InfillRequest(PY_CONTEXT, "", max_tokens=2), key="lane-1")
    assert again.timings.specialist == "javascript" and again.timings.route_ms == 0  # sticky by key
    shown = again.timings.to_dict()
    assert shown["specialist"] == "javascript" and {"route_ms", "adapter_switch_ms"} <= set(shown)
    assert completer.router is not None and completer.router.counts == [2, 2]


def test_without_a_bundle_nothing_is_routed_and_timings_are_unchanged():
    completer = Completer(FakeEngine(completion="x\n"), "qwen")
    result = completer.complete(InfillRequest(PY_CONTEXT, "", path="a.py", max_tokens=2), key="k")
    assert completer.router is None and result.timings.specialist is None
    assert not {"specialist", "route_ms", "adapter_switch_ms"} & set(result.timings.to_dict())


def test_metrics_count_completions_per_specialist():
    metrics = Metrics()
    for name, switch in (("python", 3.0), ("python", 0.0), ('java"script', 0.0)):
        t = Timings(prompt_n=10, specialist=name, route_ms=1.0, adapter_switch_ms=switch)
        metrics.observe_result(CompletionResult("x", "eos", "single", t, False, 10))
    metrics.observe_result(CompletionResult("x", "eos", "single", Timings(prompt_n=10), False, 10))  # typed through
    text = metrics.render({})
    assert 'localcoder_specialist_requests_total{specialist="python"} 2' in text
    assert 'localcoder_specialist_requests_total{specialist="java\\"script"} 1' in text
    assert 'localcoder_specialist_seconds_count{phase="switch"} 3' in text
    assert "specialist" not in Metrics().render({})


def test_load_bundle_reads_what_write_bundle_wrote(bundle_dir):
    bundle = load_bundle(bundle_dir)
    doc = json.loads((bundle_dir / "bundle.json").read_text())
    assert len(bundle) == 2 and [s.name for s in bundle.specialists] == ["python", "javascript"]
    assert bundle.centroids.shape == (2, bundle.embedder.dim) and doc["base"]["name"] == "qwen2.5-coder-0.5b"


async def test_the_lsp_path_routes_per_document_and_reports_counts_per_specialist(bundle_dir):
    """The LSP's in-process path: Requests.run -> InProcessClient.generate(req, key=uri) -> Completer.stream:
    the document's key reaches the router (a request without a path stays on its document's specialist),
    and ``localcoder/stats`` counts results per specialist."""
    from lsprotocol import types

    from localcoder.client import InProcessClient
    from localcoder.lsp.server import LocalcoderServer, on_close

    engine = FakeEngine(completion="x\n")
    engine.bundle = load_bundle(bundle_dir)
    client = InProcessClient(Completer(engine, "qwen"))
    ls = LocalcoderServer()
    ls.client = client
    try:
        for uri, text in (("file:///w/a", PY_CONTEXT), ("file:///w/b", JS_CONTEXT), ("file:///w/a", JS_CONTEXT)):
            result = await ls.requests.run(client, ls.requests.issue(uri),
                                           lambda text=text: InfillRequest(text, "", max_tokens=2))
            assert result is not None
        assert ls.stats()["specialists"] == {"python": 2, "javascript": 1}  # a's JavaScript stayed on python
        health = await client.health()
        assert [s["requests"] for s in health["specialists"]["specialists"]] == [2, 1]
        assert health["specialists"]["documents"] == 2
        # the editor closes a: its route goes (didClose), so a reopened a is routed afresh by its text
        on_close(ls, types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri="file:///w/a")))
        assert (await client.health())["specialists"]["documents"] == 1
        result = await ls.requests.run(client, ls.requests.issue("file:///w/a"),
                                       lambda: InfillRequest(JS_CONTEXT, "", max_tokens=2))
        assert result is not None and result.timings.specialist == "javascript"
    finally:
        await client.close()


def test_eval_reports_es_per_specialist_for_the_bundle_and_its_baselines(bundle_dir, tmp_path):
    from localcoder.eval.runner import evaluate, specialist_table
    from localcoder.eval.tasks import FimCase

    engine = FakeEngine(completion="value\n")
    engine.bundle = load_bundle(bundle_dir)
    completer = Completer(engine, "qwen")
    cases = [FimCase(id=f"c{i}", prefix=ctx, suffix="\n", reference=ref, mode="single", language=lang, path=path)
             for i, (ctx, ref, lang, path) in enumerate([
                 (PY_CONTEXT, "value\n", "python", "a.py"), (PY_CONTEXT, "options\n", "python", "a.py"),
                 (JS_CONTEXT, "items\n", "javascript", "b.js")])]
    ours = evaluate(completer, cases, execute=False, progress=False, name="bundle")
    assert [r.specialist for r in ours.rows] == ["python", "python", "javascript"]
    assert ours.rows[0].route_ms > 0 and ours.rows[1].route_ms == 0  # the second case of a.py is sticky
    plain = evaluate(Completer(FakeEngine(completion="items\n"), "qwen"), cases, execute=False, progress=False,
                     name="baseline")
    png = tmp_path / "per.png"
    text = specialist_table(completer.router, [ours, plain], png)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| python")
            or line.startswith("| javascript")}
    py_cells = [c.strip() for c in rows["python"].split("|")[2:-1]]
    js_cells = [c.strip() for c in rows["javascript"].split("|")[2:-1]]
    assert py_cells[0] == "2" and js_cells[0] == "1"
    # python cases: the bundle got one exact and one partial, the baseline ("items") neither exactly
    assert float(py_cells[2]) == pytest.approx((ours.rows[0].es + ours.rows[1].es) / 2)
    assert float(js_cells[3]) == 1.0 and float(js_cells[2]) < 1.0
    assert "2 documents routed" in text and png.stat().st_size > 1000
