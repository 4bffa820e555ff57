"""Typing through a suggestion (localcoder.typed): the rest of the last suggestion, no model call, and only
when that is what a fresh greedy request for the same context would have been shown."""

from __future__ import annotations

import pytest

from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import Sampling
from localcoder.engines.fake import FakeEngine

PREFIX = "def area(w, h):\n    return "
SUFFIX = "\n\nprint(area(2, 3))\n"


def completer(text="w * h\n", **kw):
    eng = FakeEngine(completion=text)
    return eng, Completer(eng, typed_through=True, **kw)


def test_typing_the_start_of_the_suggestion_answers_with_the_rest_without_the_model():
    eng, c = completer()
    first = c.complete(InfillRequest(PREFIX, SUFFIX))
    assert first.text == "w * h" and not first.timings.reused
    calls = len(eng.prompts)
    for typed, rest in (("w", " * h"), ("w ", "* h"), ("w * ", "h")):
        r = c.complete(InfillRequest(PREFIX + typed, SUFFIX))
        assert (r.text, r.stop_type, r.timings.reused) == (rest, first.stop_type, True)
        assert r.timings.to_dict()["typed_through"] is True and r.tokens_evaluated == 0
    assert c.complete(InfillRequest(PREFIX + "w *", SUFFIX, indent=7)).timings.reused  # llama.vim's n_indent: no key
    assert len(eng.prompts) == calls  # no model call
    assert c.typed.hits == 4


@pytest.mark.parametrize("change", [
    dict(prefix=PREFIX + "x"),  # departs from the suggestion
    dict(prefix=PREFIX + "w * h"),  # typed all of it: nothing left to show
    dict(prefix=PREFIX[:-1]),  # a deletion
    dict(prefix="# edited above\n" + PREFIX + "w"),  # an edit above the cursor
    dict(prefix=PREFIX + "w", suffix=SUFFIX + "x = 1\n"),  # the suffix changed
    dict(prefix=PREFIX + "w", max_tokens=8),  # other options
    dict(prefix=PREFIX + "w", sampling=Sampling(temperature=0.7, seed=1)),  # sampled: not "the" suggestion
])
def test_anything_else_goes_to_the_model(change):
    eng, c = completer()
    c.complete(InfillRequest(PREFIX, SUFFIX))
    calls = len(eng.prompts)
    req = InfillRequest(**{"prefix": PREFIX, "suffix": SUFFIX, **change})
    r = c.complete(req)
    assert not r.timings.reused and len(eng.prompts) == calls + 1


def test_a_suggestion_cut_by_the_token_limit_is_reused_but_a_cancelled_one_is_not():
    """What the editor showed is what the user types into, however it ended; a cancelled request showed nothing."""
    eng, c = completer("w * h * 2 * 3 * 4\n")
    first = c.complete(InfillRequest(PREFIX, SUFFIX, max_tokens=4))
    assert (first.text, first.stop_type) == ("w *", "limit")  # trailing space trimmed
    r = c.complete(InfillRequest(PREFIX + "w", SUFFIX, max_tokens=4))
    assert (r.text, r.timings.reused) == (" *", True)
    from localcoder.engines.base import CancelToken

    cancel = CancelToken()
    cancel.cancel()
    eng2, c2 = completer()
    assert c2.complete(InfillRequest(PREFIX, SUFFIX), cancel).stop_type == "cancelled"
    assert not c2.complete(InfillRequest(PREFIX + "w", SUFFIX)).timings.reused


def test_off_by_config_and_the_default_is_on():
    from localcoder.config import Config

    eng = FakeEngine(completion="w * h\n")
    c = Completer(eng)
    c.complete(InfillRequest(PREFIX, SUFFIX))
    assert not c.complete(InfillRequest(PREFIX + "w", SUFFIX)).timings.reused  # constructor default: off
    assert Config().completion.typed_through is True  # the product's default: on (docs/latency.md)


def test_the_memory_is_bounded():
    eng, c = completer()
    for i in range(40):
        c.complete(InfillRequest(f"# file {i}\n" + PREFIX, SUFFIX))
    assert len(c.typed._entries) == c.typed.capacity
    r = c.complete(InfillRequest("# file 39\n" + PREFIX + "w", SUFFIX))
    assert r.timings.reused  # the newest are kept
