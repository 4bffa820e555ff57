"""The editor replay builds llama.vim's bodies: prefix lines above, the cursor line split at the
cursor, the lines below; one request per pause; two files alternate."""

from __future__ import annotations

from localcoder.bench_editor import N_SUFFIX_LINES, alternate, typing_requests, vim_template

TEXT = "".join(f"line_{i} = {i}\n" for i in range(400))


def test_mid_file_bodies_split_the_file_at_the_cursor_like_llama_vim():
    reqs = typing_requests(TEXT, "a.py", 30, False, [{"filename": "b.py", "text": "x\n"}], 16)
    start = TEXT.index("line_200 =")
    typed = TEXT[start:start + 30]
    assert len(reqs) == len({i for i in range(1, 31) if typed[i - 1] in " \n=.,:;()[]{}\t"} | {30})
    for req in reqs:
        b = req.body
        assert "\n" not in b["prompt"] and b["input_prefix"].endswith("\n")
        # above the cursor: the file so far plus what was typed; below it: the rest of the file
        assert (TEXT[:start] + typed).find(b["input_prefix"] + b["prompt"]) >= 0
        assert ("\n" + TEXT[start + 30:]).startswith(b["input_suffix"])
        assert b["input_suffix"].count("\n") in (N_SUFFIX_LINES, N_SUFFIX_LINES + 1)
        assert b["n_predict"] == 16 and b["input_extra"][0]["filename"] == "b.py"
        assert set(vim_template("llama_vim_infill")) <= set(b)  # every field llama.vim sends
    assert reqs[-1].body["input_prefix"].endswith("line_201 = 201\n")  # typed two whole lines
    assert reqs[0].body["prompt"] == "line_200 " and reqs[0].body["input_suffix"].startswith("\nline_202")


def test_a_new_lines_indentation_arrives_with_its_newline_as_an_editor_indents_it():
    text = "".join(f"def f{i}(x):\n    if x:\n        return {i}\n" for i in range(200))
    reqs = typing_requests(text, "a.py", 60, False, [], 8)
    prompts = [r.body["prompt"] for r in reqs]
    # the cursor never waits inside a line's leading whitespace: one request once it is all there
    assert {p for p in prompts if not p.strip()} == {"", "    ", "        "}  # "": a line with no indentation
    assert prompts.index("        ") == prompts.index("    if x:") + 1  # the newline and 8 spaces: one edit
    # a word still pauses where it ends
    assert "        return " in prompts


def test_end_of_file_has_no_suffix_and_two_files_alternate():
    end = typing_requests(TEXT, "a.py", 20, True, [], 8)
    assert all(r.body["input_suffix"] == "" for r in end)
    both = alternate(typing_requests(TEXT, "a.py", 20, False, [], 8), typing_requests(TEXT, "b.py", 20, False, [], 8))
    assert [r.file for r in both[:4]] == ["a.py", "b.py", "a.py", "b.py"]


def test_the_lsp_target_types_through_a_real_language_server(monkeypatch, tmp_path):
    """`localcoder lsp` over stdio (fake engine): the first body opens the buffer, the next ones change
    it; each keystroke's inline completion comes back; llama.vim's warm-ups are not sent."""
    import sys

    from localcoder.bench_editor import LspTarget, warmup_body

    monkeypatch.setenv("LOCALCODER_FAKE_COMPLETION", "return 1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    reqs = typing_requests(TEXT, "a.py", 12, False, [], 8)
    lsp = LspTarget("lsp", [sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake", "--model", "fake"],
                    timeout_s=60)
    try:
        samples = [lsp.send(r.body, r.file) for r in reqs]
        assert lsp.send(warmup_body([]), "b.py").latency_ms == 0.0
        assert all(s.text == "return 1" and s.latency_ms > 0 for s in samples)
        assert lsp._versions == {"file:///bench/a.py": len(reqs)}  # opened once, then changed
        stats = lsp.call("localcoder/stats", {})
        assert stats["documents"] == 1
    finally:
        lsp.close()
    assert lsp.proc.poll() is not None


def test_the_lsp_target_flags_a_keystroke_the_server_typed_through(monkeypatch, tmp_path):
    """Typing the first letters of the suggestion shown: the language server answers from it without the model
    and the sample says so; a keystroke that leaves the suggestion goes to the model and is not flagged."""
    import sys

    from localcoder.bench_editor import LspTarget, vim_body

    monkeypatch.setenv("LOCALCODER_FAKE_COMPLETION", "return 1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    lines = ["def f():\n", "    \n", "\n", "x = f()\n"]
    bodies = [vim_body([*lines[:1], "    " + typed + "\n", *lines[2:]], 1, 4 + len(typed), [], 8)
              for typed in ("", "re", "ret", "z")]
    lsp = LspTarget("lsp", [sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake", "--model", "fake"],
                    timeout_s=60)
    try:
        samples = [lsp.send(b, "a.py") for b in bodies]
    finally:
        lsp.close()
    assert [s.text for s in samples[:3]] == ["return 1", "turn 1", "urn 1"]
    assert [s.typed_through for s in samples] == [False, True, True, False]


def test_a_jump_count_beyond_the_landing_places_is_refused():
    import pytest

    from localcoder.bench_editor import JUMP_FRACTIONS, jump_requests
    from localcoder.errors import InvalidRequest

    assert len(jump_requests(TEXT, "a.py", len(JUMP_FRACTIONS), [], 8)) == len(JUMP_FRACTIONS)
    with pytest.raises(InvalidRequest, match="editor_jumps must be 0..12"):
        jump_requests(TEXT, "a.py", len(JUMP_FRACTIONS) + 1, [], 8)


def test_jumps_land_far_apart_warm_up_there_then_type_one_character():
    from localcoder.bench_editor import jump_requests

    jumps = jump_requests(TEXT, "a.py", 12, [], 8)
    rows = [j.body["input_prefix"].count("\n") for j in jumps]
    assert len(jumps) == 12 and min(abs(a - b) for a, b in zip(rows, rows[1:])) > 50
    for j in jumps:
        assert j.warm["n_predict"] == 0 and j.body["n_predict"] == 8
        assert j.warm["input_prefix"] == j.body["input_prefix"]  # the same place
        assert j.warm["prompt"] == "" and len(j.body["prompt"]) == 1  # ... then one character typed
        assert j.body["input_suffix"].startswith("\nline_")  # typed on a fresh line above the rest


def test_lsp_and_http_targets_warm_up_at_a_jump(monkeypatch, tmp_path):
    """The jump replay with real servers (fake engine): localcoder serve gets the n_predict 0 warm-up,
    the LSP the prefetch notification; both then answer the keystroke."""
    import sys

    from localcoder.bench import serving
    from localcoder.bench_editor import InfillTarget, LspTarget, jump_requests, run_replay
    from conftest import free_port

    monkeypatch.setenv("LOCALCODER_FAKE_COMPLETION", "return 1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    port = free_port()
    cmd = [sys.executable, "-m", "localcoder.cli", "serve", "--engine", "fake", "--model", "fake", "--port", str(port)]
    with serving(cmd, f"http://127.0.0.1:{port}", "/health") as url:
        lsp = LspTarget("lsp", [sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake", "--model", "fake"],
                        timeout_s=60)
        try:
            http = InfillTarget("localcoder", url)
            results = run_replay([http, lsp], {"vim:after-jump": jump_requests(TEXT, "a.py", 2, [], 8)}, lambda: None,
                                 pause_s=0.2)
            stats = lsp.call("localcoder/stats", {})
            health = http.client.get("/metrics").text
        finally:
            lsp.close()
    assert [len(r.samples) for r in results] == [2, 2]
    assert all(s.text == "return 1" for r in results for s in r.samples)
    assert stats["prefills"] + stats["prefills_cancelled"] == 2  # one prefetch per jump
    import re

    warmed = sum(float(v) for v in re.findall(r"^localcoder_background_prefills(?:_cancelled)?_total(?:\{[^}]*\})? (\S+)$",
                                              health, re.M))
    assert warmed == 2, health  # and one n_predict 0 warm-up per jump on the HTTP server


def test_the_llama_vim_client_cache_answers_a_keystroke_that_types_into_its_suggestion():
    from localcoder.bench_editor import VimCache

    cache = VimCache()
    body = {"input_prefix": "def f(x):\n", "prompt": "    return ", "input_suffix": "\n"}
    cache.add(body, "x * 2")
    typed = dict(body, prompt="    return x ")
    assert cache.hit(typed)  # "x " starts the cached suggestion
    assert not cache.hit(dict(body, prompt="    return y"))  # departs from it
    assert not cache.hit(dict(body, prompt="    return x * 2"))  # nothing left to show
    assert not cache.hit(dict(typed, input_suffix="\nmore\n"))  # another context below
    assert not cache.hit(dict(typed, input_prefix="# edit\ndef f(x):\n"))  # another context above
