"""Typing through a suggestion: when the user types the first characters of the completion they were just
shown, the answer is the rest of it, with no model call.

Editors do this for their ghost text (Copilot; llama.vim keeps a cache of completions and, on each keystroke,
looks up the contexts with up to 128 of the last typed characters removed and shows what is left of a cached
suggestion that starts with them). Doing it here gives it to every surface and every thin client (our VS
Code and Neovim plugins, any ``/infill`` or OpenAI client) and to the LSP over HTTP.

The rule, for greedy requests only (a sampled completion is not "the" suggestion): a request whose prefix
is a recent request's prefix plus typed text ``t``, with the same suffix, snippets and options, whose
completion started with ``t`` and went on past it (and was not cancelled), is answered with that completion
minus ``t``: what the editor was showing. A suggestion cut by the token or time limit is reused too, as
editors do (its rest is shorter than a fresh request's could be, but it is what the user was reading; measured
in the editor replay, 7 of 20 mid-file keystrokes typed into such a suggestion, mostly indentation).
Anything else (an edit elsewhere, a deletion, a character that departs from the suggestion) is a miss and
goes to the model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

MAX_TYPED = 128  # like llama.vim's look-back: characters typed through one suggestion


@dataclass(frozen=True)
class Shown:
    prefix: str
    text: str  # what was inserted at the cursor
    stop_type: str
    mode: str


class TypedThrough:
    """The last ``capacity`` greedy completions, per request options (everything but the prefix)."""

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[Hashable, str], Shown] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def options(req) -> Hashable | None:
        """Everything a completion depends on besides the prefix; None: not reusable (sampled). Not the
        cursor line's indentation (llama.cpp's ``n_indent``, which grows with every space typed at a line
        start) nor the time budget: like llama.vim's cache, the context is what the key holds."""
        s = req.sampling
        if s.temperature > 0:
            return None
        budget = req.budget and (req.budget.prefix_tokens, req.budget.suffix_tokens, req.budget.extra_tokens)
        return (req.suffix, tuple((sn.path, sn.text) for sn in req.snippets), req.path, req.repo, req.language,
                req.mode, req.max_tokens, tuple(req.stop), req.order, budget)

    def lookup(self, req) -> Shown | None:
        """The rest of a recent suggestion the prefix typed into (``Shown.text`` is that rest), or None."""
        key = self.options(req)
        if key is None:
            return None
        for (opts, prefix), shown in reversed(self._entries.items()):
            if opts != key or not req.prefix.startswith(prefix):
                continue
            typed = req.prefix[len(prefix):]
            if 0 < len(typed) <= MAX_TYPED and len(shown.text) > len(typed) and shown.text.startswith(typed):
                self.hits += 1
                self._entries.move_to_end((opts, prefix))
                return Shown(req.prefix, shown.text[len(typed):], shown.stop_type, shown.mode)
        self.misses += 1
        return None

    def store(self, req, text: str, stop_type: str, mode: str) -> None:
        key = self.options(req)
        if key is None or stop_type == "cancelled" or not text:
            return
        self._entries[(key, req.prefix)] = Shown(req.prefix, text, stop_type, mode)
        self._entries.move_to_end((key, req.prefix))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
