"""Speculative decoding logic on a toy numpy language model: drafters, verification, and the verify loop
through ``run_tokens`` (greedy output identical to plain decoding, cache consistent, stops and cancels)."""

from __future__ import annotations

import numpy as np
import pytest

from localcoder.engines.base import CancelToken, GenerationRequest, Timings, run_tokens
from localcoder.engines.kvcache import SlotTable
from localcoder.engines.speculative import DraftSize, PromptLookup, Speculation, build_drafter, verify
from localcoder.errors import InvalidRequest

V = 40


def toy_logits(context: list[int]) -> np.ndarray:
    """A deterministic 'model': the next-token distribution depends on the last two tokens."""
    a, b = (context[-2], context[-1]) if len(context) > 1 else (0, context[-1])
    return np.random.default_rng(a * V + b).standard_normal(V) * 3


class ToyBackend:
    """Appends to a token list the way an engine appends to its KV cache."""

    def __init__(self, n_ctx: int = 400) -> None:
        self.cache: list[int] = []
        self.n_ctx = n_ctx
        self.forwards = 0

    def forward(self, ids: list[int]) -> np.ndarray:
        self.forwards += 1
        self.cache.extend(ids)
        return toy_logits(self.cache)

    def forward_all(self, ids: list[int]) -> np.ndarray:
        self.forwards += 1
        start = len(self.cache)
        self.cache.extend(ids)
        return np.stack([toy_logits(self.cache[: start + i + 1]) for i in range(len(ids))])

    def rollback(self, n: int) -> None:
        del self.cache[len(self.cache) - n:]

    def spec(self, drafter) -> Speculation:
        return Speculation(drafter, self.forward_all, self.rollback, lambda: self.n_ctx - len(self.cache))


def greedy_next(context: list[int]) -> int:
    return int(np.argmax(toy_logits(context)))


class Oracle:
    """Drafts the toy model's own greedy continuation (every draft is accepted)."""

    def draft(self, context, k):
        ctx = list(context)
        for _ in range(k):
            ctx.append(greedy_next(ctx))
        return ctx[len(context):]


class Wrong:
    """Drafts tokens the toy model never picks first (every draft is rejected)."""

    def draft(self, context, k):
        return [(greedy_next(list(context)) + 1) % V] * k


def generate(request: GenerationRequest, drafter=None) -> tuple[list[int], Timings, ToyBackend]:
    backend, timings = ToyBackend(), Timings()
    spec = backend.spec(drafter) if drafter is not None else None
    out = list(run_tokens(request, timings, 0, 16, backend.forward, backend.cache.clear, spec=spec))
    return out, timings, backend


PROMPTS = [[1, 2, 3, 4, 5, 6, 1, 2, 3], [7] * 5 + [8, 9] * 6, list(range(20, 40)) + list(range(20, 30))]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("drafter", [PromptLookup(), Oracle(), Wrong()], ids=["lookup", "oracle", "wrong"])
def test_speculative_greedy_output_equals_plain_greedy(prompt, drafter):
    plain, _, _ = generate(GenerationRequest(prompt, max_tokens=30))
    fast, timings, backend = generate(GenerationRequest(prompt, max_tokens=30), drafter)
    assert fast == plain and len(plain) == 30
    # the cache holds the prompt, the output, and only tokens the target itself chose
    full = prompt + plain
    assert backend.cache[: len(full) - 1] == full[: len(backend.cache)][: len(full) - 1]
    for i in range(len(prompt), len(backend.cache)):
        assert backend.cache[i] == greedy_next(backend.cache[:i])


def test_oracle_drafts_are_all_accepted_and_save_forwards():
    prompt = PROMPTS[0]
    _, plain_t, plain_b = generate(GenerationRequest(prompt, max_tokens=30))
    _, t, b = generate(GenerationRequest(prompt, max_tokens=30), Oracle())
    assert t.draft_n > 0 and t.draft_accepted_n == t.draft_n
    assert b.forwards < plain_b.forwards and t.to_dict()["tokens_per_forward"] > 3
    _, w, _ = generate(GenerationRequest(prompt, max_tokens=30), Wrong())
    assert w.draft_n > 0 and w.draft_accepted_n == 0 and w.to_dict()["draft_n_accepted"] == 0


def test_stop_token_inside_accepted_drafts_ends_generation_like_plain():
    prompt = PROMPTS[1]
    plain, _, _ = generate(GenerationRequest(prompt, max_tokens=30))
    stop = plain[7]
    first = plain.index(stop)
    req = lambda: GenerationRequest(prompt, max_tokens=30, stop_token_ids=frozenset({stop}))  # noqa: E731
    out_plain, t_plain, _ = generate(req())
    out_fast, t_fast, _ = generate(req(), Oracle())
    assert out_fast == out_plain == plain[:first]
    assert t_fast.stopped_by_token and t_fast.predicted_n == t_plain.predicted_n == first + 1


@pytest.mark.parametrize("max_tokens", [1, 2, 4, 5, 9])
def test_max_tokens_is_respected_with_drafts(max_tokens):
    plain, _, _ = generate(GenerationRequest(PROMPTS[2], max_tokens=max_tokens))
    fast, t, _ = generate(GenerationRequest(PROMPTS[2], max_tokens=max_tokens), Oracle())
    assert fast == plain and len(fast) == max_tokens == t.predicted_n


class CancelAfter(CancelToken):
    """Reports cancelled from the n-th poll on (deterministic cancellation)."""

    def __init__(self, polls: int) -> None:
        super().__init__()
        self.polls = polls

    @property
    def cancelled(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_cancel_during_speculation_stops_with_a_prefix_and_a_consistent_cache():
    plain, _, _ = generate(GenerationRequest(PROMPTS[0], max_tokens=30))
    req = GenerationRequest(PROMPTS[0], max_tokens=30, cancel=CancelAfter(12))
    out, t, backend = generate(req, Oracle())
    assert t.cancelled and 0 < len(out) < 30 and out == plain[: len(out)]
    for i in range(len(PROMPTS[0]), len(backend.cache)):
        assert backend.cache[i] == greedy_next(backend.cache[:i])


def test_temperature_turns_speculation_off():
    req = GenerationRequest(PROMPTS[0], max_tokens=10)
    req.sampling.temperature = 0.8
    _, t, _ = generate(req, Oracle())
    assert t.draft_n == 0 and t.predicted_n == 10


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup(k=3, ngram_max=3, ngram_min=2)
    #            match of [1, 2, 3] at 0 (followed by 9) and at 5 (followed by 4, 5, 6)
    assert lookup.draft([1, 2, 3, 9, 0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3], 8) == [4, 5, 6]
    assert lookup.draft([5, 6, 7, 8, 1, 6, 7], 8) == [8, 1, 6]  # bigram [6, 7]
    assert lookup.draft([1, 2, 3, 4], 8) == []  # no earlier occurrence
    assert lookup.draft([4, 4], 8) == []  # shorter than the smallest n-gram plus one
    assert lookup.draft([1, 2, 3, 1, 2], 1) == [3]


def test_verify_keeps_the_agreeing_run_and_the_targets_own_token_under_a_mask():
    rows = np.zeros((4, 6))
    for i, t in enumerate([3, 1, 2, 5]):
        rows[i, t] = 1.0
    plain = lambda row, step: int(np.argmax(row))  # noqa: E731
    assert verify([3, 1, 2], rows, plain, 1) == ([3, 1, 2], 5)
    assert verify([3, 4, 2], rows, plain, 1) == ([3], 1)
    assert verify([0, 1, 2], rows, plain, 1) == ([], 3)
    # a mask on output step 1 (the first drafted position) forbids token 3: its best allowed is then 0
    masked = lambda row, step: int(np.argmax(np.where(np.arange(6) == 3, -np.inf, row) if step == 1 else row))  # noqa
    assert verify([3, 1, 2], rows, masked, 1) == ([], 0)


def test_draft_size_uses_full_verify_batches_and_adapts():
    size = DraftSize((3, 7))
    assert size.wanted == 3 and size.fit([1, 2]) == [] and size.fit([1, 2, 3, 4, 5]) == [1, 2, 3]
    size.update(3, 3)
    assert size.wanted == 7 and size.fit(list(range(9))) == list(range(7))
    size.update(7, 2)
    assert size.wanted == 3


def test_build_drafter_checks_its_settings():
    assert build_drafter("off", "", lambda n: None) is None
    assert isinstance(build_drafter("lookup", "", lambda n: None), PromptLookup)
    with pytest.raises(InvalidRequest) as e:
        build_drafter("draft", "", lambda n: None)
    assert e.value.param == "draft_model"
    with pytest.raises(InvalidRequest):
        build_drafter("sometimes", "", lambda n: None)


def test_slot_table_picks_the_shared_prefix_slot_else_least_recently_used():
    table = SlotTable(2)
    a, b, c = [1, 2, 3, 4, 5, 6], [1, 9, 9, 9, 9, 9], [7, 7, 7, 7]
    assert table.choose(a) == 0
    table.slots[0].extend(a + [50, 51])  # prompt plus its completion
    assert table.choose(b) == 1  # shares only a header token: a fresh slot
    table.slots[1].extend(b)
    assert table.choose(a[:5] + [8]) == 0  # the same document
    assert table.choose(c) == 1  # nothing shared: the least recently used
    with pytest.raises(ValueError):
        SlotTable(0)


def test_a_warm_up_overwrites_a_warm_up_slot_not_the_file_being_typed_in():
    """Two files typed alternately (slots 0 and 1), a third slot of llama.vim's warm-ups: however long the
    files go unrefreshed (typed-through answers call no model), warm-ups of other prompts stay in slot 2."""
    table = SlotTable(3)
    a, b = [1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]
    for prompt in (a, b):
        table.slots[table.choose(prompt)].extend(prompt)
    warm = table.choose([20, 21], background=True)
    assert warm == 2
    table.slots[warm].extend([20, 21])
    for k in range(5):  # several different warm-ups, nothing else
        slot = table.choose([30 + k, 31], background=True)
        assert slot == 2
        table.slots[slot].clear()
        table.slots[slot].extend([30 + k, 31])
    assert table.choose(a + [13]) == 0 and table.choose(b + [13]) == 1  # both files still cached
    # a real request on a miss also overwrites the warm-up slot first; then the slot counts as real
    assert table.choose([40, 41, 42]) == 2
    table.slots[2].clear()
    table.slots[2].extend([40, 41, 42])
    assert table.choose([50, 51], background=True) == 0  # no warm-up slot left: the least recently used
