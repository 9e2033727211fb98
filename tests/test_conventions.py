"""The formula conventions where veRL and TRL differ among themselves or from the papers (issue 28), each
against a written-out formula: log-probs of the distribution sampled from (logits / T), the GRPO group std,
the clip defaults, Dr. GRPO's constant normalizer, and masked aggregation that no padded inf can poison."""

from __future__ import annotations

import math

import pytest
import torch

import config
import grpo
import parts
import rollout
import update
from conftest import random_model
from data_types import Episode

VOCAB = 23
PROMPTS = [[3, 4, 6, 7, 8], [9, 2], [1, 2, 3, 10, 12, 13, 14], [16]]
T = 0.7


# ------------------------------------------------------------------ 1. log-probs under the sampling temperature


def tempered_reference(model, prompt: list[int], completion: list[int], temperature: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / temperature) at the sampled tokens, and that distribution's entropy, from one
    unpadded forward of prompt + completion."""
    p, n = len(prompt), len(completion)
    logits = model(torch.tensor([prompt + completion]))[0, p - 1: p - 1 + n].double()
    logp = torch.log_softmax(logits / temperature, -1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def sampled_episodes(model, temperature: float) -> list[Episode]:
    out = rollout.generate(model, PROMPTS * 2, max_new_tokens=9, eos_token_id=[22], temperature=temperature, seed=5)
    return [Episode(prompt="", prompt_token_ids=p, generated_token_ids=g, text="", reward=0.0, reward_info={},
                    finished=False, group_idx=0, log_probs=lp, entropies=h)
            for p, g, lp, h in zip(PROMPTS * 2, out.tokens, out.log_probs, out.entropies)]


def test_rollout_log_probs_and_entropies_are_of_softmax_logits_over_t():
    model = random_model(VOCAB).eval()
    episodes = sampled_episodes(model, T)
    apart = 0.0
    with torch.no_grad():
        for e in episodes:
            lp, h = tempered_reference(model, e.prompt_token_ids, e.generated_token_ids, T)
            torch.testing.assert_close(torch.tensor(e.log_probs, dtype=torch.float64), lp, rtol=0, atol=2e-5)
            torch.testing.assert_close(torch.tensor(e.entropies, dtype=torch.float64), h, rtol=0, atol=2e-5)
            untempered, _ = tempered_reference(model, e.prompt_token_ids, e.generated_token_ids, 1.0)
            apart = max(apart, float((lp - untempered).abs().max()))
    assert apart > 0.05  # T = 0.7 is far enough from 1 for the check to tell them apart


def test_training_log_probs_at_t_give_ratio_one_no_gap_and_the_formula_gradient():
    """PPO with the rollout's log-probs as the old ones, at T = 0.7: the first ratio is 1 (a clip range of
    1e-3 clips nothing), the rollout/train gap is ~0, and the parameter change is minus the gradient of
    -A r_t / N, r_t = pi_T / pi_T,rollout, with pi_T = softmax(logits / T) written out."""
    model = random_model(VOCAB)
    with torch.no_grad():
        episodes = sampled_episodes(model, T)
    advantages = torch.linspace(-1.0, 1.0, len(episodes))
    n_tokens = sum(len(e.generated_token_ids) for e in episodes)
    loss = 0.0
    for e, a in zip(episodes, advantages):
        p, n = len(e.prompt_token_ids), len(e.generated_token_ids)
        logits = model(torch.tensor([e.prompt_token_ids + e.generated_token_ids]))[0, p - 1: p - 1 + n]
        lp = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(e.generated_token_ids)[:, None]).squeeze(-1)
        loss = loss - (a * torch.exp(lp - torch.tensor(e.log_probs))).sum() / n_tokens
    expected = torch.autograd.grad(loss, list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]

    def run(temperature: float, lr: float) -> dict[str, float]:
        settings = update.UpdateSettings(micro_batch_size=3, old_log_probs="rollout", max_grad_norm=1e9,
                                         temperature=temperature)
        objective = grpo.objective("ppo", "token-mean", epsilon_low=1e-3, epsilon_high=1e-3)
        return update.update_policy(model, torch.optim.SGD(model.parameters(), lr=lr), episodes, advantages,
                                    settings, objective).metrics
    untempered = run(1.0, 0.0)  # the same batch read at T = 1: the ratio is off and clipping acts
    assert untempered["rollout_logprob_gap"] > 0.01 and untempered["clip_frac"] > 0.2
    metrics = run(T, 1.0)
    assert metrics["clip_frac"] == 0.0 and metrics["rollout_logprob_gap"] < 2e-5
    for p, b, g in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.detach() - b, -g, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_at_t_one_and_greedy_the_statistics_are_the_plain_softmax_bit_for_bit(temperature):
    """T = 1 (and T = 0, greedy, which keeps logits / 1): token_statistics, the chunked form and the sampler
    give exactly what they gave before temperatures were applied: log_softmax(logits), its entropy and
    ||onehot - p||; the sampler's token from exp(log_softmax(logits)) (argmax at T = 0)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 40, generator=g) * 3
    targets = torch.randint(0, 40, (3, 7), generator=g)
    logp = torch.log_softmax(logits, -1)
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    p = logp.exp()
    want = (token_logp, -(p * logp).sum(-1), (1.0 - 2.0 * token_logp.exp() + (p * p).sum(-1)).clamp(min=0).sqrt())
    for got, w in zip(update.token_statistics(logits, targets, temperature), want):
        assert torch.equal(got, w)
    u = rollout.keyed_uniform(rollout.row_keys(rollout.stream_key(4), range(3), [0] * 3), 0)
    token, lp, entropy = rollout.sample_next(logits[:, 0], u, temperature, 1.0)
    first = logp[:, 0]
    want_token = (logits[:, 0].argmax(-1) if temperature == 0
                  else rollout.sample_from_probs(first.exp(), u, 1.0, overwrite=True))
    assert torch.equal(token, want_token)
    assert torch.equal(lp, first.gather(-1, want_token[:, None]).squeeze(-1))
    assert torch.equal(entropy, -(first.exp() * first).sum(-1))


def test_chunked_statistics_at_t_equal_the_whole_ones_and_the_gradient_norm_is_at_the_logits():
    """The chunked head gives the whole-logits statistics at T; the gradient norm is the size of
    d log pi_T(y) / d logits = (onehot(y) - pi_T) / T, checked by autograd."""
    torch.manual_seed(4)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    weight = torch.randn(30, 16)
    targets = torch.randint(0, 30, (2, 5))
    whole = update.token_statistics(hidden @ weight.t(), targets, T)
    for a, b in zip(whole, update.chunked_token_statistics(hidden, weight, targets, chunk_tokens=4, temperature=T)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    logits = (hidden @ weight.t()).detach().requires_grad_()
    lp, _, norm = update.token_statistics(logits, targets, T)
    (g,) = torch.autograd.grad(lp[1, 3], logits)
    torch.testing.assert_close(norm[1, 3], g[1, 3].norm(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ 2. the GRPO group std

REWARDS = [[1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.5, 2.0, 1.0, 0.0, 0.0, 1.5, 0.0, 1.0]]


@pytest.mark.parametrize("adv_std", ["population", "sample"])
def test_grpo_advantages_with_either_std_match_hand_computation(adv_std):
    eps = 1e-4
    for row, got in zip(REWARDS, grpo.compute_advantages(torch.tensor(REWARDS), "grpo", adv_eps=eps,
                                                         adv_std=adv_std)):
        g = len(row)
        mean = sum(row) / g
        var = sum((r - mean) ** 2 for r in row) / (g if adv_std == "population" else g - 1)
        want = [(r - mean) / (math.sqrt(var) + eps) for r in row]
        assert got.tolist() == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_the_sample_std_shrinks_advantages_by_sqrt_g_minus_1_over_g_and_is_set_in_the_config():
    population = grpo.compute_advantages(torch.tensor(REWARDS), "grpo", adv_eps=1e-12)
    sample = grpo.compute_advantages(torch.tensor(REWARDS), "grpo", adv_eps=1e-12, adv_std="sample")
    torch.testing.assert_close(population / sample, torch.full_like(population, math.sqrt(8 / 7)))
    assert math.sqrt(8 / 7) == pytest.approx(1.069, abs=5e-4)
    assert parts.load_config(None, []).algorithm.adv_std == "population"  # the default
    c = parts.load_config(None, ["algorithm.adv_std=sample"])
    got, _ = grpo.step_advantages(torch.tensor(REWARDS), c, 1)
    torch.testing.assert_close(got, grpo.compute_advantages(torch.tensor(REWARDS), "grpo", adv_std="sample"))
    with pytest.raises(config.ConfigError, match="algorithm.adv_std"):
        parts.load_config(None, ["algorithm.adv_std=unbiased"])


# ------------------------------------------------------------------ 3. clip defaults


def surrogate_gradient(name: str, ratio: float, advantage: float, **params) -> tuple[float, float]:
    """(loss, d loss / d log pi) of one token at the given ratio, through the registered loss's defaults."""
    lp = torch.tensor([[math.log(ratio) - 1.0]], requires_grad=True)
    token_loss, _ = grpo.policy_loss(name, **params)(lp, torch.tensor([[-1.0]]), torch.tensor([[advantage]]),
                                                     torch.ones(1, 1, dtype=torch.bool))
    (g,) = torch.autograd.grad(token_loss.sum(), lp)
    return float(token_loss.detach()), float(g)


@pytest.mark.parametrize("name", ["ppo", "dual_clip"])
def test_ppo_and_dual_clip_default_to_a_symmetric_0_2(name):
    """As veRL's clip_ratio and TRL's epsilon: A > 0 stops at r = 1.2 (DAPO's 0.28 would not), A < 0 at 0.8."""
    assert surrogate_gradient(name, 1.25, 1.0) == pytest.approx((-1.2, 0.0))
    assert surrogate_gradient(name, 1.19, 1.0)[1] == pytest.approx(-1.19)
    assert surrogate_gradient(name, 0.75, -1.0) == pytest.approx((0.8, 0.0))
    assert surrogate_gradient(name, 0.81, -1.0)[1] == pytest.approx(0.81)
    # the clip-higher preset's range, set explicitly
    assert surrogate_gradient(name, 1.25, 1.0, epsilon_low=0.2, epsilon_high=0.28)[1] == pytest.approx(-1.25)


def test_cispo_clips_the_weight_above_only_at_5_by_default():
    """-min(r, 5) A log pi (TRL's min(r, epsilon_high) with its documented 5.0; MiniMax-M1: no lower bound):
    a tiny ratio keeps its own weight, a large one is capped, the gradient always flows."""
    for ratio, weight in ((1e-3, 1e-3), (0.3, 0.3), (3.0, 3.0), (7.0, 5.0)):
        _, g = surrogate_gradient("cispo", ratio, 2.0)
        assert g == pytest.approx(-2.0 * weight, rel=1e-5)
    assert grpo.POLICY_LOSSES.get("cispo").default_epsilon == (1.0, 4.0)
    assert grpo.POLICY_LOSSES.get("gspo").default_epsilon == (3e-4, 4e-4)  # the GSPO paper's, unchanged


def test_epsilon_low_one_means_no_lower_bound_and_beyond_one_is_a_config_error():
    assert surrogate_gradient("ppo", 0.01, -1.0, epsilon_low=1.0)[1] == pytest.approx(0.01)
    c = parts.load_config(None, ["algorithm.policy_loss=cispo", "algorithm.epsilon_low=1.0"])
    assert c.algorithm.epsilon_low == 1.0
    with pytest.raises(config.ConfigError, match=r"algorithm.epsilon_low must be in \[0, 1\]"):
        parts.load_config(None, ["algorithm.policy_loss=ppo", "algorithm.epsilon_low=1.5"])


# ------------------------------------------------------------------ 4. Dr. GRPO's constant normalizer


def test_seq_mean_token_sum_norm_is_dr_grpos_sum_over_batch_times_max_len_however_split():
    """sum / (B x max_len) (the Dr. GRPO paper's constant; TRL's dr_grpo), the same for any micro-batching; the
    mode called seq-mean-token-sum is sum / B, max_len times larger."""
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 9, generator=g)
    mask = torch.arange(9)[None, :] < torch.tensor([9, 3, 5, 1, 7, 2])[:, None]
    total = sum(float(loss[i, j]) for i in range(6) for j in range(9) if mask[i, j])
    got = grpo.aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=12)
    assert float(got) == pytest.approx(total / (6 * 12), rel=1e-6)
    split = sum(grpo.aggregate_loss(loss[s], mask[s], "seq-mean-token-sum-norm", max_len=12, total_seqs=6)
                for s in (slice(0, 2), slice(2, 5), slice(5, 6)))
    assert float(split) == pytest.approx(float(got), rel=1e-6)
    assert float(grpo.aggregate_loss(loss, mask, "seq-mean-token-sum")) == pytest.approx(total / 6, rel=1e-6)


# ------------------------------------------------------------------ 5. masking


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_a_non_finite_value_in_a_padded_slot_leaves_the_loss_and_gradient_finite(mode, bad):
    """veRL's masked sum: a padded slot is selected away, so inf x 0 = NaN never happens."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 5, generator=g)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 4])[:, None]
    poisoned = values.clone()
    poisoned[1, 3] = bad
    poisoned.requires_grad_()
    assert not torch.isfinite((poisoned.detach() * mask).sum())  # what multiplying by the mask gives
    loss = grpo.aggregate_loss(poisoned, mask, mode, max_len=5)
    (grad,) = torch.autograd.grad(loss, poisoned)
    assert float(loss.detach()) == pytest.approx(float(grpo.aggregate_loss(values, mask, mode, max_len=5)), rel=1e-6)
    assert torch.isfinite(grad).all() and grad[1, 3] == 0


def test_a_minus_inf_log_prob_in_a_padded_slot_through_the_policy_losses():
    """-inf log-probs in padded slots (pg: -A x -inf = inf there): every loss and its gradient stay finite."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    for name in grpo.POLICY_LOSSES.names():
        lp = (-torch.rand(2, 3, generator=g)).masked_fill(~mask, -math.inf).requires_grad_()
        objective = grpo.objective(name, "token-mean")
        token_loss, metrics = objective.policy_loss(lp, lp.detach().masked_fill(~mask, 0.0), torch.ones(2, 3), mask)
        loss = objective.aggregate(token_loss, mask)
        (grad,) = torch.autograd.grad(loss, lp)
        assert math.isfinite(float(loss.detach())) and torch.isfinite(grad).all(), name
        assert all(math.isfinite(v) for v in metrics.values()), name
