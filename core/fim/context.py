"""Tokenizer-aware context budgeting around the cursor.

The prefix is trimmed from the top and the suffix from the bottom, at line boundaries. The prefix
start moves in coarse, stable steps so that, while the user types, the cut stays put and the KV
cache of the prompt's beginning stays valid (a cut that slid by one line per keystroke would
invalidate the whole cache every time): the possible cuts are the line boundaries where the tokens
counted from the top of the file pass a multiple of a quarter of the budget. They depend only on the
text above them, so typing below never moves them; the window starts at the first cut after which
the rest fits, and jumps one quarter of the budget at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from localcoder.engines.base import Tokenizer
from localcoder.fim.formats import Snippet

PREFIX_STEPS = 4  # the prefix window moves in steps of 1/4 of its budget


@dataclass(frozen=True)
class Budget:
    prefix_tokens: int = 1024
    suffix_tokens: int = 256
    extra_tokens: int = 512

    @classmethod
    def from_config(cls, completion) -> "Budget":
        """The budget of a ``CompletionConfig`` (``cfg.completion``)."""
        return cls(completion.prefix_tokens, completion.suffix_tokens, completion.extra_tokens)


@dataclass
class Fitted:
    prefix_ids: list[int]
    suffix_ids: list[int]
    snippets: list[Snippet]
    truncated: bool


def fit(tok: Tokenizer, prefix: str, suffix: str, snippets: Sequence[Snippet], budget: Budget) -> Fitted:
    prefix_ids, cut_pre = _fit_prefix(tok, prefix, budget.prefix_tokens)
    suffix_ids, cut_suf = _fit_suffix(tok, suffix, budget.suffix_tokens)
    kept, cut_extra = _fit_snippets(tok, snippets, budget.extra_tokens)
    return Fitted(prefix_ids, suffix_ids, kept, cut_pre or cut_suf or cut_extra)


def _fit_prefix(tok: Tokenizer, text: str, budget: int) -> tuple[list[int], bool]:
    lines = text.splitlines(keepends=True)
    counts = [len(tok.tokenize(line)) for line in lines]  # lines above the cursor's repeat: a tokenizer's memo
    if sum(counts) <= budget:  # joining lines never adds tokens (pre-tokens do not cross a line end)
        ids = tok.tokenize(text)
        if len(ids) <= budget:
            return ids, False
    cuts = stable_cuts(counts[:-1], max(1, budget // PREFIX_STEPS))  # never inside the cursor's line
    tail, before = sum(counts), 0
    for cut in cuts:  # first the cheap estimate from line counts, then re-tokenize to be exact
        tail, before = tail - sum(counts[before:cut]), cut
        if tail > budget:
            continue
        ids = tok.tokenize("".join(lines[cut:]))
        if len(ids) <= budget:
            return ids, True
    # The cursor's own line region is longer than the budget: keep its last ``budget`` tokens.
    return (tok.tokenize(lines[-1])[-budget:] if budget > 0 else []), True


def stable_cuts(counts: Sequence[int], step: int) -> list[int]:
    """Line indices where the token count from the top first reaches each multiple of ``step``."""
    cuts, total, mark = [], 0, step
    for i, n in enumerate(counts):
        total += n
        if total >= mark:
            cuts.append(i + 1)
            mark = (total // step + 1) * step
    return cuts


def _fit_suffix(tok: Tokenizer, text: str, budget: int) -> tuple[list[int], bool]:
    ids = tok.tokenize(text)
    if len(ids) <= budget:
        return ids, False
    lines = text.splitlines(keepends=True)
    end, total = 0, 0
    while end < len(lines) and total + len(tok.tokenize(lines[end])) <= budget:
        total += len(tok.tokenize(lines[end]))
        end += 1
    while end > 0:
        ids = tok.tokenize("".join(lines[:end]))
        if len(ids) <= budget:
            return ids, True
        end -= 1
    return tok.tokenize(text)[:budget], True


def _fit_snippets(tok: Tokenizer, snippets: Sequence[Snippet], budget: int) -> tuple[list[Snippet], bool]:
    kept: list[Snippet] = []
    used = 0
    for s in snippets:  # callers order snippets by relevance, most relevant first
        n = len(tok.tokenize(s.path)) + len(tok.tokenize(s.text)) + 4
        if used + n > budget:
            return kept, True
        kept.append(s)
        used += n
    return kept, False
