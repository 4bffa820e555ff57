"""Typed, documented configuration of a distillation run. It *is* the CLI (``cli.py`` builds flags from
these fields) and the config-file format (TOML, same keys). Imports nothing heavy.

Presets fill defaults by machine class; explicit flags and config-file keys override them.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from localcoder.errors import InvalidRequest


@dataclass
class DistillConfig:
    # ---- models
    teacher: str = "qwen2.5-coder-0.5b"  # name, path or hub id of the teacher
    student: str = ""  # an HF model sharing the teacher's tokenizer (init c); empty: prune the teacher
    student_layers: int = 12  # blocks kept when pruning the teacher (init a)
    # prune this model to --student-layers instead of the teacher (same tokenizer): a draft cut from the 0.5B
    # learning the 1.5B's distribution (the draft preset); empty: the teacher is pruned
    prune_from: str = ""
    layer_selection: str = "importance"  # importance | uniform
    heads_keep: float = 1.0  # width pruning (init b): fraction of query heads kept per KV group
    mlp_keep: float = 1.0  # width pruning (init b): fraction of MLP channels kept
    freeze_embeddings: bool = True  # keep embeddings and lm_head frozen (V x H each)
    lora_rank: int = 0  # >0: train LoRA adapters (peft) instead of the blocks; merged on export
    # start the LoRA from a GGUF LoRA adapter of the same rank (auto: the layout adapter shipped for the student,
    # which already reads the append-only order); empty: from zero
    init_adapter: str = ""
    # K LoRA specialists instead of one adapter (a LoRA run): the training rows are clustered (TF-IDF over code
    # tokens, k-means) and each cluster trains its own LoRA on its rows, with a share of --steps / --max-minutes
    # proportional to its size; the bundle (adapters + router) serves each document with its nearest specialist.
    # K >= 2, or auto (silhouette, K <= 8); empty: one adapter
    specialists: str = ""
    specialist_min_rows: int = 8  # a cluster with fewer training rows (chunks) than this is refused
    # ---- data
    data: list[str] = field(default_factory=list)  # corpus directories (default: the stdlib source)
    out: str = "runs/student"
    cache_dir: str = ""  # tokenized + teacher caches (default: <LOCALCODER_HOME>/distill-cache)
    languages: list[str] = field(default_factory=list)  # restrict to these languages (default: all known)
    max_file_bytes: int = 256_000
    near_dedup: bool = True
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_train_files: int = 0  # 0 = all; a cap bounds tokenization time on big corpora
    train_rows: int = 0  # 0 = all; else train on the first N packed rows (epochs cycle over them)
    min_train_rows: int = 1  # refuse a corpus whose training split packs into fewer rows (it would learn its noise)
    seq_len: int = 256
    fim_rate: float = 0.9
    fim_order: str = "psm"  # the student's order: psm | spm (cache-friendly; the teacher may read psm)
    teacher_order: str = "psm"
    span_kinds: list[str] = field(default_factory=lambda: ["line", "block", "char"])
    # ---- objective
    loss: str = "fkl"  # ce | fkl | rkl | jsd
    alpha: float = 0.1  # weight of cross-entropy on the real tokens
    temperature: float = 1.0
    beta: float = 0.5  # generalized JSD
    loss_positions: str = "all"  # all | middle
    teacher_mode: str = "cached"  # cached (top-k on disk) | online
    top_k: int = 32
    seqkd: bool = False  # sequence-level KD: the teacher writes the FIM middles of the training data
    onpolicy_steps: int = 0  # a final GKD phase: student samples middles, teacher scores them
    # ---- optimisation
    steps: int = 300
    max_minutes: float = 0.0  # >0: wall-clock budget of the training loop (the schedule follows it)
    # >0: the whole run's budget in minutes (teacher pass, training, export, gated publish). Where the plan's
    # estimate for this CPU class is longer, the run reads fewer rows (teacher pass and training shrink together)
    # and says so before it starts; 0 = the schedule as given, however long it takes
    budget_minutes: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    seed: int = 0
    threads: int = 0  # CPU threads (0 = torch default)
    device: str = "auto"  # auto | cpu | cuda
    # bf16 autocast of the forwards (teacher top-k pass and training steps; weights and AdamW stay fp32):
    # auto = on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16, AMX: a LoRA step of the 0.5B at
    # 1,024 tokens measured 1.85x faster on a 2-core EPYC) | bf16 | off
    autocast: str = "auto"
    parallel: str = "ddp"  # under torchrun: ddp (replicas) | fsdp (FSDP2: student and teacher sharded across ranks)
    memory_limit_gb: float = 0.0  # 0 = what the machine has available now
    # ---- validation, checkpoints, output
    val_every: int = 50
    val_rows: int = 16
    val_fim_cases: int = 0  # FIM EM/ES on this many validation cases at each validation (slow on CPU)
    patience: int = 0  # early stopping after this many validations without improvement (0 = off)
    ckpt_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 5
    register_as: str = ""  # name in `localcoder models` (default: the output directory's name)
    # after training, quantize the merged model to these GGUF types through `localcoder quantize` (quality gate
    # on the run's held-out files; each passing one registered as <name>-<type>), e.g. q8_0 q4_k_m; `adapter`: the
    # student's own GGUF + the run's LoRA at run time (a LoRA run only), gated the same way, registered as <name>
    export_gguf: list[str] = field(default_factory=list)
    preset: str = ""

    def check(self) -> None:
        def bad(param, msg):
            raise InvalidRequest(msg, param=param)

        if self.loss not in ("ce", "fkl", "rkl", "jsd"):
            bad("loss", f"loss must be ce, fkl, rkl or jsd, got {self.loss!r}")
        if self.teacher_mode not in ("cached", "online"):
            bad("teacher_mode", f"teacher mode must be cached or online, got {self.teacher_mode!r}")
        if self.loss_positions not in ("all", "middle"):
            bad("loss_positions", f"loss positions must be all or middle, got {self.loss_positions!r}")
        for name in ("steps", "batch_size", "grad_accum", "top_k", "val_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.alpha <= 1.0:
            bad("alpha", f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            bad("temperature", f"temperature must be > 0, got {self.temperature}")
        for name in ("budget_minutes", "max_minutes"):
            if getattr(self, name) < 0:
                bad(name, f"--{name.replace('_', '-')} must be >= 0 minutes (0 = no limit), got {getattr(self, name)}")
        if self.student_layers < 1:
            bad("student_layers", f"--student-layers must be >= 1, got {self.student_layers}")
        if self.autocast not in ("auto", "bf16", "off"):
            bad("autocast", f"autocast must be auto, bf16 or off, got {self.autocast!r}")
        if self.parallel not in ("ddp", "fsdp"):
            bad("parallel", f"parallel must be ddp or fsdp, got {self.parallel!r}")
        if self.parallel == "fsdp" and (self.lora_rank or self.onpolicy_steps):
            bad("parallel", "--parallel fsdp does not combine with --lora-rank or --onpolicy-steps; use ddp")
        if self.prune_from and self.student:
            bad("prune_from", "--prune-from makes the student by pruning; it does not combine with --student")
        if "adapter" in self.export_gguf and not self.lora_rank:
            bad("export_gguf", "--export-gguf adapter publishes a LoRA run's adapter; give --lora-rank too")
        if self.init_adapter and not self.lora_rank:
            bad("init_adapter", "--init-adapter starts a LoRA run; give --lora-rank too")
        if self.specialists:
            from localcoder.distill.specialists import parse_k

            parse_k(self.specialists)
            if not self.lora_rank:
                bad("specialists", "--specialists trains LoRA adapters; give --lora-rank too (the adapt preset does)")
            if self.onpolicy_steps or self.parallel == "fsdp":
                bad("specialists", "--specialists does not combine with --onpolicy-steps or --parallel fsdp")
        if self.specialist_min_rows < 1:
            bad("specialist_min_rows", f"--specialist-min-rows must be >= 1, got {self.specialist_min_rows}")
        if self.onpolicy_steps and self.fim_order != self.teacher_order:
            bad("onpolicy_steps", "the on-policy phase needs the same FIM order for teacher and student")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, dict[str, Any]] = {
    # 2-core laptop, no GPU, budgeted for < 60 min end to end on an *idle* machine: data ~1.5 min, student
    # init ~1 min, teacher top-k over 400 rows (102k tokens at ~150 tok/s) ~11 min, training 35 min
    # (~110 tok/s: ~2 epochs over those rows), export/report ~1 min. See docs/distill.md for measurements.
    "laptop": dict(student_layers=12, seq_len=256, batch_size=4, grad_accum=1, steps=2000, max_minutes=35,
                   teacher_mode="cached", top_k=32, loss="fkl", alpha=0.1, loss_positions="all", lr=2e-4,
                   warmup_steps=10, val_every=100, val_rows=16, ckpt_every=50, max_train_files=600,
                   train_rows=400),
    # a layout adapter (`localcoder distill --preset layout`): the model itself reading PSM teaches itself
    # + a LoRA adapter to read our append-only `spm` order (suffix first: a keystroke only appends tokens),
    # per-token aligned KD on every position; rows as long as the prompts the server builds (1,024: a
    # 256-token-row adapter failed on long held-out prefixes), cut mostly where people pause while typing
    # (cursor spans, listed twice to weigh them), whole lines, blocks and char spans too; the stdlib is the
    # corpus. The adapter is exported as a GGUF LoRA (out/adapter.gguf) that llama.cpp loads next to the
    # base GGUF.
    "layout": dict(student="teacher", lora_rank=16, fim_order="spm", teacher_order="psm", fim_rate=1.0,
                   span_kinds=["cursor", "cursor", "line", "block", "char"], loss="fkl", alpha=0.1,
                   loss_positions="all", teacher_mode="cached", top_k=32, train_rows=80, seq_len=1024,
                   batch_size=2, steps=40, lr=3e-4, warmup_steps=4, val_every=20, val_rows=8, ckpt_every=10),
    # a model adapted to the user's code (`localcoder distill --preset adapt --data ~/src/myrepo`): the packaged
    # 1.5B reading PSM teaches the packaged 0.5B + LoRA reading the append-only `spm` order it will be served in,
    # on the user's files (split by file; the held-out ones gate and evaluate it). The LoRA starts from the
    # shipped layout adapter (the 0.5B already reads `spm`), so the steps go to the repository. The merged model
    # is quantized to GGUF q8_0 and q4_k_m through the quality gate and registered: `make serve MODEL=<name>`.
    # Budget: <= 90 min end to end on a 2-core laptop (docs/distill.md, "adapt"); on a slower CPU class (no
    # native bf16: ~4x slower) the plan reads fewer rows to keep it, and says so (`--budget-minutes 0`: all of them).
    "adapt": dict(teacher="qwen2.5-coder-1.5b", student="qwen2.5-coder-0.5b", init_adapter="auto", lora_rank=16,
                  fim_order="spm", teacher_order="psm", fim_rate=1.0,
                  span_kinds=["cursor", "cursor", "line", "block", "char"], loss="fkl", alpha=0.1,
                  loss_positions="all", teacher_mode="cached", top_k=32, seq_len=1024, batch_size=2,
                  train_rows=192, min_train_rows=16, steps=96, max_minutes=30, budget_minutes=90, lr=2e-4,
                  warmup_steps=4, val_every=16, val_rows=8,
                  ckpt_every=8, export_gguf=["adapter", "q8_0", "q4_k_m"]),
    # a draft for speculative decoding (`localcoder distill --preset draft --data ~/src/myrepo`): 6 of the 0.5B's
    # 24 blocks (chosen by importance) learn the served 1.5B's next-token distribution (forward KL on its cached
    # top-k, DistillSpec) on the user's files, in the 1.5B's served order (PSM). Same rows and teacher as the
    # adapt preset, so a repository adapted first reuses its teacher cache. `serve --model qwen2.5-coder-1.5b
    # --draft-model <name>-q4_k_m` verifies its drafts: the output is the 1.5B's own greedy output.
    "draft": dict(teacher="qwen2.5-coder-1.5b", prune_from="qwen2.5-coder-0.5b", student_layers=6,
                  fim_order="psm", teacher_order="psm", fim_rate=1.0,
                  span_kinds=["cursor", "cursor", "line", "block", "char"], loss="fkl", alpha=0.1,
                  loss_positions="all", teacher_mode="cached", top_k=32, seq_len=1024, batch_size=2,
                  train_rows=192, min_train_rows=16, steps=400, max_minutes=25, lr=5e-4, warmup_steps=10,
                  val_every=50, val_rows=8, ckpt_every=25, export_gguf=["q4_k_m"]),
    # one or more GPUs: longer sequences, bigger batches, online teacher, bf16 autocast.
    "gpu": dict(student_layers=12, seq_len=1024, batch_size=16, grad_accum=2, steps=3000, teacher_mode="online",
                loss="fkl", alpha=0.1, loss_positions="all", lr=3e-4, warmup_steps=100, val_every=250,
                val_rows=64, val_fim_cases=100, ckpt_every=250, grad_checkpointing=True),
}


def field_names() -> set[str]:
    return {f.name for f in fields(DistillConfig)}


def load(preset: str = "", file: str | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """Defaults < preset < config file < explicit overrides (None values are ignored)."""
    values: dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}", param="preset")
        values.update(PRESETS[preset])
    if file:
        values.update(_read_file(Path(file)))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(values) - field_names()
    if unknown:
        raise InvalidRequest(f"unknown config keys: {', '.join(sorted(unknown))}", param="config")
    cfg = DistillConfig(**values)
    if cfg.student == "teacher":  # the teacher itself at full depth (the layout preset: a model teaches itself)
        cfg.student = cfg.teacher
    cfg.preset = preset or cfg.preset
    cfg.check()
    return cfg


def _read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InvalidRequest(f"config file {path} does not exist", param="config") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"config file {path} is not valid TOML: {exc}", param="config") from exc
    return data.get("distill", data)
