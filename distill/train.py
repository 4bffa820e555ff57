"""The distillation recipe, top to bottom: data -> teacher -> student -> targets -> train -> on-policy -> export.

Read ``train(cfg)``: prepare (data, teacher, student) -> teacher top-k cache -> optimizer steps with periodic
validation and checkpoints -> the optional on-policy (GKD) phase -> final validation -> export. Every optimizer
step of both phases goes through one function, ``optimizer_step``: AdamW at the warm-up + cosine learning
rate (over steps or over a wall-clock budget, whichever ends first), gradient accumulation over micro-batches,
bf16 autocast on CUDA, gradient clipping; the phases differ only in their micro-batches and loss
(``kd_loss``: cached top-k / online teacher / CE; ``gkd_loss``: JSD on the student's own samples).
Components live elsewhere: data.py, dedup.py, fim_transform.py (the corpus), students.py (the student's
init), losses.py, teacher.py (targets), evaluate.py, checkpoint.py (format, exact resume), distributed.py
(DDP / FSDP2 under torchrun), memory.py (will it fit), lora.py, report.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from localcoder.distill import checkpoint, distributed, evaluate, losses, students
from localcoder.distill import data as data_mod
from localcoder.distill.checkpoint import CKPT_DIR, RunState, load_checkpoint, save_checkpoint, seed_everything
from localcoder.distill.config import DistillConfig
from localcoder.distill.dedup import dedup
from localcoder.distill.distributed import Dist, init_distributed, is_fsdp, shard_fsdp
from localcoder.distill.fim_transform import FimSpec, Packed, build_split, tokenizer_hash
from localcoder.distill.lora import adapter_path, load_adapter, with_lora
from localcoder.distill.memory import autocast_dtype, check_fits, check_memory, estimate_memory_gb
from localcoder.distill.plan import Stages, check_rows, plan
from localcoder.distill.teacher import TopKCache, cache_dir_for, online_logits, onpolicy_rows
from localcoder.errors import InvalidRequest

# re-exported: these lived here before checkpoint.py / distributed.py / memory.py existed
__all__ = ["train", "Result", "Run", "RunState", "get_lr", "progress_of", "rows_for_step", "optimizer_step",
           "kd_step", "onpolicy_step", "prepare_data", "Dist", "init_distributed", "is_fsdp", "shard_fsdp",
           "CKPT_DIR", "save_checkpoint", "load_checkpoint", "estimate_memory_gb", "check_memory"]


# ---- schedule and data order ------------------------------------------------------------------------------------
def get_lr(cfg: DistillConfig, progress: float, step: int) -> float:
    """Linear warm-up, then cosine to min_lr_ratio * lr; progress in [0, 1] (steps or wall clock)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def progress_of(cfg: DistillConfig, st: RunState) -> float:
    p = st.step / cfg.steps
    if cfg.max_minutes > 0:
        p = max(p, st.elapsed / (60.0 * cfg.max_minutes))
    return p


@lru_cache(maxsize=8)
def _epoch_perm(n_rows: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist())


def rows_for_step(step: int, n_rows: int, per_step: int, seed: int) -> list[int]:
    """Global row ids of one optimizer step: an independent permutation per epoch."""
    out = []
    for g in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(g, n_rows)
        out.append(_epoch_perm(n_rows, seed, epoch)[pos])
    return out


def log(msg: str, dist: Dist | None = None) -> None:
    if dist is None or dist.main:
        print(f"[distill] {msg}", file=sys.stderr, flush=True)


# ---- stage 1: data -----------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: Packed
    val: Packed
    test: Packed
    fingerprint: str
    test_files: list[Path]
    val_files: list[Path]
    describe: str
    train_sources: list[str] = field(default_factory=list)  # per training row: the file most of it is from


def prepare_data(cfg: DistillConfig, tok, fmt, cache_dir: Path, dist: Dist, teacher=None, tname: str = "") -> Data:
    roots = cfg.data or [str(data_mod.default_corpus())]
    corpus = data_mod.walk_corpus(roots, max_bytes=cfg.max_file_bytes, languages=cfg.languages or None)
    if not corpus.files:
        raise InvalidRequest(f"the corpus is empty: no usable source files under {', '.join(roots)} "
                             f"({corpus.describe()})", param="data",
                             hint="point --data at directories with source code (see `localcoder distill --help`)")
    files, report = dedup(corpus.files, near=cfg.near_dedup)
    splits = data_mod.split_by_file(files, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.seed)
    train_files = splits["train"]
    if cfg.max_train_files and len(train_files) > cfg.max_train_files:
        train_files = random.Random(cfg.seed).sample(train_files, cfg.max_train_files)
        train_files.sort(key=lambda f: f.rel)
    fp = data_mod.fingerprint(files)
    spec = FimSpec(cfg.seq_len, cfg.fim_rate, cfg.fim_order, cfg.teacher_order, tuple(cfg.span_kinds))
    rewrite, tag = None, ""
    if cfg.seqkd:  # sequence-level KD: the teacher's greedy middles replace the real ones in training data
        from localcoder.distill.teacher import teacher_middles

        def seqkd_middles(triples):
            return teacher_middles(teacher, tok, fmt, triples, order=cfg.teacher_order)
        rewrite, tag = seqkd_middles, f"-seqkd-{tname}"
    packed = {}
    todo = [("train", train_files, rewrite, tag), ("val", splits["val"] or splits["train"][:1], None, ""),
            ("test", splits["test"] or splits["train"][:1], None, "")]  # tiny corpora: reuse a training file
    if not dist.main:
        dist.barrier()  # rank 0 writes the tokenized cache first; the other ranks then read it
    for name, fl, rw, extra in todo:
        packed[name] = build_split(tok, fmt, fl, spec, seed=cfg.seed, data_fp=fp + f"-{len(fl)}{extra}",
                                   cache_dir=cache_dir, name=name, rewrite=rw)
    if dist.main:
        dist.barrier()
    describe = (f"{corpus.describe()}; dedup removed {report.exact_duplicates} exact + {report.near_duplicates} "
                f"near duplicates; files train/val/test {len(train_files)}/{len(splits['val'])}/{len(splits['test'])}; "
                f"rows {len(packed['train'])}/{len(packed['val'])}/{len(packed['test'])} of {cfg.seq_len} tokens")
    src = packed["train"].source
    sources = [train_files[i].rel if 0 <= i < len(train_files) else "" for i in (src if src is not None else [])]
    return Data(packed["train"], packed["val"], packed["test"], fp, [f.path for f in splits["test"]],
                [f.path for f in splits["val"]], describe, sources)


# ---- stage 2: models -----------------------------------------------------------------------------------------------
def teacher_dir(spec: str) -> tuple[Path, str]:
    """An HF directory for the teacher (a packaged GGUF is converted once and cached)."""
    from localcoder.engines.torch import convert_gguf_to_hf
    from localcoder.models import resolve

    m = resolve(spec, pull_if_missing=True)
    if m.kind == "gguf":
        return convert_gguf_to_hf(m), m.name
    if m.kind != "hf" or m.path is None:
        raise InvalidRequest(f"teacher {spec!r} is a {m.kind} model; distillation needs GGUF or HF weights",
                             param="teacher")
    return Path(m.path), m.name


def build_student(cfg: DistillConfig, tdir: Path, calib: torch.Tensor, out: Path, dist: Dist):
    """Init once and save to out/init (resume reloads it: pruning is not re-measured)."""
    init_dir = out / "init"
    meta_file = init_dir / "student_init.json"
    if not meta_file.exists():
        if dist.main:
            if cfg.student:
                from localcoder.models import resolve

                m = resolve(cfg.student, pull_if_missing=True)
                path = teacher_dir(cfg.student)[0] if m.kind == "gguf" else m.path
                model, tok, init = students.given_student(path)
            else:  # the teacher, or --prune-from's model, cut to --student-layers blocks
                source = teacher_dir(cfg.prune_from)[0] if cfg.prune_from else tdir
                model, tok, init = students.depth_pruned(source, cfg.student_layers, calib,
                                                         selection=cfg.layer_selection, heads_keep=cfg.heads_keep,
                                                         mlp_keep=cfg.mlp_keep)
            tmp = out / f".init.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp), safe_serialization=True)
            tok.save_pretrained(str(tmp))
            (tmp / "student_init.json").write_text(json.dumps(init.__dict__, indent=1))
            shutil.rmtree(init_dir, ignore_errors=True)
            os.replace(tmp, init_dir)
        dist.barrier()
    model, tok = students.load_causal_lm(init_dir)
    init = students.StudentInit(**json.loads(meta_file.read_text()))
    return model, tok, init


def prepare_student(cfg: DistillConfig, tdir: Path, teacher, t_tok_hf, data: Data, out: Path, dist: Dist,
                    device: str):
    """Student init -> checks (tokenizer, size) -> frozen embeddings / LoRA -> memory check -> gradient
    checkpointing -> placed: FSDP-sharded (with the teacher) or moved to the device (with the teacher).
    Returns (student, its tokenizer, StudentInit, memory estimate in GiB per process)."""
    calib = torch.as_tensor(data.train.teacher_ids[:8]).long()  # (8, L) calibration code
    student, s_tok, init = build_student(cfg, tdir, calib, out, dist)
    students.check_tokenizers(t_tok_hf, s_tok)
    students.check_not_larger(teacher, student)
    if cfg.freeze_embeddings:
        students.freeze_embeddings(student)
    if cfg.lora_rank:
        student = with_lora(student, cfg.lora_rank)
        if cfg.init_adapter and not checkpoint.has_checkpoints(out):  # a resume loads its own LoRA weights
            path = adapter_path(cfg.init_adapter, cfg.student)
            log(f"LoRA starts from {path} ({load_adapter(student, path, cfg.lora_rank)} modules)", dist)
    fsdp = dist.world > 1 and cfg.parallel == "fsdp"
    need = check_fits(cfg, teacher, student, world=dist.world, sharded=fsdp, device=device)
    if cfg.grad_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        student.config.use_cache = False
    if fsdp:  # fully_shard moves each rank's shards to the mesh's device: no rank ever holds a whole model there
        if cfg.batch_size % dist.world:
            raise InvalidRequest(f"--parallel fsdp needs --batch-size divisible by the {dist.world} processes "
                                 f"(every rank runs the same number of forwards), got {cfg.batch_size}",
                                 param="batch_size")
        shard_fsdp(teacher)
        shard_fsdp(student)
    else:
        teacher.to(device)
        student.to(device)
    return student, s_tok, init, need


def make_optimizer(cfg: DistillConfig, student) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on vectors (norms, biases)."""
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                             foreach=True)


# ---- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What the stages of one run share; built once in ``train`` and passed to every step."""
    cfg: DistillConfig
    out: Path
    dist: Dist
    device: str
    tok: Any  # the teacher's tokenizer (HFTokenizer); the student's is identical (checked)
    fmt: Any  # the FIM format of that tokenizer
    data: Data
    student: Any  # the model being trained (maybe LoRA-wrapped, maybe FSDP-sharded)
    model: Any  # what the training forward runs: the student or its DDP wrapper
    teacher: Any  # None once cached targets make it unneeded
    opt: torch.optim.Optimizer
    teacher_name: str = ""
    cache: TopKCache | None = None  # the teacher's top-k for the training rows (None: online teacher or CE)
    val_cache: TopKCache | None = None
    autocast_dtype: torch.dtype | None = None  # bf16 on CUDA
    val_rows: Packed | None = None
    row_ids: list[int] | None = None  # train on these rows only (a specialist's cluster); None: all of them

    @property
    def metrics_file(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.autocast_dtype)

    def append(self, rec: dict) -> None:
        """One JSONL metrics record (rank 0 writes)."""
        if self.dist.main:
            with open(self.metrics_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")

    def checkpoint(self, st: RunState) -> None:
        checkpoint.write(self.out, self.student, self.opt, st, self.cfg.keep_checkpoints, self.dist)


@dataclass
class Result:
    out: Path
    model_dir: Path
    state: RunState
    provenance: dict


# ---- the recipe -------------------------------------------------------------------------------------------------
def train(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> Result:
    from localcoder.engines.torch import HFTokenizer, pick_device
    from localcoder.fim.formats import detect_format
    from localcoder.models import home

    cfg.check()
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    if checkpoint.has_checkpoints(out) and not resume:
        raise InvalidRequest(f"{out} already holds checkpoints of a run", param="out",
                             hint="pass --resume to continue it, or choose another --out")
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else home() / "distill-cache"
    stages = plan(cfg, out, cache_dir, main=dist.main)  # the estimate and the disk check, before anything is written
    out.mkdir(parents=True, exist_ok=True)

    # 1. prepare: teacher (and its tokenizer) -> data -> student
    with stages.stage("convert"):
        tdir, tname = teacher_dir(cfg.teacher)
        import transformers

        t_tok_hf = transformers.AutoTokenizer.from_pretrained(str(tdir))
        tok = HFTokenizer(t_tok_hf)
        fmt = detect_format(tok)
        teacher = students.load_causal_lm(tdir)[0].eval()
    teacher.requires_grad_(False)  # (a loop variable left pointing at a parameter kept the teacher's file mapped)
    with stages.stage("data"):
        t0 = time.perf_counter()
        data = prepare_data(cfg, tok, fmt, cache_dir, dist, teacher=teacher, tname=tname)
        if cfg.train_rows and len(data.train) > cfg.train_rows:
            data.train = data.train.rows(slice(0, cfg.train_rows))  # rows are already shuffled
            data.train_sources = data.train_sources[: cfg.train_rows]
        log(f"data: {data.describe} ({time.perf_counter() - t0:.0f} s)", dist)
    check_rows(len(data.train), cfg, data.describe)
    if dist.main:
        (out / "splits.json").write_text(json.dumps({"val": [str(p) for p in data.val_files],
                                                     "test": [str(p) for p in data.test_files]}, indent=0))
    with stages.stage("convert"):
        student, s_tok, init, need = prepare_student(cfg, tdir, teacher, t_tok_hf, data, out, dist, device)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    log(f"student: {init.method}, layers {init.layers_kept}, {students.count_params(student) / 1e6:.0f}M params "
        f"({trainable / 1e6:.0f}M trainable); teacher {tname}: {students.count_params(teacher) / 1e6:.0f}M; "
        f"memory estimate {need:.1f} GiB per process" + (f", {dist.world} processes ({cfg.parallel})"
                                                          if dist.world > 1 else ""), dist)
    run = Run(cfg, out, dist, device, tok, fmt, data, student, distributed.wrap_ddp(student, dist, device), teacher,
              make_optimizer(cfg, student), teacher_name=tname,
              autocast_dtype=autocast_dtype(cfg.autocast, device),
              val_rows=data.val.rows(slice(0, min(cfg.val_rows, len(data.val)))))
    del teacher  # run.teacher holds it now; dropping that frees it once the cached targets make it unneeded

    # 2. teacher targets for every row this schedule will read (+ validation rows)
    if cfg.teacher_mode == "cached":
        with stages.stage("teacher"):
            run.cache, run.val_cache = fill_teacher_cache(run, cache_dir, progress, stages)
        if not cfg.onpolicy_steps:  # not needed in the loop any more (on-policy excludes FSDP, see config)
            run.teacher = None

    if cfg.specialists:  # K LoRAs on clusters of the rows instead of one (distill/specialists.py)
        from localcoder.distill.specialists import train_specialists

        with stages.stage("train"):
            result = train_specialists(run, resume=resume, progress=progress and dist.main)
        distributed.close(dist)
        return result

    st = RunState()
    if resume and (loaded := load_checkpoint(out, student, run.opt)) is not None:
        st = loaded
        log(f"resumed at step {st.step} ({st.elapsed:.0f} s trained)", dist)
    if dist.main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

    # 3. steps, with periodic validation and checkpoints
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=st.step, desc="distill", disable=not (progress and dist.main),
               dynamic_ncols=True, file=sys.stderr)
    with stages.stage("train"):
        train_loop(run, st, bar)
    bar.close()

    # 4. on-policy (GKD): the same optimizer step on the student's own samples
    if cfg.onpolicy_steps and run.teacher is not None:
        with stages.stage("train"):
            onpolicy_phase(run, st)

    # 5. final validation, checkpoint, export
    with stages.stage("export"):
        validate(run, st, final=True)
        run.checkpoint(st)
        result = export(run, st, s_tok, init)
    distributed.close(dist)
    return result


def train_loop(run: Run, st: RunState, bar) -> None:
    """Optimizer steps until the step count or the wall-clock budget ends, validating and checkpointing."""
    cfg, dist = run.cfg, run.dist
    window_tokens, window_time = 0, 0.0
    while not st.stopped:
        if st.step >= cfg.steps or progress_of(cfg, st) >= 1.0:
            st.stopped = "steps" if st.step >= cfg.steps else "time budget"
            break
        t_step = time.perf_counter()
        step = kd_step(run, st)
        st.step += 1
        dt = time.perf_counter() - t_step
        st.elapsed += dt
        st.tokens += step.tokens
        window_tokens += step.tokens * dist.world
        window_time += dt
        bar.update(1)
        if st.step % cfg.log_every == 0 or st.step == 1:
            rec = {"step": st.step, "loss": round(step.loss, 5), "lr": step.lr,
                   "tok_s": round(window_tokens / window_time, 1), "elapsed_s": round(st.elapsed, 1)}
            rec |= {k: round(v, 5) for k, v in step.parts.items()}
            bar.set_postfix(loss=f"{step.loss:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            run.append(rec)
            window_tokens, window_time = 0, 0.0
        if st.step % cfg.val_every == 0:
            validate(run, st)
            st.stopped = distributed.agree_on_stop(st.stopped, dist)
        if st.step % cfg.ckpt_every == 0:
            run.checkpoint(st)
        dist.barrier()


# ---- stage 2b: teacher targets ------------------------------------------------------------------------------------
def fill_teacher_cache(run: Run, cache_dir: Path, progress: bool, stages: Stages | None = None):
    """Teacher top-k for the rows the schedule reads (all of them once the schedule wraps an epoch) and
    for the validation rows. Replicated teachers: each rank fills a disjoint share; an FSDP-sharded teacher:
    all ranks run the rows rank 0 found missing, in lockstep, and rank 0 stores them.
    Returns (train cache | None, val cache)."""
    cfg, data, dist, teacher = run.cfg, run.data, run.dist, run.teacher
    # keyed by what the teacher reads (its rows' token ids), not by how they were made: runs whose students read
    # other orders or start elsewhere (adapt, draft) share one teacher pass over the same rows
    rows_hash = hashlib.sha256(np.ascontiguousarray(data.train.teacher_ids).tobytes()
                               + np.ascontiguousarray(data.val.teacher_ids).tobytes()).hexdigest()[:16]
    key = (f"{rows_hash}-{tokenizer_hash(run.tok)}-{cfg.seq_len}-n{len(data.train)}"
           + ("-bf16" if run.autocast_dtype else ""))
    base = cache_dir_for(cache_dir, run.teacher_name, key, cfg.top_k)
    n_val = min(cfg.val_rows, len(data.val))
    if not dist.main:
        dist.barrier()  # rank 0 creates the memmap files first; the others open them
    val_cache = TopKCache(base / "val", len(data.val), cfg.seq_len, cfg.top_k)
    train_cache = TopKCache(base / "train", len(data.train), cfg.seq_len, cfg.top_k) if cfg.loss != "ce" else None
    if dist.main:
        dist.barrier()
    lockstep = is_fsdp(teacher)  # a sharded teacher: all ranks run the same rows, rank 0 stores them

    def share(cache: TopKCache, rows: list[int]) -> list[int]:
        if not lockstep:
            return rows[dist.rank::dist.world]
        todo = [cache.missing(rows) if dist.main else None]
        torch.distributed.broadcast_object_list(todo, 0)
        return todo[0]

    kw = dict(lockstep=lockstep, write=dist.main or not lockstep, autocast=run.autocast)
    n = len(data.train)

    def rows_needed() -> list[int]:
        return list(range(n)) if cfg.steps * run.per_step >= n or cfg.specialists else sorted(
            {r for s in range(cfg.steps) for r in rows_for_step(s, n, run.per_step, cfg.seed)})

    needed = rows_needed()
    if stages is not None and dist.main:  # the plan could not know what an earlier run already cached
        train_todo = train_cache.missing(needed) if train_cache is not None else []
        rows = (len(needed) if train_cache is not None else 0) + n_val
        todo = len(train_todo) + len(val_cache.missing(range(n_val)))
        if todo < rows:
            stages.revise("teacher", todo / max(1, rows), f"{rows - todo} of {rows} rows already cached")
    t0 = time.perf_counter()
    computed = val_cache.fill(teacher, data.val.teacher_ids, share(val_cache, list(range(n_val))), progress=False, **kw)
    probe: list[int] = []
    calibrating, want = stages is not None and dist.world == 1, max(2, n_val)  # rows that time the teacher
    if calibrating and train_cache is not None and computed < want:
        # an earlier run cached the validation rows (e.g. adapt before draft on one repository): the first missing
        # train rows, which the pass computes first anyway, measure the rate instead
        probe = train_cache.missing(needed)[:want - computed]
        train_cache.fill(teacher, data.train.teacher_ids, probe, progress=False, **kw)
    # those rows measured this machine's teacher rate: a run slower than planned refits its schedule to the budget
    # before the rest of the train rows (one process: the ranks of a distributed run would have to agree on it)
    if calibrating and stages.calibrate(cfg, computed + len(probe), time.perf_counter() - t0):
        needed = rows_needed()
    if train_cache is not None:
        t0 = time.perf_counter()
        done = len(set(probe) & set(needed)) + train_cache.fill(  # the probe's rows count where the schedule reads them
            teacher, data.train.teacher_ids, share(train_cache, needed), progress=progress and dist.main, **kw)
        log(f"teacher top-{cfg.top_k}: {done} rows computed, {len(needed) - done} reused "
            f"({time.perf_counter() - t0:.0f} s)", dist)
    dist.barrier()
    return train_cache, val_cache


# ---- stage 3: one optimizer step (both phases) ---------------------------------------------------------------------
@dataclass
class Micro:
    """One micro-batch of this rank."""
    ids: torch.Tensor  # (b, L) student input ids, on the device
    mask: torch.Tensor  # (b, L) float: positions whose next-token prediction carries loss
    rows: list[int] = field(default_factory=list)  # global row ids (cached targets are looked up by row)
    teacher_ids: torch.Tensor | None = None  # (b, L) the same rows as the teacher reads them (its FIM order)
    t_index: torch.Tensor | None = None  # (b, L) CPU: the teacher position aligned to each student position


@dataclass
class Step:
    loss: float  # global mean loss per loss-carrying token
    tokens: int  # loss-carrying tokens of this rank
    parts: dict[str, float]  # loss components, global means
    lr: float  # the learning rate this step used
    grad_norm: float | None  # total gradient norm before clipping (None: clipping off, or FSDP)


LossFn = Callable[[Run, Micro, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def optimizer_step(run: Run, st: RunState, micro: Sequence[Micro], total_tokens: float, loss_fn: LossFn) -> Step:
    """One optimizer step at step ``st.step`` of the schedule: set the learning rate (``get_lr``), forward and
    backward every micro-batch (autocast; DDP / FSDP gradient sync on the last one only), clip, AdamW.
    ``loss_fn`` gives a micro-batch's loss *sum*; it is divided by the *global* token count ``total_tokens``
    times world, so DDP's gradient average equals the single-process gradient of the mean."""
    cfg, dist, model, opt = run.cfg, run.dist, run.model, run.opt
    lr = get_lr(cfg, progress_of(cfg, st), st.step)
    for g in opt.param_groups:
        g["lr"] = lr
    loss_acc, parts_acc, my_tokens = 0.0, {}, 0
    opt.zero_grad(set_to_none=True)
    for i, mb in enumerate(micro):
        sync = i == len(micro) - 1
        ctx = nullcontext()
        if is_fsdp(model):
            model.set_requires_gradient_sync(sync)
        elif dist.world > 1 and not sync:
            ctx = model.no_sync()
        with ctx, run.autocast():
            logits = model(input_ids=mb.ids, use_cache=False).logits  # (b, L, V)
            loss_sum, parts = loss_fn(run, mb, logits)
            loss = loss_sum * dist.world / max(total_tokens, 1.0)
        loss.backward()
        loss_acc += float(loss_sum.detach())
        my_tokens += int(mb.mask.sum())
        for k, v in parts.items():
            parts_acc[k] = parts_acc.get(k, 0.0) + float(v)
    grad_norm = None
    if cfg.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in run.student.parameters() if p.requires_grad],
                                              cfg.grad_clip)
        grad_norm = None if is_fsdp(model) else float(norm)
    opt.step()
    keys = sorted(parts_acc)
    if dist.world > 1:  # report the global mean
        summed = distributed.sum_over_ranks([loss_acc] + [parts_acc[k] for k in keys], dist)
        loss_acc, parts_acc = summed[0], dict(zip(keys, summed[1:]))
    denom = max(total_tokens, 1.0)
    return Step(loss_acc / denom, my_tokens, {k: v / denom for k, v in parts_acc.items()}, lr, grad_norm)


# ---- the KD phase: rows of the corpus, targets from the teacher (cached top-k or online) or the data (CE) -------------
def kd_step(run: Run, st: RunState) -> Step:
    """The rows of step ``st.step`` (global); this rank takes rows[rank::world] of every micro-batch."""
    cfg, train, dist = run.cfg, run.data.train, run.dist
    if run.row_ids is None:
        rows = rows_for_step(st.step, len(train), run.per_step, cfg.seed)
    else:  # a specialist: its own epochs over its cluster's rows (global ids: the teacher cache is by row)
        rows = [run.row_ids[i] for i in rows_for_step(st.step, len(run.row_ids), run.per_step, cfg.seed)]
    micro_rows = [rows[i: i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    mask_all = train.loss_mask if cfg.loss_positions == "all" else train.mid_mask
    total_tokens = sum(float(mask_all[r][:, :-1].sum()) for r in micro_rows)
    micro = []
    for mrows in micro_rows:
        mine = mrows[dist.rank::dist.world]
        b = train.rows(mine)
        mask = torch.as_tensor(b.loss_mask if cfg.loss_positions == "all" else b.mid_mask, device=run.device).float()
        mask[:, -1] = 0  # the last position's target is outside the row
        online = run.cache is None and cfg.loss != "ce"  # the teacher runs on these rows this step
        micro.append(Micro(torch.as_tensor(b.student_ids, device=run.device).long(), mask, mine,
                           torch.as_tensor(b.teacher_ids, device=run.device).long() if online else None,
                           torch.as_tensor(b.t_index).long()))
    return optimizer_step(run, st, micro, total_tokens, kd_loss)


def kd_loss(run: Run, mb: Micro, logits: torch.Tensor):
    """alpha * CE on the real next tokens + (1 - alpha) * T^2 * divergence from the teacher: its cached top-k
    (``run.cache``) or, online, its full distribution from a forward on the same rows this step."""
    cfg, device = run.cfg, run.device
    targets = torch.roll(mb.ids, -1, 1)  # (b, L) next token
    s_lp = t_lp = s_all = None
    if cfg.loss != "ce":
        if run.cache is not None:
            vals, idx, lse = (x.to(device) for x in run.cache.get(mb.rows, mb.t_index))
            s_all = torch.log_softmax(logits.float() / cfg.temperature, -1)  # (b, L, V), shared with CE
            s_lp, t_lp = losses.sparse_pair_logp(s_all, vals, idx, lse, cfg.temperature)
            s_all = s_all if cfg.temperature == 1.0 else None
        else:
            t_logits = online_logits(run.teacher, mb.teacher_ids, mb.t_index.to(device))  # (b, L, V)
            s_lp, t_lp = losses.dense_pair(logits, t_logits, cfg.temperature)
    return losses.distill_loss_sum(cfg.loss, s_lp, t_lp, logits, targets, mb.mask, alpha=cfg.alpha,
                                   temperature=cfg.temperature, beta=cfg.beta, s_all=s_all)


# ---- stage 4: the on-policy (GKD) phase ----------------------------------------------------------------------------
def onpolicy_phase(run: Run, st: RunState) -> None:
    """``cfg.onpolicy_steps`` steps after the KD phase, continuing its step count and schedule, checkpointed
    like it (a resume picks up inside this phase: ``st.onpolicy_start`` says where it began)."""
    cfg = run.cfg
    if st.onpolicy_start < 0:
        st.onpolicy_start = st.step
    end = st.onpolicy_start + cfg.onpolicy_steps
    while st.step < end:
        t_step = time.perf_counter()
        step = onpolicy_step(run, st)
        st.step += 1
        st.elapsed += time.perf_counter() - t_step
        if step is not None:
            st.tokens += step.tokens
            rec = {"step": st.step, "phase": "onpolicy", "loss": round(step.loss, 5), "lr": step.lr}
            run.append(rec | ({"grad_norm": round(step.grad_norm, 5)} if step.grad_norm is not None else {}))
        if st.step % cfg.ckpt_every == 0:
            run.checkpoint(st)


def onpolicy_step(run: Run, st: RunState) -> Step | None:
    """GKD: the student samples each row's middle (seeded by the step: a resumed run samples the same),
    the teacher scores those tokens, minimise JSD(beta) on them. None: no row of this step has a FIM middle."""
    cfg, train, dist = run.cfg, run.data.train, run.dist
    middle_id = run.fmt.ids(run.tok)["middle"]
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed + st.step)
    rows = rows_for_step(st.step, len(train), run.per_step, cfg.seed)
    micro = []
    run.student.eval()
    for i in range(0, len(rows), cfg.batch_size):
        b = train.rows(rows[i: i + cfg.batch_size][dist.rank::dist.world])
        ids, mask = onpolicy_rows(run.student, torch.as_tensor(b.student_ids, device=run.device).long(), middle_id,
                                  0, generator=gen)
        if ids is None:  # nothing sampled on this rank: a zero-loss forward keeps DDP's ranks in step
            ids = torch.as_tensor(b.student_ids).long()
            mask = torch.zeros(ids.shape)
        micro.append(Micro(ids.to(run.device), mask.to(run.device).float()))
    run.student.train()
    total_tokens = distributed.sum_over_ranks([float(sum(mb.mask.sum() for mb in micro))], dist)[0]
    if total_tokens == 0:
        return None
    return optimizer_step(run, st, micro, total_tokens, gkd_loss)


def gkd_loss(run: Run, mb: Micro, logits: torch.Tensor):
    """Generalized JSD(beta) between the teacher and the student on the student's sampled tokens (the
    teacher reads the same sequence: on-policy needs one FIM order for both, see config.check)."""
    with torch.no_grad():
        t_logits = run.teacher(input_ids=mb.ids, use_cache=False).logits  # (b, L', V)
    s_lp, t_lp = losses.dense_pair(logits, t_logits, run.cfg.temperature)
    div = losses.jsd_sum(s_lp, t_lp, mb.mask, run.cfg.beta)
    return div, {"jsd": div.detach()}


# ---- validation ---------------------------------------------------------------------------------------------------
def validate(run: Run, st: RunState, final: bool = False) -> None:
    cfg, student, dist = run.cfg, run.student, run.dist
    if not dist.main and not is_fsdp(student):
        return  # FSDP: every rank runs the same validation forwards (gathers are collectives); rank 0 records
    student.eval()
    val_rows = run.val_rows
    ids = list(range(len(val_rows)))
    teacher = run.teacher if run.val_cache is None and cfg.loss != "ce" else None
    m = evaluate.token_metrics(student, val_rows, teacher=teacher, cache=run.val_cache, row_ids=ids,
                               positions=cfg.loss_positions)
    if cfg.val_fim_cases:
        from localcoder.eval.heldout import sample_cases

        cases = sample_cases(run.data.val_files or run.data.test_files, cfg.val_fim_cases, seed=cfg.seed)
        r = evaluate.fim_generate(student, run.tok, run.fmt, cases, order=cfg.fim_order)
        m |= {"fim_em": float(np.mean(r.em)), "fim_es": float(np.mean(r.es))}
    student.train()
    if not dist.main:
        return
    rec = {"step": st.step, "split": "val", "final": final} | {k: round(v, 5) if isinstance(v, float) else v
                                                                 for k, v in m.items()}
    run.append(rec)
    st.history.append(rec)
    score = m.get("kl", m["ce"]) if cfg.loss != "ce" else m["ce"]
    if score < st.best_val - 1e-4:
        st.best_val, st.bad_vals = score, 0
    else:
        st.bad_vals += 1
        if cfg.patience and st.bad_vals >= cfg.patience and not final:
            st.stopped = f"early stop (no val improvement in {cfg.patience} validations)"


# ---- stage 5: export ---------------------------------------------------------------------------------------------------
def export(run: Run, st: RunState, s_tok, init) -> Result:
    cfg, out, data, dist, student = run.cfg, run.out, run.data, run.dist, run.student
    model_dir = out / "model"
    prov = {
        "teacher": run.teacher_name, "student_init": init.__dict__,
        "data": {"roots": cfg.data or [str(data_mod.default_corpus())], "fingerprint": data.fingerprint,
                 "describe": data.describe},
        "steps": st.step, "tokens": st.tokens, "train_seconds": round(st.elapsed, 1), "stopped": st.stopped,
        "metrics": st.history[-1] if st.history else {}, "config": cfg.to_dict(),
        "fim": {"format": "auto", "order": cfg.fim_order},
    }
    full = distributed.full_state(student)[0] if is_fsdp(student) else None  # a collective
    if dist.main:
        from localcoder.distill.lora import merged

        export_model = merged(student, cfg.lora_rank)
        if full is not None:  # an unsharded copy of the student class, loaded with the gathered weights
            export_model = students.load_causal_lm(out / "init")[0]
            export_model.load_state_dict(full)
        tmp = out / f".model.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        export_model.save_pretrained(str(tmp), safe_serialization=True)
        s_tok.save_pretrained(str(tmp))
        (tmp / "localcoder.json").write_text(json.dumps(prov, indent=1))
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        from localcoder.distill.report import write_report

        write_report(out)
        from localcoder.models import register

        register(cfg.register_as or out.resolve().name, model_dir, source="distill", teacher=run.teacher_name,
                 orders=[cfg.fim_order])
    dist.barrier()
    return Result(out, model_dir, st, prov)
