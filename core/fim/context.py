"""Tokenizer-aware context budgeting around the cursor.

The prefix is trimmed from the top and the suffix from the bottom, at line boundaries. The prefix
start moves in whole chunks of lines so that, while the user types, the cut stays put and the KV
cache of the prompt's beginning stays valid (a cut that slid by one line per keystroke would
invalidate the whole cache every time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from localcoder.engines.base import Tokenizer
from localcoder.fim.formats import Snippet

PREFIX_CHUNK_LINES = 16


@dataclass(frozen=True)
class Budget:
    prefix_tokens: int = 1024
    suffix_tokens: int = 256
    extra_tokens: int = 512


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
    ids = tok.tokenize(text)
    if len(ids) <= budget:
        return ids, False
    lines = text.splitlines(keepends=True)
    counts = [len(tok.tokenize(line)) for line in lines]
    start, total = len(lines), 0
    while start > 0 and total + counts[start - 1] <= budget:
        start -= 1
        total += counts[start]
    # Round the start up to a chunk boundary (counted from the top of the file, so it is stable),
    # then move down whole chunks until the re-tokenized remainder fits.
    start = -(-start // PREFIX_CHUNK_LINES) * PREFIX_CHUNK_LINES
    while start < len(lines):
        ids = tok.tokenize("".join(lines[start:]))
        if len(ids) <= budget:
            return ids, True
        start += PREFIX_CHUNK_LINES
    # The cursor's own line region is longer than the budget: keep its last ``budget`` tokens.
    return (tok.tokenize(lines[-1])[-budget:] if budget > 0 else []), True


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
