"""GRPO, the algorithm: group-relative advantages, policy losses, KL estimators, loss aggregation, reward
shaping and group selection, as small pure functions on tensors behind registries by name: advantages
(`ADVANTAGE_FNS`), policy losses (`POLICY_LOSSES`), KL estimators (`KL_ESTIMATORS`).

The update that minimizes these losses is update.py; sampling is rollout.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


# ============================================================================ advantages

AdvantageFn = Callable[..., torch.Tensor]
ADVANTAGE_FNS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def add(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_FNS[name] = fn
        return fn
    return add


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4, tau: float = 1.0) -> torch.Tensor:
    """(r - mean) / (std + eps) within each group, population std (GRPO, DeepSeekMath; GRPO-Zero)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + eps)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4, tau: float = 1.0) -> torch.Tensor:
    """r - mean: no std normalization (Dr. GRPO, Liu et al. 2025), so easy/hard groups are not up-weighted."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@register_advantage("softmax")
def softmax_advantages(rewards: torch.Tensor, eps: float = 1e-4, tau: float = 1.0) -> torch.Tensor:
    """softmax(r / tau) * group_size: all-positive weights with mean 1 (the softmax-reward seed)."""
    return torch.softmax(rewards / tau, dim=-1) * rewards.shape[-1]


@register_advantage("softmax_centered")
def softmax_centered_advantages(rewards: torch.Tensor, eps: float = 1e-4, tau: float = 1.0) -> torch.Tensor:
    """softmax(r / tau) * group_size - 1: the same weights shifted to sum to zero in each group."""
    return softmax_advantages(rewards, eps, tau) - 1.0


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor, eps: float = 1e-4, tau: float = 1.0) -> torch.Tensor:
    """r_i minus the mean of the other answers' rewards (REINFORCE leave-one-out, Ahmadian et al. 2024)."""
    g = rewards.shape[-1]
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def soft_reweight_factors(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per group: group_std / (max group_std in the batch + eps) (Dr. GRPO+ soft reweighting)."""
    std = rewards.std(dim=-1, unbiased=False)
    return std / (std.max() + eps)


def compute_advantages(
    rewards: torch.Tensor,
    method: str = "grpo",
    *,
    eps: float = 1e-4,
    tau: float = 1.0,
    soft_reweight: bool = False,
    reweight_eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages [num_groups, group_size] from raw rewards of the same shape, by registered method name."""
    if method not in ADVANTAGE_FNS:
        raise ValueError(f"unknown advantage method {method!r}; valid: {', '.join(sorted(ADVANTAGE_FNS))}")
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [num_groups, group_size >= 2], got {tuple(rewards.shape)}")
    if eps <= 0 or tau <= 0:
        raise ValueError(f"eps and tau must be > 0 (got eps={eps}, tau={tau})")
    rewards = rewards.double()  # group statistics in float64: tiny stds must not turn into noise
    adv = ADVANTAGE_FNS[method](rewards, eps=eps, tau=tau)
    if soft_reweight:
        adv = adv * soft_reweight_factors(rewards, reweight_eps)[:, None]
    return adv.float()


def tau_at_step(step: int, max_steps: int, schedule: str, tau: float, tau_start: float, tau_end: float) -> float:
    """Softmax temperature at a (1-based) step: constant, or linear from tau_start (step 1) to tau_end (last)."""
    if schedule == "constant":
        return tau
    if schedule == "linear":
        frac = 0.0 if max_steps <= 1 else min(1.0, max(0.0, (step - 1) / (max_steps - 1)))
        return tau_start + (tau_end - tau_start) * frac
    raise ValueError(f"unknown tau schedule {schedule!r}; valid: constant, linear")


def select_groups(rewards: torch.Tensor, top_k: float | None = None, drop_zero_std: bool = False) -> torch.Tensor:
    """Indices of the groups to train on, in their original order.

    top_k: keep the k groups with the largest reward std (a count >= 1, or a fraction < 1 of the groups,
    rounded up; ties keep the earlier group). drop_zero_std: also drop groups whose rewards are all equal,
    which carry no group-relative signal.
    """
    n = rewards.shape[0]
    std = rewards.double().std(dim=-1, unbiased=False)
    keep = torch.arange(n)
    if top_k is not None:
        k = math.ceil(top_k * n) if top_k < 1 else int(top_k)
        k = max(1, min(n, k))
        order = sorted(range(n), key=lambda i: (-float(std[i]), i))
        keep = torch.tensor(sorted(order[:k]), dtype=torch.long)
    if drop_zero_std:
        keep = keep[std[keep] > 1e-12]
    return keep


def advantage_stats(advantages: torch.Tensor) -> dict[str, float]:
    """Mean/std/max/min of advantages [groups, group_size] and the Kish effective sample size per group,
    (sum |a|)^2 / sum a^2, averaged over groups with any nonzero advantage (how many answers carry the update)."""
    a = advantages.double()
    abs_sum = a.abs().sum(-1)
    sq_sum = (a * a).sum(-1)
    live = sq_sum > 0
    ess = (abs_sum[live] ** 2 / sq_sum[live]).mean().item() if live.any() else 0.0
    return {
        "advantage/mean": a.mean().item(),
        "advantage/std": a.std(unbiased=False).item(),
        "advantage/max": a.max().item(),
        "advantage/min": a.min().item(),
        "advantage/ess": ess,
    }


# ============================================================================ losses

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_len: int | None = None,
    total_tokens: int | None = None,
    total_seqs: int | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (veRL's agg_loss modes).

    token-mean: sum / #tokens (DAPO); seq-mean-token-mean: mean over sequences of each sequence's token mean
    (GRPO); seq-mean-token-sum: mean over sequences of token sums (Dr. GRPO); seq-mean-token-sum-norm:
    sum / (B * max_len), a constant normalizer. For gradient accumulation pass the FULL batch's
    `total_tokens` / `total_seqs` (and a fixed `max_len`): the micro-batch results then sum exactly to the
    full-batch value.
    """
    mask = mask.to(token_loss.dtype)
    masked = token_loss * mask
    n_seqs = total_seqs if total_seqs is not None else token_loss.shape[0]
    if mode == "token-mean":
        n_tok = total_tokens if total_tokens is not None else mask.sum()
        return masked.sum() / max(n_tok, 1) if isinstance(n_tok, int) else masked.sum() / n_tok.clamp(min=1)
    if mode == "seq-mean-token-mean":
        per_seq = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return per_seq.sum() / n_seqs
    if mode == "seq-mean-token-sum":
        return masked.sum(-1).sum() / n_seqs
    if mode == "seq-mean-token-sum-norm":
        length = max_len if max_len is not None else token_loss.shape[-1]
        return masked.sum() / (n_seqs * length)
    raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


# ---------------------------------------------------------------- policy losses (veRL's registry pattern)

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss and what the update needs to know about it."""

    fn: PolicyLossFn
    uses_ratio: bool  # reads old log-probs: the update must supply them (recompute or rollout)
    default_epsilon: tuple[float, float] = (0.2, 0.28)  # (epsilon_low, epsilon_high) when the config sets none
    loss_agg_mode: str | None = None  # forced aggregation (GSPO's seq-mean-token-mean); None: the config's


POLICY_LOSSES: dict[str, PolicyLoss] = {}


def register_policy_loss(
    name: str, uses_ratio: bool = True, default_epsilon: tuple[float, float] = (0.2, 0.28),
    loss_agg_mode: str | None = None,
) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn(log_probs, old_log_probs, advantages, mask, cfg) -> (token_loss, metrics)` under `name`.

    All tensors are [B, T]; `advantages` are per token (token weights already applied); `token_loss` is the
    per-token loss to minimize before aggregation; `cfg` has `epsilon_low`, `epsilon_high`, `clip_ratio_c`.
    """
    def add(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = PolicyLoss(fn, uses_ratio, default_epsilon, loss_agg_mode)
        return fn
    return add


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.to(x.dtype)
    return float((x * m).sum() / m.sum().clamp(min=1))


def log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old), clamped to +-20 as veRL does, so one -inf log-prob cannot make the loss NaN."""
    return (log_probs - old_log_probs).clamp(-20.0, 20.0)


@register_policy_loss("pg", uses_ratio=False)
def pg_loss(log_probs, old_log_probs, advantages, mask, cfg):
    """-A log pi: the on-policy GRPO / REINFORCE gradient (old log-probs unused)."""
    return -advantages * log_probs, {}


def _clipped_surrogate(ratio, advantages, mask, cfg):
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, {"clip_frac": masked_mean((clipped > unclipped).float(), mask)}


@register_policy_loss("ppo")
def ppo_loss(log_probs, old_log_probs, advantages, mask, cfg):
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old (PPO; DAPO's clip-higher when
    eps_high > eps_low)."""
    return _clipped_surrogate(torch.exp(log_ratio(log_probs, old_log_probs)), advantages, mask, cfg)


@register_policy_loss("dual_clip")
def dual_clip_loss(log_probs, old_log_probs, advantages, mask, cfg):
    """`ppo`, and for A < 0 bounded above by -A c, c = clip_ratio_c (Ye et al. 2020, dual-clip PPO)."""
    loss, metrics = ppo_loss(log_probs, old_log_probs, advantages, mask, cfg)
    bound = -advantages * cfg.clip_ratio_c
    lower_clipped = (advantages < 0) & (loss > bound)
    metrics["clip_frac_lower"] = masked_mean(lower_clipped.float(), mask)
    return torch.where(advantages < 0, torch.minimum(loss, bound), loss), metrics


@register_policy_loss("gspo", default_epsilon=(3e-4, 4e-4), loss_agg_mode="seq-mean-token-mean")
def gspo_loss(log_probs, old_log_probs, advantages, mask, cfg):
    """GSPO (Zheng et al. 2025), token form: s_i,t = sg[s_i] * pi_t / sg[pi_t], where s_i is the sequence's
    geometric-mean ratio; clipped like PPO and aggregated seq-mean-token-mean (veRL's compute_policy_loss_gspo)."""
    m = mask.to(log_probs.dtype)
    seq_log_ratio = ((log_probs - old_log_probs) * m).sum(-1) / m.sum(-1).clamp(min=1)
    token_log_ratio = log_probs - log_probs.detach() + seq_log_ratio.detach()[:, None]
    ratio = torch.exp(token_log_ratio.clamp(max=10.0))
    return _clipped_surrogate(ratio, advantages, mask, cfg)


@register_policy_loss("cispo")
def cispo_loss(log_probs, old_log_probs, advantages, mask, cfg):
    """-sg[clip(r, 1 - eps_low, 1 + eps_high)] A log pi (CISPO, MiniMax-M1 2025): clips the importance
    weight, never the gradient, so every token keeps contributing."""
    ratio = torch.exp(log_ratio(log_probs, old_log_probs)).detach()
    weight = ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    metrics = {"clip_frac": masked_mean((weight != ratio).float(), mask)}
    return -weight * advantages * log_probs, metrics


# ---------------------------------------------------------------- KL estimators

KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}


def _register_kl(name: str) -> Callable:
    def add(fn: Callable) -> Callable:
        KL_ESTIMATORS[name] = fn
        return fn
    return add


@_register_kl("k1")
def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased for KL(pi || pi_ref), high variance, can be negative per token."""
    return log_probs - ref_log_probs


@_register_kl("k2")
def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """(log pi - log pi_ref)^2 / 2: biased, low variance, >= 0 (Schulman 2020)."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


@_register_kl("k3")
def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: exp(d) - d - 1, d = log pi_ref - log pi (>= 0, unbiased). d is clamped to +-20 as in
    veRL's low_var_kl, so an infinite log-prob gives a large finite value, never NaN."""
    d = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return torch.exp(d) - d - 1


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {estimator!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}")
    return KL_ESTIMATORS[estimator](log_probs, ref_log_probs)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty: float) -> torch.Tensor:
    """DAPO's overlong reward shaping: 0 up to max_len - buffer_len generated tokens, then falling linearly
    to -penalty at max_len (veRL: min(-(L - (max_len - buffer)) / buffer * penalty, 0))."""
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    exceed = lengths.double() - (max_len - buffer_len)
    return (-exceed / buffer_len * penalty).clamp(max=0.0)
