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
    base = baseline_completer(cfg, "token_healing=false,max_tokens=8")
    assert base.token_healing is False and cfg.completion.token_healing is True  # cfg itself unchanged
    with pytest.raises(InvalidRequest):
        baseline_completer(cfg, "token_healing")
    tasks = humaneval_infill.load_tasks("single", 4, seed=0)
    good = evaluate(Completer(FakeEngine(completion="    return None\n")), tasks, progress=False, name="t", execute=False)
    args = argparse.Namespace(no_exec=True, quiet=True, baseline=["x=y"], max_tokens=None, cold=False)
    against_baseline(Completer(FakeEngine(completion="zzz\n")), "x=y", tasks, "t", args, good)
    err = capsys.readouterr().err
    assert "ES vs baseline x=y:" in err and "n=4" in err


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
