"""Token-exact KV-cache reuse: how much of a new prompt the cache already holds, and which slot holds it."""

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


class SlotTable:
    """Several token-exact caches (one per llama.cpp sequence) and the rule that picks one per request.

    A request goes to the slot whose tokens share the longest common prefix with it, provided that prefix
    covers at least ``similarity`` of the shorter of the two (like llama-server's
    ``--slot-prompt-similarity``: the same document, not just a shared header; measured against the
    shorter so that a slot holding a prompt plus its completion still matches that prompt alone);
    otherwise to a slot to overwrite: a never-used one, else the least recently used of those that only a
    background prefill (a warm-up, nothing to generate) filled, else the least recently used. A warm-up
    therefore never evicts the file the user is typing in while a slot of warm-ups exists: with typed-through
    answers no request refreshes that file's slot, and llama.vim's warm-ups at every buffer switch (its
    extra-context ring, a prompt of its own) used to evict it (two files alternating: two 13 s cold
    prefills in 40 keystrokes, bench 2026-12-04). Each slot's ``PrefixCache`` then plans the token-exact
    reuse, so a slot that holds other text only ever contributes the tokens that are identical.

    Keys and values depend on the LoRA adapter they were computed under (a specialist bundle switches
    adapters per document), so each slot carries the ``tag`` of its adapter: a slot with another tag matches
    nothing, and its tokens are dropped when it is taken. Without adapters every tag is None.
    """

    def __init__(self, n_slots: int, similarity: float = 0.5) -> None:
        if n_slots < 1:
            raise ValueError("a slot table needs at least one slot")
        self.slots = [PrefixCache() for _ in range(n_slots)]
        self.similarity = similarity
        self._last_used = [0] * n_slots  # 0 = never used
        self._background = [False] * n_slots  # filled by background prefills only since it was last taken
        self.tags: list[object] = [None] * n_slots  # the adapter each slot's keys/values were computed under
        self._clock = 0

    def __len__(self) -> int:
        return len(self.slots)

    def choose(self, prompt: Sequence[int], background: bool = False, tag: object = None) -> int:
        """Index of the slot for ``prompt`` (marks it most recently used); ``background``: a prefill with
        nothing to generate; ``tag``: the adapter it runs under (the slot's record is cleared when it held
        another's: the caller then drops its KV cells, as for any prefix it does not keep)."""
        best, best_len = -1, 0
        for i, slot in enumerate(self.slots):
            if self.tags[i] != tag:
                continue
            n = common_prefix_len(slot.tokens, prompt)
            if n > best_len and n >= self.similarity * min(len(slot.tokens), len(prompt)):
                best, best_len = i, n
        if best < 0:  # overwrite one: never used, else warm-ups only, else the least recently used
            best = min(range(len(self.slots)),
                       key=lambda i: (self._last_used[i] > 0, not self._background[i], self._last_used[i]))
            self._background[best] = background
        else:
            self._background[best] = self._background[best] and background
        if self.tags[best] != tag:
            self.slots[best].clear()
            self.tags[best] = tag
        self._clock += 1
        self._last_used[best] = self._clock
        return best

    def cached(self, prompt: Sequence[int], tag: object = None) -> int:
        """The most leading tokens of ``prompt`` that one slot (under adapter ``tag``) already holds: about
        what the prompt would not have to evaluate (``localcoder.completion``'s jump window asks)."""
        return max((common_prefix_len(slot.tokens, prompt) for i, slot in enumerate(self.slots)
                    if self.tags[i] == tag), default=0)

    def clear(self) -> None:
        for slot in self.slots:
            slot.clear()
        self._last_used = [0] * len(self.slots)
        self._background = [False] * len(self.slots)
        self.tags = [None] * len(self.slots)
