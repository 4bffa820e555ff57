"""Quality gate, reports, bitsandbytes configs and the `localcoder quantize` CLI on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from localcoder.cli import main
from localcoder.quantize.gate import Artifact, GateConfig, kl_and_top1, run_gate
from localcoder.quantize.gguf import write_gguf
from localcoder.quantize.report import markdown, write_report

SMALL = dict(n_humaneval=1, n_heldout=1, calib_seqs=2, calib_len=64, speed_prompt=32, speed_decode=4, threads=1,
             fim_max_tokens=8, progress=False)
SMALL_ARGS = ["--n-humaneval", "1", "--n-heldout", "1", "--calib-seqs", "2", "--threads", "1", "--fim-max-tokens", "8",
              "-q"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_kl_and_top1():
    a = np.log(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    assert kl_and_top1(a, a) == (pytest.approx(0.0, abs=1e-7), 1.0)
    b = np.log(np.array([[0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
    kl, top1 = kl_and_top1(a, b + 5.0)  # logits are shift-invariant
    expected = (0.7 * np.log(0.7 / 0.2) + 0.2 * np.log(0.2 / 0.7)) / 2
    assert kl == pytest.approx(expected, rel=1e-5) and top1 == 0.5
    wider = np.concatenate([b, np.full((2, 2), -1e9)], axis=1)  # padded vocabulary rows are cut
    assert kl_and_top1(a, wider)[0] == pytest.approx(expected, rel=1e-5)


def test_gate_passes_a_faithful_export_and_fails_a_broken_one(tiny_qwen_dir, tmp_path):
    good = write_gguf(tiny_qwen_dir, tmp_path / "good.gguf", "f16", progress=False).path
    # deliberately broken: same architecture and tokenizer, different (random) weights
    torch.manual_seed(123)
    other = transformers.Qwen2ForCausalLM(transformers.AutoConfig.from_pretrained(str(tiny_qwen_dir)))
    broken_dir = tmp_path / "broken-hf"
    other.save_pretrained(str(broken_dir))
    transformers.AutoTokenizer.from_pretrained(str(tiny_qwen_dir)).save_pretrained(str(broken_dir))
    broken = write_gguf(broken_dir, tmp_path / "broken.gguf", "f16", progress=False).path

    report = run_gate(tiny_qwen_dir, [Artifact("gguf f16", "gguf", good, "f16"),
                                      Artifact("gguf broken", "gguf", broken, "f16")], GateConfig(**SMALL))
    ok, bad = report.artifacts
    assert ok.passed and ok.top1 >= 0.95 and ok.kl < 1e-3 and ok.reasons == []
    assert not bad.passed and bad.top1 < 0.6 and any("top-1" in r for r in bad.reasons)
    assert not report.passed
    for r in (report.source, ok, bad):
        assert r.n_cases == 2 and r.es is not None and r.decode_tok_s > 0 and r.prefill_tok_s > 0
        assert r.weight_bytes_per_token > 0 and 0 < r.bound_fraction
    assert ok.size_bytes < report.source.size_bytes  # f16 vs fp32 safetensors
    assert report.bandwidth_gb_s > 0.5

    md, js = write_report(report.to_dict(), tmp_path / "rep")
    text = md.read_text()
    assert "| gguf f16 |" in text and "FAIL: top-1" in text and "Gate: **FAILED**" in text
    assert json.loads(js.read_text())["artifacts"][1]["passed"] is False


def test_es_drop_threshold_is_what_fails_the_gate():
    from localcoder.quantize.gate import ArtifactResult, judge

    src = ArtifactResult("s", "hf", "fp32", "p", 1, 1, 0, 0, 0, es=0.70)
    art = ArtifactResult("a", "gguf", "q4", "p", 1, 1, 0, 0, 0, es=0.675, kl=0.05, top1=0.9)
    judge(art, src, GateConfig(threshold=0.02))
    assert not art.passed and art.es_drop == pytest.approx(0.025) and "ES dropped 2.5 points" in art.reasons[0]
    judge(art, src, GateConfig(threshold=0.03))
    assert art.passed
    art.es_diff_ci = (-0.065, 0.014)  # the drop's CI reaches past 0: the sample cannot tell it from noise
    judge(art, src, GateConfig(threshold=0.02))
    assert art.passed and art.es_drop == pytest.approx(0.025)
    art.es_diff_ci = (-0.05, -0.004)  # a real drop above the threshold fails
    judge(art, src, GateConfig(threshold=0.02))
    assert not art.passed
    assert "ES drop" in markdown({"passed": True, "bandwidth_gb_s": 10.0, "machine": {"cpus": 2},
                                  "config": {**GateConfig().__dict__}, "source": src.__dict__,
                                  "artifacts": [art.__dict__]})


def test_cli_gate_failure_exit_code_and_force(tiny_qwen_dir, tmp_path, home, capsys):
    from localcoder import models

    out = tmp_path / "tiny-q8.gguf"
    strict = ["quantize", str(tiny_qwen_dir), "--to", "gguf", "--type", "q8_0", "--out", str(out),
              "--min-top1", "1.01", *SMALL_ARGS]  # an impossible floor: the gate must fail
    assert main(strict) == 1
    assert out.exists() and (tmp_path / "tiny-q8.gguf.report.md").exists()
    assert "tiny-q8" not in {r.name for r in models.listing()}
    assert "quality gate FAILED" in capsys.readouterr().err
    assert main(strict + ["--force", "--name", "tiny-forced"]) == 0
    entry = models.resolve("tiny-forced")
    assert entry.kind == "gguf" and entry.meta["gate"] is False and entry.meta["type"] == "q8_0"
    assert list((home / "gate-cache").glob("source-*.json"))  # the source eval was cached and reused


def test_cli_prune_to_hf_for_distill(tiny_qwen_dir, tmp_path, home):
    from localcoder import models

    out = tmp_path / "pruned"
    assert main(["quantize", str(tiny_qwen_dir), "--to", "hf", "--prune", "layers=2,mlp=0.5", "--out", str(out),
                 "--no-gate", "-q"]) == 0
    cfg = transformers.AutoConfig.from_pretrained(str(out))
    assert cfg.num_hidden_layers == 2 and cfg.intermediate_size == 64
    assert models.resolve("pruned").kind == "hf"
    assert main(["quantize", str(tiny_qwen_dir), "--to", "hf", "--out", str(out), "-q"]) == 2  # needs --prune


def test_bnb_config_saved_and_clear_message_without_cuda(tiny_qwen_dir, tmp_path, home, capsys):
    from localcoder.errors import BackendUnavailable
    from localcoder.quantize.bnb import bnb_quantization_config, cuda_status, require_cuda, save_bnb

    out = save_bnb(tiny_qwen_dir, tmp_path / "nf4", "nf4")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"] == bnb_quantization_config("nf4")
    assert cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert (out / "model.safetensors").stat().st_size == (tiny_qwen_dir / "model.safetensors").stat().st_size
    if torch.cuda.is_available():
        return
    assert "CUDA" in cuda_status()
    with pytest.raises(BackendUnavailable, match="CUDA"):
        require_cuda()
    rc = main(["quantize", str(tiny_qwen_dir), "--to", "bnb", "--type", "int8", "--out", str(tmp_path / "i8"), "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and "CUDA" in err and "Traceback" not in err
    assert json.loads((tmp_path / "i8" / "config.json").read_text())["quantization_config"]["load_in_8bit"]
