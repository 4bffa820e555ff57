"""HF -> GGUF round trips on tiny random models: llama.cpp must compute what torch computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from localcoder.quantize.gguf import export_gguf, pre_tokenizer_name, write_gguf
from localcoder.quantize.prune import prune_width

CODE = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"


def torch_logits(model_dir, ids: list[int]) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)


def llama_logits(path, ids: list[int]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])  # (T, V)
    finally:
        llm.close()


def tiny_dir(tmp_path, tokenizer_dir, arch: str, **over):
    torch.manual_seed(1)
    common = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False) | over
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM)}[arch]
    model = cls[1](cls[0](**common)).eval()
    out = tmp_path / arch
    model.save_pretrained(str(out))
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def code_ids(qwen_tokenizer_dir) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(str(qwen_tokenizer_dir)).encode(CODE)


@pytest.fixture(scope="module")
def tiny_ref(tiny_qwen_dir, code_ids, tmp_path_factory):
    """(torch logits (T, V) of CODE, size of the F16 GGUF) for the tiny model, computed once."""
    f16 = write_gguf(tiny_qwen_dir, tmp_path_factory.mktemp("ref") / "ref-f16.gguf", "f16", progress=False)
    return torch_logits(tiny_qwen_dir, code_ids), f16.size


def test_f16_round_trip_matches_torch_and_keeps_tokenizer(tiny_qwen_dir, tmp_path, code_ids):
    import gguf
    import llama_cpp

    res = write_gguf(tiny_qwen_dir, tmp_path / "tiny-f16.gguf", "f16", progress=False)
    assert res.arch == "qwen2" and res.path.read_bytes()[:4] == b"GGUF"
    ref = torch_logits(tiny_qwen_dir, code_ids)
    got = llama_logits(res.path, code_ids)
    assert np.abs(got - ref).max() < 5e-3  # f16 weights, f32 activations
    assert (got.argmax(-1) == ref.argmax(-1)).all()

    fields = gguf.GGUFReader(str(res.path)).fields
    assert fields["tokenizer.ggml.pre"].contents() == "qwen2"
    assert fields["tokenizer.ggml.fim_pre_token_id"].contents() == 151659
    assert fields["tokenizer.ggml.fim_mid_token_id"].contents() == 151660
    assert fields["tokenizer.ggml.fim_suf_token_id"].contents() == 151661
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[151659] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    llm = llama_cpp.Llama(str(res.path), n_ctx=64, verbose=False, vocab_only=True)
    assert llm.tokenize(CODE.encode(), add_bos=False, special=False) == code_ids  # same pre-tokenizer
    assert llm.tokenize(b"<|fim_prefix|>", add_bos=False, special=True) == [151659]
    assert len(llm.tokenize(b"<|fim_prefix|>", add_bos=False, special=False)) > 1  # plain text stays text
    llm.close()


@pytest.mark.parametrize("gtype,min_top1", [("q8_0", 0.95), ("q6_k", 0.9), ("q5_k_m", 0.8), ("q4_k_m", 0.7)])
def test_quantized_types_load_and_generate(tiny_qwen_dir, tmp_path, code_ids, tiny_ref, gtype, min_top1):
    from localcoder.engines.base import GenerationRequest
    from localcoder.engines.llamacpp import LlamaCppEngine

    res = export_gguf(tiny_qwen_dir, tmp_path / f"tiny-{gtype}.gguf", gtype, progress=False)
    ref, f16_size = tiny_ref
    assert not list(tmp_path.glob(".*.f16-*.gguf"))  # intermediate removed
    assert res.size < f16_size
    got = llama_logits(res.path, code_ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= min_top1
    eng = LlamaCppEngine(res.path, n_ctx=256, n_threads=2)
    try:
        tokens = list(eng.generate(GenerationRequest(tokens=code_ids, max_tokens=5)))
    finally:
        eng.close()
    assert len(tokens) == 5


@pytest.mark.parametrize("arch", ["llama", "starcoder2"])
def test_other_families_round_trip(tmp_path, qwen_tokenizer_dir, code_ids, arch):
    """llama needs q/k rows permuted for llama.cpp's rope layout; starcoder2 has biases and LayerNorm."""
    model_dir = tiny_dir(tmp_path, qwen_tokenizer_dir, arch)
    res = write_gguf(model_dir, tmp_path / f"{arch}.gguf", "f32", progress=False)
    assert res.arch == arch
    ref = torch_logits(model_dir, code_ids)
    got = llama_logits(res.path, code_ids)
    assert np.abs(got - ref).max() < 1e-3


def test_width_pruned_model_round_trips(tiny_qwen_dir, tmp_path, code_ids):
    """After head pruning head_dim != hidden / heads: the GGUF must carry key/value lengths."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir)).eval()
    prune_width(model, heads_keep_ratio=0.5, mlp_keep_ratio=0.5, calib=torch.tensor([code_ids]))
    pruned = tmp_path / "pruned"
    model.save_pretrained(str(pruned))
    transformers.AutoTokenizer.from_pretrained(str(tiny_qwen_dir)).save_pretrained(str(pruned))
    res = write_gguf(pruned, tmp_path / "pruned.gguf", "f32", progress=False)
    assert np.abs(llama_logits(res.path, code_ids) - torch_logits(pruned, code_ids)).max() < 1e-3


def test_pre_tokenizer_detection():
    qwen = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {
        "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"}}]}}
    llama3 = {"pre_tokenizer": {"type": "Split", "pattern": {
        "Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"}}}
    star = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel"}]}}
    assert pre_tokenizer_name(qwen, "qwen2") == "qwen2"
    assert pre_tokenizer_name(llama3, "llama") == "llama-bpe"
    assert pre_tokenizer_name(star, "starcoder2") == "starcoder"


def test_bad_inputs_are_clear_errors(tiny_qwen_dir, tmp_path):
    from localcoder.errors import InvalidRequest

    with pytest.raises(InvalidRequest, match="unknown GGUF type"):
        export_gguf(tiny_qwen_dir, tmp_path / "x.gguf", "q3_xyz")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(InvalidRequest, match="supports"):
        write_gguf(tmp_path / "gpt2", tmp_path / "y.gguf", "f16")
