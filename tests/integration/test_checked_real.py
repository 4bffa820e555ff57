"""Batched sampling on the real 0.5B GGUF: one shared prompt, N sequences decoded together.

At temperature 0 every batched sequence equals the single-sequence greedy output of ``generate``;
a checked completion of a small documented function runs end to end and ranks a passing body first."""

from __future__ import annotations

import pytest

from localcoder.checked import CheckOptions, check
from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import GenerationRequest, Sampling

pytestmark = pytest.mark.integration

PROMPT = 'def add_numbers(a, b):\n    """Return the sum of a and b.\n\n    >>> add_numbers(2, 3)\n    5\n    """\n'


def _prompt(engine):
    completer = Completer(engine, token_healing=False)
    ids, _ = completer.prompt(InfillRequest(PROMPT, ""))
    return completer, list(ids), completer.format.stop_ids(engine.tokenizer)


def test_batched_greedy_equals_single_sequence_greedy(llama_engine):
    completer, ids, stops = _prompt(llama_engine)
    single = list(llama_engine.generate(GenerationRequest(ids, 20, Sampling(), stops, cache_prompt=False)))
    outs, timings = llama_engine.sample_many(ids, 4, Sampling(), 20, stop_token_ids=stops)
    assert single and all(o == single for o in outs)
    assert timings.prompt_n == len(ids) and timings.predicted_n >= 4 * len(single)
    again, t2 = llama_engine.sample_many(ids, 4, Sampling(), 20, stop_token_ids=stops)
    assert again == outs and t2.cached_n == len(ids) - 1  # the prompt stays cached between calls
    # the slot cache of generate() is untouched by the batch context
    assert list(llama_engine.generate(GenerationRequest(ids, 20, Sampling(), stops))) == single


def test_sampled_sequences_differ_and_respect_stop(llama_engine):
    completer, ids, stops = _prompt(llama_engine)
    outs, _ = llama_engine.sample_many(ids, 4, Sampling(temperature=1.0, top_p=0.95, seed=3), 12,
                                       stop=lambda i, toks: len(toks) >= 3 + i, stop_token_ids=stops)
    assert [len(o) <= 3 + i for i, o in enumerate(outs)] == [True] * 4
    assert len({tuple(o) for o in outs}) > 1


def test_checked_completion_end_to_end(llama_engine):
    completer = Completer(llama_engine)
    out = check(completer, InfillRequest(PROMPT, "", path="m.py"),
                CheckOptions(candidates=4, tests=3, max_tokens=24, test_tokens=48))
    ev = out.evidence
    assert ev["batched_decode"] and ev["ranked"]
    assert any(t["kind"] == "doctest" for t in ev["tests"])
    top = ev["candidates"][0]
    assert "doctest1" in top["passed"], ev


def test_cancel_stops_batched_decoding(llama_engine):
    from localcoder.engines.base import CancelToken

    completer, ids, stops = _prompt(llama_engine)
    cancel = CancelToken()
    steps = []

    def on_step(live: int) -> None:
        steps.append(live)
        if len(steps) == 2:
            cancel.cancel()

    outs, timings = llama_engine.sample_many(ids, 3, Sampling(temperature=1.0, seed=1), 64, cancel=cancel,
                                             on_step=on_step)
    assert timings.cancelled and len(steps) == 2 and all(len(o) <= 3 for o in outs)
    # the engine decodes again afterwards (the cancelled sequences' cells were dropped)
    outs, timings = llama_engine.sample_many(ids, 2, Sampling(), 2)
    assert not timings.cancelled and [len(o) for o in outs] == [2, 2] and outs[0] == outs[1]
