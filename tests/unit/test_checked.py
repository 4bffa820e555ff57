"""Execution-checked completions with a fake engine scripted to return candidates: ranking (CodeT),
tests from docstrings and from the model, discarded tests, hostile candidates, the request surfaces
(CLI exit codes, HTTP option, errors) and cancellation."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from localcoder.checked import (CheckOptions, Candidate, Test, check, checked_request, doctests, example_lines,
                                function_at_cursor, parameters_of, parse_generated, rank, run_candidate,
                                written_tests)
from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.engines.base import CancelToken
from localcoder.engines.fake import FakeEngine
from localcoder.errors import InvalidRequest

SOURCE = '''import math


def add(a, b):
    """Add two numbers.

    >>> add(2, 3)
    5

    add(1, 1) == 2
    """
'''


class ScriptedEngine(FakeEngine):
    """Candidate ``seed % len(candidates)`` for a completion prompt; for the test-writing prompt
    ``tests`` (or, given a list, its ``seed % len(tests)``-th sample)."""

    def __init__(self, candidates: list[str], tests: str | list[str] = "", delay_s: float = 0.0):
        super().__init__(completion="", token_delay_s=delay_s)
        self.candidates, self.tests = candidates, tests
        self.seeds: list[int] = []
        self.temperatures: list[float] = []

    def generate(self, request):
        prompt = self.tokenizer.decode(request.tokens)
        if "# check the correctness of" in prompt:
            self.completion = (self.tests if isinstance(self.tests, str)
                               else self.tests[request.sampling.seed % len(self.tests)])
        else:
            self.seeds.append(request.sampling.seed)
            self.temperatures.append(request.sampling.temperature)
            self.completion = self.candidates[request.sampling.seed % len(self.candidates)]
        return super().generate(request)


GOOD = "    return a + b\n"
WRONG = "    return a - b\n"
TESTS = ["1, 2) == 3\nassert add(0, 0) == 0\nassert add(2, 2) == 5\n", "1,\nassert add(-1, 1) == 0\n\n"]  # two samples


def run(candidates, tests=TESTS, n=None, **kw):
    engine = ScriptedEngine(candidates, tests)
    completer = Completer(engine)
    opts = CheckOptions(candidates=n or len(candidates), tests=8, test_seconds=1.0, define_seconds=1.0,
                        tests_budget_seconds=3.0, **kw)
    return check(completer, InfillRequest(SOURCE, "", path="m.py"), opts), engine


def test_the_candidate_the_tests_agree_on_ranks_first_with_its_evidence():
    out, engine = run([WRONG, GOOD, GOOD, "    return a * b\n"])
    # distinct seeds, one per candidate (sequential fallback), then the greedy body (temperature 0)
    assert engine.seeds == [0, 1, 2, 3, 0] and engine.temperatures[-1] == 0 and set(engine.temperatures[:-1]) == {0.8}
    top = out.candidates[0]
    assert top.text == GOOD.rstrip("\n") and top.samples == 2 and not top.greedy
    wrong_greedy = next(c for c in out.candidates if c.text == WRONG.rstrip("\n"))
    assert wrong_greedy.greedy and wrong_greedy.samples == 1  # the greedy body (seed 0: WRONG) is the sample's text
    # and weighs as a second sample: its group (passing add(0, 0) == 0 only) is it, its sample and a * b's sample
    assert wrong_greedy.passed == ("gen2",) and wrong_greedy.score == (1 + 1 + 1) * 1
    assert len(out.samples) == 4  # pass@k counts samples only: the greedy body is not one
    ev = out.evidence
    assert ev["ranked"] and not ev["batched_decode"]
    kinds = {t["kind"] for t in ev["tests"]}
    assert kinds == {"doctest", "example", "generated"}
    # doctest + example + add(1,2)==3, add(0,0)==0, add(-1,1)==0; add(2,2)==5 fails everywhere -> dropped
    assert len(ev["tests"]) == 5
    assert ev["discarded"]["failing_everywhere"] == 1 and ev["discarded"]["unparsable"] == 1
    assert ev["discarded"]["failing_everywhere_tests"] == ["assert add(2, 2) == 5"]
    first = ev["candidates"][0]
    assert first["score"] == 2 * 5 and len(first["passed"]) == 5
    wrong = next(c for c in ev["candidates"] if c["text"] == WRONG.rstrip("\n"))
    assert wrong["failed"] and wrong["score"] < first["score"]
    json.dumps(ev)  # the evidence is plain JSON


def test_grouped_sampling_without_a_batched_engine_equals_one_call_per_group():
    """Engines without ``sample_groups`` (fake, torch, onnx, remote): the groups are sampled request
    by request, each with its own sampling, stop and max_tokens, exactly as if sampled alone."""
    from localcoder.checked import sample_groups
    from localcoder.engines.base import Sampling
    from localcoder.engines.base import SampleGroup

    engine = ScriptedEngine([GOOD, WRONG, "    return a * b\n"], TESTS)
    tok = engine.tokenizer
    cands = SampleGroup(tok.tokenize(SOURCE), 3, Sampling(0.8, 40, 0.95, 4), 64,
                        lambda i, toks: tok.decode(toks).endswith("\n"))
    tests = SampleGroup(tok.tokenize(SOURCE + "# check the correctness of add\nassert add("), 2,
                        Sampling(0.2, 40, 0.9, 1000), 6, lambda i, toks: len(toks) >= 4 + 3 * i)
    done: list[tuple[int, int]] = []
    outs, _, batched = sample_groups(engine, [cands, tests], CancelToken(), lambda k, n: done.append((k, n)))
    alone = [sample_groups(engine, [g], CancelToken())[0][0] for g in (cands, tests)]
    assert not batched and outs == alone
    # seeds 4, 5, 6 pick scripted candidates 1, 2, 0; the tests' seeds 1000, 1001 pick TESTS[0], TESTS[1]
    assert [tok.decode(t) for t in outs[0]] == [WRONG, "    return a * b\n", GOOD]
    assert [tok.decode(t) for t in outs[1]] == ["1, 2", "1,\nass"]  # its own stop, then its max_tokens
    assert done == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]


def test_a_straggler_is_cut_once_half_the_candidates_finished_and_runaway_assert_lines_stop():
    long_body = "".join(f"    x{i} = a + {i}\n" for i in range(10)) + "    return a + b\n"
    out, _ = run([GOOD, WRONG, long_body, GOOD])
    assert out.evidence["stragglers_cut"] == [2]  # seeds 0, 1 finished at ~17 tokens; seed 2 ran past 2x that
    cut = next(c for c in out.evidence["candidates"] if c["text"].startswith("    x0"))
    assert len(cut["text"]) < len(long_body) / 2
    assert out.candidates[0].text == GOOD.rstrip("\n")
    whole, _ = run([GOOD, WRONG, long_body, GOOD], straggler=0.0)  # off: every candidate runs to its end
    assert whole.evidence["stragglers_cut"] == []
    assert any(c["text"] == long_body.rstrip("\n") for c in whole.evidence["candidates"])
    with pytest.raises(InvalidRequest) as e:
        CheckOptions(straggler=0.5).validate()
    assert e.value.param == "check_straggler"
    # a test-writing sequence whose line runs away stops there; the partial line is not a test
    runaway = ["1, 2) == 3\nassert add(" + "1 + " * 100, "0, 0) == 0\n"]
    out, _ = run([GOOD], tests=runaway)
    gen = [t["code"] for t in out.evidence["tests"] if t["kind"] == "generated"]
    assert gen == ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]


def test_codet_score_is_group_size_times_tests_passed():
    tests = [Test("a", "generated", "assert 1"), Test("b", "generated", "assert 1"), Test("c", "generated", "assert 1")]
    p = "passed"
    x = Candidate("x", 1, 0, p, {"a": p, "b": p, "c": p})  # passes all, alone
    y = Candidate("y", 2, 1, p, {"a": p, "b": "failed", "c": "failed"})  # passes a, with z
    z = Candidate("z", 2, 2, p, {"a": p, "b": "failed", "c": "failed"})
    ordered, kept, dropped = rank([x, y, z], tests)
    assert [c.score for c in ordered] == [4, 4, 3] and dropped == 0
    assert [c.text for c in ordered] == ["y", "z", "x"]  # ties: more samples, then sample order
    x.greedy = True  # the greedy body goes first among equals, before a group with more samples
    x.results["b"] = x.results["c"] = "failed"
    ordered, _, _ = rank([y, z, x], tests)
    assert [c.text for c in ordered] == ["x", "y", "z"] and {c.score for c in ordered} == {(1 + 1 + 2 + 2) * 1}


def test_where_the_tests_tell_nothing_the_greedy_body_is_the_answer():
    # seed 0 (the greedy body's) gives a * b; three samples agree on a - b; both fail the docstring's examples
    # and the generated tests do not run (add(0) misses an argument): every score is 0, and greedy's body wins
    mul = "    return a * b\n"
    out, _ = run([mul, WRONG, WRONG, WRONG], tests=8 * ["0) == 0\n"], n=4)
    assert {c.score for c in out.candidates} == {0}
    assert out.candidates[0].text == mul.rstrip("\n") and out.candidates[0].greedy
    assert out.evidence["candidates"][0]["greedy"] is True and "greedy body first" in out.evidence["note"]
    off, _ = run([mul, WRONG, WRONG, WRONG], tests=8 * ["0) == 0\n"], n=4, greedy=False)
    assert off.candidates[0].text == WRONG.rstrip("\n") and not any(c.greedy for c in off.candidates)


def test_hostile_candidates_are_stopped_and_fail(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    hostile = {
        "loop": "    while True:\n        pass\n",
        "c_loop": "    return sum(range(10 ** 13))\n",
        "alloc": "    x = []\n    while True:\n        x.append(' ' * 10 ** 7)\n",
        "fork": "    import os\n    os.fork()\n    return a + b\n",
        "posix_fork": "    import posix\n    posix.fork()\n    return a + b\n",
        "socket": "    import socket\n    socket.create_connection(('127.0.0.1', 9))\n    return a + b\n",
        "delete": f"    import os, shutil\n    os.remove({str(victim)!r})\n    return a + b\n",
        "write": f"    open({str(victim)!r}, 'w').write('gone')\n    return a + b\n",
        "print": "    print('x' * (1 << 24))\n    return a + b\n",
    }
    t0 = time.monotonic()
    out, _ = run([GOOD, *hostile.values()])
    assert time.monotonic() - t0 < 60
    by_text = {c["text"]: c for c in out.evidence["candidates"]}
    assert out.candidates[0].text == GOOD.rstrip("\n")
    for name, body in hostile.items():
        c = by_text[body.rstrip("\n")]
        if name == "print":  # prints are discarded; the answer is still right, so it passes
            assert c["passed"], c
            continue
        assert not c["passed"] and c["score"] == 0, (name, c)
        assert c["failed"], name
    assert victim.read_text() == "precious"


def test_sandbox_reports_timeouts_and_memory_errors_per_test():
    opts = CheckOptions(test_seconds=0.5, define_seconds=1.0, tests_budget_seconds=2.0)
    tests = [Test("t1", "generated", "assert f() == 1"), Test("t2", "generated", "assert f() == 1")]
    define, res = run_candidate("def f():\n    while True: pass\n", tests, opts)
    assert define == "passed" and set(res.values()) == {"timeout"}
    define, res = run_candidate("def f():\n    return [0] * (10 ** 10)\n", tests, opts)
    assert res["t1"].startswith("error: MemoryError")
    define, res = run_candidate("def f(:\n", tests, opts)
    assert define.startswith("error: SyntaxError") and set(res.values()) == {"not run"}


def test_doctests_and_example_lines_count_as_written():
    doc = "Say.\n>>> x = 2\n>>> f(x)\n3\n>>> f(1)  # doctest: +ELLIPSIS\n2...\n\nf(4) ➞ 5\nf([1, 2]) => 3.\nf(x) is big"
    dt = doctests(doc)
    assert [(t.code, t.want.strip()) for t in dt] == [("f(x)", "3"), ("f(1)  # doctest: +ELLIPSIS", "2...")]
    assert dt[0].setup == "x = 2\n"
    assert [t.code for t in example_lines(doc, "f")] == ["assert f(4) == 5", "assert f([1, 2]) == 3"]
    define, res = run_candidate("def f(x):\n    return x + 1\n", dt, CheckOptions())
    assert res == {"doctest1": "passed", "doctest2": "passed"}


def test_the_ways_docstrings_write_examples_become_assertions():
    """HumanEval's docstrings write examples a dozen ways (``==>``, ``->`` with the working, ``returns``,
    ``should return``, ``=``, bullets, ``For x = .. the output should be ..``); each is an assertion,
    and what is not an example (a definition with free names, prose) is left out."""
    doc = """Examples:
    f(1) ==> true
    f(2)==>False
    * f([]) => []
    f(3)   # returns "db11db"
    f('Hi') returns 'iH'
    f({"a": 1}) should return True.
    f(12, 15) = 14
    f("5 apples", 19) ->19 - 5 - 6 = 8
    f(7) -> 3 (because 7 has three bits)
    For x = [1,2] the output should be 3
    For x = "ab", y = "a", the result should be ('b',False)
    For x = 1000, the sum of digits will be 1 the output should be "1".
    For z = 1 the output should be 2
    f(n) == f(n-1) + f(n-2)
    f(x) is big
    f(4) returns the sum of its digits
    """
    codes = [t.code for t in example_lines(doc, "f", ["x", "y"])]
    assert codes == ["assert f(1) == True", "assert f(2) == False", "assert f([]) == []", 'assert f(3) == "db11db"',
                     "assert f('Hi') == 'iH'", 'assert f({"a": 1}) == True', "assert f(12, 15) == 14",
                     'assert f("5 apples", 19) == 8', "assert f(7) == 3", "assert f(x=[1, 2]) == 3",
                     "assert f(x='ab', y='a') == ('b',False)", 'assert f(x=1000) == "1"']
    assert not example_lines(doc, "g")  # only the function's own calls; "For .." needs its parameters
    hostile = "For x = " + ",".join(["1"] * 1900) + " the output should be 1\n" + "f(" + "(" * 5000 + "\n"
    assert example_lines(hostile, "f", ["x"]) == []  # over-long lines are not read piece by piece


def test_doctests_written_as_comparisons_count_and_a_broken_block_loses_only_itself():
    # ">>> f(1) == 2" with no output line is an assertion the author meant; a string literal with a
    # real newline breaks doctest's parser for the whole docstring, not for the other examples
    doc = "Doc.\n    >>> f(1) == 2\n    >>> f('a\nb')\n    'ab'\n    >>> f(3)\n    4\n    >>> y = f(0) == 1\n"
    tests = written_tests(doc, "f")
    assert [(t.kind, t.code) for t in tests] == [("example", "assert f(1) == 2"), ("doctest", "f(3)")]
    assert tests[1].setup == ""  # an assignment stays setup, and only for the examples after it
    define, res = run_candidate("def f(x):\n    return x + 1\n", tests, CheckOptions())
    assert res == {tests[0].id: "passed", tests[1].id: "passed"}
    # the same example written both ways counts once
    assert [t.code for t in written_tests(">>> f(1) == 2\n\nf(1) == 2\nf(2) ==> 3\n", "f")] == [
        "assert f(1) == 2", "assert f(2) == 3"]
    src = "def f(a, b=1, *, c):\n    \"\"\"Doc.\"\"\"\n    "
    assert parameters_of(src, function_at_cursor(src, "")) == ["a", "b", "c"]


def test_the_docstrings_own_tests_filter_before_codet_agreement():
    """A candidate that passes every example the user wrote outranks a bigger group that passes more
    generated tests but fails one of those examples (AlphaCode-style filtering, then CodeT)."""
    p, f = "passed", "failed"
    tests = [Test("e1", "example", "assert 1"), Test("e2", "doctest", "1", "1")] + [
        Test(f"g{i}", "generated", "assert 1") for i in range(4)]
    right = Candidate("right", 1, 0, p, {"e1": p, "e2": p, "g0": p, "g1": f, "g2": f, "g3": f})
    crowd = Candidate("crowd", 6, 1, p, {"e1": p, "e2": f, "g0": p, "g1": p, "g2": p, "g3": p})
    ordered, _, _ = rank([crowd, right], tests)
    assert [c.text for c in ordered] == ["right", "crowd"]
    assert (right.written, crowd.written) == (2, 1) and crowd.score > right.score  # CodeT alone would pick crowd


def test_generated_asserts_are_parsed_deduplicated_and_counted():
    tests, counts = parse_generated(["1) == 2\nassert f(2) == 3\nassert f(1) == 2\nassert f(\nassert g(1)\nx = 1\n"
                                     "assert f(9) == 9"], "f", 8, set())
    assert [t.code for t in tests] == ["assert f(1) == 2", "assert f(2) == 3"]
    assert counts == {"unparsable": 2, "duplicates": 1}


def test_generated_asserts_are_taken_round_robin_across_samples():
    """With room for 3, the kept tests are the first line of each sample, then the second: three
    samples' first lines beat one sample's three."""
    texts = ["1) == 1\nassert f(2) == 2\nassert f(3) == 3\n", "4) == 4\nassert f(5) == 5\n", "6) == 6\n"]
    tests, counts = parse_generated(texts, "f", 3, set())
    assert [t.code for t in tests] == ["assert f(1) == 1", "assert f(4) == 4", "assert f(6) == 6"]
    assert counts == {"unparsable": 0, "duplicates": 0}


def test_cursor_outside_a_function_body_is_an_invalid_request():
    assert function_at_cursor("x = 1\n", "") is None
    assert function_at_cursor("def f(a", "):\n    pass\n") is None  # in the signature
    assert function_at_cursor("def f(a):\n    ", "") is not None
    req = checked_request(InfillRequest("x = 1\n", "", path="m.py"), CheckOptions())
    with pytest.raises(InvalidRequest) as err:
        req.validate()
    assert err.value.param == "position"
    with pytest.raises(InvalidRequest):
        checked_request(InfillRequest(SOURCE, ""), CheckOptions(candidates=0)).validate()


def test_other_languages_get_unranked_candidates_with_a_note():
    engine = ScriptedEngine(["  return a + b;\n}\n", "  return b + a;\n}\n"])
    completer = Completer(engine)
    out = check(completer, InfillRequest("function add(a, b) {\n", "", language="javascript"),
                CheckOptions(candidates=2))
    assert out.evidence["ranked"] is False and "only Python" in out.evidence["note"]
    assert len(out.evidence["candidates"]) == 2
    assert out.evidence["candidates"][0]["greedy"] is True and "greedy body first" in out.evidence["note"]


def test_cancel_stops_decoding_and_execution():
    engine = ScriptedEngine([GOOD + "    # " + "x" * 400 + "\n"], delay_s=0.01)
    completer = Completer(engine)
    cancel = CancelToken()
    threading.Timer(0.3, cancel.cancel).start()
    t0 = time.monotonic()
    out = check(completer, InfillRequest(SOURCE, "", path="m.py"), CheckOptions(candidates=8, max_tokens=400), cancel)
    assert out.cancelled and time.monotonic() - t0 < 3
    assert engine.tokens_generated_total < 8 * 400 / 4


def test_cli_checked_completion_and_its_errors(tmp_path, monkeypatch, capsys):
    from localcoder.cli import main

    src = tmp_path / "m.py"
    src.write_text(SOURCE)
    monkeypatch.setenv("LOCALCODER_FAKE_COMPLETION", GOOD)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    line = SOURCE.count("\n") + 1
    code = main(["complete", str(src), "--line", str(line), "--column", "1", "--model", "fake",
                 "--check", "tests", "--candidates", "3", "--check-tests", "2", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert data["text"] == GOOD.rstrip("\n") and data["checked"]["candidates"][0]["samples"] == 3
    assert "candidates decoded: 3/3" in captured.err
    code = main(["complete", str(src), "--line", "1", "--column", "1", "--model", "fake",
                 "--check", "tests"])
    assert code == 2 and "function body" in capsys.readouterr().err


def test_server_checked_option_errors_and_keeps_serving():
    from localcoder.server.app import create_app
    from conftest import serve_app

    engine = ScriptedEngine([GOOD, "    while True:\n        pass\n"], TESTS)
    app = create_app(Completer(engine), Config())
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/infill", json={"input_prefix": SOURCE, "input_suffix": "", "check": "tests", "candidates": 2,
                                    "check_tests": 4, "path": "m.py"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["content"] == GOOD.rstrip("\n") and body["checked"]["candidates"][0]["score"] > 0
        r = c.post("/infill", json={"input_prefix": "x = 1\n", "check": "tests", "path": "m.py"})
        assert r.status_code == 400 and "function body" in r.json()["error"]["message"]
        r = c.post("/infill", json={"input_prefix": SOURCE, "check": "maybe"})
        assert r.status_code == 400
        r = c.post("/v1/completions", json={"prompt": SOURCE, "suffix": "", "check": "tests", "candidates": 2})
        assert r.status_code == 200 and r.json()["checked"]["ranked"] is True
        r = c.post("/infill", json={"input_prefix": "def f():\n", "input_suffix": ""})  # plain requests still served
        assert r.status_code == 200 and "checked" not in r.json()


def test_a_running_server_answers_checked_requests_of_the_http_client():
    """serverUrl mode (the LSP's and the CLI's HttpClient): the check runs on the server, the evidence
    comes back with the top candidate."""
    import asyncio

    from localcoder.checked import CheckedResult
    from localcoder.client import HttpClient, complete
    from localcoder.server.app import create_app
    from conftest import serve_app

    engine = ScriptedEngine([WRONG, GOOD, GOOD], TESTS)
    req = checked_request(InfillRequest(SOURCE, "", path="m.py"), CheckOptions(candidates=3, tests=4, seed=7))

    async def ask(url):
        client = HttpClient(url)
        try:
            return await complete(client, req)
        finally:
            await client.close()

    with serve_app(create_app(Completer(engine), Config())) as url:
        result = asyncio.run(ask(url))
    assert isinstance(result, CheckedResult) and result.text == GOOD.rstrip("\n")
    assert result.checked["candidates"][0]["samples"] == 2 and result.checked["ranked"] is True
    assert sorted(engine.seeds) == [7, 7, 8, 9]  # the options travelled: three candidates from seed 7 (+ greedy)


def test_unbiased_pass_at_k():
    from localcoder.eval.humaneval_function import pass_at_k

    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 1, 10) == 1.0 and pass_at_k(10, 2, 5) == pytest.approx(1 - (8 * 7 * 6 * 5 * 4) / (10 * 9 * 8 * 7 * 6))


async def test_lsp_code_action_complete_function_checked(tmp_path):
    """A real `localcoder lsp` process (fake engine): the action is offered on a blank body line,
    the command inserts the top candidate and returns the evidence; outside a body it is an error."""
    import os
    import sys

    from lsprotocol import types
    from pygls.exceptions import JsonRpcException
    from pytest_lsp import ClientServerConfig

    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCALCODER_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path), LOCALCODER_FAKE_COMPLETION=GOOD, LOCALCODER_CANDIDATES="3",
               LOCALCODER_CHECK_TESTS="2")
    if "LOCALCODER_HOME" in os.environ:
        env["LOCALCODER_HOME"] = os.environ["LOCALCODER_HOME"]
    cfg = ClientServerConfig(server_command=[sys.executable, "-m", "localcoder.cli", "lsp", "--engine", "fake",
                                             "--model", "fake"], server_env=env)
    client = await cfg.start()
    edits = []

    @client.feature(types.WORKSPACE_APPLY_EDIT)
    def apply_edit(params):
        edits.append(params)
        return types.ApplyWorkspaceEditResult(applied=True)

    uri = "file:///work/proj/m.py"
    caps = types.ClientCapabilities(workspace=types.WorkspaceClientCapabilities(apply_edit=True))
    try:
        await client.initialize_session(types.InitializeParams(capabilities=caps, root_uri="file:///work/proj"))
        text = SOURCE + "    \n"
        client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(uri, "python", 1, text)))
        line = SOURCE.count("\n")

        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
        from lsp_helpers import raw_request

        async def raw(method, params):
            return await raw_request(client, method, params, timeout=60)

        pos = {"line": line, "character": 4}
        actions = await raw("textDocument/codeAction", {"textDocument": {"uri": uri}, "range": {"start": pos, "end": pos},
                                                        "context": {"diagnostics": []}})
        titles = [a["title"] for a in actions]
        assert "Complete function (checked): add()" in titles
        res = await raw("workspace/executeCommand", {"command": "localcoder.completeChecked", "arguments": [uri, pos]})
        assert res["applied"] is True and res["text"] == GOOD.rstrip("\n")
        assert res["checked"]["candidates"][0]["samples"] == 3 and "score" in res["documentation"]
        assert len(edits) == 1
        with pytest.raises(JsonRpcException):
            await raw("workspace/executeCommand", {"command": "localcoder.completeChecked",
                                                   "arguments": [uri, {"line": 0, "character": 0}]})
        # the server keeps serving
        again = await raw("workspace/executeCommand", {"command": "localcoder.completeChecked", "arguments": [uri, pos]})
        assert again is not None
        await client.shutdown_session()
    finally:
        await client.stop()


def test_function_eval_scores_the_checked_answer_codet_alone_and_every_candidate_on_hidden_tests():
    """``--suite humaneval-function`` on one problem whose docstring example (``add(1, 1) == 2``) the
    right body passes: the crowd's wrong body passes more of the model's tests, so CodeT alone picks it
    and fails the hidden tests, while the filtered ranking passes; each candidate's verdict is kept."""
    from localcoder.eval.humaneval_function import evaluate_function

    prompt = 'def add(a, b):\n    """Add two numbers.\n\n    add(1, 1) == 2\n    """\n'
    problem = {"task_id": "T/0", "prompt": prompt, "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(0, 0) == 0\n"}
    double = "    return 2 * a\n"  # passes add(1, 1) == 2, fails the hidden add(2, 3)
    crowd = "    return a + b + 1\n"  # fails the docstring's example, passes the three (wrong) generated tests
    tests = ["0, 0) == 1\nassert add(2, 2) == 5\nassert add(1, 2) == 4\n"]
    engine = ScriptedEngine([crowd, GOOD, crowd, crowd, double], tests)
    opts = CheckOptions(candidates=5, tests=8, test_seconds=1.0, define_seconds=1.0, tests_budget_seconds=3.0)
    report = evaluate_function(Completer(engine), [problem], opts, progress=False)
    (row,) = report.rows
    assert row.checked_pass and not row.codet_pass and not row.greedy_pass  # greedy = seed 0 = crowd
    assert row.checked_text == GOOD.rstrip("\n") and row.docstring_tests == 1
    verdicts = {(c["docstring_tests_passed"], c["hidden"]) for c in row.candidates}
    assert verdicts == {(0, False), (1, True), (1, False)}  # crowd, GOOD, double
    s = report.summary
    assert s["pass_at_1_checked"] == 1.0 and s["pass_at_1_codet_only"] == 0.0 and s["pass_at_1_best_candidate"] == 1.0
    assert "CodeT alone" in report.table("fake")


def test_function_eval_resumes_from_its_rows_and_refuses_rows_of_other_settings(tmp_path):
    """A killed run loses at most the problem it was on: finished problems are appended (fsynced) to
    the checkpoint, a line cut short by the kill is ignored, the same settings resume without running
    them again, and other settings are refused with a clear error naming ``out``."""
    from localcoder.eval.humaneval_function import Checkpoint, evaluate_function

    def problem(i):
        return {"task_id": f"T/{i}", "prompt": 'def add(a, b):\n    """Add.\n\n    add(1, 1) == 2\n    """\n',
                "entry_point": "add", "test": "def check(f):\n    assert f(2, 3) == 5\n"}

    opts = CheckOptions(candidates=2, tests=8, test_seconds=1.0, define_seconds=1.0, tests_budget_seconds=3.0)
    path = tmp_path / "he.json.rows.jsonl"
    first = ScriptedEngine([GOOD, WRONG], TESTS)
    evaluate_function(Completer(first), [problem(0), problem(1)], opts, progress=False,
                      checkpoint=Checkpoint(path, {"n": 2}))
    with path.open("a") as fh:
        fh.write('{"id": "T/2", "greedy_pa')  # the kill
    again = ScriptedEngine([GOOD, WRONG], TESTS)
    report = evaluate_function(Completer(again), [problem(i) for i in range(3)], opts, progress=False,
                               checkpoint=Checkpoint(path, {"n": 2}))
    assert [r.id for r in report.rows] == ["T/0", "T/1", "T/2"] and all(r.checked_pass for r in report.rows)
    assert len(again.seeds) == len(first.seeds) // 2  # only T/2 was sampled again
    assert [json.loads(line).get("id") for line in path.read_text().splitlines()] == [None, "T/0", "T/1", "T/2"]
    with pytest.raises(InvalidRequest) as err:
        Checkpoint(path, {"n": 3})
    assert err.value.param == "out" and "delete it" in str(err.value)
