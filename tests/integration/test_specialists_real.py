"""A specialist bundle served by real llama.cpp with the packaged Qwen2.5-Coder 0.5B.

The bundle has two real adapters: specialist 0 ("python") is a copy of the shipped layout adapter,
specialist 1 ("javascript") the same adapter with every lora_b tensor negated, a genuinely different LoRA
of the same base and shapes. Each routed request must give exactly the greedy output of an engine loaded
with that one adapter (``--adapter FILE``), documents must keep their adapter and their KV cache, keys and
values computed under one adapter must never serve another, and a broken bundle must stop ``localcoder
serve`` with a message naming the file or the flag. Few tokens per request: CI is a 2-core CPU
(LOCALCODER_THREADS sets the threads, e.g. 1 on a machine busy with other work).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import httpx
import pytest
from specialist_bundles import make_bundle, scaled_lora
from test_server_harness import make_config, running_server

from conftest import DEFAULT_MODEL, free_port
from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import GenerationRequest
from localcoder.errors import ModelCorrupt
from localcoder.models import BUILTIN, shipped_adapter

pytestmark = pytest.mark.integration

THREADS = int(os.environ.get("LOCALCODER_THREADS") or min(2, os.cpu_count() or 2))
LOCALCODER = [sys.executable, "-m", "localcoder.cli"]

PY = ("tool/files.py", "import os\n\ndef list_python_files(root):\n    out = []\n    for name in os.listdir(root):\n"
      "        if name.endswith('.py'):\n            out.", "\n    return out\n")
JS = ("web/double.js", "const items = [1, 2, 3];\nfunction double(list) {\n  return list.map((x) => ", ");\n}\n")
PY2 = ("tool/words.py",
       "def count_words(text):\n    counts = {}\n    for word in text.split():\n        counts[word] = ",
       "\n    return counts\n")
JS2 = ("web/sum.js", "function total(prices) {\n  let sum = 0;\n  for (const p of prices) {\n    sum ",
       "\n  }\n  return sum;\n}\n")


def request(case: tuple[str, str, str], typed: str = "", cache_prompt: bool = True) -> InfillRequest:
    path, prefix, suffix = case
    return InfillRequest(prefix + typed, suffix, path=path, max_tokens=8, cache_prompt=cache_prompt)


def config(**fields) -> Config:
    cfg = Config()
    cfg.apply({"model": DEFAULT_MODEL, "threads": THREADS, "ctx": 1024, "max_tokens": 8, "suffix_tokens": 64,
               "typed_through": False, **fields})  # every keystroke goes to the engine
    return cfg


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, model_05b_path):
    shipped = shipped_adapter(DEFAULT_MODEL)
    assert shipped is not None
    return [shipped, scaled_lora(shipped, tmp_path_factory.mktemp("lora") / "negated.gguf", -1.0)]


def base_info() -> dict:
    m = BUILTIN[DEFAULT_MODEL]
    return {"name": m.name, "sha256": m.sha256, "size": m.size}


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, adapters):
    return make_bundle(tmp_path_factory.mktemp("specialists") / "bundle", adapters, base=base_info())


@pytest.fixture(scope="module")
def routed(bundle_dir):
    completer = Completer.from_config(config(specialists=str(bundle_dir), cache_slots=3))
    yield completer
    completer.engine.close()


@pytest.fixture(scope="module")
def single(adapters):
    """One engine per adapter, loaded the plain way (``--adapter FILE``, one cache slot)."""
    completers = [Completer.from_config(config(adapter=str(a), specialists="off", cache_slots=1)) for a in adapters]
    yield completers
    for c in completers:
        c.engine.close()


def test_each_document_runs_on_its_specialist_exactly_as_that_adapter_alone(routed, single):
    assert routed.router is not None and routed.router.names == ["python", "javascript"]
    assert routed.order == single[0].order == "spm"  # the specialists teach the layout adapter's order
    for case, k in ((PY, 0), (JS, 1)):  # all cold (whole prompts evaluated), so the numerics are the same
        got = routed.complete(request(case, cache_prompt=False))
        want = [s.complete(request(case, cache_prompt=False)) for s in single]
        assert want[0].text != want[1].text, "the two adapters must differ here, else this test proves nothing"
        assert got.timings.specialist == routed.router.names[k]
        assert got.text == want[k].text, (case[0], got.text, [w.text for w in want])


def test_keystrokes_in_one_document_never_switch_the_adapter_and_reuse_the_cache(routed):
    routed.complete(request(JS))  # the other specialist is now set on the context
    engine = routed.engine
    results, switches = [], []
    for typed in ("", "append", "append(os", "append(os.path"):
        results.append(routed.complete(request(PY, typed)))
        switches.append(engine.adapter_switches)
    assert {r.timings.specialist for r in results} == {"python"}
    assert results[0].timings.adapter_switch_ms > 0 and all(r.timings.adapter_switch_ms == 0 for r in results[1:])
    assert switches[1:] == [switches[0]] * 3, switches
    cached = [r.tokens_cached for r in results[1:]]
    # each keystroke reuses what the one before left (its prompt and its completion, which the user types)
    assert cached[0] > 0 and cached == sorted(cached) and cached[-1] > cached[0], cached
    assert all(r.tokens_evaluated <= 8 for r in results[1:]), [r.tokens_evaluated for r in results]


def test_alternating_documents_on_different_specialists_stay_correct(routed, single):
    """Two documents typed in turn, each on its own specialist: every output is the one its adapter alone
    gives after the same history (new documents; each single engine sees only its own), so no request ran
    on the other adapter or on keys and values it computed."""
    for typed in ("", "1", "1 +"):
        for case, k in ((PY2, 0), (JS2, 1)):
            got = routed.complete(request(case, typed))
            want = single[k].complete(request(case, typed))
            assert got.timings.specialist == routed.router.names[k]
            assert got.text == want.text, (case[0], typed, got.text, want.text)


def test_a_prompt_cached_under_one_adapter_is_evaluated_again_under_another(routed, single):
    """The KV tag itself: the very same tokens, cached under adapter 0, asked under adapter 1, must be
    evaluated from scratch and give adapter 1's own output."""
    ids = list(routed.prompt(request(PY, "x"))[0])
    engine = routed.engine

    def run(eng, adapter, cache_prompt=True):
        stream = eng.generate(GenerationRequest(ids, max_tokens=8, adapter=adapter, cache_prompt=cache_prompt))
        return list(stream), stream.timings

    first, _ = run(engine, 0)
    again, t = run(engine, 0)
    assert again == first and t.cached_n == len(ids) - 1  # same adapter: the cache serves
    other, t = run(engine, 1)
    assert t.cached_n == 0, "a slot computed under adapter 0 was reused under adapter 1"
    alone, _ = run(single[1].engine, None, cache_prompt=False)
    assert other == alone and other != first


def test_infill_timings_health_and_metrics_name_the_specialist(routed, bundle_dir):
    with running_server(routed, make_config(suffix_tokens=64, max_tokens=8)) as url, httpx.Client(base_url=url,
                                                                                                  timeout=300) as c:
        path, prefix, suffix = PY
        r = c.post("/infill", json={"input_prefix": prefix, "input_suffix": suffix, "path": path, "n_predict": 8,
                                    "lane": "file:///w/tool/files.py"})
        assert r.status_code == 200, r.text
        timings = r.json()["timings"]
        assert timings["specialist"] == "python" and "route_ms" in timings and "adapter_switch_ms" in timings
        health = c.get("/health").json()
        assert health["specialists"]["bundle"] == str(bundle_dir / "bundle.json")
        assert [s["name"] for s in health["specialists"]["specialists"]] == ["python", "javascript"]
        metrics = c.get("/metrics").text
    assert 'localcoder_specialist_requests_total{specialist="python"} 1' in metrics
    assert 'localcoder_specialist_seconds_count{phase="switch"} 1' in metrics
    assert "localcoder_adapter_switches_total " in metrics


def test_a_specialist_adapter_llama_cpp_cannot_load_is_refused_naming_it(tmp_path, adapters):
    bad = make_bundle(tmp_path / "bundle", adapters, base=base_info())
    whole = (bad / "specialist-1" / "adapter.gguf").read_bytes()
    (bad / "specialist-1" / "adapter.gguf").write_bytes(whole[: len(whole) // 2])  # truncated mid-tensors
    with pytest.raises(ModelCorrupt) as err:
        Completer.from_config(config(specialists=str(bad), cache_slots=1))
    assert "specialist 1 (javascript)" in str(err.value) and "specialist-1/adapter.gguf" in str(err.value)


def serve(*flags: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*LOCALCODER, "serve", "--model", DEFAULT_MODEL, "--port", str(free_port()),
                           "--threads", str(THREADS), "--ctx", "512", "--cache-slots", "1", *flags],
                          capture_output=True, text=True, timeout=timeout_s)


def test_serve_exits_when_a_specialist_adapter_is_garbage(tmp_path, adapters):
    bad = make_bundle(tmp_path / "bundle", adapters, base=base_info())
    (bad / "specialist-1" / "adapter.gguf").write_bytes(os.urandom(4096))
    proc = serve("--specialists", str(bad))
    assert proc.returncode != 0
    assert "specialist 1 (javascript)" in proc.stderr, proc.stderr[-2000:]
    assert "specialist-1/adapter.gguf" in proc.stderr


def test_serve_exits_at_once_when_a_specialist_adapter_is_missing(tmp_path, adapters):
    bad = make_bundle(tmp_path / "bundle", adapters, base=base_info())
    (bad / "specialist-0" / "adapter.gguf").unlink()
    proc = serve("--specialists", str(bad), timeout_s=60)
    assert proc.returncode != 0 and "specialist-0/adapter.gguf" in proc.stderr, proc.stderr[-2000:]
    assert "loading model" not in proc.stderr  # refused before the server started


def test_serve_exits_at_once_when_the_bundle_was_trained_on_another_base(tmp_path, adapters):
    other = make_bundle(tmp_path / "bundle", adapters, base={**base_info(), "name": "qwen2.5-coder-1.5b"})
    proc = serve("--specialists", str(other), timeout_s=60)
    assert proc.returncode != 0, proc.stderr[-2000:]
    assert "trained on qwen2.5-coder-1.5b" in proc.stderr and "--model qwen2.5-coder-1.5b" in proc.stderr


def test_a_bundle_on_a_non_llama_engine_is_refused(bundle_dir):
    proc = serve("--specialists", str(bundle_dir), "--engine", "torch", timeout_s=60)
    assert proc.returncode != 0 and "--specialists off" in proc.stderr, proc.stderr[-2000:]
