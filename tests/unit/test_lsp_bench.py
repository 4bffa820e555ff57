"""The LSP typing replay: which keystrokes ask for a completion and which wait for it, and at a typist's
pace, what a server debounce filters (a real ``localcoder lsp`` over stdio, fake engine)."""

from __future__ import annotations

import asyncio
import sys

from localcoder.bench import keystrokes, pauses
from localcoder.lsp.bench import asks_at, run, summarize

TYPED = "def f(x):\n    return x + 1\n"


def test_a_newline_and_its_indentation_are_one_keystroke():
    keys = keystrokes(TYPED)
    assert keys[:9] == list(range(1, 10))
    assert keys[9] == len("def f(x):\n    ")  # the newline and four spaces: one edit
    assert keys[-1] == len(TYPED) and len(keys) == len(TYPED) - 4


def test_without_a_pace_only_pauses_ask_and_with_one_every_keystroke_asks_but_only_pauses_wait():
    at_pauses = asks_at(TYPED, 0)
    assert [i for i, ask, _ in at_pauses if ask] == pauses(TYPED)
    assert all(wait == ask for _, ask, wait in at_pauses)
    paced = asks_at(TYPED, 120)
    assert all(ask for _, ask, _ in paced)
    assert [i for i, _, wait in paced if wait] == pauses(TYPED)


def test_at_a_typists_pace_the_server_debounce_keeps_inside_word_requests_from_the_engine(monkeypatch, tmp_path):
    monkeypatch.setenv("LOCALCODER_FAKE_COMPLETION", "y = 2")
    monkeypatch.setenv("LOCALCODER_FAKE_DELAY_MS", "15")  # a decode step
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    cmd = [sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake", "--model", "fake"]
    source = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1, 200))
    runs = [asyncio.run(run(cmd, source, 40, {"maxTokens": 8, "debounceMs": d}, iki_ms=40)) for d in (0, 300)]
    eager, patient = runs
    for r in runs:
        assert r["requests"] == len(pauses(r["typed"])) and r["non_empty"] == r["requests"]
        assert r["requests_unseen"] == r["keystrokes"] - r["requests"] > 0
        assert r["replay_stats"]["requests"] == r["keystrokes"]
    # no debounce: the keystrokes inside words reach the engine too, and are superseded by the next one
    assert eager["replay_stats"]["generations"] > eager["requests"]
    assert eager["replay_stats"]["superseded"] >= eager["requests_unseen"]
    # a debounce longer than the pace: only the pauses' requests reach it, each waiting out the debounce
    assert patient["replay_stats"]["generations"] == patient["requests"]
    assert min(patient["latencies_ms"]) >= 300
    rows = summarize(runs)
    assert [r["debounce_ms"] for r in rows] == [0, 300]
    assert rows[0]["generations_per_key"] > rows[1]["generations_per_key"]
