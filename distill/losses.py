"""Distillation losses (components; the recipe in train.py composes them).

Shapes: B batch, T positions, C categories. C is the full vocabulary V for an online teacher, or
K + 1 for a cached top-k teacher (its K kept tokens plus one "rest of the vocabulary" bucket, see
``sparse_pair``). Every divergence takes *log*-probabilities over the same C categories and a
(B, T) mask, and returns the mean over masked positions (a scalar); ``*_sum`` variants return the
sum, for normalising by a token count shared across processes (DDP).

- forward KL   KL(p_t || q_s) = sum p_t (log p_t - log q_s)     mass-covering (standard KD)
- reverse KL   KL(q_s || p_t) = sum q_s (log q_s - log p_t)     mode-seeking (MiniLLM)
- generalized JSD(beta) = beta KL(p_t || m) + (1 - beta) KL(q_s || m), m = beta p_t + (1 - beta) q_s (GKD)
- cross-entropy on the real next tokens.
``distill_loss`` = alpha * CE + (1 - alpha) * T^2 * divergence(softmax(z_s / T), softmax(z_t / T)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DIVERGENCES = ("fkl", "rkl", "jsd")


def _masked_sum(per_pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """per_pos (B, T), mask (B, T) -> scalar sum over masked positions."""
    return (per_pos * mask.to(per_pos.dtype)).sum()


def _mean(total: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return total / mask.sum().clamp_min(1)


def forward_kl_sum(s_logp: torch.Tensor, t_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_logp, t_logp (B, T, C) log-probs; mask (B, T) -> scalar sum of KL(p_t || q_s)."""
    p_t = t_logp.exp()
    per_pos = (p_t * (t_logp - s_logp)).sum(-1)  # (B, T)
    return _masked_sum(per_pos, mask)


def reverse_kl_sum(s_logp: torch.Tensor, t_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, C), (B, T, C), (B, T) -> scalar sum of KL(q_s || p_t)."""
    q_s = s_logp.exp()
    per_pos = (q_s * (s_logp - t_logp)).sum(-1)  # (B, T)
    return _masked_sum(per_pos, mask)


def jsd_sum(s_logp: torch.Tensor, t_logp: torch.Tensor, mask: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalized JSD (GKD, Agarwal et al. 2024). beta -> 0 approaches forward KL's gradient,
    beta -> 1 reverse KL's; beta = 0.5 is the symmetric JSD. (B, T, C) x2, (B, T) -> scalar sum."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl_sum(s_logp, t_logp, mask) * 0.0  # m = q_s and KL(p_t||m) carries weight 0
    if beta == 1.0:
        return reverse_kl_sum(s_logp, t_logp, mask) * 0.0
    # log m = logsumexp(log beta + log p_t, log(1 - beta) + log q_s)           (B, T, C)
    log_m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), dim=0)
    kl_t = (t_logp.exp() * (t_logp - log_m)).sum(-1)  # (B, T)
    kl_s = (s_logp.exp() * (s_logp - log_m)).sum(-1)  # (B, T)
    return _masked_sum(beta * kl_t + (1 - beta) * kl_s, mask)


def divergence_sum(kind: str, s_logp: torch.Tensor, t_logp: torch.Tensor, mask: torch.Tensor,
                   beta: float = 0.5) -> torch.Tensor:
    if kind == "fkl":
        return forward_kl_sum(s_logp, t_logp, mask)
    if kind == "rkl":
        return reverse_kl_sum(s_logp, t_logp, mask)
    if kind == "jsd":
        return jsd_sum(s_logp, t_logp, mask, beta)
    raise ValueError(f"unknown divergence {kind!r}; one of {DIVERGENCES}")


def forward_kl(s_logp, t_logp, mask):
    return _mean(forward_kl_sum(s_logp, t_logp, mask), mask)


def reverse_kl(s_logp, t_logp, mask):
    return _mean(reverse_kl_sum(s_logp, t_logp, mask), mask)


def jsd(s_logp, t_logp, mask, beta: float = 0.5):
    return _mean(jsd_sum(s_logp, t_logp, mask, beta), mask)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), targets (B, T) next-token ids, mask (B, T) -> scalar sum of -log q(target)."""
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().long(), reduction="none")  # (B*T,)
    return _masked_sum(nll.view(targets.shape), mask)


def cross_entropy(logits, targets, mask):
    return _mean(cross_entropy_sum(logits, targets, mask), mask)


# ---- teacher targets -----------------------------------------------------------------------------------------
def dense_pair(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0):
    """Full-vocabulary log-probs at temperature T: (B, T, V), (B, T, V) -> (B, T, V), (B, T, V)."""
    return (F.log_softmax(s_logits.float() / temperature, -1),
            F.log_softmax(t_logits.float() / temperature, -1))


def sparse_pair(s_logits: torch.Tensor, t_vals: torch.Tensor, t_idx: torch.Tensor, t_lse: torch.Tensor | None,
                temperature: float = 1.0):
    """Log-probs over the teacher's top-k tokens plus a "rest" bucket.

    s_logits (B, T, V) student logits; t_vals (B, T, K) teacher top-k logits; t_idx (B, T, K) their ids;
    t_lse (B, T) logsumexp of the teacher's full logits (exact top-k probabilities at T = 1; None or
    T != 1 renormalises over the top-k, rest = 0). Returns (s_logp, t_logp), each (B, T, K + 1).
    """
    s_all = F.log_softmax(s_logits.float() / temperature, -1)  # (B, T, V)
    return sparse_pair_logp(s_all, t_vals, t_idx, t_lse, temperature)


def sparse_pair_logp(s_all: torch.Tensor, t_vals: torch.Tensor, t_idx: torch.Tensor, t_lse: torch.Tensor | None,
                     temperature: float = 1.0):
    """``sparse_pair`` from the student's full log-probs s_all (B, T, V) at temperature T (lets the
    recipe share one log-softmax between the CE and the KD terms when T = 1)."""
    s_top = s_all.gather(-1, t_idx.long())  # (B, T, K)
    s_rest = _log1mexp(torch.logsumexp(s_top, -1))  # (B, T)
    t_vals = t_vals.float() / temperature
    if t_lse is not None and temperature == 1.0:
        t_top = t_vals - t_lse.float()[..., None]  # (B, T, K)
    else:
        t_top = t_vals - torch.logsumexp(t_vals, -1, keepdim=True)
    t_rest = _log1mexp(torch.logsumexp(t_top, -1))  # (B, T)
    return torch.cat([s_top, s_rest[..., None]], -1), torch.cat([t_top, t_rest[..., None]], -1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, clamped so an all-covering top-k gives a tiny, finite rest."""
    x = x.clamp(max=-1e-6)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def nll_sum_from_logp(s_all: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """s_all (B, T, V) log-probs at T = 1, targets (B, T), mask (B, T) -> scalar sum of -log q(target)."""
    return _masked_sum(-s_all.gather(-1, targets.long()[..., None])[..., 0], mask)


def distill_loss_sum(kind: str, s_logp, t_logp, logits, targets, mask, *, alpha: float, temperature: float,
                     beta: float = 0.5, s_all: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """alpha * CE + (1 - alpha) * T^2 * divergence, summed over masked positions (divide by the token
    count). kind "ce" ignores the teacher. ``s_all``: the student's full log-probs at T = 1 when the
    caller already has them (the CE then reuses them). Returns (loss_sum, parts) with parts detached."""
    ce = nll_sum_from_logp(s_all, targets, mask) if s_all is not None else cross_entropy_sum(logits, targets, mask)
    if kind == "ce":
        return ce, {"ce": ce.detach()}
    div = divergence_sum(kind, s_logp, t_logp, mask, beta)
    loss = alpha * ce + (1 - alpha) * temperature ** 2 * div
    return loss, {"ce": ce.detach(), kind: div.detach()}
