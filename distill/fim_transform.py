"""FIM transformation, token alignment between teacher and student orders, packing, tokenized cache.

A training example is one chunk of a source file, either left-to-right or (with probability
``rate``) cut into prefix / middle / suffix and laid out in the *serving* prompt format via
``localcoder.fim.formats`` (the same token ids ``Completer`` builds), followed by the middle and EOS.

Teacher and student may read different orders (teacher PSM, student SPM): both sequences hold the
same content tokens, permuted. ``t_index[j]`` is the teacher position whose next-token
distribution predicts the same content token as student position ``j``, so per-token KD lines up on
every position (prefix, suffix and middle), not only on the middle.

Row arrays of a packed dataset (N rows, L = seq_len):
    student_ids (N, L) int32   teacher_ids (N, L) int32   t_index (N, L) int32 (row-local)
    loss_mask   (N, L) uint8   position j carries loss (its target student_ids[j+1] is content)
    mid_mask    (N, L) uint8   ... and that target is a middle token or the EOS after the middle
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from localcoder.distill.data import SourceFile
from localcoder.errors import InputFileError, InvalidRequest
from localcoder.fim.formats import FimFormat

SPAN_KINDS = ("char", "line", "block", "cursor")
CHARS_PER_TOKEN = 3.2  # code with a BPE vocabulary; only sizes the chunks (exact lengths are trimmed)
CACHE_VERSION = 3  # 3: rows record their main source file (Packed.source)


@dataclass(frozen=True)
class FimSpec:
    seq_len: int = 256
    rate: float = 0.9  # fraction of chunks turned into FIM examples (the rest stay left-to-right)
    order: str = "psm"  # the student's order: psm | spm
    teacher_order: str = "psm"
    span_kinds: tuple[str, ...] = ("line", "block", "char")
    max_block_lines: int = 12

    def check(self) -> None:
        if self.seq_len < 32:
            raise InvalidRequest(f"seq_len must be >= 32, got {self.seq_len}", param="seq_len")
        if not 0.0 <= self.rate <= 1.0:
            raise InvalidRequest(f"FIM rate must be in [0, 1], got {self.rate}", param="fim_rate")
        for o in (self.order, self.teacher_order):
            if o not in ("psm", "spm"):
                raise InvalidRequest(f"FIM order must be psm or spm, got {o!r}", param="fim_order")
        bad = [k for k in self.span_kinds if k not in SPAN_KINDS]
        if bad or not self.span_kinds:
            raise InvalidRequest(f"span kinds must be among {SPAN_KINDS}, got {self.span_kinds}", param="span_kinds")


# ---- spans ------------------------------------------------------------------------------------------------
def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def split_span(text: str, kind: str, rng: random.Random, max_block_lines: int = 12) -> tuple[str, str, str]:
    """(prefix, middle, suffix) with prefix + middle + suffix == text.

    char: two uniform cut points (Bavarian et al. 2022); line: one whole non-blank line;
    block: a line plus the following lines indented deeper than it (its body), up to max_block_lines;
    cursor: where people pause while typing, inside a line after its indentation; the middle is the
    rest of that line (without its newline) or, one time in three, up to three more lines.
    """
    if kind == "char":
        a, b = sorted((rng.randrange(len(text) + 1), rng.randrange(len(text) + 1)))
        return text[:a], text[a:b], text[b:]
    lines = text.splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if line.strip()]
    if not candidates:
        return split_span(text, "char", rng)
    i = candidates[rng.randrange(len(candidates))]
    start = sum(len(line) for line in lines[:i])
    if kind == "cursor":
        body = lines[i].rstrip("\r\n")
        cut = start + rng.randrange(_indent(body), len(body))
        last = min(len(lines), i + 1 + (rng.randrange(1, 4) if rng.random() < 1 / 3 else 0))
        stop = start + len(body) if last == i + 1 else sum(len(line) for line in lines[:last])
        return text[:cut], text[cut:stop], text[stop:]
    end = i + 1
    if kind == "block":
        base = _indent(lines[i])
        while end < len(lines) and end - i < max_block_lines and (
                not lines[end].strip() or _indent(lines[end]) > base):
            end += 1
        while end - 1 > i and not lines[end - 1].strip():  # do not end the block on blank lines
            end -= 1
    elif kind != "line":
        raise InvalidRequest(f"unknown span kind {kind!r}", param="span_kinds")
    stop = start + sum(len(line) for line in lines[i:end])
    return text[:start], text[start:stop], text[stop:]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Cut a file at line boundaries into pieces of at most ~max_chars (a longer line stays whole)."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if cur and size + len(line) > max_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        chunks.append("".join(cur))
    return [c for c in chunks if c.strip()]


# ---- one example --------------------------------------------------------------------------------------------
@dataclass
class Example:
    student_ids: list[int]
    teacher_ids: list[int]
    t_index: list[int]  # (T,) teacher position for each student position
    loss_mask: list[int]  # (T,)
    mid_mask: list[int]  # (T,)
    source: int = -1  # index of the file it was cut from (make_examples' ``files``)


def _layout(fmt: FimFormat, tok, segs: dict[str, list[int]], order: str) -> tuple[list[int], list[tuple]]:
    """Token ids of a FIM example in ``order`` and, per position, the key of the token there:
    ("p"|"s"|"m"|"e", i) for content tokens, ("marker", n) for format tokens."""
    ids = fmt.build(tok, segs["p"], segs["s"], order=order) + segs["m"] + segs["e"]
    keys: list[tuple] = []
    nmark = 0
    queue = {"p": 0, "s": 0}
    for tid in ids[: len(ids) - len(segs["m"]) - len(segs["e"])]:
        seg = _next_segment(order, queue, segs)
        if seg is not None and segs[seg][queue[seg]] == tid and _in_segment_region(keys, seg, order, nmark):
            keys.append((seg, queue[seg]))
            queue[seg] += 1
        else:
            keys.append(("marker", nmark))
            nmark += 1
    keys += [("m", i) for i in range(len(segs["m"]))] + [("e", i) for i in range(len(segs["e"]))]
    if queue != {"p": len(segs["p"]), "s": len(segs["s"])}:
        raise AssertionError(f"FIM layout of {fmt.name} did not place every prefix/suffix token")
    return ids, keys


def _next_segment(order: str, queue: dict[str, int], segs: dict[str, list[int]]) -> str | None:
    first, second = ("p", "s") if order == "psm" else ("s", "p")
    if queue[first] < len(segs[first]):
        return first
    if queue[second] < len(segs[second]):
        return second
    return None


def _in_segment_region(keys: list[tuple], seg: str, order: str, nmark: int) -> bool:
    """Content of the first segment follows marker 1 (+ optional space tokens); of the second, marker 2."""
    first = "p" if order == "psm" else "s"
    return nmark >= (1 if seg == first else 2)


def encode_example(tok, fmt: FimFormat, prefix: str, middle: str, suffix: str, spec: FimSpec) -> Example:
    """Tokenize the three parts separately (as serving does), lay out both orders, align, trim to seq_len."""
    eos = [_eos_id(tok)]
    p, m, s = tok.tokenize(prefix), tok.tokenize(middle), tok.tokenize(suffix)
    budget = spec.seq_len - 4 - len(eos)  # three markers, and room for a CodeLlama-style space
    m = m[: max(budget // 2, budget - len(p) - len(s))]
    over = len(p) + len(m) + len(s) - budget
    if over > 0:  # trim the suffix's far end first (kept small at serving too), then the prefix's start
        cut_s = min(len(s), max(over - len(p) // 2, over // 2))
        s = s[: len(s) - cut_s]
        over -= cut_s
        p = p[over:] if over > 0 else p
    segs = {"p": p, "s": s, "m": m, "e": eos}
    s_ids, s_keys = _layout(fmt, tok, segs, spec.order)
    t_ids, t_keys = _layout(fmt, tok, segs, spec.teacher_order)
    return _aligned(s_ids, s_keys, t_ids, t_keys)


def encode_plain(tok, text: str, spec: FimSpec) -> Example:
    """A left-to-right example (the 1 - rate share): same ids for teacher and student."""
    ids = tok.tokenize(text)[: spec.seq_len - 1] + [_eos_id(tok)]
    keys = [("p", i) for i in range(len(ids) - 1)] + [("e", 0)]
    return _aligned(ids, keys, ids, keys)


def _aligned(s_ids, s_keys, t_ids, t_keys) -> Example:
    where = {k: i for i, k in enumerate(t_keys)}
    n = len(s_ids)
    t_index, loss, mid = list(range(n)), [0] * n, [0] * n
    is_fim = any(k[0] == "marker" for k in s_keys)
    for j in range(n - 1):
        key = s_keys[j + 1]  # what position j predicts
        if key[0] == "marker":
            continue
        t_index[j] = where[key] - 1
        loss[j] = 1
        mid[j] = int(is_fim and key[0] in ("m", "e"))
    return Example(list(s_ids), list(t_ids), t_index, loss, mid)


def _eos_id(tok) -> int:
    ids = sorted(tok.eos_token_ids)
    if not ids:
        raise InvalidRequest("the tokenizer has no end-of-text token", param="tokenizer")
    endoftext = tok.special_token_id("<|endoftext|>")
    return endoftext if endoftext is not None else ids[0]


def make_examples(tok, fmt: FimFormat, files: Sequence[SourceFile], spec: FimSpec, seed: int,
                  rewrite: Callable[[list[tuple[str, str, str]]], list[str]] | None = None) -> list[Example]:
    """Chunk every file, FIM-transform a ``rate`` share of the chunks; deterministic in ``seed``.
    ``rewrite`` (sequence-level KD) maps the (prefix, middle, suffix) triples to the middles to train on."""
    rng = random.Random(seed)
    items: list[tuple[str, ...]] = []
    sources: list[int] = []
    for fi, f in enumerate(files):
        for chunk in chunk_text(f.text, int(spec.seq_len * CHARS_PER_TOKEN)):
            sources.append(fi)
            if rng.random() < spec.rate:
                kind = spec.span_kinds[rng.randrange(len(spec.span_kinds))]
                items.append(split_span(chunk, kind, rng, spec.max_block_lines))
            else:
                items.append((chunk,))
    if rewrite is not None:
        triples = [it for it in items if len(it) == 3]
        middles = iter(rewrite(triples))
        items = [(it[0], next(middles), it[2]) if len(it) == 3 else it for it in items]
    examples = [encode_example(tok, fmt, *it, spec) if len(it) == 3 else encode_plain(tok, it[0], spec) for it in items]
    for ex, fi in zip(examples, sources):
        ex.source = fi
    return examples


# ---- packing ---------------------------------------------------------------------------------------------
@dataclass
class Packed:
    student_ids: np.ndarray  # (N, L) int32
    teacher_ids: np.ndarray  # (N, L) int32
    t_index: np.ndarray  # (N, L) int32
    loss_mask: np.ndarray  # (N, L) uint8
    mid_mask: np.ndarray  # (N, L) uint8
    source: np.ndarray | None = None  # (N,) int32: the file (build_split's ``files`` index) most of a row is from

    def __len__(self) -> int:
        return int(self.student_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.loss_mask.sum())

    def rows(self, idx) -> "Packed":
        return Packed(*(a[idx] for a in self.arrays()), source=None if self.source is None else self.source[idx])

    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.student_ids, self.teacher_ids, self.t_index, self.loss_mask, self.mid_mask


def pack(examples: Sequence[Example], seq_len: int, pad_id: int) -> Packed:
    """Greedy first-fit in order: whole examples only (alignment stays inside an example); the rest of
    a row is padding with loss 0."""
    rows: list[list[Example]] = []
    cur: list[Example] = []
    used = 0
    for ex in examples:
        n = len(ex.student_ids)
        if cur and used + n > seq_len:
            rows.append(cur)
            cur, used = [], 0
        cur.append(ex)
        used += n
    if cur:
        rows.append(cur)
    N = len(rows)
    arr = {k: np.zeros((N, seq_len), dtype) for k, dtype in
           (("s", np.int32), ("t", np.int32), ("i", np.int32), ("l", np.uint8), ("m", np.uint8))}
    arr["s"][:] = pad_id
    arr["t"][:] = pad_id
    arr["i"][:] = np.arange(seq_len)
    src = np.full(N, -1, np.int32)
    for r, row in enumerate(rows):
        off = 0
        src[r] = max(row, key=lambda ex: len(ex.student_ids)).source
        for ex in row:
            n = len(ex.student_ids)
            arr["s"][r, off:off + n] = ex.student_ids
            arr["t"][r, off:off + n] = ex.teacher_ids
            arr["i"][r, off:off + n] = np.asarray(ex.t_index) + off
            arr["l"][r, off:off + n] = ex.loss_mask
            arr["m"][r, off:off + n] = ex.mid_mask
            off += n
    return Packed(arr["s"], arr["t"], arr["i"], arr["l"], arr["m"], src)


# ---- tokenized cache ---------------------------------------------------------------------------------------
_HASHES: dict[int, tuple[object, str]] = {}


def tokenizer_hash(tok) -> str:
    """Identity of a vocabulary (also used to refuse a teacher/student tokenizer mismatch); memoized
    per tokenizer object (hashing 150k entries takes seconds)."""
    hf = tok.tok if hasattr(tok, "tok") else tok
    hit = _HASHES.get(id(hf))
    if hit is not None and hit[0] is hf:
        return hit[1]
    _HASHES[id(hf)] = (hf, _vocab_hash(hf))
    return _HASHES[id(hf)][1]


def _vocab_hash(hf) -> str:
    vocab = hf.get_vocab()
    h = hashlib.sha256()
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{i}\0{piece}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def build_split(tok, fmt: FimFormat, files: Sequence[SourceFile], spec: FimSpec, *, seed: int,
                data_fp: str, cache_dir: Path | None, name: str,
                rewrite: Callable[[list[tuple[str, str, str]]], list[str]] | None = None) -> Packed:
    """Packed rows of one split, loaded from ``cache_dir`` when the same data + tokenizer + spec were
    tokenized before (the second run does not re-tokenize)."""
    spec.check()
    key = hashlib.sha256(json.dumps([CACHE_VERSION, data_fp, tokenizer_hash(tok), asdict(spec), seed, name,
                                     fmt.name]).encode()).hexdigest()[:16]
    path = cache_dir / f"{name}-{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        try:
            with np.load(path) as z:
                return Packed(*(z[k] for k in ("s", "t", "i", "l", "m", "f")))
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a torn cache file is rebuilt, never trusted
    if not files:
        raise InputFileError(f"the {name} split has no files", hint="give a larger corpus or change --val/--test")
    examples = make_examples(tok, fmt, files, spec, seed, rewrite)
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)  # mix files within rows; deterministic
    packed = pack([examples[i] for i in order], spec.seq_len, _eos_id(tok))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
        np.savez(tmp, s=packed.student_ids, t=packed.teacher_ids, i=packed.t_index, l=packed.loss_mask,
                 m=packed.mid_mask, f=packed.source)
        os.replace(tmp, path)
    return packed
