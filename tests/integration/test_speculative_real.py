"""Speculative decoding on the real llama.cpp engine (packaged 0.5B): greedy output with speculation
``lookup`` and ``draft`` (the 0.5B drafting for itself: there is no smaller packaged model, and it still
drives the batched verify and the rollback) equals the output with it ``off``; the stats show drafts
accepted; cancelling mid-speculation stops at once and leaves the slot consistent."""

from __future__ import annotations

import pytest
from test_llama_slots import CancelAtPoll, assert_same_greedy

from localcoder.completion import Completer, InfillRequest
from localcoder.config import ModelConfig
from localcoder.engines.base import CancelToken, GenerationRequest
from localcoder.engines.speculative import DraftModel, PromptLookup

pytestmark = pytest.mark.integration

MAX_TOKENS = 24
MODEL = "qwen2.5-coder-0.5b"

# Plain (non-FIM) text whose continuation repeats what came before: prompt lookup finds it.
REPETITIVE = "".join(f"row_{i} = compute(values[{i}], scale=2.5, offset=-1.0)\n" for i in range(6)) + "row_6 = "
FIM = {
    "fib": ("def fib(n):\n    if n < 2:\n        return n\n    return ", "\n\n\nprint(fib(10))\n"),
    "stack": ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ",
              "\n\n    def pop(self):\n        return self.items.pop()\n"),
}


def engine_for(speculation: str):
    from localcoder import models
    from localcoder.engines.llamacpp import LlamaCppEngine

    # the shipped weights, pinned whatever the default serves: the cancel points below were chosen on their
    # outputs; what is tested (exactness, rollback, cancel) does not depend on the weight type
    cfg = ModelConfig(model=MODEL, ctx=1024, threads=2, speculation=speculation, gguf_type="original",
                      draft_model=MODEL if speculation == "draft" else "")
    return LlamaCppEngine.from_config(models.resolve(MODEL), cfg)


@pytest.fixture(scope="module")
def engines(model_05b_path):
    engs = {s: engine_for(s) for s in ("off", "lookup", "draft")}
    yield engs
    for e in engs.values():
        e.close()


@pytest.fixture(scope="module")
def prompts(engines):
    eng = engines["off"]
    c = Completer(eng)
    out = {"repetitive": eng.tokenizer.tokenize(REPETITIVE)}
    out.update({k: c.prompt(InfillRequest(p, s))[0] for k, (p, s) in FIM.items()})
    return out


def generate(eng, prompt, **kw):
    stops = Completer(eng).format.stop_ids(eng.tokenizer)
    stream = eng.generate(GenerationRequest(tokens=list(prompt), max_tokens=MAX_TOKENS, stop_token_ids=stops,
                                            heal=getattr(prompt, "heal", None), **kw))
    return list(stream), stream.timings


def assert_slot_consistent(eng) -> None:
    for s, cache in enumerate(eng.slots.slots):
        assert eng._lib.llama_memory_seq_pos_max(eng._memory, s) == len(cache.tokens) - 1


def assert_prefix(got, want, prompt, ref) -> None:
    """A cancelled output is the start of the plain one (up to a near-tie parting)."""
    assert_same_greedy(got, want[: len(got)], prompt, ref, max_tokens=len(got))


@pytest.fixture(scope="module")
def plain(engines, prompts):
    """Outputs with speculation off, each from a cold cache."""
    out = {}
    for name, p in prompts.items():
        engines["off"].reset_cache()
        out[name], t = generate(engines["off"], p)
        assert t.draft_n == 0 and t.target_forwards == 0 and len(out[name]) > 4
    return out


def test_the_engines_are_built_from_the_config(engines):
    assert engines["off"].drafter is None
    assert isinstance(engines["lookup"].drafter, PromptLookup)
    assert isinstance(engines["draft"].drafter, DraftModel) and engines["draft"].drafter.engine.model_name == MODEL


@pytest.mark.parametrize("speculation", ["lookup", "draft"])
@pytest.mark.parametrize("name", ["repetitive", "fib", "stack"])
def test_greedy_output_is_the_same_with_speculation(engines, prompts, plain, speculation, name):
    eng = engines[speculation]
    eng.reset_cache()
    if speculation == "draft":
        eng.drafter.engine.reset_cache()
    out, t = generate(eng, prompts[name])
    stops = Completer(engines["off"]).format.stop_ids(engines["off"].tokenizer)
    assert_same_greedy(out, plain[name], prompts[name], engines["off"], stops, MAX_TOKENS)
    assert_slot_consistent(eng)  # rejected drafts rolled out of the KV cache
    assert t.draft_accepted_n <= t.draft_n
    assert t.target_forwards <= t.predicted_n
    stats = t.to_dict()
    assert stats["draft_n"] == t.draft_n and stats["draft_n_accepted"] == t.draft_accepted_n
    if name == "repetitive" or speculation == "draft":  # the 0.5B drafting for itself agrees nearly always
        assert t.draft_accepted_n > 0 and t.target_forwards < t.predicted_n - 1
        assert stats["tokens_per_forward"] > 1.0
    if name == "repetitive" and speculation == "lookup":
        # measured on this CPU: 9 of 22 drafts accepted, 1.6 tokens per target forward
        assert t.draft_accepted_n >= t.draft_n // 3 and stats["tokens_per_forward"] >= 1.4


@pytest.mark.parametrize("speculation", ["lookup", "draft"])
def test_cancel_during_speculative_decoding_stops_at_once(engines, prompts, plain, speculation):
    eng = engines[speculation]
    eng.reset_cache()
    cancel = CancelToken()
    stream = eng.generate(GenerationRequest(tokens=list(prompts["repetitive"]), max_tokens=MAX_TOKENS, cancel=cancel))
    got = []
    for token in stream:
        got.append(token)
        if len(got) == 5:
            cancel.cancel()
    assert len(got) == 5 and stream.timings.cancelled  # not one token after the cancel
    assert_prefix(got, plain["repetitive"], prompts["repetitive"], engines["off"])
    assert_slot_consistent(eng)
    # a cancel that fires inside a run of accepted drafts (polled before each token they yield)
    eng.reset_cache()
    stream = eng.generate(GenerationRequest(tokens=list(prompts["repetitive"]), max_tokens=MAX_TOKENS,
                                            cancel=CancelAtPoll(9)))  # poll 1: the prefill chunk
    got = list(stream)
    assert len(got) == 7 and stream.timings.cancelled and stream.timings.draft_accepted_n > 0
    assert_prefix(got, plain["repetitive"], prompts["repetitive"], engines["off"])
    assert_slot_consistent(eng)
    out, t = generate(eng, prompts["repetitive"])  # the slot still serves the prompt (its cells are right)
    assert t.evaluated_n == 1
    assert_same_greedy(out, plain["repetitive"], prompts["repetitive"], engines["off"], max_tokens=MAX_TOKENS)


def test_health_says_which_speculation_serves(engines):
    """/health's ``speculation``: what the engine drafts with (``auto``, the default, is off unless a draft
    model is named)."""
    import asyncio

    from localcoder.client import InProcessClient

    async def health(eng):
        client = InProcessClient(Completer(eng))  # given a Completer, closing it leaves the engine loaded
        try:
            await client.wait_ready(5)
            return (await client.health())["speculation"]
        finally:
            await client.close()

    assert [asyncio.run(health(engines[s])) for s in ("off", "lookup", "draft")] == ["off", "lookup", "draft"]
    auto = engine_for("auto")
    try:
        assert auto.drafter is None and asyncio.run(health(auto)) == "off"
    finally:
        auto.close()
