"""Loss values on hand-made distributions (distill/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from localcoder.distill import losses

P = torch.tensor([[[0.5, 0.25, 0.25]]])  # teacher (B=1, T=1, C=3)
Q = torch.tensor([[[0.25, 0.5, 0.25]]])  # student
MASK = torch.ones(1, 1)


def test_forward_and_reverse_kl_by_hand():
    expect_f = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log p/q
    expect_r = 0.25 * math.log(0.5) + 0.5 * math.log(2)
    assert float(losses.forward_kl(Q.log(), P.log(), MASK)) == pytest.approx(expect_f, abs=1e-6)
    assert float(losses.reverse_kl(Q.log(), P.log(), MASK)) == pytest.approx(expect_r, abs=1e-6)
    assert float(losses.forward_kl(P.log(), P.log(), MASK)) == pytest.approx(0.0, abs=1e-7)


def test_jsd_matches_definition_and_limits():
    m = 0.5 * P + 0.5 * Q
    kl = lambda a, b: float((a * (a / b).log()).sum())  # noqa: E731
    expect = 0.5 * kl(P, m) + 0.5 * kl(Q, m)
    assert float(losses.jsd(Q.log(), P.log(), MASK, 0.5)) == pytest.approx(expect, abs=1e-6)
    m9 = 0.9 * P + 0.1 * Q
    assert float(losses.jsd(Q.log(), P.log(), MASK, 0.9)) == pytest.approx(0.9 * kl(P, m9) + 0.1 * kl(Q, m9), abs=1e-6)
    assert float(losses.jsd(Q.log(), P.log(), MASK, 0.0)) == 0.0
    with pytest.raises(ValueError):
        losses.jsd(Q.log(), P.log(), MASK, 1.5)


def test_mask_restricts_positions():
    s = torch.stack([Q[0, 0], P[0, 0]])[None].log()  # (1, 2, 3): position 1 equals the teacher
    t = torch.stack([P[0, 0], P[0, 0]])[None].log()
    kl_pos0 = float(losses.forward_kl(Q.log(), P.log(), MASK))
    assert float(losses.forward_kl(s, t, torch.tensor([[1.0, 0.0]]))) == pytest.approx(kl_pos0, abs=1e-6)
    assert float(losses.forward_kl(s, t, torch.tensor([[1.0, 1.0]]))) == pytest.approx(kl_pos0 / 2, abs=1e-6)
    assert float(losses.forward_kl(s, t, torch.tensor([[0.0, 1.0]]))) == pytest.approx(0.0, abs=1e-7)


def test_cross_entropy_and_alpha_temperature_mix():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))  # (1, 2, 3)
    targets = torch.tensor([[1, 2]])
    mask = torch.ones(1, 2)
    ce = float(losses.cross_entropy(logits, targets, mask))
    assert ce == pytest.approx(-(math.log(0.25) + math.log(0.8)) / 2, abs=1e-6)
    t_logits = torch.log(torch.tensor([[[0.25, 0.5, 0.25], [0.1, 0.1, 0.8]]]))
    T = 2.0
    s_lp, t_lp = losses.dense_pair(logits, t_logits, T)
    total, parts = losses.distill_loss_sum("fkl", s_lp, t_lp, logits, targets, mask, alpha=0.3, temperature=T)
    expect = 0.3 * float(parts["ce"]) + 0.7 * T ** 2 * float(parts["fkl"])
    assert float(total) == pytest.approx(expect, rel=1e-6)
    ce_only, parts = losses.distill_loss_sum("ce", None, None, logits, targets, mask, alpha=0.3, temperature=T)
    assert float(ce_only) / 2 == pytest.approx(ce, abs=1e-6) and set(parts) == {"ce"}


def test_sparse_topk_pair_equals_dense_when_k_covers_vocab():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g)
    t = torch.randn(2, 3, 7, generator=g)
    vals, idx = t.topk(7, -1)
    s_lp, t_lp = losses.sparse_pair(s, vals, idx, torch.logsumexp(t, -1))
    mask = torch.ones(2, 3)
    dense = losses.forward_kl(*losses.dense_pair(s, t), mask)
    assert float(losses.forward_kl(s_lp, t_lp, mask)) == pytest.approx(float(dense), abs=1e-4)
    # k < V: the "rest" bucket keeps each row a distribution; the top-k KL lower-bounds the full KL
    vals, idx = t.topk(3, -1)
    s_lp, t_lp = losses.sparse_pair(s, vals, idx, torch.logsumexp(t, -1))
    assert torch.allclose(t_lp.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert torch.allclose(s_lp.exp().sum(-1), torch.ones(2, 3), atol=1e-5)
    assert float(losses.forward_kl(s_lp, t_lp, mask)) <= float(dense) + 1e-6


def test_shared_log_softmax_gives_the_same_loss():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=g)
    targets = torch.randint(0, 11, (2, 4), generator=g)
    mask = torch.ones(2, 4)
    t = torch.randn(2, 4, 11, generator=g)
    vals, idx = t.topk(4, -1)
    lse = torch.logsumexp(t, -1)
    s_lp, t_lp = losses.sparse_pair(logits, vals, idx, lse)
    a, _ = losses.distill_loss_sum("fkl", s_lp, t_lp, logits, targets, mask, alpha=0.1, temperature=1.0)
    s_all = torch.log_softmax(logits, -1)
    s_lp2, t_lp2 = losses.sparse_pair_logp(s_all, vals, idx, lse)
    b, _ = losses.distill_loss_sum("fkl", s_lp2, t_lp2, logits, targets, mask, alpha=0.1, temperature=1.0, s_all=s_all)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
