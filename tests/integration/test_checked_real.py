"""Batched sampling on the real 0.5B GGUF: one shared prompt, N sequences decoded together.

At temperature 0 every batched sequence equals the single-sequence greedy output of ``generate``, and
every sequence of a grouped call (candidates and test-writing prompts decoded together) equals what
its group's prompt gives alone; a checked completion of a small documented function runs end to end
and ranks a passing body first."""

from __future__ import annotations

import pytest

from localcoder import checked
from localcoder.checked import CheckOptions, check
from localcoder.completion import Completer, InfillRequest
from localcoder.engines.base import GenerationRequest, Sampling
from localcoder.engines.kvcache import common_prefix_len
from localcoder.engines.base import SampleGroup

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


def test_grouped_greedy_equals_each_prompt_alone_and_group_0_stays_cached(llama_engine):
    """Candidates and test-writing sequences in one decode: the shared prefix is evaluated once,
    each group keeps its own stop and max_tokens, and each sequence is what its prompt gives alone."""
    completer, ids, stops = _prompt(llama_engine)
    fn = checked.function_at_cursor(PROMPT, "")
    test_ids = list(completer.prompt(InfillRequest(checked.tests_prompt_prefix(PROMPT, fn), ""))[0])
    shared = common_prefix_len(ids, test_ids)
    assert shared >= len(ids) - 3 and len(test_ids) > len(ids)  # the test prompt extends the candidates' prefix
    groups = [SampleGroup(ids, 3, Sampling(), 16, stop_token_ids=stops),
              SampleGroup(test_ids, 2, Sampling(), 12, lambda i, toks: len(toks) >= 6 + i, stops)]
    outs, timings = llama_engine.sample_groups(groups)
    assert timings.prompt_n == len(ids) + len(test_ids) and timings.cached_n >= shared
    assert [len(o) for o in outs[1]] == [6, 7]  # group 1's own stop
    again, t2 = llama_engine.sample_groups(groups)
    assert again == outs
    assert t2.cached_n == len(ids) - 1 + shared  # group 0's prompt was kept; group 1 shares its prefix
    assert t2.evaluated_n == 1 + len(test_ids) - shared
    alone = [llama_engine.sample_many(g.prompt, g.n, g.sampling, g.max_tokens, g.stop, stop_token_ids=stops)[0]
             for g in groups]
    assert outs == alone
    assert all(o == outs[0][0] for o in outs[0]) and outs[0][0]


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
    assert ev["timings"]["sampled_tokens"]["tests"] > 0  # the tests were written in the shared decode
    assert any(t["kind"] == "doctest" for t in ev["tests"])
    top = ev["candidates"][0]
    assert "doctest1" in top["passed"], ev
    assert sum(c["greedy"] for c in ev["candidates"]) == 1  # the greedy body was decoded in the same batch
    assert sum(c["samples"] for c in ev["candidates"]) == 4 == len(out.samples)  # and is not counted as a sample


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
