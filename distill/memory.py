"""Will this run fit? A rough peak-memory estimate per process, checked before anything is trained, so a
run that cannot fit is refused with advice instead of being killed half way."""

from __future__ import annotations

import os
import sys

import torch

from localcoder.distill.config import DistillConfig
from localcoder.errors import InvalidRequest


def estimate_memory_gb(cfg: DistillConfig, teacher_params: int, student_params: int, trainable: int,
                       hidden: int, vocab: int, n_layers: int, teacher_resident: bool, world: int = 1,
                       sharded: bool = False) -> float:
    """Peak bytes of one process, roughly: weights + grads + AdamW states + activations + (B, L, V) logit
    tensors. With ``world`` processes each takes batch/world rows; FSDP (``sharded``) also divides the
    weights and optimizer states (plus one gathered block)."""
    tokens = -(-cfg.batch_size // world) * cfg.seq_len
    shard = world if sharded else 1
    weights = 4 * (student_params + (teacher_params if teacher_resident else 0)) / shard
    optim = 4 * 3 * trainable / shard
    per_layer = (2 if cfg.grad_checkpointing else 24) * hidden * 4
    acts = tokens * n_layers * per_layer
    logit_copies = 4 + (2 if cfg.teacher_mode == "online" and cfg.loss != "ce" else 0)
    logits = tokens * vocab * 4 * logit_copies
    return (weights + optim + acts + logits) / 2**30 * 1.15


def available_memory_gb(device: str) -> float:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free / 2**30
    try:
        with open("/proc/meminfo") as fh:
            info = {line.split(":")[0]: int(line.split()[1]) for line in fh}
        return info["MemAvailable"] / 2**20
    except (OSError, KeyError, ValueError):
        return float("inf")


def check_memory(cfg: DistillConfig, need_gb: float, device: str) -> None:
    have = cfg.memory_limit_gb or available_memory_gb(device)
    if need_gb > 0.9 * have:
        raise InvalidRequest(
            f"this run needs about {need_gb:.1f} GiB but only {have:.1f} GiB is available: refusing to start "
            "rather than be killed half way", param="batch_size",
            hint="lower --batch-size or --seq-len (raise --grad-accum to keep the tokens per step), use "
                 "--teacher-mode cached, --grad-checkpointing, or fewer --student-layers")


def check_fits(cfg: DistillConfig, teacher, student, *, world: int, sharded: bool, device: str) -> float:
    """Estimate this run's per-process peak from the two models and refuse it if it does not fit;
    returns the estimate (GiB per process). A micro-batch that is too large is first split: the batch
    halves and --grad-accum doubles (``cfg`` is changed, and says so), which reads the same rows per step
    and averages the same loss over the same tokens, so the run computes the same update, only in more
    forwards (the layout preset's batch of two 1,024-token rows does not fit the 1.5B in 24 GB)."""
    from localcoder.distill.students import count_params

    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    c = student.config
    t_params, s_params = count_params(teacher), count_params(student)
    # with cached targets the teacher is freed before training: the peak is the larger of its top-k pass
    # (both models' weights and one row's logits) and the training steps without it
    resident = cfg.teacher_mode == "online" or cfg.onpolicy_steps > 0
    # on CPU every local rank shares this host's memory; on CUDA each has its own device
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1

    def need_gb() -> float:
        need = estimate_memory_gb(cfg, t_params, s_params, trainable, c.hidden_size, c.vocab_size,
                                  c.num_hidden_layers, teacher_resident=resident, world=world, sharded=sharded)
        if not resident:
            need = max(need, (4 * (t_params + s_params) / (world if sharded else 1)
                              + 4 * 3 * cfg.seq_len * c.vocab_size) / 2**30 * 1.15)
        return need

    need, have = need_gb(), cfg.memory_limit_gb or available_memory_gb(device)
    batch, too_much = cfg.batch_size, need
    while need * procs > 0.9 * have and cfg.batch_size % (2 * world) == 0:
        cfg.batch_size, cfg.grad_accum = cfg.batch_size // 2, cfg.grad_accum * 2
        if (smaller := need_gb()) >= need:  # the micro-batch is not what is too large: undo, refuse below
            cfg.batch_size, cfg.grad_accum = cfg.batch_size * 2, cfg.grad_accum // 2
            break
        need = smaller
    if cfg.batch_size != batch:
        print(f"memory: a batch of {batch} needs about {too_much:.1f} GiB of the {have:.1f} available; "
              f"running --batch-size {cfg.batch_size} --grad-accum {cfg.grad_accum} instead (the same rows "
              "and the same update per step)", file=sys.stderr, flush=True)
    check_memory(cfg, need * procs, device)
    return need


def native_bf16() -> bool:
    """Does this CPU multiply bf16 natively (AVX512-BF16 or AMX-BF16)? Elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def autocast_dtype(setting: str, device: str) -> torch.dtype | None:
    """The dtype of ``torch.autocast`` for ``DistillConfig.autocast`` on ``device`` (None: fp32)."""
    if setting == "off":
        return None
    if setting == "bf16" or device == "cuda" or native_bf16():
        return torch.bfloat16
    return None
