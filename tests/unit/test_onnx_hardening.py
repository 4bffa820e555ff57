"""ONNX exports under failure: kill -9 midway, truncated/corrupt files, CUDA asked for without the provider."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import onnx
import onnxruntime
import pytest

from localcoder.engines.onnx import INCOMPLETE, MANIFEST, OnnxEngine, pick_providers
from localcoder.errors import BackendUnavailable, ModelCorrupt, ModelNotFound
from localcoder.quantize.onnx import export_fp32


@pytest.fixture(scope="module")
def onnx_fp32(tiny_qwen_dir, tmp_path_factory):
    return export_fp32(tiny_qwen_dir, tmp_path_factory.mktemp("onnx") / "fp32", progress=False).path


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_a_complete_export_has_a_manifest_and_no_marker(onnx_fp32):
    import json

    files = json.loads((onnx_fp32 / MANIFEST).read_text())["files"]
    assert files["model.onnx"] == (onnx_fp32 / "model.onnx").stat().st_size
    assert not (onnx_fp32 / INCOMPLETE).exists()
    assert not list(onnx_fp32.parent.glob(".fp32.tmp-*"))  # the temporary directory was renamed away


def test_export_killed_midway_leaves_nothing_loadable(onnx_fp32, tmp_path):
    """A real kill -9 of a quantization while it writes: the target never appears, the leftover is refused."""
    out = tmp_path / "int8"
    script = textwrap.dedent(f"""
        import sys, time
        import localcoder.quantize.onnx as q
        real = q._copy_side_files
        def stall(src, dst):
            real(src, dst)
            print("written", flush=True)
            time.sleep(120)  # killed here: model.onnx and side files are in the temporary directory
        q._copy_side_files = stall
        q.quantize_onnx({str(onnx_fp32)!r}, {str(out)!r}, "int8", progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    (leftover,) = tmp_path.glob(".int8.tmp-*")
    assert (leftover / "model.onnx").exists() and (leftover / INCOMPLETE).exists()
    from localcoder.engines import load_engine
    from localcoder.models import resolve

    with pytest.raises(ModelNotFound):
        resolve(str(out))
    with pytest.raises(ModelCorrupt, match="unfinished ONNX export"):  # what `serve --model LEFTOVER` does
        load_engine(resolve(str(leftover)))


def test_truncated_model_file_is_named(onnx_fp32, tmp_path):
    d = _copy(onnx_fp32, tmp_path / "trunc")
    f = d / "model.onnx"
    with f.open("r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(ModelCorrupt, match=f"{f}.*truncated"):  # caught by the manifest before loading
        OnnxEngine(d)
    (d / MANIFEST).unlink()  # an export from elsewhere (no manifest): the parse failure, with the file
    with pytest.raises(ModelCorrupt, match=f"{f}.*truncated"):
        OnnxEngine(d)


def test_corrupt_bytes_of_the_same_size(onnx_fp32, tmp_path):
    d = _copy(onnx_fp32, tmp_path / "garbled")
    f = d / "model.onnx"
    data = bytearray(f.read_bytes())
    data[:4096] = os.urandom(4096)
    f.write_bytes(bytes(data))
    with pytest.raises(ModelCorrupt, match=str(f)):
        OnnxEngine(d)


@pytest.mark.parametrize("with_manifest", [True, False])
def test_truncated_external_data_is_named(onnx_fp32, tmp_path, with_manifest):
    d = tmp_path / "ext"
    d.mkdir()
    for p in onnx_fp32.iterdir():
        if not p.name.startswith("model.onnx") and p.name != MANIFEST:
            shutil.copy2(p, d / p.name)
    onnx.save_model(onnx.load(str(onnx_fp32 / "model.onnx")), str(d / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx_data", size_threshold=0)
    assert OnnxEngine(d, n_threads=1).score([1, 2, 3]).shape[0] == 3  # the external layout loads and runs
    if with_manifest:
        import json

        files = {p.name: p.stat().st_size for p in d.iterdir()}
        (d / MANIFEST).write_text(json.dumps({"files": files}))
    data = d / "model.onnx_data"
    with data.open("r+b") as fh:
        fh.truncate(data.stat().st_size - 1000)
    with pytest.raises(ModelCorrupt, match=f"{data}.*truncated"):
        OnnxEngine(d)
    data.unlink()
    with pytest.raises(ModelCorrupt, match=f"{data} is missing"):
        OnnxEngine(d)


def test_cuda_without_the_provider_says_what_to_install(onnx_fp32, monkeypatch):
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the refusal path cannot happen")
    with pytest.raises(BackendUnavailable) as err:
        OnnxEngine(onnx_fp32, device="cuda")
    assert "CUDAExecutionProvider" in str(err.value)
    assert "pip install onnxruntime-gpu==1.31.1" in err.value.hint and "pip uninstall -y onnxruntime" in err.value.hint
    assert pick_providers(onnxruntime, "auto") == (["CPUExecutionProvider"], "cpu")
    with pytest.raises(Exception, match="device must be"):
        pick_providers(onnxruntime, "tpu")


def test_cuda_provider_present_but_not_starting(onnx_fp32, monkeypatch):
    """onnxruntime-gpu on a machine without a usable GPU: the session silently falls back to CPU;
    --device cuda must say so instead of running on the CPU, auto must just use the CPU."""
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("a real CUDA provider is installed")
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(BackendUnavailable, match="did not start"):
        OnnxEngine(onnx_fp32, device="cuda")
    eng = OnnxEngine(onnx_fp32, device="auto", n_threads=1)
    assert eng.device == "cpu" and eng.score([1, 2]).shape[0] == 2


def test_session_threads_and_kv_stay_ortvalues(onnx_fp32):
    from localcoder.engines.base import GenerationRequest

    eng = OnnxEngine(onnx_fp32, n_threads=2)
    opts = eng.session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    row = eng._logits_row
    toks = list(eng.generate(GenerationRequest(tokens=[1, 2, 3, 4], max_tokens=5)))
    assert len(toks) == 5 and eng.past_len == 8
    assert all(isinstance(v, onnxruntime.OrtValue) for v in eng.past)  # no numpy copy of the cache
    assert eng.past[0].shape() == [1, eng.n_kv_heads, 8, eng.head_dim]
    assert eng._logits_row is row  # the decode row buffer is reused, not reallocated
    assert OnnxEngine(onnx_fp32).threads == (os.cpu_count() or 2)  # 0 threads = every core, like llama.cpp
