"""`localcoder bench --workloads formats`: artifacts of one model measured in-process, interleaved, with the
bandwidth bound; real onnxruntime and torch inference on the tiny random Qwen2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from localcoder.bench import BenchConfig, markdown, write_outputs
from localcoder.bench_formats import parse_formats, run_formats
from localcoder.errors import InvalidRequest
from localcoder.quantize.onnx import export_fp32


@pytest.fixture(scope="module")
def tiny_onnx(tiny_qwen_dir, tmp_path_factory):
    return export_fp32(tiny_qwen_dir, tmp_path_factory.mktemp("formats") / "onnx", progress=False).path


def test_formats_rows_are_interleaved_medians_with_the_bound(tiny_onnx, tiny_qwen_dir, tmp_path):
    cfg = BenchConfig(model=str(tiny_onnx), workloads="formats", formats=(f"torch fp32={tiny_qwen_dir}",),
                      format_rounds=3, format_prompt_tokens=48, format_decode_tokens=6, threads=1)
    got = run_formats(cfg, progress=False)
    first, torch_row = got["rows"]
    assert (first["kind"], torch_row["kind"], torch_row["label"]) == ("onnx", "hf", "torch fp32")
    for row in got["rows"]:
        assert len(row["prefill_rounds"]) == len(row["decode_rounds"]) == 3
        assert row["decode_tok_s"] == sorted(row["decode_rounds"])[1] > 0  # the median of the rounds
        assert row["weights_per_token_mb"] > 0
        bound = got["read_bandwidth_gbs"] * 1e3 / row["weights_per_token_mb"]
        assert row["decode_bound_tok_s"] == pytest.approx(bound, rel=0.01)
        assert row["of_bound"] == pytest.approx(row["decode_tok_s"] / row["decode_bound_tok_s"], abs=0.002)
    assert first["decode_vs_first"] == 1.0
    assert torch_row["decode_vs_first"] == pytest.approx(torch_row["decode_tok_s"] / first["decode_tok_s"], rel=0.01)
    report = {"results": {}, "bound": {}, "config": {"debounce_ms": 0}, "ratios_localcoder_over_peer": {},
              "formats": got}
    assert "| torch fp32 | hf |" in markdown(report)
    paths = write_outputs(report, tmp_path)
    assert paths["formats_plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot" not in paths


def test_a_missing_artifact_is_named_before_anything_runs(tmp_path):
    with pytest.raises(InvalidRequest, match="nope"):
        parse_formats("m.gguf", [f"x={tmp_path / 'nope'}"])
    proc = subprocess.run([sys.executable, "-m", "localcoder.cli", "bench", "--model", "fake", "--formats",
                           f"x={tmp_path / 'nope'}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "nope" in proc.stderr and not (tmp_path / "o").exists()
