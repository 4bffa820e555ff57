"""Token sampling from a logits row: greedy, or temperature + top-k + top-p (numpy)."""

from __future__ import annotations

import numpy as np

from localcoder.engines.base import Sampling


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """logits: (V,) float. Greedy when temperature is 0."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    k = sampling.top_k if 0 < sampling.top_k < logits.shape[0] else logits.shape[0]
    top = np.argpartition(-logits, k - 1)[:k]  # (k,)
    scaled = logits[top].astype(np.float64) / sampling.temperature
    order = np.argsort(-scaled)
    top, scaled = top[order], scaled[order]
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), sampling.top_p) + 1)
        top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
    return int(rng.choice(top, p=probs))
