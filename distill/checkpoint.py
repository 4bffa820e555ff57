"""Checkpoints of a distillation run, and the run state they carry.

On disk, ``<out>/checkpoints/``::

    step-0000050/state.pt   {"model": {name: tensor} (trainable parameters only), "optim": AdamW state dict,
                             "rng": {"python", "numpy", "torch"}, ["fsdp": True]}
    step-0000050/run.json   RunState's fields (step, elapsed, tokens, best_val, bad_vals, stopped, history, ...)
    latest                  the name of the newest complete checkpoint

Written to a temporary directory, fsynced, renamed, then ``latest`` moves; older ones are pruned only
after that, so kill -9 never loses the last good checkpoint. Exact resume: the data position is the
step (rows are a pure function of it), the RNG states and the optimizer come back bit for bit.
An FSDP checkpoint is gathered to full tensors with the optimizer state keyed by parameter name, so it
does not depend on how it was sharded.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from localcoder.distill.distributed import Dist, full_state, is_fsdp
from localcoder.errors import ModelCorrupt

CKPT_DIR = "checkpoints"


@dataclass
class RunState:
    step: int = 0  # optimizer steps done == data position (rows are a pure function of the step)
    elapsed: float = 0.0  # seconds spent in optimizer steps (validation and checkpoints excluded)
    tokens: int = 0  # loss-carrying tokens seen
    best_val: float = math.inf
    bad_vals: int = 0
    stopped: str = ""  # why the KD phase ended ("" while it runs)
    history: list[dict] = field(default_factory=list)
    onpolicy_start: int = -1  # the step the on-policy phase began at (-1: not begun; absent in older run.json)


# ---- RNG state ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


# ---- write -----------------------------------------------------------------------------------------------------
def has_checkpoints(out: Path) -> bool:
    return (out / CKPT_DIR).exists() and any((out / CKPT_DIR).glob("step-*"))


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_blob(model, opt) -> dict | None:
    """What a checkpoint holds. FSDP: gathered to full tensors (a collective; None on ranks other than 0), the
    optimizer state keyed by parameter name, so a checkpoint does not depend on how it was sharded."""
    if is_fsdp(model):
        full, optim = full_state(model, opt)
        if torch.distributed.get_rank() != 0:
            return None
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        return {"model": {n: t for n, t in full.items() if n in names}, "optim": optim, "rng": rng_state(),
                "fsdp": True}
    return {"model": trainable_state(model), "optim": opt.state_dict(), "rng": rng_state()}


def save_checkpoint(out: Path, model, opt, st: RunState, keep: int, blob: dict | None = None) -> Path:
    """Write to a temporary directory, fsync, rename, then move the ``latest`` pointer; older
    checkpoints are pruned only after the new one is complete (kill -9 never loses the last good one).
    ``blob``: from checkpoint_blob (pass it for FSDP, where gathering it is a collective)."""
    root = out / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{st.step:07d}"
    tmp = root / f".tmp-step-{st.step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(blob if blob is not None else checkpoint_blob(model, opt), tmp / "state.pt")
    state = {k: v for k, v in st.__dict__.items()}
    (tmp / "run.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = root / "latest"
    ptmp = root / f".latest.{os.getpid()}"
    ptmp.write_text(final.name)
    os.replace(ptmp, pointer)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write(out: Path, student, opt, st: RunState, keep: int, dist: Dist) -> None:
    """Every rank calls it (FSDP: the gather is a collective); rank 0 writes."""
    blob = checkpoint_blob(student, opt) if is_fsdp(student) else None
    if dist.main:
        save_checkpoint(out, student, opt, st, keep, blob=blob)


# ---- read ------------------------------------------------------------------------------------------------------
def load_checkpoint(out: Path, model, opt) -> RunState | None:
    """Newest loadable checkpoint; a corrupt one is reported and skipped (never deleted)."""
    root = out / CKPT_DIR
    if not root.exists():
        return None
    cands = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    if not cands:
        return None
    problems = []
    for ck in cands:
        try:
            blob = torch.load(ck / "state.pt", map_location="cpu", weights_only=False)
            st = RunState(**json.loads((ck / "run.json").read_text()))
            named = dict(model.named_parameters())
            missing = [n for n in named if named[n].requires_grad and n not in blob["model"]]
            if missing or any(n not in named or named[n].shape != t.shape for n, t in blob["model"].items()):
                raise ValueError(f"parameters do not match this student ({len(missing)} missing)")
            if bool(blob.get("fsdp")) != is_fsdp(model):
                raise ValueError("written by a " + ("--parallel fsdp" if blob.get("fsdp") else "non-FSDP") +
                                 " run; resume with the same --parallel")
            if is_fsdp(model):  # every rank read the full file; each keeps its shard
                from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                     set_optimizer_state_dict)

                o = StateDictOptions(full_state_dict=True, strict=False)
                set_model_state_dict(model, blob["model"], options=o)
                set_optimizer_state_dict(model, opt, blob["optim"], options=o)
            else:
                with torch.no_grad():
                    for n, t in blob["model"].items():
                        named[n].copy_(t)
                opt.load_state_dict(blob["optim"])
            set_rng_state(blob["rng"])
        except Exception as exc:  # torn/garbled file: any loader error means "not usable"
            problems.append(f"{ck.name}: {type(exc).__name__}: {str(exc)[:120]}")
            print(f"[distill] warning: checkpoint {ck} is corrupt ({problems[-1]}); left in place, "
                  "trying an older one", file=sys.stderr)
            continue
        return st
    raise ModelCorrupt(f"no usable checkpoint in {root}: " + "; ".join(problems),
                       hint="the files were left in place; move them away or start without --resume")
