"""Exact and near-duplicate removal (CodeSearchNet / Allamanis 2019 style).

exact: files whose content (trailing whitespace stripped per line) hashes the same; the first by
path is kept. near: MinHash over token 5-gram shingles + LSH, pairs above a Jaccard ``threshold``
are one cluster and only its first member (by path) is kept. Run before ``split_by_file`` so a file
and its near copy can never sit on both sides of the train/test boundary.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Sequence

from localcoder.distill.data import SourceFile
from localcoder.errors import BackendUnavailable

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
MAX_SHINGLES = 20_000  # per file: bounds MinHash time on large files (a prefix sample is enough)


@dataclass
class DedupReport:
    kept: int
    exact_duplicates: int
    near_duplicates: int


def _normalized(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def exact_dedup(files: Sequence[SourceFile]) -> tuple[list[SourceFile], int]:
    seen: set[str] = set()
    kept = []
    for f in sorted(files, key=lambda f: f.rel):
        h = hashlib.sha256(_normalized(f.text).encode("utf-8")).hexdigest()
        if h not in seen:
            seen.add(h)
            kept.append(f)
    return kept, len(files) - len(kept)


def shingles(text: str, n: int = 5) -> list[bytes]:
    toks = _TOKEN.findall(text)
    if len(toks) < n:
        return [" ".join(toks).encode()] if toks else []
    return [" ".join(toks[i: i + n]).encode() for i in range(min(len(toks) - n + 1, MAX_SHINGLES))]


def near_dedup(files: Sequence[SourceFile], *, threshold: float = 0.85, num_perm: int = 128,
               seed: int = 1) -> tuple[list[SourceFile], int]:
    try:
        from datasketch import MinHash, MinHashLSH
    except ImportError as exc:
        raise BackendUnavailable("near-dedup needs datasketch", hint="pip install 'localcoder[train]'") from exc
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    kept = []
    for i, f in enumerate(sorted(files, key=lambda f: f.rel)):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(shingles(f.text))
        if lsh.query(m):  # a kept file is already this similar: drop this one
            continue
        lsh.insert(str(i), m)
        kept.append(f)
    return kept, len(files) - len(kept)


def dedup(files: Sequence[SourceFile], *, near: bool = True, threshold: float = 0.85) -> tuple[list[SourceFile], DedupReport]:
    exact_kept, n_exact = exact_dedup(files)
    kept, n_near = near_dedup(exact_kept, threshold=threshold) if near else (exact_kept, 0)
    return kept, DedupReport(len(kept), n_exact, n_near)
