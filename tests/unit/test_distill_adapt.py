"""`--preset adapt`: the 1.5B teaches the 0.5B + LoRA (started from the shipped layout adapter) on the user's
code, in the served `spm` order; the run says what it will cost before it starts, refuses what cannot work,
and its exports declare the order they were trained for wherever they are served from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from localcoder.distill.config import load
from localcoder.distill.plan import Estimate, Stages, check_disk, check_rows, estimate
from localcoder.errors import InvalidRequest, ModelCorrupt, ModelNotFound


def test_the_adapt_preset_is_the_big_model_teaching_the_small_one_the_served_order():
    cfg = load("adapt", None, {"data": ["/src/repo"]})
    assert (cfg.teacher, cfg.student) == ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
    assert (cfg.fim_order, cfg.teacher_order, cfg.lora_rank, cfg.init_adapter) == ("spm", "psm", 16, "auto")
    assert "cursor" in cfg.span_kinds and cfg.seq_len >= 1024
    assert cfg.export_gguf == ["adapter", "q8_0", "q4_k_m"] and cfg.min_train_rows > 1
    with pytest.raises(InvalidRequest, match="export-gguf adapter"):
        load("", None, {"export_gguf": ["adapter"]})  # only a LoRA run has an adapter
    with pytest.raises(InvalidRequest, match="init-adapter"):
        load("", None, {"init_adapter": "auto"})  # starting a LoRA needs a LoRA run


def _lora_model(tiny_qwen_dir: Path, rank: int = 4):
    import transformers

    from localcoder.distill.lora import with_lora

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_qwen_dir), dtype=torch.float32)
    return with_lora(model, rank)


def test_a_gguf_adapter_round_trips_into_the_lora_a_run_starts_from(tiny_qwen_dir, tmp_path):
    from localcoder.distill.lora import ALPHA_PER_RANK, load_adapter
    from localcoder.quantize.gguf import write_lora_gguf

    torch.manual_seed(1)
    trained = _lora_model(tiny_qwen_dir)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.1)
    lora = {n: p for n, p in trained.state_dict().items() if "lora_" in n}
    config = json.loads((tiny_qwen_dir / "config.json").read_text())
    path = write_lora_gguf(lora, tmp_path / "a.gguf", alpha=ALPHA_PER_RANK * 4, base_config=config, name="t").path

    fresh = _lora_model(tiny_qwen_dir)
    assert load_adapter(fresh, path, 4) == 4 * 7  # every projection of every block
    got = dict(fresh.state_dict())
    for name, want in lora.items():  # F16 in the file: equal to half precision
        assert torch.allclose(got[name], want, atol=2e-3), name
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():  # the same function: the run starts where the adapter left off
        assert torch.allclose(fresh(input_ids=ids).logits, trained(input_ids=ids).logits, atol=2e-2)

    with pytest.raises(InvalidRequest, match="rank"):
        load_adapter(_lora_model(tiny_qwen_dir, rank=8), path, 8)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(ModelCorrupt):
        load_adapter(fresh, tmp_path / "bad.gguf", 4)


def test_init_adapter_auto_is_the_one_shipped_for_the_student():
    from localcoder.distill.lora import adapter_path

    assert adapter_path("auto", "qwen2.5-coder-0.5b").name == "qwen2.5-coder-0.5b.gguf"
    with pytest.raises(InvalidRequest, match="no layout adapter ships"):
        adapter_path("auto", "qwen2.5-coder-1.5b")
    with pytest.raises(ModelNotFound):
        adapter_path("/nonexistent/adapter.gguf", "x")


def test_the_estimate_adds_up_what_the_preset_will_do(monkeypatch):
    from localcoder.distill import memory

    monkeypatch.setattr(memory, "native_bf16", lambda: True)  # the CPU class the budget was measured on
    cfg = load("adapt", None, {"data": ["/src"]})
    est = estimate(cfg, rows=cfg.train_rows, teacher_params=1.78e9, student_params=0.63e9, gate_cases=60)
    rows_read = cfg.steps * cfg.batch_size
    assert est.minutes["teacher"] == pytest.approx((rows_read + cfg.val_rows) * cfg.seq_len / (280 / 1.78) / 60, 0.05)
    assert est.minutes["train"] <= cfg.max_minutes and est.minutes["convert"] == 0
    assert 30 < est.total_minutes <= 90  # the budget on the 2-core laptop class
    fresh = estimate(cfg, rows=cfg.train_rows, teacher_params=1.78e9, student_params=0.63e9,
                     converted=(False, False), gate_cases=60)
    assert fresh.minutes["convert"] > 0 and fresh.disk_gb > est.disk_gb + 9  # two fp32 conversions
    assert "of the preset's length" in est.describe() and f"{est.total_minutes:.0f} min" in est.describe()


def test_the_estimate_knows_a_cpu_without_native_bf16_runs_fp32_and_slower(monkeypatch):
    """The throughputs differ ~4x between the two CPU classes measured (docs/distill.md): an AVX2-only CPU
    gets the fp32 rates, and so does `--autocast off` on a bf16 CPU."""
    from localcoder.distill import memory, plan

    cfg = load("layout", None, {"teacher": "qwen2.5-coder-1.5b"})
    sizes = dict(rows=cfg.train_rows, teacher_params=1.78e9, student_params=1.78e9)
    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    bf16 = estimate(cfg, **sizes)
    off = estimate(load("layout", None, {"teacher": "qwen2.5-coder-1.5b", "autocast": "off"}), **sizes)
    monkeypatch.setattr(memory, "native_bf16", lambda: False)
    fp32 = estimate(cfg, **sizes)
    assert off.minutes == fp32.minutes
    for stage, ratio in (("teacher", plan.FORWARD_TOK_S_PER_B / plan.FORWARD_TOK_S_PER_B_FP32),
                         ("train", plan.TRAIN_TOK_S_PER_B / plan.TRAIN_TOK_S_PER_B_FP32)):
        assert fp32.minutes[stage] == pytest.approx(bf16.minutes[stage] * ratio, rel=0.05)
    assert fp32.total_minutes > 120  # the 1.5B's layout adapter is a run of hours on 2 AVX2 cores


def test_on_a_slower_cpu_the_schedule_fits_the_training_cap_and_the_budget(monkeypatch, capsys):
    """On the fp32 CPU class (~4x slower) the adapt preset's 30-minute training cap reaches about a third of
    its 96 steps: the teacher pass must not compute targets for rows no step reads, and the whole run must
    keep the preset's 90 minutes. A CPU on which the schedule fits is left alone."""
    from localcoder.distill import memory
    from localcoder.distill.plan import fit_schedule

    sizes = dict(teacher_params=1.78e9, student_params=0.63e9, gate_cases=60)
    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    cfg = load("adapt", None, {"data": ["/src"]})
    est = estimate(cfg, rows=cfg.train_rows, **sizes)
    assert fit_schedule(cfg, est, **sizes) is est and (cfg.steps, cfg.train_rows, cfg.max_minutes) == (96, 192, 30)
    # the draft preset's cap ends its 400 steps early on this class too, but those steps still read all 192 rows
    # (in epochs): nothing to save, nothing changes
    draft = load("draft", None, {"data": ["/src"]})
    small = dict(sizes, student_params=0.36e9)
    est = estimate(draft, rows=draft.train_rows, **small)
    assert fit_schedule(draft, est, **small) is est and (draft.steps, draft.train_rows) == (400, 192)

    monkeypatch.setattr(memory, "native_bf16", lambda: False)
    full = estimate(cfg, rows=cfg.train_rows, **sizes)
    assert full.total_minutes > cfg.budget_minutes == 90 and full.minutes["train"] == 30  # the cap binds
    fitted = fit_schedule(cfg, full, **sizes)
    assert 8 <= cfg.steps < 96 and cfg.train_rows == cfg.steps * cfg.batch_size
    assert fitted.total_minutes <= 90 and fitted.minutes["publish"] == full.minutes["publish"]
    assert fitted.minutes["teacher"] < full.minutes["teacher"] / 2  # no targets for rows no step reads
    assert fitted.minutes["train"] <= cfg.max_minutes <= 30
    assert "cap reaches about" in capsys.readouterr().err and "schedule:" in fitted.notes[-1]

    # a tighter budget drops steps (rows) further; one step more would not have fitted
    tight = load("adapt", None, {"budget_minutes": 60})
    fitted = fit_schedule(tight, estimate(tight, rows=192, **sizes), **sizes)
    assert fitted.total_minutes <= 60 and tight.steps < cfg.steps
    more = load("adapt", None, {"steps": tight.steps + 1, "train_rows": tight.train_rows + 2, "budget_minutes": 0})
    assert estimate(more, rows=192, **sizes).total_minutes > 60
    assert "--budget-minutes 0" in capsys.readouterr().err
    # a budget even the fewest rows cannot meet runs the fewest rows and says it is not met
    tiny = load("adapt", None, {"budget_minutes": 10})
    late = fit_schedule(tiny, estimate(tiny, rows=192, **sizes), **sizes)
    assert tiny.train_rows == tiny.min_train_rows and late.total_minutes > 10
    assert "budget not met" in late.notes[-1]
    with pytest.raises(InvalidRequest, match="--budget-minutes must be >= 0 minutes") as err:
        load("adapt", None, {"budget_minutes": -1})
    assert err.value.param == "budget_minutes"


def test_a_teacher_slower_than_planned_refits_the_schedule_and_a_resume_keeps_it(monkeypatch, tmp_path, capsys):
    """A CPU of the bf16 class without AMX (an AMD Zen 4) ran the 1.5B's teacher pass at 11.3 s a row where
    the plan assumed 6.5: the validation rows measure that before any training row is computed, and the
    schedule is refit so the budget holds. The measured speed is recorded, so --resume plans the same."""
    from localcoder.distill import memory
    from localcoder.distill.plan import fit_schedule

    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    sizes = dict(teacher_params=1.78e9, student_params=0.63e9, gate_cases=60)
    cfg = load("adapt", None, {"data": ["/src"]})
    stages = Stages(tmp_path, estimate(cfg, rows=192, **sizes))
    stages.sizes = sizes
    planned = cfg.seq_len / (280 / 1.78)  # seconds a row at the class's rate
    assert not stages.calibrate(cfg, 8, 8 * planned * 1.05) and cfg.steps == 96  # as planned: nothing changes
    assert stages.est.total_minutes < 90 and cfg.steps * 2 == 192
    assert stages.calibrate(cfg, 8, 8 * 11.3)
    assert 40 <= cfg.steps < 96 and stages.est.total_minutes <= 90 and cfg.max_minutes <= 30
    assert stages.est.minutes["teacher"] > planned * (cfg.steps * 2 + 8) / 60  # at the measured rate
    err = capsys.readouterr().err
    assert "1.7x the 6.5 s planned" in err and "estimate revised" in err
    speed = Stages.recorded_speed(tmp_path)
    assert speed == pytest.approx(planned / 11.3, rel=0.01)
    again = load("adapt", None, {"data": ["/src"]})  # what plan() does on --resume with the recorded speed
    fit_schedule(again, estimate(again, rows=192, speed=speed, **sizes), speed=speed, **sizes)
    assert (again.steps, again.max_minutes) == (cfg.steps, cfg.max_minutes)


def test_a_run_without_a_budget_still_says_when_it_will_end_at_the_measured_speed(monkeypatch, tmp_path, capsys):
    """The 1.5B's layout adapter on an AMD Zen 4 (2026-12-07): planned 40 min at the bf16 class's rates, the
    teacher ran 12.2 s a row (6.5 planned), the run took 61. No budget, no cap: the schedule stays, but the
    estimate printed after the validation rows is the one at the measured speed."""
    from localcoder.distill import memory

    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    sizes = dict(teacher_params=1.78e9, student_params=1.78e9, gate_cases=0)
    cfg = load("layout", None, {"teacher": "qwen2.5-coder-1.5b"})
    assert not cfg.budget_minutes and not cfg.max_minutes
    stages = Stages(tmp_path, estimate(cfg, rows=cfg.train_rows, **sizes))
    stages.sizes = sizes
    before = stages.est.total_minutes
    assert not stages.calibrate(cfg, 8, 8 * 12.2) and cfg.steps == 40  # nothing to fit: the same 40 steps
    assert stages.est.total_minutes > 1.6 * before and stages.est.minutes["teacher"] > 15
    assert "estimate revised" in capsys.readouterr().err
    assert Stages.recorded_speed(tmp_path) < 0.6


def test_the_publish_estimate_slows_down_with_the_measured_torch_speed_for_the_torch_part_only(monkeypatch, tmp_path):
    """The Zen 4 networkx rebuild (2026-12-07, `--export-gguf adapter`) measured its torch speed at 0.565x the
    class's rate, and its publish stage took 11.6 min where the plan said 9.6: the gate's fp32 source runs in
    torch and slowed down with it, its GGUF runs in llama.cpp and did not. The estimate at the measured speed
    now scales the torch part only, and a calibrated run prints it."""
    from localcoder.distill import memory, plan

    monkeypatch.setattr(memory, "native_bf16", lambda: True)
    sizes = dict(teacher_params=1.78e9, student_params=0.63e9, gate_cases=60)
    one = load("adapt", None, {"data": ["/src"], "export_gguf": ["adapter"]})
    planned, slow = (estimate(one, rows=192, speed=s, **sizes).minutes for s in (1.0, 0.565))
    assert slow["publish"] == pytest.approx(11.58, rel=0.1) and planned["publish"] < 10
    assert slow["publish"] - planned["publish"] == pytest.approx(
        60 * plan.GATE_SOURCE_S_PER_CASE * (1 / 0.565 - 1) / 60, abs=0.1)  # the source's cases only
    assert slow["export"] > planned["export"]  # the merge runs in torch too
    three = load("adapt", None, {"data": ["/src"]})  # adapter, q8_0, q4_k_m: two more llama.cpp artifacts
    slow3 = estimate(three, rows=192, speed=0.565, **sizes).minutes
    planned3 = estimate(three, rows=192, **sizes).minutes
    assert slow3["publish"] - slow["publish"] == pytest.approx(planned3["publish"] - planned["publish"], abs=0.1)

    stages = Stages(tmp_path, estimate(one, rows=192, **sizes))
    stages.sizes = sizes
    stages.calibrate(one, 8, 8 * 11.5)  # the rebuild's measured 11.5 s a row
    assert stages.est.minutes["publish"] == pytest.approx(11.58, rel=0.1)


def test_a_run_that_cannot_fit_on_disk_is_refused_before_it_writes(tmp_path):
    est = Estimate({"train": 1.0}, disk_gb=10**6, peak_memory_gb=1.0, rows=1)
    with pytest.raises(InvalidRequest, match="not enough disk") as err:
        check_disk(est, tmp_path / "not" / "yet", tmp_path)
    assert err.value.param == "out"
    assert not (tmp_path / "not").exists()
    check_disk(Estimate({}, disk_gb=0.001, peak_memory_gb=1.0, rows=1), tmp_path / "out", tmp_path)


def test_too_little_code_for_the_preset_says_how_much_is_needed():
    cfg = load("adapt", None, {"data": ["/src"]})
    with pytest.raises(InvalidRequest, match=r"at least 16 rows of 1024 tokens \(~16,384 tokens") as err:
        check_rows(3, cfg, "3 files kept")
    assert err.value.param == "data"
    check_rows(cfg.min_train_rows, cfg, "enough")


def test_stages_record_actual_minutes_beside_the_estimate_and_survive_a_resume(tmp_path):
    est = Estimate({"teacher": 2.0, "train": 3.0}, disk_gb=1.0, peak_memory_gb=1.0, rows=10)
    s = Stages(tmp_path, est)
    with s.stage("teacher"):
        pass
    again = Stages(tmp_path)  # a resumed run reads the record back
    assert again.est.minutes == est.minutes and "teacher" in again.actual
    table = again.compare()
    assert "| teacher | 2.0 | 0.0 |" in table and "| train | 3.0 |  |" in table and "**total** | 5.0" in table
    again.revise("teacher", 0.25, "3 of 4 rows already cached")
    assert Stages(tmp_path).est.minutes == {"teacher": 0.5, "train": 3.0}
    assert "**total** | 3.5" in again.compare() and "2.0 -> 0.5" in again.est.notes[-1]


def test_registered_models_declare_the_order_they_were_trained_for(tmp_path, monkeypatch, tiny_qwen_dir):
    from localcoder import models

    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    student = tmp_path / "student"
    student.mkdir()
    for f in tiny_qwen_dir.iterdir():
        (student / f.name).symlink_to(f)
    (student / "localcoder.json").write_text(json.dumps({"fim": {"order": "spm"}, "teacher": "t"}))
    assert models.hf_declared_orders(student) == ("spm",)
    assert models.hf_declared_orders(tiny_qwen_dir) == ()
    models.register("mine", student, orders=["spm"])
    assert models.resolve("mine").meta["orders"] == ["spm"]
    reg = json.loads(models.registry_file().read_text())
    reg["old"] = {"path": str(student), "kind": "hf", "fim_order": "spm"}  # an entry from before "orders"
    models.registry_file().write_text(json.dumps(reg))
    assert models.resolve("old").meta["orders"] == ["spm"]


def test_models_pull_of_a_registered_name_checks_it_is_there(tmp_path, monkeypatch, capsys, tiny_qwen_dir):
    from localcoder import models
    from localcoder.cli import main

    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    models.register("mine", tiny_qwen_dir)
    assert main(["models", "pull", "mine"]) == 0  # `make serve MODEL=mine` pulls first
    assert str(tiny_qwen_dir) in capsys.readouterr().out
    assert main(["models", "pull", "nothing-by-this-name"]) == 2


# ---- the draft preset's parts: a student pruned from another model; one teacher pass shared by runs --------------
from tests.unit.distill_helpers import cfg_of, corpus, flags, home  # noqa: E402,F401 (fixtures)


def test_the_draft_preset_prunes_the_small_model_to_learn_the_big_ones_distribution():
    cfg = load("draft", None, {"data": ["/src"]})
    assert (cfg.teacher, cfg.prune_from, cfg.student, cfg.student_layers) == (
        "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b", "", 6)
    assert (cfg.fim_order, cfg.teacher_order, cfg.loss, cfg.lora_rank) == ("psm", "psm", "fkl", 0)
    adapt = load("adapt", None, {"data": ["/src"]})  # the same rows as the adapt preset: one teacher pass for both
    assert all(getattr(cfg, k) == getattr(adapt, k) for k in ("teacher", "teacher_order", "seq_len", "fim_rate",
                                                              "span_kinds", "seed", "train_rows"))
    with pytest.raises(InvalidRequest, match="prune-from"):
        load("", None, {"prune_from": "a", "student": "b"})


def test_prune_from_cuts_that_model_not_the_teacher(tiny_qwen_dir, corpus, tmp_path):
    import shutil

    import transformers
    from safetensors.torch import load_file

    from localcoder.distill.train import train

    other = tmp_path / "other"
    shutil.copytree(tiny_qwen_dir, other)
    torch.manual_seed(7)  # same architecture and tokenizer, other weights
    transformers.Qwen2ForCausalLM(transformers.AutoConfig.from_pretrained(str(other))).save_pretrained(
        str(other), safe_serialization=True)
    out = tmp_path / "run"
    res = train(cfg_of(flags(tiny_qwen_dir, corpus, out, tmp_path / "cache", steps=1,
                             **{"prune-from": other, "student-layers": 2})), progress=False)
    kept = res.provenance["student_init"]["layers_kept"]
    init, source = load_file(str(out / "init" / "model.safetensors")), load_file(str(other / "model.safetensors"))
    name = "model.layers.{}.mlp.down_proj.weight"
    assert len(kept) == 2
    for new, old in enumerate(kept):
        assert torch.equal(init[name.format(new)], source[name.format(old)])


def test_runs_whose_students_read_other_orders_share_one_teacher_pass(tiny_qwen_dir, corpus, tmp_path, capsys):
    from localcoder.distill.train import train

    common = dict(steps=2, **{"fim-rate": 1.0, "teacher-order": "psm"})
    train(cfg_of(flags(tiny_qwen_dir, corpus, tmp_path / "a", tmp_path / "cache", **common)), progress=False)
    capsys.readouterr()
    train(cfg_of(flags(tiny_qwen_dir, corpus, tmp_path / "b", tmp_path / "cache", **{**common, "fim-order": "spm"})),
          progress=False)
    err = capsys.readouterr().err
    assert "teacher top-8: 0 rows computed" in err  # the spm student reuses the psm student's teacher targets
    # and the estimate it printed before starting is revised once the run sees the cache: no teacher minutes left
    assert "estimate revised: teacher" in err and "rows already cached" in err
    stages = json.loads((tmp_path / "b" / "stages.json").read_text())
    assert stages["estimate"]["minutes"]["teacher"] == 0.0
    assert any(n.startswith("teacher:") and "already cached" in n for n in stages["estimate"]["notes"])


def test_a_run_whose_validation_rows_are_cached_measures_its_rate_on_the_first_train_rows(
        tiny_qwen_dir, corpus, tmp_path, capsys, monkeypatch):
    """The draft preset after adapt on one repository: the earlier run cached the validation rows and some train
    rows, so the rate the plan refits to comes from the first missing train rows (it used to measure nothing)."""
    from localcoder.distill.plan import Stages
    from localcoder.distill.train import train

    common = {"fim-rate": 1.0, "teacher-order": "psm"}
    train(cfg_of(flags(tiny_qwen_dir, corpus, tmp_path / "a", tmp_path / "cache", steps=1, **common)), progress=False)
    seen = []
    monkeypatch.setattr(Stages, "calibrate", lambda self, cfg, rows, seconds: seen.append((rows, seconds)) or False)
    capsys.readouterr()
    train(cfg_of(flags(tiny_qwen_dir, corpus, tmp_path / "b", tmp_path / "cache", steps=4, **common)), progress=False)
    assert len(seen) == 1 and seen[0][0] == 2 and seen[0][1] > 0  # 2 = max(2, the 2 validation rows)
    # 8 rows read, 2 of them cached by run a: the 6 computed include the 2 that measured the rate
    assert "teacher top-8: 6 rows computed, 2 reused" in capsys.readouterr().err


def test_a_registered_base_plus_adapter_serves_with_it_and_off_drops_it(tmp_path, monkeypatch):
    from localcoder import models

    monkeypatch.setenv("LOCALCODER_HOME", str(tmp_path / "home"))
    base = tmp_path / "base.gguf"
    base.write_bytes(b"GGUF" + b"\0" * 64)
    lora = tmp_path / "adapter.gguf"
    lora.write_bytes(b"GGUF" + b"\0" * 64)
    models.register("mine", base, adapter=str(lora), orders=["spm"])  # what `--export-gguf adapter` registers
    m = models.resolve("mine")
    assert models.with_adapter(m, "auto").meta["adapter"] == str(lora)  # served with its adapter by default
    assert "adapter" not in models.with_adapter(m, "off").meta  # --adapter off: the base alone


def test_the_report_says_what_the_plan_changed_next_to_the_times(tmp_path, monkeypatch):
    """report.md's time table keeps the plan's notes (the measured speed, the refit schedule), so a reader
    sees why the estimate differs from the one a preset prints on a faster CPU."""
    import types

    from localcoder.distill import cli, publish

    Stages(tmp_path, Estimate({"teacher": 26.4, "train": 28.9}, 1.0, 1.0, 120,
                              ["measured: the teacher's first 8 rows took 12.4 s a row", "schedule: 60 of 96 steps"]))
    monkeypatch.setattr(publish, "publish", lambda *a, **k: [])
    assert cli.publish_ggufs(types.SimpleNamespace(threads=0), types.SimpleNamespace(out=tmp_path, model_dir=tmp_path),
                             progress=False) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| teacher | 26.4 |" in report and "- measured: the teacher's first 8 rows took 12.4 s a row" in report
    assert "- schedule: 60 of 96 steps" in report
