"""The distillation recipe on a tiny random Qwen2 teacher (distill/train.py, cli.py): loss goes down,
kill -9 + --resume is bit-exact, 2-process gloo DDP matches 1 process, every bad input is refused
clearly (exit 2) without losing checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localcoder.cli import main as cli_main
from localcoder.distill.train import train
from tests.unit.distill_helpers import BIN, cfg_of, corpus, flags, home, records, weights  # noqa: F401 (fixtures)


def test_kd_steps_lower_the_loss_and_export_registers(tiny_qwen_dir, corpus, tmp_path, home):
    out = tmp_path / "run"
    cfg = cfg_of(flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", steps=12, **{"train-rows": 2}))
    res = train(cfg, progress=False)
    losses = [r["loss"] for r in records(out) if "split" not in r]
    assert losses[-1] < 0.95 * losses[0] and sum(b < a for a, b in zip(losses, losses[1:])) >= 9, losses
    assert (out / "model" / "model.safetensors").exists() and (out / "report.md").exists()
    assert (out / "curves.png").stat().st_size > 1000
    prov = json.loads((out / "model" / "localcoder.json").read_text())
    assert prov["steps"] == 12 and prov["student_init"]["layers_kept"] == [0, 3]
    assert res.state.history[-1]["final"] and "kl" in res.state.history[-1]
    reg = json.loads((home / "registry.json").read_text())
    assert reg["run"]["path"] == str((out / "model").resolve())
    from localcoder.models import resolve

    assert resolve("run").kind == "hf"


def test_kill_9_then_resume_is_bit_exact(tiny_qwen_dir, corpus, tmp_path):
    common = dict(steps=30, **{"ckpt-every": 5, "val-every": 10})
    ref = tmp_path / "ref"
    train(cfg_of(flags(tiny_qwen_dir, corpus, ref, tmp_path / "cache", **common)), progress=False)

    out = tmp_path / "killed"
    argv = [str(BIN / "localcoder"), "distill", *flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", **common)]
    proc = subprocess.Popen(argv, env=os.environ.copy(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-0000010"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    killed_at = int(latest.read_text().split("-")[1])
    assert 10 <= killed_at < 30
    res = train(cfg_of(flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", **common)), resume=True, progress=False)
    assert res.state.step == 30
    a, b = weights(ref), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(flag_list: list[str]) -> None:
    from tests.conftest import free_port

    argv = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
            "-m", "localcoder.distill.cli", *flag_list]
    proc = subprocess.run(argv, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(parallel, tiny_qwen_dir, corpus, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP replicas, or FSDP2 with student and teacher sharded (the
    teacher cache then filled in lockstep); the weights and losses equal a single process's."""
    kw = dict(steps=4, **{"batch-size": 4, "ckpt-every": 2, "val-every": 2})
    one = tmp_path / "one"
    train(cfg_of(flags(tiny_qwen_dir, corpus, one, tmp_path / "cache", **kw)), progress=False)
    two = tmp_path / "two"
    two_flags = flags(tiny_qwen_dir, corpus, two, tmp_path / f"cache-{parallel}", parallel=parallel, **kw)
    _torchrun(two_flags)
    a, b = weights(one), weights(two)
    changed = [k for k in a if "layers" in k and not torch.equal(a[k], load_file(str(one / "init" / "model.safetensors"))[k])]
    assert changed, "training did not move the student"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    la = [r["loss"] for r in records(one) if "split" not in r]
    lb = [r["loss"] for r in records(two) if "split" not in r]
    assert la == pytest.approx(lb, rel=1e-4)
    va = [r["kl"] for r in records(one) if r.get("split") == "val"]
    assert va == pytest.approx([r["kl"] for r in records(two) if r.get("split") == "val"], rel=1e-4)
    if parallel == "fsdp":  # resume from the gathered step-2 checkpoint, re-sharded: same final weights
        ckpts = two / "checkpoints"
        shutil.rmtree(ckpts / "step-0000004")
        (ckpts / "latest").write_text("step-0000002")
        shutil.rmtree(two / "model")
        _torchrun([*two_flags, "--resume"])
        c = weights(two)
        for k in a:
            torch.testing.assert_close(b[k], c[k], rtol=1e-5, atol=1e-6)


# ---- bad input: one clear line on stderr, exit 2 -------------------------------------------------------------
def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli_main(["distill", *argv])
    return rc, capsys.readouterr().err


def test_empty_and_unreadable_corpus(tiny_qwen_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.txt").write_text("no code here\n")
    rc, err = run_cli(flags(tiny_qwen_dir, empty, tmp_path / "o1", tmp_path / "cache"), capsys)
    assert rc == 2 and "corpus is empty" in err and "1 not source" in err
    bad = tmp_path / "unreadable"
    bad.mkdir()
    (bad / "gone.py").symlink_to(tmp_path / "missing.py")
    rc, err = run_cli(flags(tiny_qwen_dir, bad, tmp_path / "o2", tmp_path / "cache"), capsys)
    assert rc == 2 and "1 unreadable" in err
    rc, err = run_cli(flags(tiny_qwen_dir, tmp_path / "nowhere", tmp_path / "o3", tmp_path / "cache"), capsys)
    assert rc == 2 and "does not exist" in err


def _variant(tiny: Path, dest: Path, *, layers: int | None = None, extra_token: bool = False) -> Path:
    import transformers

    shutil.copytree(tiny, dest)
    if extra_token:
        tok = transformers.AutoTokenizer.from_pretrained(str(dest))
        tok.add_tokens(["<|not_in_teacher|>"])
        tok.save_pretrained(str(dest))
    if layers:
        cfg = transformers.AutoConfig.from_pretrained(str(dest))
        cfg.num_hidden_layers = layers
        cfg.layer_types = ["full_attention"] * layers
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(str(dest), safe_serialization=True)
    return dest


def test_tokenizer_mismatch_and_larger_student(tiny_qwen_dir, corpus, tmp_path, capsys):
    other = _variant(tiny_qwen_dir, tmp_path / "other_tok", extra_token=True)
    rc, err = run_cli(flags(tiny_qwen_dir, corpus, tmp_path / "o1", tmp_path / "cache", student=other), capsys)
    assert rc == 2 and "tokenizers differ" in err
    big = _variant(tiny_qwen_dir, tmp_path / "big", layers=6)
    rc, err = run_cli(flags(tiny_qwen_dir, corpus, tmp_path / "o2", tmp_path / "cache", student=big), capsys)
    assert rc == 2 and "larger than the teacher" in err
    rc, err = run_cli(flags(tiny_qwen_dir, corpus, tmp_path / "o3", tmp_path / "cache", **{"student-layers": 9}), capsys)
    assert rc == 2 and "between 1 and the teacher's 4 layers" in err


def test_memory_estimate_refuses_with_advice(tiny_qwen_dir, corpus, tmp_path, capsys):
    rc, err = run_cli(flags(tiny_qwen_dir, corpus, tmp_path / "o", tmp_path / "cache", **{"memory-limit-gb": 0.05}),
                      capsys)
    assert rc == 2 and "refusing to start" in err and "--batch-size" in err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_a_batch_too_large_for_memory_is_split_into_accumulation_steps(tiny_qwen_dir, capsys):
    """The memory check halves the micro-batch and doubles --grad-accum (the same rows, the same update per
    step) before it refuses; a run that does not fit even one row at a time is still refused."""
    from localcoder.distill.config import DistillConfig
    from localcoder.distill.memory import check_fits
    from localcoder.distill.students import load_causal_lm
    from localcoder.errors import InvalidRequest

    model = load_causal_lm(tiny_qwen_dir)[0]

    def need(batch, limit=1e6):
        cfg = DistillConfig(batch_size=batch, grad_accum=1, seq_len=256, teacher_mode="cached", memory_limit_gb=limit)
        return cfg, check_fits(cfg, model, model, world=1, sharded=False, device="cpu")

    one, four = need(1)[1], need(4)[1]
    assert one < need(2)[1] < four
    cfg, got = need(4, limit=one / 0.85)  # one row per forward fits, two do not
    assert (cfg.batch_size, cfg.grad_accum, got) == (1, 4, one)
    assert "running --batch-size 1 --grad-accum 4 instead" in capsys.readouterr().err
    with pytest.raises(InvalidRequest, match="refusing to start"):
        need(4, limit=one / 2)


def test_corrupt_checkpoint_falls_back_then_refuses_and_keeps_files(tiny_qwen_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", steps=4, **{"keep-checkpoints": 2})
    assert run_cli(argv, capsys)[0] == 0
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000002", "step-0000004"]
    (ckpts[-1] / "state.pt").write_bytes(b"garbage")
    rc, err = run_cli([*argv[:-1], "--steps", "6", "--resume", "--quiet"], capsys)
    assert rc == 0 and "step-0000004" in err and "corrupt" in err  # resumed from step 2, said so
    assert (out / "checkpoints" / "step-0000006").exists()
    for ck in (out / "checkpoints").glob("step-*"):
        (ck / "state.pt").write_bytes(b"\x80garbage")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    rc, err = run_cli([*argv[:-1], "--steps", "8", "--resume", "--quiet"], capsys)
    assert rc == 2 and "no usable checkpoint" in err and "left in place" in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    rc, err = run_cli(argv, capsys)  # no --resume over an existing run: refuse, do not overwrite
    assert rc == 2 and "--resume" in err


def test_lora_mode_trains_adapters_and_merges_on_export(tiny_qwen_dir, corpus, tmp_path):
    out = tmp_path / "lora"
    train(cfg_of(flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", steps=3, **{"lora-rank": 4})), progress=False)
    w = weights(out)
    init = load_file(str(out / "init" / "model.safetensors"))
    assert not any("lora" in k for k in w) and w.keys() == init.keys()  # merged: a plain HF model again
    assert any(not torch.equal(w[k], init[k]) for k in w if "layers" in k)
