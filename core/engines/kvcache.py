"""Token-exact KV-cache reuse: how much of a new prompt the cache already holds."""

from __future__ import annotations

from typing import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Tracks the token ids whose keys/values an engine holds, and plans reuse.

    ``plan(prompt)`` returns how many leading tokens can be kept: the longest common token prefix,
    but always leaving at least one prompt token to evaluate (its logits start decoding).
    ``commit(tokens)`` records what the cache holds after evaluation/decoding.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def plan(self, prompt: Sequence[int]) -> int:
        keep = common_prefix_len(self.tokens, prompt)
        return min(keep, len(prompt) - 1)

    def truncate(self, n: int) -> None:
        del self.tokens[n:]

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)

    def clear(self) -> None:
        self.tokens.clear()
