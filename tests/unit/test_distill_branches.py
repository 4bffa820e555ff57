"""The recipe's three other target sources, on the tiny random Qwen2 teacher (distill/train.py):
an online teacher (a teacher forward every step, no top-k cache), sequence-level KD (the teacher writes the
training middles) and the on-policy (GKD) phase (the same optimizer step as KD: schedule, clipping,
autocast; checkpointed, so a kill inside it loses at most one checkpoint interval)."""

from __future__ import annotations

import copy
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from localcoder.distill.checkpoint import RunState
from localcoder.distill.distributed import Dist
from localcoder.distill.train import (Run, get_lr, make_optimizer, onpolicy_step, prepare_data, progress_of,
                                      rows_for_step, teacher_dir, train)
from tests.unit.distill_helpers import BIN, cfg_of, corpus, flags, home, records, weights  # noqa: F401 (fixtures)


def _tok_fmt(tiny: Path):
    import transformers

    from localcoder.engines.torch import HFTokenizer
    from localcoder.fim.formats import detect_format

    tok = HFTokenizer(transformers.AutoTokenizer.from_pretrained(str(tiny)))
    return tok, detect_format(tok)


def _load(path: Path):
    from localcoder.distill.students import load_causal_lm

    return load_causal_lm(path)[0].eval()


# ---- online teacher --------------------------------------------------------------------------------------------
def test_online_teacher_scores_every_step_with_its_full_distribution(tiny_qwen_dir, corpus, tmp_path):
    out, cache = tmp_path / "online", tmp_path / "cache"
    cfg = cfg_of(flags(tiny_qwen_dir, corpus, out, cache, steps=10, **{"teacher-mode": "online", "train-rows": 2,
                                                                       "val-every": 5}))
    train(cfg, progress=False)
    recs = [r for r in records(out) if "split" not in r]
    losses = [r["loss"] for r in recs]
    assert len(recs) == 10 and losses[-1] < 0.95 * losses[0], losses
    assert all(r["fkl"] > 0 for r in recs)
    assert not list(cache.glob("teacher-*")), "an online run must not build a top-k cache"
    val = [r for r in records(out) if r.get("split") == "val"]
    assert val and all("kl" in r for r in val)  # validation KL from teacher forwards too

    # step 1's KD term is the full-vocabulary KL(teacher || initial student) on the rows of step 0
    tok, fmt = _tok_fmt(tiny_qwen_dir)
    data = prepare_data(cfg, tok, fmt, cache, Dist())  # the tokenized cache the run wrote
    rows = data.train.rows(slice(0, cfg.train_rows)).rows(rows_for_step(0, cfg.train_rows, cfg.batch_size, cfg.seed))
    teacher, student = _load(tiny_qwen_dir), _load(out / "init")
    with torch.no_grad():
        t_logits = teacher(input_ids=torch.as_tensor(rows.teacher_ids).long()).logits
        t_index = torch.as_tensor(rows.t_index).long()
        t_logits = t_logits.gather(1, t_index[..., None].expand(-1, -1, t_logits.shape[-1]))
        s_logits = student(input_ids=torch.as_tensor(rows.student_ids).long()).logits
    mask = torch.as_tensor(rows.loss_mask).float()
    mask[:, -1] = 0
    kl = F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                  reduction="none").sum(-1)  # (b, L): sum_v p_t (log p_t - log q_s)
    assert recs[0]["fkl"] == pytest.approx(float((kl * mask).sum() / mask.sum()), rel=2e-3)  # metrics keep 5 decimals


# ---- sequence-level KD -------------------------------------------------------------------------------------------
SNIPPETS = {
    "geometry.py": "import math\n\n\ndef area(r):\n    return math.pi * r * r\n\n\ndef circumference(r):\n"
                   "    return 2 * math.pi * r\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
                   "        self.y = y\n\n    def norm(self):\n        return math.hypot(self.x, self.y)\n",
    "strings.py": "def shout(s):\n    return s.upper() + '!'\n\n\ndef words(text):\n    out = []\n"
                  "    for w in text.split():\n        if w:\n            out.append(w.strip('.,'))\n    return out\n",
    "numbers.py": "def mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n    return total / len(xs)\n"
                  "\n\ndef clamp(x, lo, hi):\n    return max(lo, min(hi, x))\n",
}


def test_seqkd_trains_on_the_teachers_greedy_middles(tiny_qwen_dir, tmp_path):
    from localcoder.distill import data as data_mod
    from localcoder.distill.dedup import dedup
    from localcoder.distill.fim_transform import FimSpec, build_split
    from localcoder.distill.teacher import teacher_middles

    src = tmp_path / "src"
    src.mkdir()
    for name, text in SNIPPETS.items():
        (src / name).write_text(text)
    cache = tmp_path / "cache"
    real_cfg = cfg_of(flags(tiny_qwen_dir, src, tmp_path / "real", cache, steps=3, **{
        "fim-rate": 1.0, "val-fraction": 0.0, "test-fraction": 0.0, "train-rows": 0, "span-kinds": "line"}))
    kd_cfg = dataclasses.replace(real_cfg, seqkd=True, out=str(tmp_path / "seqkd"))
    res = train(kd_cfg, progress=False)
    assert res.state.step == 3 and (tmp_path / "seqkd" / "model" / "model.safetensors").exists()

    tok, fmt = _tok_fmt(tiny_qwen_dir)
    tname = teacher_dir(str(tiny_qwen_dir))[1]
    kd = prepare_data(kd_cfg, tok, fmt, cache, Dist(), tname=tname)  # what the run trained on (cached)
    real = prepare_data(real_cfg, tok, fmt, cache, Dist())
    assert not np.array_equal(kd.train.student_ids, real.train.student_ids)
    for split in ("val", "test"):  # validation and test keep the real code
        assert all(np.array_equal(a, b) for a, b in zip(getattr(kd, split).arrays(), getattr(real, split).arrays()))

    # the training middles are the teacher's greedy generations for the same (prefix, middle, suffix) spans
    teacher = _load(tiny_qwen_dir)
    triples, written = [], []

    def rewrite(ts):
        triples.extend(ts)
        written.extend(teacher_middles(teacher, tok, fmt, ts, order=kd_cfg.teacher_order))
        return written

    files, _ = dedup(data_mod.walk_corpus([str(src)], max_bytes=kd_cfg.max_file_bytes).files, near=kd_cfg.near_dedup)
    spec = FimSpec(kd_cfg.seq_len, kd_cfg.fim_rate, kd_cfg.fim_order, kd_cfg.teacher_order, tuple(kd_cfg.span_kinds))
    expected = build_split(tok, fmt, files, spec, seed=kd_cfg.seed, data_fp="x", cache_dir=None, name="train",
                           rewrite=rewrite)
    assert all(np.array_equal(a, b) for a, b in zip(kd.train.arrays(), expected.arrays()))
    assert len(triples) >= 3 and sum(w != t[1] for w, t in zip(written, triples)) >= len(triples) - 1

    def text(p):
        return b"".join(tok.token_bytes(int(t)) for t in p.student_ids.ravel()).decode("utf-8", errors="replace")
    kd_text, real_text = text(kd.train), text(real.train)
    assert all(w in kd_text for w in written if w.strip())
    assert sum(w in real_text for w in written if len(w.strip()) > 8) <= 1  # random-teacher text is not real code


# ---- on-policy (GKD) ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onpolicy_run(tiny_qwen_dir, corpus, tmp_path_factory):
    """One run: 4 KD steps then 6 on-policy steps, every checkpoint kept, clipping at 0.005 (below the
    grad norms). Returns (cfg, root, result, the flags with --out left to the caller)."""
    root = tmp_path_factory.mktemp("onpolicy")

    def argv(out: Path) -> list[str]:
        return flags(tiny_qwen_dir, corpus, out, root / "cache", **{
            "steps": 4, "onpolicy-steps": 6, "ckpt-every": 2, "val-every": 4, "keep-checkpoints": 10,
            "grad-clip": 0.005, "warmup-steps": 1})
    cfg = cfg_of(argv(root / "run"))
    with pytest.MonkeyPatch.context() as mp:  # module scope: the function-scoped `home` is not set yet
        mp.setenv("LOCALCODER_HOME", str(root / "home"))
        res = train(cfg, progress=False)
    return cfg, root, res, argv


def test_onpolicy_phase_follows_the_schedule_and_checkpoints(onpolicy_run):
    cfg, root, res, _ = onpolicy_run
    out = root / "run"
    assert res.state.step == 10 and res.state.onpolicy_start == 4
    recs = records(out)
    kd = [r for r in recs if "split" not in r and "phase" not in r]
    op = [r for r in recs if r.get("phase") == "onpolicy"]
    assert [r["step"] for r in kd] == [1, 2, 3, 4] and [r["step"] for r in op] == [5, 6, 7, 8, 9, 10]
    for r in kd + op:  # one schedule for both phases: warm-up + cosine, then its floor
        expected = get_lr(cfg, progress_of(cfg, RunState(step=r["step"] - 1)), r["step"] - 1)
        assert r["lr"] == pytest.approx(expected)
    assert all(r["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio) for r in op)
    assert all(r["grad_norm"] > cfg.grad_clip and np.isfinite(r["loss"]) and r["loss"] > 0 for r in op)
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-0000002", "step-0000004", "step-0000006", "step-0000008", "step-0000010"]
    a = torch.load(out / "checkpoints" / "step-0000004" / "state.pt", weights_only=False)["model"]
    b = torch.load(out / "checkpoints" / "step-0000010" / "state.pt", weights_only=False)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a), "the on-policy steps did not move the student"


def _onpolicy_run_object(cfg, root, tiny: Path) -> Run:
    tok, fmt = _tok_fmt(tiny)
    data = prepare_data(cfg, tok, fmt, root / "cache", Dist())
    data.train = data.train.rows(slice(0, cfg.train_rows))
    from localcoder.distill.students import freeze_embeddings

    student = _load(root / "run" / "init").train()
    freeze_embeddings(student)
    teacher = _load(tiny)
    return Run(cfg, root / "step-test", Dist(), "cpu", tok, fmt, data, student, student, teacher,
               make_optimizer(cfg, student))


def test_onpolicy_step_sets_the_scheduled_lr_clips_and_autocasts(onpolicy_run, tiny_qwen_dir):
    cfg, root, _, _ = onpolicy_run
    cfg = dataclasses.replace(cfg, steps=8)  # step 4 of 8: mid-cosine, an lr no other step uses
    run = _onpolicy_run_object(cfg, root, tiny_qwen_dir)
    before = {n: p.detach().clone() for n, p in run.student.named_parameters() if p.requires_grad}
    st = RunState(step=4)
    fp32_student = copy.deepcopy(run.student)
    step = onpolicy_step(run, st)
    want = get_lr(cfg, 0.5, 4)
    assert step.lr == pytest.approx(want) and all(g["lr"] == pytest.approx(want) for g in run.opt.param_groups)
    assert want not in (cfg.lr, cfg.lr * cfg.min_lr_ratio)
    grads = [p.grad for p in run.student.parameters() if p.grad is not None]
    clipped = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    assert step.grad_norm > 2 * cfg.grad_clip and clipped == pytest.approx(cfg.grad_clip, rel=1e-3)
    assert any(not torch.equal(before[n], p) for n, p in run.student.named_parameters() if n in before)

    # bf16 autocast reaches the forward: the same step from the same weights and samples gives another loss
    bf16 = dataclasses.replace(run, student=fp32_student, model=fp32_student, opt=make_optimizer(cfg, fp32_student),
                               autocast_dtype=torch.bfloat16)
    fp32 = dataclasses.replace(bf16, student=copy.deepcopy(fp32_student), autocast_dtype=None)
    fp32.model, fp32.opt = fp32.student, make_optimizer(cfg, fp32.student)
    loss_bf16, loss_fp32 = onpolicy_step(bf16, st).loss, onpolicy_step(fp32, st).loss
    assert loss_fp32 == pytest.approx(step.loss, rel=1e-6)  # same samples (seeded by the step), same loss
    assert np.isfinite(loss_bf16) and loss_bf16 != loss_fp32


def _records(out: Path) -> list[dict]:
    """metrics.jsonl of a run that was killed: a torn last line is skipped."""
    import json

    recs = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return recs


def test_kill_9_in_the_onpolicy_phase_loses_at_most_one_checkpoint_interval(onpolicy_run, tmp_path):
    _, root, _, argv = onpolicy_run  # the reference: the same flags, never interrupted
    out = tmp_path / "killed"
    proc = subprocess.Popen([str(BIN / "localcoder"), "distill", *argv(out)], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step-0000006"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run finished before it could be killed"
    killed_at = int(latest.read_text().split("-")[1])
    assert 6 <= killed_at < 10  # inside the on-policy phase (steps 5..10)
    logged = [r["step"] for r in _records(out) if r.get("phase") == "onpolicy"]
    n_before = len(_records(out))
    res = train(cfg_of(argv(out)), resume=True, progress=False)
    assert res.state.step == 10 and res.state.onpolicy_start == 4
    resumed = [r for r in _records(out)[n_before:] if "split" not in r]
    assert resumed[0]["step"] == killed_at + 1 and all(r.get("phase") == "onpolicy" for r in resumed)
    assert max(logged) - killed_at <= 2  # lost: at most one checkpoint interval of work
    a, b = weights(root / "run"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
