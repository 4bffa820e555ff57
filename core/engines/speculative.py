"""Speculative decoding, lossless at greedy: draft a few tokens cheaply, verify them in one target forward.

A drafter proposes the next tokens for a context (prompt + output so far):

- ``PromptLookup``: the tokens that followed the most recent earlier occurrence of the context's last
  n-gram (prompt-lookup decoding; code repeats its prefix, suffix and neighbours). Free.
- ``DraftModel``: greedy tokens from a smaller engine with the same tokenizer (its own KV cache,
  reused token-exactly between calls).

``decode`` is the greedy verify loop ``run_tokens`` hands over to: the target evaluates
``[last token] + drafts`` in one batch with logits at every position, keeps the longest run of drafts
that equal its own choice at each position, then its own next token, and rolls the rejected tail out
of its KV cache. Every emitted token is the target's own choice given exactly the tokens before it
(``choose`` applies the same masks as plain decoding), so the output is the plain greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:
    from localcoder.engines.base import GenerationRequest, Timings

SPECULATION = ("auto", "off", "lookup", "draft")


class Drafter(Protocol):
    def draft(self, context: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens likely to follow ``context`` (may be fewer, or none)."""


class PromptLookup:
    """Draft by n-gram match: find the latest earlier occurrence of the context's last ``n`` tokens
    (longest ``n`` first, from ``ngram_max`` down to ``ngram_min``) and propose what followed it."""

    kind = "lookup"  # /health's ``speculation``

    def __init__(self, k: int = 8, ngram_max: int = 4, ngram_min: int = 2) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError("need 1 <= ngram_min <= ngram_max")
        self.k, self.ngram_max, self.ngram_min = k, ngram_max, ngram_min

    def draft(self, context: Sequence[int], k: int) -> list[int]:
        k = min(k, self.k)
        ids = np.asarray(context, dtype=np.int64)
        for n in range(min(self.ngram_max, len(ids) - 1), self.ngram_min - 1, -1):
            tail = ids[-n:]
            # windows starting at j = 0 .. len-n-1 (never the tail itself)
            windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return ids[start: start + k].tolist()
        return []


class DraftModel:
    """Draft with a smaller engine that shares the target's tokenizer (greedy, its own token-exact cache)."""

    kind = "draft"  # /health's ``speculation``

    def __init__(self, engine, k: int = 4) -> None:
        self.engine, self.k = engine, k

    def draft(self, context: Sequence[int], k: int) -> list[int]:
        from localcoder.engines.base import GenerationRequest

        k = min(k, self.k, self.engine.n_ctx - len(context))
        if k <= 0:
            return []
        return list(self.engine.generate(GenerationRequest(list(context), max_tokens=k)))

    def close(self) -> None:
        self.engine.close()


@dataclass
class Speculation:
    """What a backend lends the verify loop: a drafter and batched evaluation on the request's cache.

    ``forward_all(ids)`` appends ``ids`` to the cache and returns (len(ids), V) logits, row i being the
    distribution after ``ids[: i + 1]``; ``rollback(n)`` drops the last ``n`` evaluated tokens from the
    KV cache and its token record; ``room()`` is how many more tokens the cache can take."""

    drafter: Drafter
    forward_all: Callable[[list[int]], np.ndarray]
    rollback: Callable[[int], None]
    room: Callable[[], int]
    sizes: tuple[int, ...] = (3, 7)  # allowed draft lengths, smallest first (see DraftSize)


class DraftSize:
    """How many drafted tokens to verify next. Measured on our 2-core CPU (0.5B, Q4_K_M): a forward of
    1 token costs ~25 ms, of 2 ~60, 3 ~90, 4 ~78, 8 ~114 (llama.cpp's matmul tiles take 4 columns, so 2-3
    tokens cost 2-3 single steps). So verify batches of 4 or 8 (drafts of 3 or 7), never shorter drafts;
    grow to the next size after a fully accepted draft, fall back to the smallest after a rejection."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = sorted(sizes)
        self.level = 0

    @property
    def wanted(self) -> int:
        return self.sizes[self.level]

    def fit(self, drafts: list[int]) -> list[int]:
        """``drafts`` cut to the largest allowed size they fill (none when shorter than the smallest)."""
        fitting = [n for n in self.sizes if n <= len(drafts)]
        return drafts[: fitting[-1]] if fitting else []

    def update(self, drafted: int, accepted: int) -> None:
        full = accepted == drafted
        self.level = min(self.level + 1, len(self.sizes) - 1) if full else 0


def verify(drafts: Sequence[int], rows: np.ndarray, choose: Callable[[np.ndarray, int], int], step: int
           ) -> tuple[list[int], int]:
    """Greedy verification. ``rows[i]`` are the target's logits after the drafts before ``drafts[i]``
    (``rows`` has len(drafts) + 1 rows); ``step`` is the output index of ``drafts[0]``. Returns the
    accepted drafts (the longest prefix equal to the target's own choices) and the target's own token
    after them."""
    accepted: list[int] = []
    for i, d in enumerate(drafts):
        own = choose(rows[i], step + i)
        if own != d:
            return accepted, own
        accepted.append(d)
    return accepted, choose(rows[len(drafts)], step + len(drafts))


def decode(request: "GenerationRequest", timings: "Timings", logits: np.ndarray, forward: Callable[[list[int]], np.ndarray],
           spec: Speculation, choose: Callable[[np.ndarray, int], int], clock) -> Iterator[int]:
    """The greedy decode loop with speculation; same contract as plain decoding in ``run_tokens``:
    at most ``max_tokens`` tokens counted (a stop token counts and is not yielded), cancellation checked
    before every token, ``timings`` filled as it goes. The cache stays token-exact throughout: rejected
    drafts are rolled back before any token is yielded."""
    context = list(request.tokens)
    pending = [choose(logits, 0)]  # target-chosen tokens not yet emitted
    size = DraftSize(spec.sizes)
    step = 0
    while pending:
        for token in pending:
            if request.cancel.cancelled:
                timings.cancelled = True
                return
            timings.predicted_n += 1
            step += 1
            if token in request.stop_token_ids:
                timings.stopped_by_token = True
                timings.predicted_ms = clock.ms()
                return
            yield token
            context.append(token)
            timings.predicted_ms = clock.ms()
            if step >= request.max_tokens:
                return
        last = pending[-1]
        k = min(size.wanted, request.max_tokens - step, spec.room() - 1)
        drafts = size.fit(spec.drafter.draft(context, k)) if k >= size.sizes[0] else []
        timings.target_forwards += 1
        if not drafts:
            pending = [choose(forward([last]), step)]
            continue
        rows = spec.forward_all([last] + drafts)
        accepted, own = verify(drafts, rows, choose, step)
        spec.rollback(len(drafts) - len(accepted))
        size.update(len(drafts), len(accepted))
        timings.draft_n += len(drafts)
        timings.draft_accepted_n += len(accepted)
        pending = accepted + [own]
        timings.predicted_ms = clock.ms()


def build_drafter(kind: str, draft_model: str, load: Callable[[str], object]) -> Drafter | None:
    """The drafter a config asks for: ``off`` none, ``lookup`` a PromptLookup, ``draft`` a DraftModel on
    the engine ``load(draft_model)`` returns; ``auto`` is ``draft`` when a draft model is named, else ``off``."""
    from localcoder.errors import InvalidRequest

    if kind not in SPECULATION:
        raise InvalidRequest(f"speculation must be one of {SPECULATION}, got {kind!r}", param="speculation")
    if kind == "auto":  # a draft model given is a request to draft with it
        kind = "draft" if draft_model else "off"
    if kind == "off":
        return None
    if kind == "lookup":
        return PromptLookup()
    if not draft_model:
        raise InvalidRequest("speculation = draft needs a draft_model", param="draft_model")
    return DraftModel(load(draft_model))
