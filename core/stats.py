"""Small statistics shared by the benches and the LSP's feedback counters. Imports nothing heavy."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between the closest ranks (numpy's default); NaN if empty."""
    s = sorted(values)
    if not s:
        return float("nan")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile wants q in [0, 100], got {q}")
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return float(s[lo] + (s[hi] - s[lo]) * (pos - lo))
