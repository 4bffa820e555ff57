import pytest

from localcoder.completion import Completer
from localcoder.engines.fake import FakeEngine
from localcoder.eval import heldout, humaneval_infill, metrics
from localcoder.eval.runner import evaluate, table
from localcoder.eval.sandbox import run_program


def test_humaneval_infilling_task_counts_match_the_benchmark():
    assert len(humaneval_infill.build_tasks("single")) == 1033
    assert len(humaneval_infill.build_tasks("multi")) == 5815


def test_sample_is_deterministic():
    a = [t.id for t in humaneval_infill.load_tasks("single", 120, seed=0)]
    assert a == [t.id for t in humaneval_infill.load_tasks("single", 120, seed=0)] and len(set(a)) == 120


def test_reference_middles_pass_their_tests_and_wrong_ones_fail():
    tasks = humaneval_infill.load_tasks("single", 12, seed=1)
    for t in tasks:
        assert run_program(humaneval_infill.program(t, t.reference.rstrip("\n"))).passed, t.id
    broken = [run_program(humaneval_infill.program(t, "    raise ValueError()")).passed for t in tasks]
    assert not all(broken)


def test_sandbox_limits():
    assert run_program("while True: pass", timeout_s=1).detail == "timeout"
    assert not run_program("import socket; socket.socket()").passed
    assert not run_program("import os; os.system('true')").passed


def test_metrics():
    assert metrics.exact_match("  return x  \n", "  return x") == 1.0
    assert metrics.exact_match("return x", "  return x") == 1.0
    assert metrics.exact_match("if a:\n  b", "if a:\n    b") == 0.0
    assert metrics.edit_similarity("abcd", "abcd") == 1.0
    assert metrics.edit_similarity("abcd", "abxd") == pytest.approx(0.75)
    assert metrics.edit_similarity("", "abc") == 0.0
    assert metrics.bleu("Return the sum of a and b.", "Return the sum of a and b.") == pytest.approx(1.0)
    assert 0 < metrics.bleu("Return the sum.", "Return the sum of a and b.") < 1
    diff, lo, hi = metrics.paired_bootstrap([1.0] * 50 + [0.0] * 50, [0.0] * 100)
    assert diff == 0.5 and lo > 0.3 and hi < 0.7


def test_heldout_cases_are_deterministic_and_consistent(tmp_path):
    for i in range(5):
        (tmp_path / f"m{i}.py").write_text("".join(f"value_{i}_{j} = compute({j})\n" for j in range(40)))
    (tmp_path / "blob.bin").write_bytes(b"\0" * 100)
    a = heldout.sample_cases([tmp_path], 20, seed=3, kinds=("line", "block"))
    b = heldout.sample_cases([tmp_path], 20, seed=3, kinds=("line", "block"))
    assert [c.id for c in a] == [c.id for c in b] and len(a) == 20
    for c in a:
        original = (tmp_path / c.path.split("/")[-1]).read_text()
        assert c.prefix + c.reference + c.suffix in original


def test_heldout_partial_cases_cut_inside_the_line(tmp_path):
    for i in range(3):
        (tmp_path / f"m{i}.py").write_text("".join(f"    value_{i}_{j} = compute({j})\n" for j in range(40)))
    cases = heldout.sample_cases([tmp_path], 30, seed=1, kinds=("partial",))
    assert len(cases) == 30 and all(c.mode == "single" for c in cases)
    for c in cases:
        original = (tmp_path / c.path.split("/")[-1]).read_text()
        assert c.prefix + c.reference + "\n" + c.suffix in original  # the rest of the line is the answer
        assert c.reference and "\n" not in c.reference
    assert len({len(c.reference) for c in cases}) > 5  # cut at many points, not only line starts


def test_baseline_setting_builds_a_second_completer_and_reports_the_paired_difference(capsys):
    from localcoder.eval.cli import against_baseline, baseline_completer
    from localcoder.errors import InvalidRequest
    from localcoder.config import Config
    import argparse

    cfg = Config()
    cfg.apply({"model": "fake"})
    base = baseline_completer(cfg, "token_healing=false,max_tokens=8,label=no healing")  # label: the chart's only
    assert base.token_healing is False and cfg.completion.token_healing is True  # cfg itself unchanged
    with pytest.raises(InvalidRequest):
        baseline_completer(cfg, "token_healing")
    tasks = humaneval_infill.load_tasks("single", 4, seed=0)
    good = evaluate(Completer(FakeEngine(completion="    return None\n")), tasks, progress=False, name="t", execute=False)
    args = argparse.Namespace(no_exec=True, quiet=True, baseline=["x=y"], max_tokens=None, cold=False)
    against_baseline(Completer(FakeEngine(completion="zzz\n")), "x=y", tasks, "t", args, good)
    err = capsys.readouterr().err
    assert "ES vs baseline x=y:" in err and "n=4" in err


def test_gap_share_is_the_share_of_the_floor_to_ceiling_gap_closed_with_its_interval():
    low, high = [0.2, 0.4] * 50, [0.6, 0.8] * 50  # a gap of 0.4 on every case
    share, lo, hi = metrics.gap_share([0.4, 0.6] * 50, low, high)  # +0.2 on every case: half of it
    assert share == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    share, lo, hi = metrics.gap_share([0.6, 0.4] * 50, low, high)  # +0.4, 0: half, with spread
    assert share == pytest.approx(0.5) and 0.3 < lo < 0.5 < hi < 0.7
    assert metrics.gap_share([0.5] * 4, [0.5] * 4, [0.4] * 4) is None  # the ceiling is below: no gap
    share, lo, hi = metrics.gap_share([0.1, 0.0] * 5, [0.0] * 10, [0.3, -0.25] * 5)  # a gap the cases can't tell from 0
    assert share > 0 and hi == float("inf")
    with pytest.raises(ValueError):
        metrics.gap_share([1.0], [0.0, 1.0], [1.0])


def test_two_baselines_report_the_gap_closed_and_a_costly_baseline_runs_on_the_first_cases(capsys, tmp_path):
    import argparse
    import json

    from localcoder.errors import InvalidRequest
    from localcoder.eval.cli import against_baseline, baseline_cases, baseline_label, gap_closed
    from localcoder.eval.runner import tradeoff, write_reports

    assert baseline_cases("model=big,cases=3") == 3 and baseline_cases("adapter=off") is None
    assert baseline_label("model=big,label=the 1.5B,cases=3", "psm") == "the 1.5B"
    assert baseline_label("model=big,cases=3", "psm") == "model=big,cases=3, psm"
    for bad in ("cases=0", "cases=x", "cases=-2"):
        with pytest.raises(InvalidRequest):
            baseline_cases(bad)
    tasks = humaneval_infill.load_tasks("single", 6, seed=0)
    args = argparse.Namespace(no_exec=True, quiet=True, max_tokens=None, cold=False)
    refs = {t.id: t.reference for t in tasks}
    half = {t.id: t.reference[: len(t.reference) // 2] for t in tasks}

    def completer_for(table):  # completes each task with what ``table`` holds for it
        c = Completer(FakeEngine())
        c.complete = lambda req: Completer(FakeEngine(completion=table[next(
            t.id for t in tasks if t.prefix == req.prefix)])).complete(req)
        return c

    ours = evaluate(completer_for(half), tasks, progress=False, name="t", execute=False)
    paired: list[dict] = []
    floor = against_baseline(completer_for({t.id: "" for t in tasks}), "stock", tasks, "t", args, ours, paired)
    top = against_baseline(completer_for(refs), "big", tasks[:3], "t", args, ours, paired)
    assert len(top.rows) == 3 and [p["n"] for p in paired] == [6, 6, 3, 3]
    gaps = gap_closed("t", ours, ["stock", "big"], [floor, top])
    err = capsys.readouterr().err
    assert "of the ES gap from stock to big" in err and "n=3" in err
    expect = sum(r.es for r in ours.rows[:3]) / 3  # the floor scores 0 and the ceiling 1 on every case
    assert gaps[0]["n"] == 3 and gaps[0]["gap_share"] == pytest.approx(expect, abs=1e-4)
    text = tradeoff([ours, floor, top], ["ours", "stock", "big"], tmp_path / "t.png")
    assert "on the 3 cases every model ran" in text and (tmp_path / "t.png").stat().st_size > 1000
    cells = {line.split("|")[1].strip(): line.split("|")[3] for line in text.splitlines() if line.startswith("| ")}
    assert cells["big"].startswith(" 1.000") and cells["stock"].startswith(" 0.000")
    assert cells["ours"].startswith(f" {expect:.3f}")
    write_reports([ours, floor, top], tmp_path / "r.json", [*paired, *gaps])
    body = json.loads((tmp_path / "r.json").read_text())
    assert body["paired"][-1]["ceiling"] == "big" and body["t"]["summary"]["n"] == 6


def test_runner_scores_a_fake_engine():
    tasks = humaneval_infill.load_tasks("single", 5, seed=0)
    report = evaluate(Completer(FakeEngine(completion="    return None\n")), tasks, progress=False, name="t")
    s = report.summary
    assert s["n"] == 5 and 0 <= s["es"] <= 1 and s["pass_at_1"] is not None
    assert "| t | 5 |" in table([report])


def test_docstring_cases_remove_the_docstring_and_score_with_bleu(tmp_path):
    from localcoder.eval import docstrings

    (tmp_path / "geo.py").write_text(
        'def area(w, h):\n    """Return the area of a w by h rectangle."""\n    return w * h\n\n\n'
        'def nodoc(x):\n    return x\n')
    cases = docstrings.sample_cases([tmp_path], 5)
    assert len(cases) == 1
    c = cases[0]
    assert c.reference == "Return the area of a w by h rectangle." and c.metric == "bleu"
    assert c.prefix.endswith('def area(w, h):\n    """') and c.suffix.startswith('"""\n    return w * h')
    report = evaluate(Completer(FakeEngine(completion='Return the area of a w by h rectangle."""')), cases,
                      progress=False, name="docstrings")
    assert report.rows[0].es == 1.0 and report.rows[0].text == "Return the area of a w by h rectangle."
