"""The distillation recipe, top to bottom: data -> teacher -> student -> targets -> train -> export.

Read ``train(cfg)``: each stage is a small helper below it. Components live elsewhere (data.py,
dedup.py, fim_transform.py, students.py, losses.py, teacher.py, evaluate.py); this file only wires
them and owns the loop: AdamW, warm-up + cosine (over steps or over a wall-clock budget, whichever
ends first), gradient accumulation and clipping, optional gradient checkpointing, bf16 autocast on
CUDA, DDP under torchrun (gloo on CPU, NCCL on GPU), periodic validation, atomic checkpoints with
exact resume (model, optimizer, data position = step, RNG, elapsed time), early stopping, JSONL metrics.
"""

from __future__ import annotations

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

import numpy as np
import torch

from localcoder.distill import data as data_mod
from localcoder.distill import evaluate, losses, students
from localcoder.distill.config import DistillConfig
from localcoder.distill.dedup import dedup
from localcoder.distill.fim_transform import FimSpec, Packed, build_split, tokenizer_hash
from localcoder.distill.teacher import TopKCache, cache_dir_for, online_logits, onpolicy_rows
from localcoder.errors import InvalidRequest, ModelCorrupt

CKPT_DIR = "checkpoints"


# ---- distributed -----------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str) -> Dist:
    """torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK; one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return Dist(torch.distributed.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def shard_fsdp(model) -> None:
    """FSDP2: every decoder block is its own unit (gathered just in time, resharded after), then the root
    (embeddings, final norm, lm_head). Frozen parameters are sharded too; they just get no gradient."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _full_state(model, opt=None):
    """Full (unsharded) model and optimizer state dicts of an FSDP model on rank 0, CPU ({} elsewhere).
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=o), (get_optimizer_state_dict(model, opt, options=o) if opt else None)


# ---- run state ---------------------------------------------------------------------------------------------------
@dataclass
class RunState:
    step: int = 0  # optimizer steps done == data position (rows are a pure function of the step)
    elapsed: float = 0.0  # seconds spent in the training loop (validation and checkpoints excluded)
    tokens: int = 0  # loss-carrying tokens seen
    best_val: float = math.inf
    bad_vals: int = 0
    stopped: str = ""
    history: list[dict] = field(default_factory=list)


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
    return Data(packed["train"], packed["val"], packed["test"], fp, [f.path for f in splits["test"]],
                [f.path for f in splits["val"]], describe)


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
            else:
                model, tok, init = students.depth_pruned(tdir, cfg.student_layers, calib,
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


# ---- stage 3: checkpoints -----------------------------------------------------------------------------------------
def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_blob(model, opt) -> dict | None:
    """What a checkpoint holds. FSDP: gathered to full tensors (a collective; None on ranks other than 0), the
    optimizer state keyed by parameter name, so a checkpoint does not depend on how it was sharded."""
    if is_fsdp(model):
        full, optim = _full_state(model, opt)
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


# ---- stage 4: the loop -----------------------------------------------------------------------------------------------
@dataclass
class Result:
    out: Path
    model_dir: Path
    state: RunState
    provenance: dict


def train(cfg: DistillConfig, *, resume: bool = False, progress: bool = True) -> Result:
    from localcoder.engines.torch import HFTokenizer, pick_device
    from localcoder.fim.formats import detect_format

    cfg.check()
    device = pick_device(cfg.device)
    dist = init_distributed(device)
    if device == "cuda":
        torch.cuda.set_device(dist.local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    if out.exists() and (out / CKPT_DIR).exists() and not resume and any((out / CKPT_DIR).glob("step-*")):
        raise InvalidRequest(f"{out} already holds checkpoints of a run", param="out",
                             hint="pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    from localcoder.models import home

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else home() / "distill-cache"

    # teacher tokenizer + data
    tdir, tname = teacher_dir(cfg.teacher)
    import transformers

    t_tok_hf = transformers.AutoTokenizer.from_pretrained(str(tdir))
    tok = HFTokenizer(t_tok_hf)
    fmt = detect_format(tok)
    teacher = students.load_causal_lm(tdir)[0].eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    data = prepare_data(cfg, tok, fmt, cache_dir, dist, teacher=teacher, tname=tname)
    if cfg.train_rows and len(data.train) > cfg.train_rows:
        data.train = data.train.rows(slice(0, cfg.train_rows))  # rows are already shuffled
    log(f"data: {data.describe} ({time.perf_counter() - t0:.0f} s)", dist)
    if dist.main:
        (out / "splits.json").write_text(json.dumps({"val": [str(p) for p in data.val_files],
                                                     "test": [str(p) for p in data.test_files]}, indent=0))

    # student
    calib = torch.as_tensor(data.train.teacher_ids[:8]).long()  # (8, L) calibration code
    student, s_tok, init = build_student(cfg, tdir, calib, out, dist)
    students.check_tokenizers(t_tok_hf, s_tok)
    students.check_not_larger(teacher, student)
    if cfg.freeze_embeddings:
        students.freeze_embeddings(student)
    if cfg.lora_rank:
        student = _with_lora(student, cfg.lora_rank)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    fsdp = dist.world > 1 and cfg.parallel == "fsdp"
    need = estimate_memory_gb(cfg, students.count_params(teacher), students.count_params(student), trainable,
                              student.config.hidden_size, student.config.vocab_size,
                              student.config.num_hidden_layers, teacher_resident=True, world=dist.world,
                              sharded=fsdp)
    # on CPU every local rank shares this host's memory; on CUDA each has its own device
    check_memory(cfg, need * (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1), device)
    log(f"student: {init.method}, layers {init.layers_kept}, {students.count_params(student) / 1e6:.0f}M params "
        f"({trainable / 1e6:.0f}M trainable); teacher {tname}: {students.count_params(teacher) / 1e6:.0f}M; "
        f"memory estimate {need:.1f} GiB per process" + (f", {dist.world} processes ({cfg.parallel})"
                                                          if dist.world > 1 else ""), dist)
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

    # teacher targets for every row this schedule will read (+ validation rows)
    per_step = cfg.batch_size * cfg.grad_accum
    cache = val_cache = None
    if cfg.teacher_mode == "cached":
        cache, val_cache = _fill_teacher_cache(cfg, teacher, data, tok, tname, cache_dir, dist, progress)
        if not cfg.onpolicy_steps:  # not needed in the loop any more (on-policy excludes FSDP, see config)
            teacher = None

    model = student
    if dist.world > 1 and not fsdp:
        model = torch.nn.parallel.DistributedDataParallel(student, device_ids=[dist.local_rank] if device == "cuda" else None)
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95),
                            foreach=True)
    st = RunState()
    if resume:
        loaded = load_checkpoint(out, student, opt)
        if loaded is not None:
            st = loaded
            log(f"resumed at step {st.step} ({st.elapsed:.0f} s trained)", dist)
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1)) if dist.main else None
    metrics_file = out / "metrics.jsonl"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    val_rows = data.val.rows(slice(0, min(cfg.val_rows, len(data.val))))

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=st.step, desc="distill", disable=not (progress and dist.main),
               dynamic_ncols=True, file=sys.stderr)
    window_tokens, window_time = 0, 0.0
    while not st.stopped:
        if st.step >= cfg.steps or progress_of(cfg, st) >= 1.0:
            st.stopped = "steps" if st.step >= cfg.steps else "time budget"
            break
        t_step = time.perf_counter()
        lr = get_lr(cfg, progress_of(cfg, st), st.step)
        for g in opt.param_groups:
            g["lr"] = lr
        rows = rows_for_step(st.step, len(data.train), per_step, cfg.seed)
        loss_val, ntok, parts = _optimizer_step(cfg, model, student, opt, data.train, rows, cache, teacher,
                                                dist, device, autocast)
        st.step += 1
        dt = time.perf_counter() - t_step
        st.elapsed += dt
        st.tokens += ntok
        window_tokens += ntok * dist.world
        window_time += dt
        bar.update(1)
        if st.step % cfg.log_every == 0 or st.step == 1:
            rec = {"step": st.step, "loss": round(loss_val, 5), "lr": lr, "tok_s": round(window_tokens / window_time, 1),
                   "elapsed_s": round(st.elapsed, 1)} | {k: round(v, 5) for k, v in parts.items()}
            bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{rec['tok_s']:.0f}")
            _append(metrics_file, rec, dist)
            window_tokens, window_time = 0, 0.0
        if st.step % cfg.val_every == 0:
            _validate(cfg, student, val_rows, val_cache, teacher, data, tok, fmt, st, metrics_file, dist)
            st.stopped = _agree_on_stop(st.stopped, dist)
        if st.step % cfg.ckpt_every == 0:
            _checkpoint(out, student, opt, st, cfg, dist)
        dist.barrier()
    bar.close()
    if cfg.onpolicy_steps and teacher is not None:
        _onpolicy_phase(cfg, student, teacher, opt, data.train, st, tok, fmt, device, metrics_file, dist)
    _validate(cfg, student, val_rows, val_cache, teacher, data, tok, fmt, st, metrics_file, dist, final=True)
    _checkpoint(out, student, opt, st, cfg, dist)
    result = _export(cfg, student, s_tok, init, data, tname, st, out, dist)
    if dist.world > 1:
        torch.distributed.destroy_process_group()
    return result


def _checkpoint(out: Path, student, opt, st: RunState, cfg: DistillConfig, dist: Dist) -> None:
    blob = checkpoint_blob(student, opt) if is_fsdp(student) else None  # FSDP: every rank joins the gather
    if dist.main:
        save_checkpoint(out, student, opt, st, cfg.keep_checkpoints, blob=blob)


def _fill_teacher_cache(cfg, teacher, data: Data, tok, tname, cache_dir: Path, dist: Dist, progress: bool):
    """Teacher top-k for the rows the schedule reads (all of them once the schedule wraps an epoch) and
    for the validation rows. Replicated teachers: each rank fills a disjoint share; an FSDP-sharded teacher:
    all ranks run the rows rank 0 found missing, in lockstep, and rank 0 stores them.
    Returns (train cache | None, val cache)."""
    key = (f"{data.fingerprint}-{tokenizer_hash(tok)}-{cfg.seq_len}-{cfg.fim_rate}-{cfg.fim_order}-"
           f"{cfg.teacher_order}-s{cfg.seed}-n{len(data.train)}")
    base = cache_dir_for(cache_dir, tname, key, cfg.top_k)
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

    kw = dict(lockstep=lockstep, write=dist.main or not lockstep)
    val_cache.fill(teacher, data.val.teacher_ids, share(val_cache, list(range(n_val))), progress=False, **kw)
    cache = None
    if cfg.loss != "ce":
        per_step = cfg.batch_size * cfg.grad_accum
        n = len(data.train)
        needed = list(range(n)) if cfg.steps * per_step >= n else sorted(
            {r for s in range(cfg.steps) for r in rows_for_step(s, n, per_step, cfg.seed)})
        cache = train_cache
        t0 = time.perf_counter()
        done = cache.fill(teacher, data.train.teacher_ids, share(cache, needed), progress=progress and dist.main,
                          **kw)
        log(f"teacher top-{cfg.top_k}: {done} rows computed, {len(needed) - done} reused "
            f"({time.perf_counter() - t0:.0f} s)", dist)
    dist.barrier()
    return cache, val_cache


def _batch_tensors(rows: Packed, device: str):
    s_ids = torch.as_tensor(rows.student_ids, device=device).long()  # (b, L)
    t_index = torch.as_tensor(rows.t_index).long()  # (b, L), CPU (indexes cached arrays too)
    targets = torch.roll(s_ids, -1, 1)  # (b, L) next token
    return s_ids, t_index, targets


def _optimizer_step(cfg, model, student, opt, train: Packed, rows, cache, teacher, dist, device, autocast):
    """One optimizer step over ``rows`` (global); this rank takes rows[rank::world] per micro-batch.
    The loss is a sum over positions divided by the *global* token count times world, so DDP's gradient
    average equals the single-process gradient of the mean."""
    micro = [rows[i: i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    mask_all = train.loss_mask if cfg.loss_positions == "all" else train.mid_mask
    counts = [float(mask_all[r][:, :-1].sum()) for r in micro]
    total_tokens = sum(counts)
    loss_acc, parts_acc, my_tokens = 0.0, {}, 0
    opt.zero_grad(set_to_none=True)
    for i, mrows in enumerate(micro):
        mine = mrows[dist.rank::dist.world]
        b = train.rows(mine)
        s_ids, t_index, targets = _batch_tensors(b, device)
        mask = torch.as_tensor(b.loss_mask if cfg.loss_positions == "all" else b.mid_mask, device=device).float()
        mask[:, -1] = 0  # the last position's target is outside the row
        sync = i == len(micro) - 1
        ctx = nullcontext()
        if is_fsdp(model):
            model.set_requires_gradient_sync(sync)
        elif dist.world > 1 and not sync:
            ctx = model.no_sync()
        with ctx, autocast:
            logits = model(input_ids=s_ids, use_cache=False).logits  # (b, L, V)
            s_lp = t_lp = s_all = None
            if cfg.loss != "ce":
                if cache is not None:
                    vals, idx, lse = (x.to(device) for x in cache.get(mine, t_index))
                    s_all = torch.log_softmax(logits.float() / cfg.temperature, -1)  # (b, L, V), shared with CE
                    s_lp, t_lp = losses.sparse_pair_logp(s_all, vals, idx, lse, cfg.temperature)
                    s_all = s_all if cfg.temperature == 1.0 else None
                else:
                    t_logits = online_logits(teacher, torch.as_tensor(b.teacher_ids, device=device).long(),
                                             t_index.to(device))
                    s_lp, t_lp = losses.dense_pair(logits, t_logits, cfg.temperature)
            loss_sum, parts = losses.distill_loss_sum(cfg.loss, s_lp, t_lp, logits, targets, mask, alpha=cfg.alpha,
                                                      temperature=cfg.temperature, beta=cfg.beta, s_all=s_all)
            loss = loss_sum * dist.world / max(total_tokens, 1.0)
        loss.backward()
        loss_acc += float(loss_sum.detach())
        my_tokens += int(mask.sum())
        for k, v in parts.items():
            parts_acc[k] = parts_acc.get(k, 0.0) + float(v)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], cfg.grad_clip)
    opt.step()
    if dist.world > 1:  # report the global mean
        t = torch.tensor([loss_acc] + [parts_acc[k] for k in sorted(parts_acc)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        loss_acc = float(t[0])
        parts_acc = {k: float(v) for k, v in zip(sorted(parts_acc), t[1:])}
    denom = max(total_tokens, 1.0)
    return loss_acc / denom, my_tokens, {k: v / denom for k, v in parts_acc.items()}


def _validate(cfg, student, val_rows, val_cache, teacher, data: Data, tok, fmt, st: RunState, metrics_file, dist,
              final: bool = False) -> None:
    if not dist.main and not is_fsdp(student):
        return  # FSDP: every rank runs the same validation forwards (gathers are collectives); rank 0 records
    student.eval()
    ids = list(range(len(val_rows)))
    m = evaluate.token_metrics(student, val_rows, teacher=teacher if val_cache is None and cfg.loss != "ce" else None,
                               cache=val_cache, row_ids=ids, positions=cfg.loss_positions)
    if cfg.val_fim_cases:
        from localcoder.eval.heldout import sample_cases

        cases = sample_cases(data.val_files or data.test_files, cfg.val_fim_cases, seed=cfg.seed)
        r = evaluate.fim_generate(student, tok, fmt, cases, order=cfg.fim_order)
        m |= {"fim_em": float(np.mean(r.em)), "fim_es": float(np.mean(r.es))}
    student.train()
    if not dist.main:
        return
    rec = {"step": st.step, "split": "val", "final": final} | {k: round(v, 5) if isinstance(v, float) else v
                                                                 for k, v in m.items()}
    _append(metrics_file, rec, dist)
    st.history.append(rec)
    score = m.get("kl", m["ce"]) if cfg.loss != "ce" else m["ce"]
    if score < st.best_val - 1e-4:
        st.best_val, st.bad_vals = score, 0
    else:
        st.bad_vals += 1
        if cfg.patience and st.bad_vals >= cfg.patience and not final:
            st.stopped = f"early stop (no val improvement in {cfg.patience} validations)"


def _agree_on_stop(stopped: str, dist: Dist) -> str:
    """Rank 0 decides early stopping; every rank must leave the loop at the same step."""
    if dist.world == 1:
        return stopped
    flag = torch.tensor([1 if stopped else 0])
    torch.distributed.broadcast(flag, 0)
    return stopped or ("early stop (rank 0)" if int(flag) else "")


def _append(path: Path, rec: dict, dist: Dist) -> None:
    if dist.main:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")


def _onpolicy_phase(cfg, student, teacher, opt, train: Packed, st: RunState, tok, fmt, device, metrics_file, dist):
    """GKD: the student samples middles, the teacher scores them, minimise JSD(beta) on those tokens."""
    middle_id = fmt.ids(tok)["middle"]
    gen = torch.Generator().manual_seed(cfg.seed + st.step)
    for k in range(cfg.onpolicy_steps):
        rows = rows_for_step(st.step + k, len(train), cfg.batch_size, cfg.seed)
        b = train.rows(rows)
        student.eval()
        ids, mask = onpolicy_rows(student, torch.as_tensor(b.student_ids).long(), middle_id, 0, generator=gen)
        student.train()
        if ids is None:
            continue
        ids, mask = ids.to(device), mask.to(device).float()
        opt.zero_grad(set_to_none=True)
        logits = student(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        s_lp, t_lp = losses.dense_pair(logits, t_logits, cfg.temperature)
        loss = losses.jsd(s_lp, t_lp, mask, cfg.beta)
        loss.backward()
        opt.step()
        _append(metrics_file, {"step": st.step + k + 1, "phase": "onpolicy", "loss": round(float(loss), 5)}, dist)
    st.step += cfg.onpolicy_steps


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        from localcoder.errors import BackendUnavailable

        raise BackendUnavailable("LoRA needs peft", hint="pip install 'localcoder[train]'") from exc
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets))


# ---- stage 5: export ---------------------------------------------------------------------------------------------------
def _export(cfg, student, tok, init, data: Data, tname: str, st: RunState, out: Path, dist: Dist) -> Result:
    model_dir = out / "model"
    prov = {
        "teacher": tname, "student_init": init.__dict__, "data": {"roots": cfg.data or [str(data_mod.default_corpus())],
                                                                   "fingerprint": data.fingerprint,
                                                                   "describe": data.describe},
        "steps": st.step, "tokens": st.tokens, "train_seconds": round(st.elapsed, 1), "stopped": st.stopped,
        "metrics": st.history[-1] if st.history else {}, "config": cfg.to_dict(),
        "fim": {"format": "auto", "order": cfg.fim_order},
    }
    full = _full_state(student)[0] if is_fsdp(student) else None  # a collective
    if dist.main:
        export_model = student.merge_and_unload() if cfg.lora_rank else student
        if full is not None:  # an unsharded copy of the student class, loaded with the gathered weights
            export_model = students.load_causal_lm(out / "init")[0]
            export_model.load_state_dict(full)
        tmp = out / f".model.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        export_model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "localcoder.json").write_text(json.dumps(prov, indent=1))
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        from localcoder.distill.report import write_report

        write_report(out)
        from localcoder.models import register

        register(cfg.register_as or out.resolve().name, model_dir, source="distill", teacher=tname,
                 fim_order=cfg.fim_order)
    dist.barrier()
    return Result(out, model_dir, st, prov)
