"""What a run will cost, said before it starts and compared with what it cost at the end.

``estimate(cfg, ...)`` gives minutes per stage, disk and peak memory from the run's sizes (rows, sequence
length, the two models' parameter counts) and throughputs measured on our 2-core laptop class (below; a
faster machine finishes early, the comparison at the end says by how much). ``check_disk`` refuses a run
whose outputs cannot fit before anything is written. ``Stages`` times each stage and writes ``stages.json``
next to the estimate, so ``report.md`` and the CLI show estimate against actual.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from localcoder.distill.config import DistillConfig
from localcoder.errors import InvalidRequest

# Throughputs measured on a 2-core Xeon (AVX512-BF16/AMX, bf16 autocast), 2026-12-04 (docs/distill.md "adapt"):
# tokens per second of a no-grad forward, per billion parameters (teacher top-k pass), and of a training step
# (forward + backward; LoRA: the base is frozen but its activations' gradients still flow).
FORWARD_TOK_S_PER_B = 280.0  # the 1.5B teacher (1.78B with its head): ~157 tok/s (measured 144-167)
TRAIN_TOK_S_PER_B = 85.0  # the 0.5B (0.64B) + LoRA at 2 x 1,024 tokens: ~133 tok/s (measured 124-140)
# The same on a CPU without native bf16, where the run stays fp32: a 2-core AMD EPYC (Zen 3, AVX2), 2026-12-06
# (1,024-token rows; the 1.5B's teacher pass 37 tok/s, the 0.5B + LoRA training 33 tok/s): ~4x slower.
FORWARD_TOK_S_PER_B_FP32 = 68.0
TRAIN_TOK_S_PER_B_FP32 = 21.0
CONVERT_S_PER_B = 90.0  # GGUF -> fp32 safetensors, once per model (cached)
EXPORT_S_PER_B = 60.0  # merge + save safetensors + per GGUF type: write f16, quantize
# One gate FIM case (Xeon): the fp32 source in torch ~3.5 s, which slows down with the torch speed the teacher
# pass measures (the Zen 4 at 0.53-0.57x: 5.3-6.2 s); each GGUF in llama.cpp ~5 s, which does not (there
# 3.8-4.4 s). Two adapter-only publishes there took 11.6 and 10.2 min; this split says 11.8 and 12.2, the
# old flat 4.5 s a case 9.6 for both (docs/distill.md, "A third CPU class")
GATE_SOURCE_S_PER_CASE = 3.5
GATE_GGUF_S_PER_CASE = 5.0


@dataclass
class Estimate:
    minutes: dict[str, float]
    disk_gb: float
    peak_memory_gb: float
    rows: int
    notes: list[str] = field(default_factory=list)

    @property
    def total_minutes(self) -> float:
        return sum(self.minutes.values())

    def describe(self) -> str:
        stages = ", ".join(f"{k} {v:.0f}" for k, v in self.minutes.items())
        return (f"estimate: {self.total_minutes:.0f} min ({stages}), disk {self.disk_gb:.1f} GB, "
                f"peak memory {self.peak_memory_gb:.1f} GB, {self.rows} training rows of the preset's length")


def rates(cfg: DistillConfig) -> tuple[float, float]:
    """(teacher forward, training step) tokens/s per billion parameters assumed for this CPU class."""
    from localcoder.distill.memory import native_bf16

    bf16 = cfg.autocast != "off" and native_bf16()  # CUDA runs finish far earlier than either CPU class
    return (FORWARD_TOK_S_PER_B, TRAIN_TOK_S_PER_B) if bf16 else (FORWARD_TOK_S_PER_B_FP32, TRAIN_TOK_S_PER_B_FP32)


def estimate(cfg: DistillConfig, *, rows: int, teacher_params: float, student_params: float,
             converted: tuple[bool, bool] = (True, True), gate_cases: int = 0, speed: float = 1.0) -> Estimate:
    """Minutes per stage, disk (everything the run writes) and peak memory for ``rows`` training rows.
    ``speed``: this machine's measured torch throughput as a fraction of the class's assumed one (the teacher
    pass measures it; training is taken to scale alike: the two rates kept a ~0.3 ratio on every CPU measured)."""
    from localcoder.distill.memory import estimate_memory_gb

    forward_rate, train_rate = (r * speed for r in rates(cfg))
    tb, sb = teacher_params / 1e9, student_params / 1e9
    n_val = cfg.val_rows
    teacher_rows = min(rows, cfg.steps * cfg.batch_size * cfg.grad_accum) if cfg.loss != "ce" else 0
    train_tokens = cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len
    train_min = train_tokens / (train_rate / max(sb, 1e-3)) / 60
    if cfg.max_minutes:
        train_min = min(train_min, cfg.max_minutes)
    minutes = {
        "convert": ((0 if converted[0] else tb) + (0 if converted[1] else sb)) * CONVERT_S_PER_B / 60,
        "data": 0.5,
        "teacher": (teacher_rows + n_val) * cfg.seq_len / (forward_rate / max(tb, 1e-3)) / 60,
        "train": train_min,
        "export": sb * EXPORT_S_PER_B / 60 / speed,  # merged safetensors in torch (+ the LoRA as a GGUF adapter)
        # each GGUF type: written, quantized, gated (the source's cases once in torch, then each artifact's)
        "publish": (len(cfg.export_gguf) * sb * EXPORT_S_PER_B
                    + gate_cases * (GATE_SOURCE_S_PER_CASE / speed + GATE_GGUF_S_PER_CASE * len(cfg.export_gguf))) / 60
        if cfg.export_gguf else 0.0,
    }
    gb = 1e9
    cache = (teacher_rows + n_val) * cfg.seq_len * (cfg.top_k * 6 + 4) / gb  # fp16 values, int32 ids, lse
    trainable = student_params if not cfg.lora_rank else student_params * 0.02
    ckpts = cfg.keep_checkpoints * trainable * 4 * 3 / gb  # weights + AdamW moments
    merged = student_params * 4 / gb
    ggufs = sum({"q8_0": 1.07, "q4_k_m": 0.62, "f16": 2.0}.get(t, 1.0) for t in cfg.export_gguf) * student_params / gb
    conversions = ((0 if converted[0] else teacher_params) + (0 if converted[1] else student_params)) * 4 / gb
    disk = cache + ckpts + merged + ggufs + conversions + 0.2  # + tokenized rows, reports
    peak = estimate_memory_gb(cfg, int(teacher_params), int(student_params), int(trainable), 896, 151936, 24,
                              teacher_resident=cfg.teacher_mode == "online" or cfg.onpolicy_steps > 0) * 2**30 / gb
    peak = max(peak, teacher_params * 4 / gb * 1.3)  # the teacher pass holds the fp32 teacher
    notes = [] if rows >= cfg.train_rows else [f"the corpus gives {rows} rows (the preset reads up to {cfg.train_rows})"]
    return Estimate({k: round(v, 1) for k, v in minutes.items()}, round(disk, 2), round(peak, 1), rows, notes)


def plan(cfg: DistillConfig, out: Path, cache_dir: Path, *, main: bool = True) -> Stages:
    """Before anything is converted or written: the estimate (printed), the disk check, the stage clock."""
    from localcoder.distill.publish import GATE_HELDOUT, GATE_HUMANEVAL

    if not main:
        return Stages(out, None, enabled=False)
    (tp, _, _, t_ok) = param_count(cfg.teacher)
    sp, blocks, layers, s_ok = param_count(cfg.student or cfg.prune_from or cfg.teacher)
    if not cfg.student and layers:  # a pruned student keeps --student-layers of the blocks (embeddings, head stay)
        sp = int(sp - blocks * (1 - min(cfg.student_layers, layers) / layers))
    sizes = dict(teacher_params=tp, student_params=sp, converted=(t_ok, s_ok), gate_cases=GATE_HELDOUT + GATE_HUMANEVAL)
    speed = Stages.recorded_speed(out)  # a resumed run keeps the schedule its first teacher rows measured
    est = estimate(cfg, rows=cfg.train_rows or 400, speed=speed, **sizes)
    est = fit_schedule(cfg, est, speed=speed, **sizes)
    say(est.describe())
    check_disk(est, out, cache_dir)
    stages = Stages(out, est)
    stages.sizes = sizes
    return stages


def fit_schedule(cfg: DistillConfig, est: Estimate, *, speed: float = 1.0, **sizes) -> Estimate:
    """Fit the schedule to this CPU class before anything runs (``cfg.steps``, ``train_rows``, ``max_minutes``
    change in place) and return the new estimate. Two rules, each said when it applies:

    - the training's time cap (``max_minutes``) reaches fewer steps than ``steps``: the teacher pass computes
      targets for the rows those steps read, not for rows no step would reach;
    - the whole run is still over ``budget_minutes``: drop steps (each one's rows: their teacher pass and their
      training) until it fits. Conversion, export, the gated publish and the validation rows stay.
    A CPU on which the schedule already fits is left alone."""
    per_step = cfg.batch_size * cfg.grad_accum
    avail = cfg.train_rows or 400  # the rows the plan assumes the corpus gives (as plan() estimates)
    rows_before, steps_before = min(avail, cfg.steps * per_step), cfg.steps

    def with_steps(n: int) -> Estimate:  # uncapped: what n steps cost
        return estimate(replace(cfg, train_rows=n * per_step, steps=n, max_minutes=0), rows=n * per_step,
                        speed=speed, **sizes)

    one, two = with_steps(1), with_steps(2)
    row_teacher = (two.minutes["teacher"] - one.minutes["teacher"]) / per_step  # one row's teacher pass
    step_train = two.minutes["train"] - one.minutes["train"]  # one step's training
    fixed = one.total_minutes - row_teacher * per_step - step_train

    def total(n: int) -> float:  # rows past the corpus's are re-read (epochs), not taught again
        return fixed + row_teacher * min(n * per_step, avail) + step_train * n

    steps, said = cfg.steps, []
    if cfg.max_minutes and step_train > 0 and int(cfg.max_minutes / step_train) * per_step < rows_before:
        steps = max(1, int(cfg.max_minutes / step_train))
        said.append(f"the training's {cfg.max_minutes:.0f}-minute cap reaches about {steps} of {cfg.steps} steps on "
                    f"this CPU, so the teacher pass covers their {steps * per_step} rows only")
    floor = max(1, -(-cfg.min_train_rows // per_step))  # the fewest steps that read the preset's minimum rows
    short = False
    if cfg.budget_minutes and total(steps) > cfg.budget_minutes:
        fit = next((n for n in range(steps, 0, -1) if total(n) <= cfg.budget_minutes), 0)
        short = fit < floor
        steps = max(floor, fit)
        said.append(f"the whole run is over the {cfg.budget_minutes:.0f}-minute budget at this CPU's speed; it reads "
                    f"{min(steps * per_step, avail)} rows in {steps} steps instead (less adaptation; "
                    "--budget-minutes 0 keeps the full schedule)")
    if steps == cfg.steps:
        return est
    cfg.steps = steps
    if steps * per_step < rows_before:
        cfg.train_rows = steps * per_step
    cap = step_train * steps * 1.1  # a 10% margin: the steps end the schedule, not the clock
    cfg.max_minutes = round(min(cfg.max_minutes, cap) if cfg.max_minutes else cap, 1)
    new = estimate(cfg, rows=cfg.train_rows or avail, speed=speed, **sizes)
    added = [f"schedule: {rows_before} rows in {steps_before} steps would take about {est.total_minutes:.0f} min "
             "here; " + "; ".join(said)]
    if short:
        added.append(f"budget not met: even the fewest rows ({cfg.train_rows}) take {new.total_minutes:.0f} min")
    for note in added:
        say(note)
    new.notes += added
    return new


def check_disk(est: Estimate, out: Path, cache_dir: Path) -> None:
    """Refuse before anything is written when the run's outputs cannot fit (kept: 1 GB to spare)."""
    for where in {out, cache_dir}:
        probe = where
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free / 1e9
        if free < est.disk_gb + 1.0:
            raise InvalidRequest(f"not enough disk for this run: it writes about {est.disk_gb:.1f} GB (teacher cache, "
                                 f"checkpoints, merged model, GGUF exports) and {probe} has {free:.1f} GB free",
                                 param="out", hint="free some space, or point --out / --cache-dir at another disk")


def check_rows(rows: int, cfg: DistillConfig, describe: str) -> None:
    """Refuse a corpus too small for the preset (``min_train_rows``), saying how much it needs."""
    if rows < cfg.min_train_rows:
        need = cfg.min_train_rows * cfg.seq_len
        raise InvalidRequest(f"too little code to train on: {describe}. The {cfg.preset or 'run'}'s training split "
                             f"needs at least {cfg.min_train_rows} rows of {cfg.seq_len} tokens (~{need:,} tokens, "
                             f"about {need * 4 // 1000:,} KB of source after the held-out files are set aside)",
                             param="data", hint="add more directories with --data, or lower --seq-len")


class Stages:
    """Wall time per stage, written to ``out/stages.json`` with the estimate (a resumed run adds to it)."""

    def __init__(self, out: Path, est: Estimate | None = None, *, enabled: bool = True):
        self.file, self.enabled = out / "stages.json", enabled
        self.sizes: dict = {}  # the plan's model sizes (estimate()'s keywords), for a refit once rates are measured
        prior = json.loads(self.file.read_text()) if enabled and self.file.exists() else {}
        self.speed: float = prior.get("speed", 1.0)  # measured / assumed torch throughput (calibrate)
        self.actual: dict[str, float] = prior.get("actual_minutes", {})
        self.est = est if est is not None else (Estimate(**prior["estimate"]) if "estimate" in prior else None)
        self.save()

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.actual[name] = round(self.actual.get(name, 0.0) + (time.perf_counter() - t0) / 60, 2)
            self.save()

    def save(self) -> None:
        if not self.enabled:  # other ranks of a distributed run: rank 0 keeps the record
            return
        data = {"actual_minutes": self.actual, "estimate": asdict(self.est) if self.est else None, "speed": self.speed}
        self.file.parent.mkdir(parents=True, exist_ok=True)
        self.file.write_text(json.dumps(data, indent=1))

    def revise(self, name: str, fraction: float, why: str) -> None:
        """Scale one stage's estimate once the run knows more than the plan did (e.g. teacher rows already
        cached by an earlier run on the same data), say so, and keep the note with the estimate."""
        if self.est is None or name not in self.est.minutes or not self.enabled:
            return
        old = self.est.minutes[name]
        self.est.minutes[name] = round(old * max(0.0, min(1.0, fraction)), 1)
        self.est.notes.append(f"{name}: {old:.1f} -> {self.est.minutes[name]:.1f} min ({why})")
        say(f"estimate revised: {name} {old:.0f} -> {self.est.minutes[name]:.0f} min ({why}); "
            f"total now {self.est.total_minutes:.0f} min")
        self.save()

    @staticmethod
    def recorded_speed(out: Path) -> float:
        try:
            return float(json.loads((out / "stages.json").read_text()).get("speed", 1.0))
        except (OSError, ValueError, AttributeError):
            return 1.0

    def calibrate(self, cfg: DistillConfig, rows: int, seconds: float) -> bool:
        """The teacher pass's first ``rows`` took ``seconds`` on this machine. Where that is clearly slower than
        the class's rates assumed (a CPU of the same class can be ~2x slower: no AMX, fewer GHz), replace the
        estimate of the stages still to come with one at the measured speed and say so (every run: the user
        sees when it will really end), and refit the schedule where a ``budget_minutes`` or a ``max_minutes``
        cap binds at that speed. True when the schedule changed (the rows the teacher must cover shrank)."""
        if not (self.enabled and self.est and self.sizes and rows >= 2 and seconds > 0):
            return False
        planned = rows * cfg.seq_len / (rates(cfg)[0] / (self.sizes["teacher_params"] / 1e9))
        speed = planned / seconds
        if speed >= 0.9:  # as planned (or faster: the plan's rows stay, the run ends early)
            return False
        steps = cfg.steps
        note = (f"measured: the teacher's first {rows} rows took {seconds / rows:.1f} s a row, {1 / speed:.1f}x the "
                f"{planned / rows:.1f} s planned for this CPU class")
        say(note)
        self.speed = speed
        new = fit_schedule(cfg, estimate(cfg, rows=cfg.train_rows, speed=speed, **self.sizes), speed=speed,
                           **self.sizes)
        done = {k: v for k, v in self.est.minutes.items() if k in ("convert", "data")}  # stages already run
        self.est = Estimate(new.minutes | done, new.disk_gb, new.peak_memory_gb, new.rows,
                            self.est.notes + [note] + [n for n in new.notes if n not in self.est.notes])
        say(f"estimate revised: {self.est.describe().removeprefix('estimate: ')}")
        self.save()
        return cfg.steps != steps

    def compare(self) -> str:
        """A table of estimate vs actual minutes per stage."""
        est = self.est.minutes if self.est else {}
        lines = ["| stage | estimate (min) | actual (min) |", "|---|---|---|"]
        for name in dict.fromkeys([*est, *self.actual]):
            e, a = est.get(name), self.actual.get(name)
            lines.append(f"| {name} | {'' if e is None else f'{e:.1f}'} | {'' if a is None else f'{a:.1f}'} |")
        te, ta = sum(est.values()), sum(self.actual.values())
        lines.append(f"| **total** | {te:.1f} | {ta:.1f} |")
        return "\n".join(lines)


def say(msg: str) -> None:
    print(f"[distill] {msg}", file=sys.stderr, flush=True)


def param_count(spec: str) -> tuple[int, int, int, bool]:
    """(parameters, of those in the transformer blocks, number of blocks, already converted to the fp32 HF form
    distillation reads) of a model spec, from its file headers only (GGUF tensor shapes, safetensors
    headers): nothing is loaded."""
    import re
    import struct

    from localcoder.models import hf_cache_path, resolve

    m = resolve(spec, pull_if_missing=True)
    sizes: dict[str, int] = {}
    if m.kind == "gguf":
        import gguf

        sizes = {t.name: int(t.n_elements) for t in gguf.GGUFReader(str(m.path)).tensors}
        block = re.compile(r"blk\.(\d+)\.")
    else:
        for f in sorted(Path(m.path).glob("*.safetensors")):
            with f.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
            for name, t in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in t["shape"]:
                        n *= d
                    sizes[name] = n
        block = re.compile(r"layers\.(\d+)\.")
    found = {name: block.search(name) for name in sizes}
    blocks = sum(n for name, n in sizes.items() if found[name])
    layers = len({x.group(1) for x in found.values() if x})
    converted = m.kind != "gguf" or (hf_cache_path(m.name) / "config.json").exists()
    return sum(sizes.values()), blocks, layers, converted
