"""FIM quality metrics: exact match, edit similarity (CodeXGLUE), BLEU, paired bootstrap."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from typing import Sequence


def normalize(code: str) -> str:
    """Blank lines at both ends and trailing spaces of each line removed (indentation kept)."""
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").split("\n")]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def exact_match(pred: str, ref: str) -> float:
    """Lines equal after trailing spaces and the outer whitespace are removed (the usual line-level
    FIM exact match; a wrongly indented line still fails pass@1, which executes it)."""
    return float(normalize(pred).strip() == normalize(ref).strip())


def _lcs_len(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for ca in a:
        cur = [0]
        for j, cb in enumerate(b):
            cur.append(prev[j] + 1 if ca == cb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def edit_similarity(pred: str, ref: str) -> float:
    """CodeXGLUE's ES: fuzz.ratio (normalized indel similarity, 2·LCS / (|a|+|b|)) of the stripped
    strings, in [0, 1]."""
    a, b = pred.strip(), ref.strip()
    if not a and not b:
        return 1.0
    return 2.0 * _lcs_len(a, b) / (len(a) + len(b))


_TOKEN = re.compile(r"\w+|[^\w\s]")


def bleu(pred: str, ref: str, max_n: int = 4) -> float:
    """Sentence BLEU-4 with add-one smoothing (Lin & Och 2004), on word/punctuation tokens."""
    p, r = _TOKEN.findall(pred.lower()), _TOKEN.findall(ref.lower())
    if not p or not r:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        pc = Counter(tuple(p[i:i + n]) for i in range(len(p) - n + 1))
        rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
        match = sum(min(c, rc[g]) for g, c in pc.items())
        total = max(len(p) - n + 1, 0)
        if n == 1:
            if match == 0:
                return 0.0
            logs.append(math.log(match / total))
        else:
            logs.append(math.log((match + 1) / (total + 1)))
    brevity = min(0.0, 1.0 - len(r) / len(p))
    return math.exp(brevity + sum(logs) / max_n)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of (a - b) over paired cases and its 95% bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired_bootstrap needs two equally long, non-empty score lists")
    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return sum(diffs) / n, means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]


def gap_share(ours: Sequence[float], low: Sequence[float], high: Sequence[float], n_boot: int = 2000,
              seed: int = 0) -> tuple[float, float, float] | None:
    """The share of the gap from ``low`` to ``high`` that ``ours`` closes on paired cases:
    mean(ours - low) / mean(high - low), with a 95% bootstrap interval (cases resampled jointly).
    None when ``high`` is not above ``low`` on these cases (no gap to close). A resample whose gap is not
    positive counts as an infinite share of its numerator's sign, so a gap the cases cannot tell from 0
    shows as an unbounded interval instead of a made-up one."""
    if not (len(ours) == len(low) == len(high)) or not ours:
        raise ValueError("gap_share needs three equally long, non-empty score lists")
    n = len(ours)
    gained = [o - b for o, b in zip(ours, low)]
    gap = [h - b for h, b in zip(high, low)]
    if sum(gap) <= 0:
        return None
    rng = random.Random(seed)
    shares = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        num, den = sum(gained[i] for i in idx), sum(gap[i] for i in idx)
        shares.append(num / den if den > 0 else math.copysign(math.inf, num))
    shares.sort()
    return sum(gained) / sum(gap), shares[int(0.025 * n_boot)], shares[int(0.975 * n_boot) - 1]
