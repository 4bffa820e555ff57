"""Token healing at the cursor.

The cursor may split a token: the user typed ``ret`` and the model would write ``return`` as one
token, but the prompt ends with the token ``ret`` and a model rarely continues a token it has
never seen split. So the prompt backs off its last token (and more while that cut would fall inside
a UTF-8 character), and the first generated tokens are constrained to spell the removed bytes:
each must start with the bytes still to spell, or be a prefix of them. The completion then drops
those bytes again (the client inserts at the cursor, after what was typed).

Only a token that some vocabulary token extends can have been split; a byte-level vocabulary never
heals. Backing off the last token keeps the prompt cache-friendly: typing one more character within
a word usually leaves the backed-off prompt as it was.
"""

from __future__ import annotations

import bisect
import weakref
from typing import Callable, Sequence

import numpy as np

from localcoder.engines.base import Tokenizer

MAX_BACKOFF = 4  # tokens; a UTF-8 character is at most 4 bytes


class VocabBytes:
    """Every token's bytes, sorted so that "tokens starting with b" is one bisect range. Specials excluded."""

    def __init__(self, tok: Tokenizer, n_vocab: int) -> None:
        specials = set(tok.eos_token_ids)
        pieces: list[bytes] = []
        for i in range(n_vocab):
            try:
                b = tok.token_bytes(i)
            except Exception:  # ids past the tokenizer (padded embedding rows)
                b = b""
            if b[:1] in (b"<", b"[", b" ") and len(b) > 2 and _is_special(tok, i, b):
                specials.add(i)
            pieces.append(b)
        self.pieces = pieces
        self.n_vocab = n_vocab
        keep = [i for i, b in enumerate(pieces) if b and i not in specials]
        keep.sort(key=pieces.__getitem__)
        self._sorted_ids = np.asarray(keep, dtype=np.int64)
        self._sorted = [pieces[i] for i in keep]
        self._by_bytes: dict[bytes, list[int]] = {}
        for i in keep:
            self._by_bytes.setdefault(pieces[i], []).append(i)
        self._allowed: dict[bytes, np.ndarray] = {}

    def _range(self, prefix: bytes) -> tuple[int, int]:
        lo = bisect.bisect_left(self._sorted, prefix)
        succ = _successor(prefix)
        return lo, (bisect.bisect_left(self._sorted, succ) if succ else len(self._sorted))

    def extending(self, prefix: bytes) -> np.ndarray:
        """Ids whose bytes start with ``prefix``."""
        lo, hi = self._range(prefix)
        return self._sorted_ids[lo:hi]

    def allowed(self, rest: bytes) -> np.ndarray:
        """Ids that may come next while ``rest`` remains to be spelled: they start with it, or are a prefix of it."""
        if rest not in self._allowed:
            shorter = [i for n in range(1, len(rest)) for i in self._by_bytes.get(rest[:n], ())]
            self._allowed[rest] = np.concatenate([self.extending(rest), np.asarray(shorter, dtype=np.int64)])
        return self._allowed[rest]

    def can_extend(self, data: bytes) -> bool:
        """Some token is longer than ``data`` and starts with it (so a cut after ``data`` may split it).
        In sorted order the tokens equal to ``data`` come first in its range, the longer ones last."""
        lo, hi = self._range(data)
        return hi > lo and self._sorted[hi - 1] != data


def _successor(b: bytes) -> bytes:
    """The smallest byte string greater than every string starting with ``b`` (b"" when none)."""
    b = b.rstrip(b"\xff")
    return b[:-1] + bytes([b[-1] + 1]) if b else b""


def _is_special(tok: Tokenizer, i: int, b: bytes) -> bool:
    try:
        return tok.special_token_id(b.decode("utf-8")) == i
    except UnicodeDecodeError:
        return False


_TABLES: "weakref.WeakKeyDictionary[object, VocabBytes]" = weakref.WeakKeyDictionary()


def vocab_size(tok: Tokenizer) -> int:
    """Number of token ids of ``tok`` (``n_vocab`` where the tokenizer says it; llama.cpp and HF otherwise)."""
    n = getattr(tok, "n_vocab", None)
    if n is None and hasattr(tok, "_lib") and hasattr(tok, "_vocab"):  # LlamaTokenizer
        n = tok._lib.llama_vocab_n_tokens(tok._vocab)  # type: ignore[attr-defined]
    if n is None and hasattr(tok, "tok"):  # HFTokenizer
        n = len(tok.tok)  # type: ignore[attr-defined]
    if n is None:
        raise TypeError(f"cannot tell the vocabulary size of {type(tok).__name__}")
    return int(n)


def vocab_bytes(tok: Tokenizer) -> VocabBytes:
    """The table of ``tok``, built once (about half a second for a 150k vocabulary) and cached."""
    table = _TABLES.get(tok)
    if table is None:
        table = _TABLES[tok] = VocabBytes(tok, vocab_size(tok))
    return table


def back_off(tok: Tokenizer, prefix_ids: Sequence[int]) -> tuple[list[int], bytes]:
    """(the prefix without the tokens the cursor may have split, their bytes). Nothing backed off when
    the last token cannot be extended by any token."""
    if not prefix_ids:
        return list(prefix_ids), b""
    table = vocab_bytes(tok)
    k = 1
    while k < min(MAX_BACKOFF, len(prefix_ids)) and _starts_mid_char(table, prefix_ids[-k:]):
        k += 1
    removed = b"".join(table.pieces[i] if i < table.n_vocab else tok.token_bytes(i) for i in prefix_ids[-k:])
    if not removed or not removed.strip() or not table.can_extend(removed):
        # whitespace (the indentation at a line start) is left alone: healing it measured worse
        # (HumanEval partial, 0% typed: ES 0.761 healed vs 0.804 plain, n=40; docs/latency.md)
        return list(prefix_ids), b""
    return list(prefix_ids[:-k]), removed


def _starts_mid_char(table: VocabBytes, ids: Sequence[int]) -> bool:
    first = table.pieces[ids[0]] if ids[0] < table.n_vocab else b""
    return bool(first) and (first[0] & 0xC0) == 0x80


class Heal:
    """The constraint a generation carries (``GenerationRequest.heal``): its first tokens spell ``text``."""

    def __init__(self, table: VocabBytes, text: bytes) -> None:
        self.table, self.text = table, text

    def start(self) -> "Healer":
        return Healer(self)


class Healer:
    """One generation's progress through the constraint. ``choose`` is called once per output step, in
    order (plain and speculative decoding alike); the bytes still to spell at each step are kept by step."""

    def __init__(self, heal: Heal) -> None:
        self.table = heal.table
        self._rest = {0: heal.text}

    def choose(self, row: np.ndarray, step: int, pick: Callable[[np.ndarray], int]) -> int:
        rest = self._rest.get(step, b"")
        if not rest:
            return pick(row)
        ids = self.table.allowed(rest)
        ids = ids[ids < row.shape[0]]
        masked = np.full(row.shape, -np.inf, dtype=row.dtype)
        masked[ids] = row[ids]
        token = pick(masked)
        piece = self.table.pieces[token] if token < self.table.n_vocab else b""
        self._rest[step + 1] = rest[len(piece):] if rest.startswith(piece) else b""
        return token


# Engines whose token loop is ``run_tokens`` (it applies the constraint); a remote engine cannot.
HEALING_ENGINES = frozenset({"llama", "torch", "onnx", "fake"})


class Prompt(list):
    """A prompt's token ids and the constraint its generation carries (None: no healing)."""

    def __init__(self, ids: Sequence[int], heal: Heal | None = None) -> None:
        super().__init__(ids)
        self.heal = heal


def heal_prefix(tok: Tokenizer, prefix_ids: Sequence[int]) -> tuple[list[int], Heal | None]:
    """The prefix ids to put in the prompt and the constraint for the generation (None when nothing is backed off)."""
    kept, removed = back_off(tok, prefix_ids)
    return kept, (Heal(vocab_bytes(tok), removed) if removed else None)
