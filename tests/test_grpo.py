"""GRPO's algorithm against hand computation: advantages, group selection, loss aggregation, policy losses,
KL estimators, reward shaping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo

REWARDS = [[1.1, 0.1, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [1.1, 1.1, 0.1, 0.0]]


# ------------------------------------------------------------------ advantages


def test_grpo_advantages_match_hand_computation():
    r = np.array(REWARDS)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)  # numpy std: population
    got = grpo.compute_advantages(torch.tensor(REWARDS), "grpo", adv_eps=1e-4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1] == 0)  # a zero-variance group carries no signal


def test_dr_grpo_rloo_softmax_advantages():
    r = np.array(REWARDS)
    g = r.shape[1]
    np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo").numpy(),
                               r - r.mean(1, keepdims=True), atol=1e-6)
    loo = np.array([[r[i, j] - (r[i].sum() - r[i, j]) / (g - 1) for j in range(g)] for i in range(len(r))])
    np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "rloo").numpy(), loo, atol=1e-6)
    for tau in (0.25, 0.5, 1.0):
        e = np.exp(r / tau)
        soft = e / e.sum(1, keepdims=True) * g
        np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "softmax", tau=tau).numpy(),
                                   soft, rtol=1e-5)
        np.testing.assert_allclose(
            grpo.compute_advantages(torch.tensor(REWARDS), "softmax_centered", tau=tau).numpy(), soft - 1, atol=1e-5)
        assert np.allclose(soft.sum(1), g)


def test_softmax_weight_on_the_single_correct_answer():
    # one correct (1.1) and seven wrong (0 or 0.1): softmax at tau=0.5 weighs the correct one e^(1.1/0.5) vs e^0
    r = torch.tensor([[1.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.1]])
    w = grpo.compute_advantages(r, "softmax", tau=0.5)[0]
    e = np.exp(r[0].numpy() / 0.5)
    assert w[0].item() == pytest.approx(8 * e[0] / e.sum(), rel=1e-5)
    assert w[0] > w[1:].max()


def test_soft_reweight_scales_each_group_by_its_std_over_the_max():
    r = np.array(REWARDS)
    std = r.std(1)
    factor = std / (std.max() + 1e-6)
    base = grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo")
    got = grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo", soft_reweight=True, reweight_eps=1e-6)
    np.testing.assert_allclose(got.numpy(), base.numpy() * factor[:, None], rtol=1e-5, atol=1e-7)
    # the highest-variance group keeps (almost) its full advantage
    top = int(std.argmax())
    np.testing.assert_allclose(got[top].numpy(), base[top].numpy(), rtol=1e-4)


def test_unknown_method_and_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="valid: dr_grpo, grpo, rloo, softmax, softmax_centered"):
        grpo.compute_advantages(torch.tensor(REWARDS), "ppo")
    with pytest.raises(ValueError, match="tau"):
        grpo.compute_advantages(torch.tensor(REWARDS), "softmax", tau=0.0)
    with pytest.raises(ValueError, match="group_size"):
        grpo.compute_advantages(torch.tensor([1.0, 0.0]), "grpo")


def test_tau_schedule():
    assert grpo.tau_at_step(7, 100, "constant", 0.5, 0.75, 0.25) == 0.5
    assert grpo.tau_at_step(1, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.75)
    assert grpo.tau_at_step(51, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.5)
    assert grpo.tau_at_step(101, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        grpo.tau_at_step(1, 10, "cosine", 0.5, 0.75, 0.25)


def test_select_groups_top_k_and_zero_std():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.2, 0.2]])  # stds .5 0 .25 .5 0
    assert grpo.select_groups(r).tolist() == [0, 1, 2, 3, 4]
    assert grpo.select_groups(r, top_k=2).tolist() == [0, 3]  # the two with std .5, in original order
    assert grpo.select_groups(r, top_k=3).tolist() == [0, 2, 3]
    assert grpo.select_groups(r, top_k=0.5).tolist() == [0, 2, 3]  # ceil(0.5 * 5) = 3
    assert grpo.select_groups(r, drop_zero_std=True).tolist() == [0, 2, 3]
    assert grpo.select_groups(r, top_k=4, drop_zero_std=True).tolist() == [0, 2, 3]


def test_advantage_stats_effective_sample_size():
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    s = grpo.advantage_stats(adv)
    ess = [16 / 4, (6 ** 2) / 12]  # (sum|a|)^2 / sum a^2; the all-zero group is excluded
    assert s["advantage/ess"] == pytest.approx(np.mean(ess))
    assert s["advantage/max"] == 3.0 and s["advantage/min"] == -1.0


# ------------------------------------------------------------------ losses


def _loss_batch():
    torch.manual_seed(1)
    loss = torch.randn(5, 7)
    lens = [7, 3, 5, 1, 4]
    mask = torch.zeros(5, 7, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    return loss, mask, lens


def test_aggregate_loss_modes_match_hand_computation():
    loss, mask, lens = _loss_batch()
    rows = [loss[i, :n].tolist() for i, n in enumerate(lens)]
    flat = [x for r in rows for x in r]
    assert grpo.aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(
        np.mean([np.mean(r) for r in rows]), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(
        np.mean([np.sum(r) for r in rows]), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(
        sum(flat) / (5 * 10), rel=1e-5)
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_gradient_accumulation_equals_full_batch(mode):
    loss, mask, _ = _loss_batch()
    full = grpo.aggregate_loss(loss, mask, mode, max_len=9)
    total_tokens, total_seqs = int(mask.sum()), loss.shape[0]
    parts = [grpo.aggregate_loss(loss[s:s + 2], mask[s:s + 2], mode, max_len=9,
                                 total_tokens=total_tokens, total_seqs=total_seqs) for s in range(0, 5, 2)]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)


def test_ppo_with_ratio_one_is_the_plain_policy_gradient():
    torch.manual_seed(2)
    logits = torch.randn(3, 6, requires_grad=True)
    adv = torch.tensor([[1.5], [-0.7], [0.3]]).expand(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    lp = torch.log_softmax(logits, -1)
    plain, _ = grpo.policy_loss("pg")(lp, lp.detach(), adv, mask)
    (g_plain,) = torch.autograd.grad(plain.sum(), logits)
    for name in ("ppo", "dual_clip", "cispo"):
        lp = torch.log_softmax(logits, -1)
        loss, metrics = grpo.policy_loss(name)(lp, lp.detach(), adv, mask)  # eps 0.2 / 0.28, c = 3
        (g,) = torch.autograd.grad(loss.sum(), logits)
        torch.testing.assert_close(g, g_plain)
        assert metrics["clip_frac"] == 0.0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    old = torch.log(torch.tensor([0.5, 2.0, 0.5, 2.0]))  # ratios 2, 0.5, 2, 0.5
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = grpo.policy_loss("ppo", epsilon_low=0.2, epsilon_high=0.28)(lp, old, adv, torch.ones(4, dtype=torch.bool))
    loss.sum().backward()
    # A > 0 and ratio above 1 + eps_high: clipped, no gradient; A > 0 and ratio low: still pushed up
    # A < 0 and ratio high: pushed down; A < 0 and ratio below 1 - eps_low: clipped
    assert metrics["clip_frac"] == 0.5
    assert lp.grad.tolist() == pytest.approx([0.0, -0.5, 2.0, 0.0])
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 2.0, 0.8])


def test_kl_estimators():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    ref = torch.log(torch.tensor([0.4, 0.5, 0.3]))
    d = (ref - lp).numpy()
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k3").numpy(), np.exp(d) - d - 1, rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k1").numpy(), -d, rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k2").numpy(), 0.5 * d ** 2, rtol=1e-6)
    assert grpo.kl_k3(lp, lp).abs().max() == 0
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo.kl_penalty(lp, ref, "k4")


@pytest.mark.parametrize("log_prob, ref_log_prob", [
    (-20.0, 0.0), (0.0, -20.0), (-25.0, 0.0),  # log-ratio d = log pi_ref - log pi at and beyond +-20
    (-3.0, 0.0),  # d = 3: within +-20, but e^3 - 4 ~ 16 > 10
    (float("-inf"), 0.0), (0.0, float("-inf")),  # an infinite log-prob on either side
])
def test_kl_k3_is_clamped_as_verl_low_var_kl(log_prob, ref_log_prob):
    """veRL's low_var_kl: d clamped to +-20, then the value to [-10, 10]. A token far from the reference
    contributes at most 10 and no gradient (not exp(20) - 21 ~ 4.9e8 dominating the clipped gradient); the
    value is finite and the gradient is 0, never NaN."""
    lp = torch.tensor([log_prob, -1.0], requires_grad=True)
    ref = torch.tensor([ref_log_prob, -1.5])
    k3 = grpo.kl_k3(lp, ref)
    d = min(max(ref_log_prob - log_prob, -20.0), 20.0)
    assert k3[0].item() == pytest.approx(min(math.exp(d) - d - 1, 10.0))
    assert k3[1].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)  # an ordinary token: the plain formula
    k3.sum().backward()
    assert lp.grad[0].item() == 0.0  # through the clamp: no gradient
    assert lp.grad[1].item() == pytest.approx(1 - math.exp(-0.5))  # d/dlp (e^d - d - 1) = 1 - e^d


def test_overlong_penalty_is_dapo_linear_ramp():
    lengths = torch.tensor([10, 80, 81, 90, 100])
    got = grpo.overlong_penalty(lengths, max_len=100, buffer_len=20, penalty=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0])
    assert grpo.overlong_penalty(lengths, 100, 0, 1.0).abs().sum() == 0
