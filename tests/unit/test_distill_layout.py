"""`--preset layout` and its adapter export: the preset is a model teaching itself a cache-friendly
order with LoRA; the run's newest checkpoint becomes a GGUF LoRA whose metadata declares the order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from localcoder.distill.config import load
from localcoder.distill.layout import LORA_ALPHA_PER_RANK, export_adapter
from localcoder.errors import InvalidRequest, ModelCorrupt

CONFIG = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "hidden_size": 64}


def test_the_layout_preset_is_the_teacher_teaching_itself_spm_with_lora():
    cfg = load("layout", None, {"teacher": "qwen2.5-coder-1.5b"})
    assert cfg.student == "qwen2.5-coder-1.5b"  # "teacher": the teacher itself at full depth
    assert (cfg.lora_rank, cfg.fim_order, cfg.teacher_order, cfg.fim_rate) == (16, "spm", "psm", 1.0)
    assert "cursor" in cfg.span_kinds and "char" in cfg.span_kinds  # cuts inside lines, as people pause while typing
    assert cfg.seq_len >= 1024  # rows as long as served prompts (256-token rows failed on long prefixes)
    assert load("layout", None, {"student": "other"}).student == "other"  # an explicit student wins


def checkpoint(out, step: int = 7, rank: int = 4):
    """A training checkpoint as the loop writes it: LoRA tensors under their PEFT parameter names."""
    ck = out / "checkpoints" / f"step-{step:07d}"
    ck.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text(ck.name)
    tensors = {}
    for layer in range(2):
        for proj, (o, i) in {"q_proj": (64, 64), "v_proj": (32, 64)}.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{name}.lora_A.default.weight"] = torch.randn(rank, i)
            tensors[f"{name}.lora_B.default.weight"] = torch.randn(o, rank)
    torch.save({"model": tensors, "optim": {}, "rng": {}}, ck / "state.pt")
    (ck / "run.json").write_text(json.dumps({"step": step}))
    (out / "init").mkdir()
    (out / "init" / "config.json").write_text(json.dumps(CONFIG))
    return tensors


def test_export_writes_a_gguf_lora_with_the_order_and_provenance(tmp_path):
    import gguf

    tensors = checkpoint(tmp_path)
    cfg = load("layout", None, {"teacher": "qwen2.5-coder-0.5b", "lora_rank": 4})
    res = export_adapter(cfg, tmp_path)
    reader = gguf.GGUFReader(str(res.path))

    def field(key):
        f = reader.fields[key]
        return bytes(f.parts[f.data[0]]).decode() if f.types[0] == gguf.GGUFValueType.STRING else f.parts[f.data[0]][0]

    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "qwen2"
    assert field("adapter.lora.alpha") == pytest.approx(LORA_ALPHA_PER_RANK * 4)
    assert field("localcoder.fim_orders") == "spm" and field("localcoder.steps") == "7"
    assert field("localcoder.base_model") == "qwen2.5-coder-0.5b" and len(field("localcoder.base_sha256")) == 64
    by_name = {t.name: t for t in reader.tensors}
    assert len(by_name) == 8
    a = by_name["blk.1.attn_v.weight.lora_a"]
    b = by_name["blk.1.attn_v.weight.lora_b"]
    assert list(a.shape) == [64, 4] and list(b.shape) == [4, 32]  # GGUF order: A [in, r], B [r, out]
    want = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"].numpy()
    assert np.allclose(np.asarray(b.data, dtype=np.float32).reshape(32, 4), want, atol=1e-2)


def test_export_refuses_what_has_no_adapter(tmp_path):
    with pytest.raises(InvalidRequest):
        export_adapter(load("laptop"), tmp_path)  # not a LoRA run
    with pytest.raises(ModelCorrupt):
        export_adapter(load("layout"), tmp_path)  # no checkpoint yet


def test_autocast_is_bf16_on_cuda_and_on_cpus_with_native_bf16(monkeypatch):
    from localcoder.distill import memory

    assert memory.autocast_dtype("off", "cuda") is None and memory.autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert memory.autocast_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(memory, "native_bf16", lambda: False)
    assert memory.autocast_dtype("auto", "cpu") is None  # emulated bf16 would be slower than fp32
    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    assert memory.autocast_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(InvalidRequest):
        load("layout", None, {"autocast": "fp8"})
