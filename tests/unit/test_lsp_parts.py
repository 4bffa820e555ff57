"""The language server's parts in-process: settings, context snippets, docstring action, requests
(newest per document wins), errors, feedback; and one in-process completion through the server object with the fake engine."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from lsprotocol import types

from localcoder.completion import Completer, InfillRequest
from localcoder.config import Config
from localcoder.client import InProcessClient, http_error
from localcoder.engines.fake import FakeEngine
from localcoder.errors import BackendUnavailable, InvalidRequest, ModelNotFound
from localcoder import docstring
from localcoder.lsp.context import ContextBuilder, ContextOptions, uri_to_path
from localcoder.lsp.documents import Document
from localcoder.lsp.errors import Reporter, to_response_error
from localcoder.lsp.options import apply_settings
from localcoder.lsp.requests import Requests
from localcoder.lsp.server import Feedback, create_server, on_inline_completion, on_open


# ---- settings -------------------------------------------------------------------------------------
def test_settings_camel_or_snake_flat_or_sectioned():
    cfg = Config()
    a = apply_settings(cfg, {"localcoder": {"maxTokens": 12, "contextTokens": 100, "serverUrl": "http://h:1"}})
    assert a.config.completion.max_tokens == 12 and a.config.completion.extra_tokens == 100
    assert a.config.lsp.server_url == "http://h:1" and a.needs_reload
    b = apply_settings(cfg, {"time_budget_ms": "250", "enabled": True, "bogus": 1})
    assert b.config.completion.time_budget_ms == 250 and b.ignored == ["bogus"] and not b.needs_reload
    assert cfg.completion.max_tokens == 64  # the original is untouched


@pytest.mark.parametrize("settings,param", [({"maxTokens": "many"}, "maxTokens"), ({"mode": "all"}, "mode"),
                                            ({"serverUrl": "localhost:8765"}, "serverUrl"),
                                            ({"debounceMs": -1}, "debounce_ms"), ([1, 2], "initializationOptions")])
def test_bad_settings_name_the_setting(settings, param):
    with pytest.raises(InvalidRequest) as err:
        apply_settings(Config(), settings)
    assert err.value.param == param


# ---- context ------------------------------------------------------------------------------------
def test_neighbour_snippets_prefer_related_code_and_recent_edits():
    cur = Document("file:///p/main.py", "from shapes import area_of_circle\n\nr = 2\nprint(area_of_circle(r))\n", "python")
    shapes = Document("file:///p/shapes.py", "import math\n\ndef area_of_circle(radius):\n    return math.pi * radius ** 2\n",
                      "python")
    notes = Document("file:///p/notes.md", "unrelated words only here\n" * 3, "markdown")
    edited = Document("file:///p/util.py", "def helper():\n    pass\n", "python")
    edited.apply(types.Position(1, 4), types.Position(1, 8), "return 42")
    snips = ContextBuilder().snippets(cur, len(cur.text), [shapes, notes, edited], ContextOptions(), "file:///p")
    assert [s.path for s in snips] == ["util.py", "shapes.py"]  # the recent edit first, then similarity
    assert "return 42" in snips[0].text and "def area_of_circle" in snips[1].text


def test_snippets_are_stable_while_typing_in_one_region():
    cur = Document("file:///p/a.py", "def f(x):\n    return x\n", "python")
    other = Document("file:///p/b.py", "def f(y):\n    return y * 2\n", "python")
    builder = ContextBuilder()
    first = builder.snippets(cur, 5, [other], ContextOptions(), None)
    cur.apply(types.Position(1, 12), types.Position(1, 12), " + g(x)")
    assert builder.snippets(cur, 20, [other], ContextOptions(), None) is first  # same region: cached


def test_typing_in_another_file_keeps_the_snippets_until_its_edits_move_region():
    """Two files edited alternately: the prompt prelude (snippets of the other file) must not change at
    every switch, or each switch re-reads the whole prompt."""
    other_text = "".join(f"def helper_{i}(value):\n    return value + {i}\n" for i in range(40))
    cur = Document("file:///p/a.py", "def main(value):\n    return helper_3(value)\n", "python")
    other = Document("file:///p/b.py", other_text, "python")
    other.apply(types.Position(7, 0), types.Position(7, 0), "# x")  # the user worked there (line 7)
    builder = ContextBuilder()
    first = builder.snippets(cur, 20, [other], ContextOptions(), None)
    assert any("# x" in s.text for s in first)
    for ch in "yz":  # more typing on that line of b.py
        other.apply(types.Position(7, 3), types.Position(7, 3), ch, version=other.version + 1)
        assert builder.snippets(cur, 20, [other], ContextOptions(), None) is first
    other.apply(types.Position(70, 0), types.Position(70, 0), "# far away\n")  # edits move to another region
    again = builder.snippets(cur, 20, [other], ContextOptions(), None)
    assert again is not first and any("# far away" in s.text for s in again)


def test_snippet_budget_and_paths():
    big = Document("file:///p/big.py", "value = compute(value)\n" * 400, "python")
    cur = Document("file:///p/a.py", "value = compute(", "python")
    snips = ContextBuilder().snippets(cur, len(cur.text), [big], ContextOptions(extra_tokens=100), None)
    assert sum(len(s.text) for s in snips) <= 300
    assert uri_to_path("file:///home/u/proj/src/x.py", "file:///home/u/proj") == "src/x.py"
    assert uri_to_path("file:///elsewhere/y%20z.py", "file:///home/u/proj") == "y z.py"


# ---- docstring action -----------------------------------------------------------------------------
SRC = '''class Shape:
    def area(self,
             scale: float = 1.0) -> float:
        w = self.w
        return w * scale

    def named(self):
        """Has one."""
        return self.name
'''


def test_find_function_innermost_with_multiline_signature():
    fn = docstring.find_function(SRC, 4)
    assert (fn.name, fn.def_line, fn.body_line, fn.indent, fn.has_docstring) == ("area", 1, 3, "        ", False)
    assert docstring.find_function(SRC, 2).name == "area"  # inside the signature
    assert docstring.find_function(SRC, 8).has_docstring
    assert docstring.find_function(SRC, 0) is None


def test_docstring_request_puts_the_cursor_between_quotes():
    fn = docstring.find_function(SRC, 4)
    req = docstring.docstring_request(SRC, fn)
    assert req.prefix.endswith('-> float:\n        """') and req.suffix.startswith('"""\n        w = self.w')
    assert req.mode == "multi" and '"""' in req.stop
    assert docstring.format_docstring("Area scaled.", "    ") == '    """Area scaled."""\n'
    assert docstring.format_docstring("Area.\n\n    Args: s", "    ") == '    """Area.\n\n    Args: s\n    """\n'
    assert docstring.format_docstring('  \n', "    ") is None


# ---- requests: newest wins, superseded work never starts -------------------------------------------
def slow_client() -> tuple[InProcessClient, FakeEngine]:
    engine = FakeEngine(completion="x" * 100, token_delay_s=0.01)
    return InProcessClient(Completer(engine)), engine


async def test_newest_request_per_document_wins():
    client, engine = slow_client()
    reqs = Requests()
    first = reqs.issue("a")
    t1 = asyncio.ensure_future(reqs.run(client, first, lambda: InfillRequest("one", max_tokens=100)))
    await asyncio.sleep(0.1)
    queued = reqs.issue("a")  # supersedes the running one: it stops before its next token
    t2 = asyncio.ensure_future(reqs.run(client, queued, lambda: InfillRequest("two"), debounce_s=0.05))
    last = reqs.issue("a")  # supersedes the debouncing one: it never reaches the engine
    t3 = asyncio.ensure_future(reqs.run(client, last, lambda: InfillRequest("three", max_tokens=3)))
    assert await t1 is None and await t2 is None
    assert (await t3).text == "xxx"
    assert len(engine.prompts) == 2 and engine.tokens_generated_total < 50
    assert reqs.stats.superseded == 2 and reqs.stats.skipped == 1 and reqs.stats.generations == 2
    await client.close()


async def test_cancelled_task_cancels_the_generation():
    client, engine = slow_client()
    reqs = Requests()
    task = asyncio.ensure_future(reqs.run(client, reqs.issue("a"), lambda: InfillRequest("x", max_tokens=100)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    settled = engine.tokens_generated_total
    await asyncio.sleep(0.05)
    assert engine.tokens_generated_total == settled < 50 and reqs.stats.cancelled == 1
    await client.close()


# ---- errors and feedback --------------------------------------------------------------------------
def test_errors_map_once():
    r = Reporter()
    assert r.failure(ModelNotFound("no model")) is not None
    assert r.failure(ModelNotFound("no model")) is None  # once per kind
    assert r.failure(BackendUnavailable("down")) is not None
    r.success()
    assert r.failure(ModelNotFound("no model")) is not None  # re-armed after a success
    err = to_response_error(InvalidRequest("bad position", param="position"))
    assert err.code == -32602 and err.data["param"] == "position"


def test_http_errors_map_by_type_then_status():
    assert isinstance(http_error(400, "context_length_exceeded", "m", "u"), InvalidRequest)
    assert type(http_error(404, "model_not_found", "m", "u")) is ModelNotFound
    assert type(http_error(503, None, "m", "u")) is BackendUnavailable


def test_feedback_counts_each_completion_once():
    f = Feedback()
    f.serve(1, "abc", 10.0)
    f.serve(2, "de", 30.0)
    f.judge(1, True)
    f.judge(1, True)  # the command and the notification for the same completion
    f.judge(2, False)
    s = f.summary()
    assert (s["shown"], s["accepted"], s["rejected"], s["accepted_chars"], s["acceptance_rate"]) == (2, 1, 1, 3, 0.5)
    assert s["latency_ms_p50"] == 20.0


# ---- the server object in-process ------------------------------------------------------------------
async def test_in_process_completion_sees_path_neighbours_and_incremental_text():
    ls = create_server(Config())
    engine = FakeEngine(completion="return a + b\n")
    ls.client = InProcessClient(Completer(engine, "qwen"))
    ls.root_uri = "file:///proj"
    on_open(ls, types.DidOpenTextDocumentParams(types.TextDocumentItem(
        uri="file:///proj/util.py", language_id="python", version=1, text="def add_numbers(a, b):\n    pass\n")))
    on_open(ls, types.DidOpenTextDocumentParams(types.TextDocumentItem(
        uri="file:///proj/main.py", language_id="python", version=1, text="def add_numbers(a, b):\n    \n")))
    res = await on_inline_completion(ls, types.InlineCompletionParams(
        context=types.InlineCompletionContext(types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier("file:///proj/main.py"), position=types.Position(1, 4)))
    assert res.items[0].insert_text == "return a + b"
    prompt = engine.prompts[-1]
    assert "<|file_sep|>util.py\ndef add_numbers" in prompt and "<|file_sep|>main.py\n" in prompt
    assert prompt.index("util.py") < prompt.index("main.py")
    assert ls.stats()["shown"] == 1
    await ls.close_engine()


@pytest.mark.parametrize("general,expected", [
    (None, "utf-16"),  # no preference: pygls picks its default, an Enum member
    (types.GeneralClientCapabilities(position_encodings=[types.PositionEncodingKind.Utf8]), "utf-8"),
    (types.GeneralClientCapabilities(position_encodings=["utf-32", "utf-16"]), "utf-32"),
])
def test_negotiated_position_encoding_reaches_the_documents(general, expected):
    from localcoder.lsp.server import on_initialize

    ls = create_server(Config())
    on_initialize(ls, types.InitializeParams(capabilities=types.ClientCapabilities(general=general)))
    assert ls.documents.encoding == expected
    doc = ls.documents.open("file:///x.py", "s = '😀x'")
    col = {"utf-16": 7, "utf-8": 9, "utf-32": 6}[expected]
    assert doc.text[doc.offset_at(types.Position(0, col))] == "x"


def test_lsp_command_does_not_import_torch():
    code = ("import sys; from localcoder.cli import build_parser; build_parser('lsp'); "
            "import localcoder.lsp.server, localcoder.client; "
            "print(json.dumps(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'llama_cpp') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
