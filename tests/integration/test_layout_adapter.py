"""Layout adapters as llama.cpp GGUF LoRAs: what `localcoder distill --preset layout` writes
(quantize.gguf.write_lora_gguf) loads next to its base GGUF and computes exactly what the merged model
computes; its metadata makes `auto` pick the order it teaches; wrong adapters are refused clearly.

The math is checked on a tiny random-weight Qwen2 (random weights make greedy tokens very sensitive
to any error of transposition or scale): llama.cpp(base + adapter) must equal llama.cpp(the PEFT model
merged, exported to GGUF), and differ from the base alone; an adapter whose B is zero equals the base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localcoder.config import Config
from localcoder.errors import InvalidRequest, ModelCorrupt, ModelNotFound

pytestmark = pytest.mark.integration

PROMPT = "def add(a, b):\n    return"


@pytest.fixture(scope="module")
def tiny(tiny_qwen_dir, tmp_path_factory):
    """(dir) holding base.gguf, adapter.gguf, zero.gguf and merged.gguf (all f32)."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from localcoder.quantize.gguf import LORA_TARGETS, write_gguf, write_lora_gguf

    d = tmp_path_factory.mktemp("lora")
    base_config = json.loads((tiny_qwen_dir / "config.json").read_text())
    write_gguf(tiny_qwen_dir, d / "base.gguf", "f32", progress=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero (a no-op adapter): make it matter
                p.normal_(0.0, 0.3)
    tensors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    meta = {"fim_orders": "spm", "base_model": "tiny"}
    write_lora_gguf(tensors, d / "adapter.gguf", alpha=8, base_config=base_config, name="tiny", meta=meta)
    zero = {n: (t * 0 if "lora_B" in n else t) for n, t in tensors.items()}
    write_lora_gguf(zero, d / "zero.gguf", alpha=8, base_config=base_config, name="tiny-zero", meta=meta)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(d / "merged"), safe_serialization=True)
    transformers.AutoTokenizer.from_pretrained(str(tiny_qwen_dir)).save_pretrained(str(d / "merged"))
    write_gguf(d / "merged", d / "merged.gguf", "f32", progress=False)
    return d


def greedy(path: Path, adapter: Path | None = None, n: int = 24) -> list[int]:
    from localcoder.engines.base import GenerationRequest
    from localcoder.engines.llamacpp import LlamaCppEngine

    eng = LlamaCppEngine(path, n_ctx=512, n_threads=2, adapter=adapter)
    try:
        return list(eng.generate(GenerationRequest(tokens=eng.tokenizer.tokenize(PROMPT), max_tokens=n)))
    finally:
        eng.close()


def assert_adapter_off_is_plain_psm(cfg: Config) -> None:
    """``--adapter off`` on the same configuration: no adapter loaded, the stock order (PSM)."""
    from localcoder.completion import Completer

    cfg.apply({"adapter": "off"})
    plain = Completer.from_config(cfg)
    try:
        assert plain.engine.adapter == {} and plain.order == "psm"
    finally:
        plain.engine.close()


def test_base_plus_adapter_equals_the_merged_model(tiny):
    with_adapter = greedy(tiny / "base.gguf", tiny / "adapter.gguf")
    assert with_adapter == greedy(tiny / "merged.gguf")
    assert with_adapter != greedy(tiny / "base.gguf")


def test_an_adapter_with_zero_b_is_the_base(tiny):
    assert greedy(tiny / "base.gguf", tiny / "zero.gguf") == greedy(tiny / "base.gguf")


def test_the_adapter_metadata_declares_its_order_and_auto_picks_it(tiny):
    from localcoder.completion import Completer

    cfg = Config()
    cfg.apply({"model": str(tiny / "base.gguf"), "adapter": str(tiny / "adapter.gguf"), "ctx": 512})
    completer = Completer.from_config(cfg)
    try:
        assert completer.engine.declared_orders == ("spm",)
        assert completer.engine.adapter["base_model"] == "tiny"
        assert completer.order == "spm"
    finally:
        completer.engine.close()
    assert_adapter_off_is_plain_psm(cfg)


def test_an_adapter_for_another_base_is_refused(tiny, model_05b_path):
    with pytest.raises(ModelCorrupt) as info:
        greedy(model_05b_path, tiny / "adapter.gguf", n=1)
    assert "another base model" in str(info.value)
    with pytest.raises(ModelCorrupt):  # not a GGUF LoRA at all (the base model itself)
        greedy(tiny / "base.gguf", tiny / "base.gguf", n=1)


def test_adapter_settings(tiny, tmp_path):
    from localcoder.models import ResolvedModel, with_adapter

    gguf = ResolvedModel("x", "gguf", tiny / "base.gguf")
    assert with_adapter(gguf, "off") is gguf
    assert with_adapter(gguf, "auto") is gguf  # nothing shipped for an unknown model
    assert with_adapter(gguf, str(tiny / "adapter.gguf")).meta["adapter"] == str(tiny / "adapter.gguf")
    with pytest.raises(ModelNotFound):
        with_adapter(gguf, str(tmp_path / "missing.gguf"))
    with pytest.raises(InvalidRequest) as info:
        with_adapter(ResolvedModel("h", "hf", tmp_path), str(tiny / "adapter.gguf"))
    assert info.value.param == "adapter"


def test_the_packaged_model_serves_with_its_shipped_adapter_by_default(model_05b_path):
    """`make serve`'s configuration: the 0.5B loads core/adapters/qwen2.5-coder-0.5b.gguf (auto) and
    reads the append-only order it was taught; `--adapter off` is the stock model in PSM. A keystroke
    at the cursor then evaluates only what was typed (plus the healed token), not the suffix."""
    from localcoder.completion import Completer, InfillRequest
    from localcoder.models import resolve, shipped_adapter, with_adapter

    assert shipped_adapter("qwen2.5-coder-0.5b") is not None
    by_path = with_adapter(resolve(str(model_05b_path)), "auto")  # the packaged file by path is the same model
    assert by_path.name == "qwen2.5-coder-0.5b" and by_path.meta["adapter"] == str(shipped_adapter(by_path.name))
    cfg = Config()
    cfg.apply({"model": "qwen2.5-coder-0.5b", "ctx": 2048, "threads": 2})
    completer = Completer.from_config(cfg)
    try:
        meta = completer.engine.adapter
        assert meta["base_model"] == "qwen2.5-coder-0.5b" and meta["fim_orders"] == "spm"
        assert completer.order == "spm"
        prefix = "def area(width, height):\n    \"\"\"Area of a rectangle.\"\"\"\n    re"
        suffix = "\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n" * 4
        first = completer.complete(InfillRequest(prefix, suffix, max_tokens=8))
        typed = completer.complete(InfillRequest(prefix + "t", suffix, max_tokens=8))
        assert first.timings.prompt_n > 60  # the suffix (its default budget) comes first
        assert typed.timings.prompt_n - typed.timings.cached_n <= 4, typed.timings
    finally:
        completer.engine.close()
    assert_adapter_off_is_plain_psm(cfg)
