"""HF -> ONNX (optimum, KV cache) -> onnxruntime engine, on the tiny random Qwen2 with the real tokenizer."""

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


def test_logits_match_torch(onnx_fp32, torch_model, ids):
    eng = OnnxEngine(onnx_fp32, n_threads=2, n_batch=7)  # chunked scoring through the KV inputs
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, V)
    got = eng.score(ids)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-4


def test_generation_matches_torch_and_reuses_the_cache(onnx_fp32, torch_model, ids):
    eng = OnnxEngine(onnx_fp32, n_threads=2)
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
def test_quantized_exports_keep_the_head_and_generate(onnx_fp32, tmp_path, torch_model, ids, qtype, min_top1):
    res = quantize_onnx(onnx_fp32, tmp_path / qtype, qtype, progress=False)
    assert res.kept_nodes == ["/lm_head/MatMul"] and res.quantized_nodes == 4 * 7  # 7 matmuls per block
    graph = onnx.load(str(res.path / "model.onnx"))
    ops = {n.op_type for n in graph.graph.node}
    assert "MatMulNBits" in ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}  # weight-only
    bits = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
    assert bits == {8 if qtype == "int8" else 4}
    assert any(n.name == "/lm_head/MatMul" and n.op_type == "MatMul" for n in graph.graph.node)
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
