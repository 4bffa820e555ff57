"""HF -> ONNX (onnxruntime-genai's builder by default, optimum as the fallback; KV cache) -> onnxruntime engine,
on the tiny random Qwen2 with the real tokenizer."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import transformers

from localcoder.engines.base import CancelToken, GenerationRequest
from localcoder.engines.onnx import OnnxEngine
from localcoder.quantize.onnx import export_fp32, quantize_onnx

CODE = "import os\n\ndef read(path):\n    with open(path) as fh:\n        return fh.read()\n"


@pytest.fixture(scope="module")
def onnx_fp32(tiny_qwen_dir, tmp_path_factory):
    return export_fp32(tiny_qwen_dir, tmp_path_factory.mktemp("onnx") / "fp32", progress=False).path


@pytest.fixture(scope="module")
def onnx_fp32_optimum(tiny_qwen_dir, tmp_path_factory):
    return export_fp32(tiny_qwen_dir, tmp_path_factory.mktemp("onnx") / "fp32-optimum", graph="optimum",
                       progress=False).path


def test_the_default_graph_is_the_fused_builder_graph(onnx_fp32, onnx_fp32_optimum):
    ops = {n.op_type for n in onnx.load(str(onnx_fp32 / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and "SkipSimplifiedLayerNormalization" in ops
    plain = {n.op_type for n in onnx.load(str(onnx_fp32_optimum / "model.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" not in plain


@pytest.fixture(scope="module")
def torch_model(tiny_qwen_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(tiny_qwen_dir) -> list[int]:
    return transformers.AutoTokenizer.from_pretrained(str(tiny_qwen_dir)).encode(CODE)


def torch_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("graph", ["onnx_fp32", "onnx_fp32_optimum"])
def test_logits_match_torch(graph, request, torch_model, ids):
    eng = OnnxEngine(request.getfixturevalue(graph), n_threads=2, n_batch=7)  # chunked scoring through the KV inputs
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)
    got = eng.score(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("graph", ["onnx_fp32", "onnx_fp32_optimum"])
def test_generation_matches_torch_and_reuses_the_cache(graph, request, torch_model, ids):
    eng = OnnxEngine(request.getfixturevalue(graph), n_threads=2)
    assert eng.name == "onnx" and eng.device == "cpu"
    stream = eng.generate(GenerationRequest(tokens=ids, max_tokens=6))
    first = list(stream)
    assert first == torch_greedy(torch_model, ids, 6)
    assert stream.timings.cached_n == 0 and stream.timings.predicted_n == 6

    longer = ids + first[:3]  # the user accepted three tokens: only they need evaluating
    stream = eng.generate(GenerationRequest(tokens=longer, max_tokens=4))
    warm = list(stream)
    assert stream.timings.cached_n == len(longer) - 1
    eng.reset_cache()
    cold_stream = eng.generate(GenerationRequest(tokens=longer, max_tokens=4))
    assert list(cold_stream) == warm and cold_stream.timings.cached_n == 0

    edited = ids[:-2] + [ids[-1], ids[-2]]  # an edit inside the prompt crops the cache to the common prefix
    stream = eng.generate(GenerationRequest(tokens=edited, max_tokens=3))
    assert list(stream) == torch_greedy(torch_model, edited, 3)
    assert stream.timings.cached_n == len(ids) - 2


def test_cancel_and_stop_tokens(onnx_fp32, ids):
    eng = OnnxEngine(onnx_fp32, n_threads=2)
    cancel = CancelToken()
    stream = eng.generate(GenerationRequest(tokens=ids, max_tokens=20, cancel=cancel))
    got = [next(stream)]
    cancel.cancel()
    got += list(stream)
    assert got and len(got) == 1 and stream.timings.cancelled
    first = list(eng.generate(GenerationRequest(tokens=ids, max_tokens=3)))
    stream = eng.generate(GenerationRequest(tokens=ids, max_tokens=3, stop_token_ids=frozenset({first[1]})))
    assert list(stream) == first[:1] and stream.timings.stopped_by_token


@pytest.mark.parametrize("qtype,min_top1", [("int8", 0.8), ("int4", 0.5)])
def test_quantized_exports_by_default(onnx_fp32, tmp_path, torch_model, ids, qtype, min_top1):
    """Defaults: int8 activations per block (accuracy level 4), the head quantized too; int8 rounds to nearest,
    int4 is k-quant with llama.cpp Q4_K_M's mixed precision (head + sensitive blocks' QKV/down at 8 bits)."""
    import json

    res = quantize_onnx(onnx_fp32, tmp_path / qtype, qtype, progress=False)
    assert res.kept_nodes == [] and res.quantized_nodes == 4 * 5 + 1  # qkv, o, gate, up, down per block + head
    graph = onnx.load(str(res.path / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}  # weight-only
    assert not any(n.op_type == "MatMul" and n.name == "/lm_head/MatMul" for n in graph.graph.node)
    nodes, _ = _nbits_nodes(res.path)
    assert {v[1] for v in nodes.values()} == {4}
    bits = {k.split("_Q")[0]: v[0] for k, v in nodes.items()}  # the rtn/k-quant path renames nodes ..._Q4
    if qtype == "int8":
        assert set(bits.values()) == {8}
    else:  # 4 blocks: layer 0 (first eighth; the last eighth, i >= 3.5, is empty) and 2 (i % 3 == 2)
        eight = {k for k, b in bits.items() if b == 8}
        assert {k for k in eight if "lm_head" in k} and set(res.eight_bit_nodes) == {
            f"/model/layers.{i}/{m}/MatMul" for i in (0, 2) for m in ("attn/qkv_proj", "mlp/down_proj")
        } | {"/lm_head/MatMul"}
        assert not any("layers.1/" in k or "layers.3/" in k for k in eight) and 4 in bits.values()
        assert json.loads((res.path / "localcoder-onnx.json").read_text())["quantizer"]["algorithm"] == "k_quant"
    eng = OnnxEngine(res.path, n_threads=2)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert (eng.score(ids).argmax(-1) == ref.argmax(-1)).mean() >= min_top1
    assert len(list(eng.generate(GenerationRequest(tokens=ids, max_tokens=4)))) == 4


def test_load_engine_picks_onnx_for_an_export_dir(onnx_fp32):
    from localcoder.config import ModelConfig
    from localcoder.engines import load_engine
    from localcoder.models import resolve

    model = resolve(str(onnx_fp32))
    assert model.kind == "onnx"
    eng = load_engine(model, ModelConfig(threads=1, ctx=512))
    assert isinstance(eng, OnnxEngine) and eng.n_ctx == 512
    assert eng.tokenizer.special_token_id("<|fim_prefix|>") == 151659


def test_errors_are_typed(tmp_path, onnx_fp32):
    from localcoder.errors import BackendUnavailable, ContextTooLong, ModelCorrupt

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelCorrupt):
        OnnxEngine(tmp_path / "broken")
    eng = OnnxEngine(onnx_fp32, n_ctx=16)
    with pytest.raises(ContextTooLong):
        eng.generate(GenerationRequest(tokens=list(range(10)), max_tokens=10))
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="CUDA"):
            OnnxEngine(onnx_fp32, device="cuda")


def _nbits_nodes(path):
    graph = onnx.load(str(path / "model.onnx"))
    out = {}
    for n in graph.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            out[n.name] = (attrs.get("bits"), attrs.get("accuracy_level", 0), attrs.get("block_size"), len(n.input))
    return out, graph


@pytest.mark.parametrize("qtype,cfg,head_bits", [
    ("int8", dict(accuracy_level=4), 8),  # block-wise int8 activations, head quantized too (keep=[])
    ("int4", dict(algorithm="k_quant", accuracy_level=4, eight_bit=["lm_head", "layers.0/"]), 8),  # mixed
    ("int4", dict(accuracy_level=4, eight_bit=["lm_head"]), 8),  # two passes: 8-bit head, 4-bit blocks
    ("int4", dict(algorithm="rtn", block_size=16, symmetric=False, eight_bit=()), 4),  # () = all 4-bit
    ("int4", dict(algorithm="hqq", accuracy_level=4, eight_bit=[""]), 4),  # what `--onnx-8bit ''` gives
    ("int4", dict(algorithm="gptq", gptq_seqs=1, eight_bit=()), 4),
])
def test_quantizer_options(onnx_fp32, tmp_path, torch_model, ids, qtype, cfg, head_bits):
    from localcoder.quantize.onnx import OnnxQuantConfig

    res = quantize_onnx(onnx_fp32, tmp_path / "q", qtype, keep=[], config=OnnxQuantConfig(**cfg), progress=False)
    assert res.kept_nodes == [] and res.quantized_nodes == 4 * 5 + 1  # the head is quantized too
    nodes, graph = _nbits_nodes(res.path)
    assert not any(n.op_type == "MatMul" and n.name == "/lm_head/MatMul" for n in graph.graph.node)
    head = next(v for k, v in nodes.items() if k.startswith("/lm_head/MatMul"))
    block = {k: v for k, v in nodes.items() if k.startswith("/model/layers.1/")}
    assert head[0] == head_bits and len(block) == 5  # fused qkv, o, gate, up, down
    base_bits = 8 if qtype == "int8" else 4
    assert {v[0] for v in block.values()} == {base_bits}
    if any(cfg.get("eight_bit") or ()):  # the nodes the patterns name kept at 8 bits, the rest at 4
        named = {k: v for k, v in nodes.items() if any(p in k for p in cfg["eight_bit"])}
        assert named and {v[0] for v in named.values()} == {8}
        assert res.eight_bit_nodes and all(any(p in n for p in cfg["eight_bit"]) for n in res.eight_bit_nodes)
    if "accuracy_level" in cfg:
        assert {v[1] for v in nodes.values()} == {cfg["accuracy_level"]}
    if "block_size" in cfg:
        assert {v[2] for v in block.values()} == {cfg["block_size"]}
    if cfg.get("symmetric") is False or cfg.get("algorithm") == "hqq":
        assert {v[3] for v in block.values()} == {4}  # A, B, scales, zero points
    eng = OnnxEngine(res.path, n_threads=2)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert (eng.score(ids).argmax(-1) == ref.argmax(-1)).mean() >= (0.8 if qtype == "int8" else 0.3)
    import json

    assert json.loads((res.path / "localcoder-onnx.json").read_text())["quantizer"]["algorithm"] == \
        cfg.get("algorithm", "default" if qtype == "int8" else "k_quant")


def test_bad_quantizer_options_fail_before_exporting(onnx_fp32, tmp_path):
    from localcoder.errors import InvalidRequest
    from localcoder.quantize.onnx import OnnxQuantConfig, export_onnx

    for qtype, cfg in [("int8", dict(algorithm="hqq")), ("int4", dict(block_size=24)),
                       ("int8", dict(eight_bit=["lm_head"]))]:  # mixed 8-bit layers are for int4
        with pytest.raises(InvalidRequest):
            export_onnx("/nonexistent", tmp_path / "x", qtype, config=OnnxQuantConfig(**cfg), progress=False)
    assert not (tmp_path / "x").exists()


def test_quantize_cli_flags_come_from_the_config():
    import argparse

    from localcoder.cliargs import values_from_args
    from localcoder.quantize.cli import add_arguments
    from localcoder.quantize.onnx import OnnxQuantConfig

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["m", "--to", "onnx", "--type", "int4", "--out", "o", "--onnx-accuracy-level", "4",
                         "--onnx-algorithm", "k_quant", "--onnx-block-size", "64", "--no-onnx-symmetric",
                         "--onnx-8bit", "lm_head", "down_proj"])
    cfg = OnnxQuantConfig(**values_from_args(args, OnnxQuantConfig))
    assert (cfg.accuracy_level, cfg.algorithm, cfg.block_size, cfg.symmetric) == (4, "k_quant", 64, False)
    assert list(cfg.eight_bit) == ["lm_head", "down_proj"]
    assert OnnxQuantConfig(**values_from_args(p.parse_args(["m", "--to", "onnx", "--out", "o"]),
                                              OnnxQuantConfig)) == OnnxQuantConfig()


def test_fp16_export_for_cuda(onnx_fp32, tmp_path, ids):
    import numpy as np

    from localcoder.quantize.onnx import convert_fp16

    res = convert_fp16(onnx_fp32, tmp_path / "fp16", progress=False)
    graph = onnx.load(str(res.path / "model.onnx"))
    kv = [i for i in graph.graph.input if i.name.startswith("past_key_values.")]
    assert kv and all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for i in kv)
    floats = [t for t in graph.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in floats) >= 0.9 * len(floats)
    weights = lambda d: sum(p.stat().st_size for p in d.glob("model.onnx*"))  # noqa: E731
    assert weights(res.path) < 0.6 * weights(onnx_fp32)
    eng = OnnxEngine(res.path, n_threads=2)  # meant for CUDA, but the CPU provider runs it too
    assert eng.kv_dtype == np.float16 and eng.logits_dtype == np.float16
    ref = OnnxEngine(onnx_fp32, n_threads=2).score(ids)
    got = eng.score(ids)
    assert got.dtype == np.float32 and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9
    assert len(list(eng.generate(GenerationRequest(tokens=ids, max_tokens=3)))) == 3  # fp16 KV through the loop
