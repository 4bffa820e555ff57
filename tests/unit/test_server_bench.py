"""`localcoder bench --quick` end to end against `localcoder serve` with the fake engine, and the
bench's pure pieces (workload construction, summaries, bound)."""

from __future__ import annotations

import json
import subprocess
import sys

from localcoder.bench import BenchConfig, Sample, WorkloadResult, cold_cases, read_bandwidth_gbs, typing_cases
from localcoder.engines.fake import ByteTokenizer


def test_quick_bench_writes_json_markdown_and_png(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "localcoder.cli", "bench", "--model", "fake", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "bench.json").read_text())
    assert set(report["results"]) == {"cold@64", "cold@128", "typing"}
    typing = report["results"]["typing"]["localcoder"]
    assert typing["n"] >= 5 and typing["p50_ms"] >= BenchConfig(model="fake").debounce_ms > 0  # includes the debounce
    assert 0 < typing["cache_hit_ratio"] < 1
    assert report["bound"]["read_bandwidth_gbs"] > 0
    assert "| typing | localcoder |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench" in proc.stderr  # the progress bar


def test_typing_cases_pause_at_word_ends_and_keep_the_window_anchored():
    text = "".join(f"line {i} = value_{i}\n" for i in range(40))
    cases = typing_cases(text, 30, before=5, after=3)
    assert len(cases) >= 5
    first_top = cases[0].prefix.split("\n", 1)[0]
    assert all(c.prefix.startswith(first_top) for c in cases)  # a stable prompt start: cacheable
    assert all(cases[i].prefix.startswith(cases[i - 1].prefix) for i in range(1, len(cases)))
    assert len({c.suffix for c in cases}) == 1 and cases[0].suffix.count("\n") == 3


def test_cold_cases_have_the_requested_size_and_differ():
    tok = ByteTokenizer()
    cases = cold_cases(tok, 300, 2, 32, offset=0)
    assert len(cases) == 2 and cases[0].prefix[:50] != cases[1].prefix[:50]
    for c in cases:
        assert abs(len(tok.tokenize(c.prefix)) + len(tok.tokenize(c.suffix)) + 3 - 300) <= 8


def test_summary_percentiles_and_cache_ratio():
    r = WorkloadResult("t", "typing", [Sample(100, 100, 90, 4, "a", 40), Sample(300, 100, 50, 4, "b", 40)])
    s = r.summary(debounce_ms=150)
    assert s["p50_ms"] == 350 and s["cache_hit_ratio"] == 0.7 and s["decode_tok_per_s"] == 100
    assert s["evaluated_tokens_mean"] == 30


def test_the_jump_is_compared_with_every_warm_keystroke_and_with_those_the_model_answered():
    """A typed-through keystroke makes no model call; the after-jump ratio is given against the mid-file median
    of every keystroke and of those the model answered (the jump's own keystroke is always one of them)."""
    from localcoder.bench import markdown, report

    def s(ms, typed=False):
        return Sample(ms, 0, 0, 0, "x", typed_through=typed)

    mid = WorkloadResult("localcoder lsp", "vim:mid-file", [s(10, True), s(12, True), s(14, True), s(100), s(140)])
    jump = WorkloadResult("localcoder lsp", "vim:after-jump", [s(250), s(290)])
    rep = report(BenchConfig(model="fake", debounce_ms=150), [jump, mid], {})
    m = rep["results"]["vim:mid-file"]["localcoder lsp"]
    assert m["p50_ms"] == 164 and m["typed_through"] == 3 and m["p50_model_ms"] == 270  # (250 + 290) / 2
    assert rep["after_jump_over_mid_file_p50"] == {"localcoder lsp": round(420 / 164, 3)}
    assert rep["after_jump_over_model_keystroke_p50"] == {"localcoder lsp": round(420 / 270, 3)}
    md = markdown(rep)
    assert "| vim:mid-file | localcoder lsp | – | 3 | 164 |" in md and "not typed through): localcoder lsp 1.56×" in md
    everything = WorkloadResult("t", "vim:mid-file", [s(10, True)]).summary(150)
    assert everything["p50_model_ms"] != everything["p50_model_ms"]  # nan: no keystroke reached the model


def test_read_bandwidth_is_measured():
    assert 0.1 < read_bandwidth_gbs(1, mib=64, rounds=2) < 1000
