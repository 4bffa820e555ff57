"""Depth/width pruning and magnitude sparsity on tiny random models (no tokenizer needed)."""

from __future__ import annotations

import pytest
import torch
import transformers

from localcoder.quantize.prune import (PrunePlan, WidthImportance, apply_plan, decoder_layers, layer_importance,
                                       magnitude_sparsify, prune_depth, prune_width, select_layers,
                                       width_importance)

VOCAB = 512


def tiny(arch: str = "qwen2", layers: int = 4) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)).eval()
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(**common)).eval()


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))  # (N, T)


def make_identity_block(model, i: int) -> None:
    """Zero the block's residual writes: it then returns its input unchanged."""
    layer = decoder_layers(model)[i]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        down = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj
        down.weight.zero_()
        for lin in (layer.self_attn.o_proj, down):
            if lin.bias is not None:
                lin.bias.zero_()


@pytest.mark.parametrize("arch", ["qwen2", "llama", "starcoder2"])
def test_identity_block_is_least_important_and_dropping_it_changes_nothing(arch, calib):
    model = tiny(arch)
    make_identity_block(model, 2)
    with torch.no_grad():
        ref = model(input_ids=calib).logits  # (N, T, V)
    imp = layer_importance(model, calib)
    assert len(imp) == 4 and imp[2] == pytest.approx(0.0, abs=1e-6)
    assert min(range(4), key=imp.__getitem__) == 2
    keep = select_layers(imp, 3)
    assert keep == [0, 1, 3]
    prune_depth(model, keep)
    assert model.config.num_hidden_layers == 3 and len(decoder_layers(model)) == 3
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, ref, atol=1e-5, rtol=1e-5)


def test_select_layers_protects_first_and_last():
    assert select_layers([0.0, 0.9, 0.8, 0.1], 2) == [0, 3]
    assert select_layers([0.0, 0.9, 0.8, 0.1], 3) == [0, 1, 3]
    assert select_layers([0.0, 0.9, 0.8, 0.1], 3, protect=()) == [1, 2, 3]
    with pytest.raises(ValueError):
        select_layers([0.1, 0.2], 0)


def test_pruned_model_generates_with_kv_cache_and_reloads(tmp_path, calib):
    model = tiny()
    prune_depth(model, [0, 3])
    prune_width(model, heads_keep_ratio=0.5, mlp_keep_ratio=0.5, calib=calib)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 2, 2)
    assert (cfg.head_dim, cfg.intermediate_size) == (16, 64)
    model.save_pretrained(str(tmp_path))
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=calib).logits, model(input_ids=calib).logits)
        full = again(input_ids=calib[:1]).logits[0, -1]
        # the same last-position logits through the KV cache (prefix first, then one token)
        out = again(input_ids=calib[:1, :-1], use_cache=True)
        step = again(input_ids=calib[:1, -1:], past_key_values=out.past_key_values, use_cache=True).logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_width_pruning_of_dead_heads_and_channels_is_exact(calib):
    """Heads whose o_proj columns are zero and channels whose down_proj columns are zero contribute
    nothing; with an importance that ranks them last, pruning them leaves the logits unchanged."""
    model = tiny()
    hd = model.config.hidden_size // model.config.num_attention_heads
    dead_heads, dead_chans = [1, 2], torch.arange(0, 128, 2)  # head 1 in KV group 0, head 2 in group 1
    with torch.no_grad():
        for layer in decoder_layers(model):
            for h in dead_heads:
                layer.self_attn.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            layer.mlp.down_proj.weight[:, dead_chans] = 0
        ref = model(input_ids=calib).logits
    heads = torch.tensor([1.0, 0.0, 0.0, 1.0])
    chans = torch.ones(128)
    chans[dead_chans] = 0.0
    n = len(decoder_layers(model))
    prune_width(model, 0.5, 0.5, WidthImportance([heads] * n, [chans] * n))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=calib).logits, ref, atol=1e-5, rtol=1e-5)


def test_width_importance_sees_silent_units(calib):
    model = tiny()
    with torch.no_grad():
        layer = decoder_layers(model)[0]
        layer.self_attn.v_proj.weight[:16] = 0  # KV group 0 -> query heads 0 and 1 output zeros
        layer.self_attn.v_proj.bias[:16] = 0
        layer.mlp.gate_proj.weight[:10] = 0  # act(0) * up = 0 for channels 0..9
    imp = width_importance(model, calib)
    assert imp.heads[0].shape == (4,) and imp.channels[0].shape == (128,)
    assert torch.all(imp.heads[0][:2] < 1e-6) and torch.all(imp.heads[0][2:] > 1e-3)
    assert torch.all(imp.channels[0][:10] < 1e-6) and torch.all(imp.channels[0][10:] > 0)


def test_magnitude_sparsity_is_reported_honestly(calib):
    model = tiny()
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    rep = magnitude_sparsify(model, 0.5)
    assert rep.achieved == pytest.approx(0.5, abs=0.01)
    assert rep.dense_bytes == before  # dense storage does not shrink
    assert rep.zlib_bytes_after < rep.zlib_bytes_before  # only compression sees the zeros
    emb = model.get_input_embeddings().weight
    assert int((emb == 0).sum()) == 0  # embeddings untouched
    assert "do not shrink" in rep.note


def test_plan_parse_and_apply(calib):
    plan = PrunePlan.parse("layers=0.5, mlp=0.75,sparsity=0.25")
    assert (plan.layers, plan.heads, plan.mlp, plan.sparsity) == (0.5, 1.0, 0.75, 0.25)
    assert plan.n_layers(24) == 12 and PrunePlan.parse("layers=10").n_layers(24) == 10
    with pytest.raises(ValueError):
        PrunePlan.parse("depth=3")
    model = tiny()
    res = apply_plan(model, plan, calib, progress=False)
    assert res.layers_before == 4 and len(res.layers_kept) == 2
    assert res.params_after < res.params_before
    assert model.config.intermediate_size == 96 and res.sparsity is not None
