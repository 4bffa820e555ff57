"""Calibration code: fixed-length token windows cut from real source files (by default the CPython
standard library, present on every machine). Used for pruning importance and for the quality
gate's KL / top-1 agreement."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path
from typing import Sequence

from localcoder.errors import InputFileError


def default_calib_paths() -> list[Path]:
    return [Path(sysconfig.get_paths()["stdlib"])]


def calibration_ids(tokenize, paths: Sequence[str | Path] | None = None, *, n_seqs: int = 8, seq_len: int = 256,
                    seed: int = 0) -> list[list[int]]:
    """``n_seqs`` windows of exactly ``seq_len`` token ids, each from a different random file.

    tokenize: ``str -> list[int]`` (plain text, no special tokens). Deterministic for a given seed.
    """
    from localcoder.eval.heldout import _read, source_files

    files = source_files(paths or default_calib_paths(), extensions=[".py"])
    files = [f for f in files if "test" not in f.parts and "site-packages" not in f.parts]
    if not files:
        raise InputFileError("no Python files found for calibration")
    rng = random.Random(seed)
    rng.shuffle(files)
    out: list[list[int]] = []
    for f in files:
        text = _read(f)
        if not text or len(text) < seq_len * 3:
            continue
        ids = tokenize(text)
        if len(ids) < seq_len:
            continue
        start = rng.randrange(len(ids) - seq_len + 1)
        out.append(ids[start: start + seq_len])
        if len(out) == n_seqs:
            return out
    raise InputFileError(f"only {len(out)} of {n_seqs} calibration windows of {seq_len} tokens could be cut")
