"""GRPO, the algorithm: what a researcher reads and swaps, as small pure functions on tensors.

    rewards   -> overlong_penalty (DAPO's reward shaping)
              -> select_groups (top-k by reward std, zero-variance groups)
              -> compute_advantages (ADVANTAGES: grpo, dr_grpo, softmax, softmax_centered, rloo)
    per token -> a policy loss (POLICY_LOSSES: pg, ppo, dual_clip, gspo, cispo)
                 + beta x a KL estimator (KL_ESTIMATORS: k1, k2, k3) - entropy_coef x entropy
              -> aggregate_loss (LOSS_AGG_MODES, veRL's four; GSPO forces seq-mean-token-mean on its own term)

Log-probs and entropies are those of softmax(logits / T), the distribution sampled from (update, rollout).
Where veRL and TRL differ from each other or from the papers, the choice made here is stated beside the
formula and tested in tests/test_conventions.py.

Each registry maps a config name to a function, and each function declares the config keys it reads
(config.Param), so adding one is one function here and its test. `objective` binds the loss side into what
update.update_policy minimizes; the update itself (micro-batches, forwards, gradients) is update.py, and
sampling is rollout.py.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from config import Config, Param
from registry import Registry
from update import Objective


def _positive(v: float) -> bool:
    return v > 0


# ============================================================================ advantages

ADVANTAGES: Registry[Callable[..., torch.Tensor]] = Registry("algorithm.adv_estimator")
# Both softmax estimators read one temperature: algorithm.tau (algorithm.tau_schedule moves it over a run)
TAU = Param(0.5, "softmax temperature (constant schedule)", "> 0", _positive)


ADV_STD = ("population", "sample")


@ADVANTAGES.register("grpo", params={
    "adv_eps": Param(1e-4, "the eps in (r - mean) / (std + eps)", "> 0", _positive),
    "adv_std": Param("population", "grpo: the group std, population (/ G) or sample (/ (G - 1), veRL's and TRL's)",
                     "population or sample", lambda v: v in ADV_STD, Literal["population", "sample"])})
def grpo_advantages(rewards: torch.Tensor, adv_eps: float, adv_std: str = "population") -> torch.Tensor:
    """(r - mean) / (std + eps) within each group of G answers (GRPO, DeepSeekMath).

    adv_std population (the default) divides the variance by G, as GRPO-Zero does and as every result this
    repository has published was run; sample divides by G - 1, as veRL (torch.std) and TRL do: advantages
    smaller by sqrt((G - 1) / G) (1 / 1.069 at G = 8), which shifts the policy term against KL, entropy and
    gradient clipping. veRL's eps is 1e-6 and TRL's 1e-4 (ours)."""
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True, unbiased=adv_std == "sample")
    return (rewards - mean) / (std + adv_eps)


@ADVANTAGES.register("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r - mean: no std normalization (Dr. GRPO, Liu et al. 2025), so easy/hard groups are not up-weighted.
    The paper's loss also divides by a constant, loss_agg_mode seq-mean-token-sum-norm."""
    return rewards - rewards.mean(dim=-1, keepdim=True)


@ADVANTAGES.register("softmax", params={"tau": TAU})
def softmax_advantages(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(r / tau) * group_size: all-positive weights with mean 1 (the softmax-reward seed)."""
    return torch.softmax(rewards / tau, dim=-1) * rewards.shape[-1]


@ADVANTAGES.register("softmax_centered", params={"tau": TAU})
def softmax_centered_advantages(rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(r / tau) * group_size - 1: the same weights shifted to sum to zero in each group."""
    return softmax_advantages(rewards, tau) - 1.0


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """r_i minus the mean of the other answers' rewards (REINFORCE leave-one-out, Ahmadian et al. 2024)."""
    g = rewards.shape[-1]
    others = (rewards.sum(dim=-1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def soft_reweight_factors(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per group: group_std / (max group_std in the batch + eps) (Dr. GRPO+ soft reweighting)."""
    std = rewards.std(dim=-1, unbiased=False)
    return std / (std.max() + eps)


def compute_advantages(rewards: torch.Tensor, method: str = "grpo", *, soft_reweight: bool = False,
                       reweight_eps: float = 1e-6, **params: float) -> torch.Tensor:
    """Advantages [num_groups, group_size] from raw rewards of the same shape, by registered method name.
    `params`: the method's declared keys (adv_eps, tau, ...; its defaults where absent, others ignored)."""
    fn = ADVANTAGES.get(method)
    values = ADVANTAGES.bind(method, params)
    if rewards.dim() != 2 or rewards.shape[-1] < 2:
        raise ValueError(f"rewards must be [num_groups, group_size >= 2], got {tuple(rewards.shape)}")
    rewards = rewards.double()  # group statistics in float64: tiny stds must not turn into noise
    adv = fn(rewards, **values)
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


def step_advantages(rewards: torch.Tensor, config: Config, step: int) -> tuple[torch.Tensor, float]:
    """The configured estimator's advantages at `step` (its keys from the config, tau on its schedule), and
    that tau."""
    a = config.algorithm
    params = ADVANTAGES.values(a.adv_estimator, config)
    tau = tau_at_step(step, config.training.max_steps, a.tau_schedule, a.tau, a.tau_start, a.tau_end)
    params["tau"] = tau
    return compute_advantages(rewards, a.adv_estimator, soft_reweight=a.soft_reweight,
                              reweight_eps=a.soft_reweight_eps, **params), tau


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: groups whose answers all scored the same, which carry no group-relative signal."""
    return rewards.double().std(dim=-1, unbiased=False) <= 1e-12


def select_groups(rewards: torch.Tensor, top_k: float | None = None, drop_zero_std: bool = False) -> torch.Tensor:
    """Indices of the groups to train on, in their original order.

    top_k: keep the k groups with the largest reward std (a count >= 1, or a fraction < 1 of the groups,
    rounded up; ties keep the earlier group). drop_zero_std: also drop zero-variance groups.
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
        keep = keep[~zero_variance(rewards[keep])]
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


# ============================================================================ reward shaping


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty: float) -> torch.Tensor:
    """DAPO's overlong reward shaping: 0 up to max_len - buffer_len generated tokens, then falling linearly
    to -penalty at max_len (veRL: min(-(L - (max_len - buffer)) / buffer * penalty, 0))."""
    if buffer_len <= 0:
        return torch.zeros_like(lengths, dtype=torch.float64)
    exceed = lengths.double() - (max_len - buffer_len)
    return (-exceed / buffer_len * penalty).clamp(max=0.0)


# ============================================================================ loss aggregation

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def aggregate_loss(
    token_loss: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    max_len: int | None = None,
    total_tokens: int | None = None,
    total_seqs: int | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar (veRL's agg_loss modes), over the tokens where `mask` is set.

    token-mean: sum / #tokens (DAPO; TRL's dapo); seq-mean-token-mean: mean over sequences of each sequence's
    token mean (GRPO; TRL's grpo); seq-mean-token-sum: mean over sequences of token sums, i.e. sum / B;
    seq-mean-token-sum-norm: sum / (B * max_len), Dr. GRPO's constant normalizer (Liu et al. 2025; TRL's
    dr_grpo: sum / (batch size x max_completion_length)). veRL's seq-mean-token-sum-norm divides each
    micro-batch's sum by max_len alone and then by the number of micro-batches: b x ours for micro-batches of
    b sequences, a constant that depends on how the batch is split; ours does not (the same gradient as TRL's).
    For gradient accumulation pass the FULL batch's `total_tokens` / `total_seqs` (and a fixed `max_len`): the
    micro-batch results then sum exactly to the full-batch value. Masked slots are selected away
    (torch.where, as veRL's masked sum), never multiplied by 0, so an inf or NaN there cannot reach the loss.
    """
    keep = mask.bool()
    masked = torch.where(keep, token_loss, 0.0)
    mask = keep.to(token_loss.dtype)
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


# ============================================================================ policy losses (veRL's registry)

PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


@dataclass(frozen=True)
class PolicyLoss:
    """A registered policy loss: `fn(log_probs, old_log_probs, advantages, mask, **its keys) -> (token_loss,
    metrics)`, all tensors [B, T], `advantages` per token (token weights applied), `token_loss` the per-token
    loss to minimize before aggregation."""

    fn: PolicyLossFn
    uses_ratio: bool = True  # reads old log-probs: the update must supply them (recompute or rollout)
    default_epsilon: tuple[float, float] = (0.2, 0.2)  # (epsilon_low, epsilon_high) when the config sets none
    loss_agg_mode: str | None = None  # forced aggregation (GSPO's seq-mean-token-mean); None: the config's


POLICY_LOSSES: Registry[PolicyLoss] = Registry("algorithm.policy_loss")
# The clipped losses share the clip range; None: the loss's own default_epsilon. epsilon_low = 1 clips below at 0,
# which a ratio never crosses: no lower bound, exactly (CISPO's default)
CLIP = {"epsilon_low": Param(None, "ratio clipped below at 1 - epsilon_low; 1: no lower bound (default: the loss's)",
                             "in [0, 1]", lambda v: 0 <= v <= 1, float | None),
        "epsilon_high": Param(None, "ratio clipped above at 1 + epsilon_high (default: the loss's)", ">= 0",
                              lambda v: v >= 0, float | None)}


def register_policy_loss(name: str, params: dict[str, Param] | None = None, **record: object
                         ) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Register `fn` under `name` with the config keys it reads; `record`: PolicyLoss's other fields."""
    def add(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES.add(name, PolicyLoss(fn, **record), params)  # type: ignore[arg-type]
        return fn
    return add


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float(torch.where(keep, x, 0.0).sum() / keep.sum().clamp(min=1))


def log_ratio(log_probs: torch.Tensor, old_log_probs: torch.Tensor) -> torch.Tensor:
    """log(pi / pi_old), clamped to +-20 as veRL does, so one -inf log-prob cannot make the loss NaN."""
    return (log_probs - old_log_probs).clamp(-20.0, 20.0)


@register_policy_loss("pg", uses_ratio=False)
def pg_loss(log_probs, old_log_probs, advantages, mask):
    """-A log pi: the on-policy GRPO / REINFORCE gradient (old log-probs unused)."""
    return -advantages * log_probs, {}


def _clipped_surrogate(ratio, advantages, mask, epsilon_low, epsilon_high):
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    loss = torch.maximum(unclipped, clipped)
    return loss, {"clip_frac": masked_mean((clipped > unclipped).float(), mask)}


@register_policy_loss("ppo", CLIP)
def ppo_loss(log_probs, old_log_probs, advantages, mask, epsilon_low, epsilon_high):
    """max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high)), r = pi / pi_old (PPO, Schulman et al. 2017). Default
    (0.2, 0.2), as veRL's clip_ratio and TRL's epsilon; DAPO's clip-higher (0.2, 0.28) is the ablation preset
    ppo_clip_higher."""
    ratio = torch.exp(log_ratio(log_probs, old_log_probs))
    return _clipped_surrogate(ratio, advantages, mask, epsilon_low, epsilon_high)


@register_policy_loss("dual_clip", {**CLIP, "clip_ratio_c": Param(
    3.0, "dual_clip: the loss of A < 0 tokens is bounded by -A c", "> 1", lambda v: v > 1)})
def dual_clip_loss(log_probs, old_log_probs, advantages, mask, epsilon_low, epsilon_high, clip_ratio_c):
    """`ppo`, and for A < 0 bounded above by -A c, c = clip_ratio_c (Ye et al. 2020, dual-clip PPO)."""
    loss, metrics = ppo_loss(log_probs, old_log_probs, advantages, mask, epsilon_low, epsilon_high)
    bound = -advantages * clip_ratio_c
    lower_clipped = (advantages < 0) & (loss > bound)
    metrics["clip_frac_lower"] = masked_mean(lower_clipped.float(), mask)
    return torch.where(advantages < 0, torch.minimum(loss, bound), loss), metrics


@register_policy_loss("gspo", CLIP, default_epsilon=(3e-4, 4e-4), loss_agg_mode="seq-mean-token-mean")
def gspo_loss(log_probs, old_log_probs, advantages, mask, epsilon_low, epsilon_high):
    """GSPO (Zheng et al. 2025), token form: s_i,t = sg[s_i] * pi_t / sg[pi_t], where s_i is the sequence's
    geometric-mean ratio; clipped like PPO and aggregated seq-mean-token-mean (veRL's compute_policy_loss_gspo)."""
    keep = mask.bool()
    diff = torch.where(keep, log_probs - old_log_probs, 0.0)
    seq_log_ratio = diff.sum(-1) / keep.sum(-1).clamp(min=1).to(log_probs.dtype)
    token_log_ratio = log_probs - log_probs.detach() + seq_log_ratio.detach()[:, None]
    ratio = torch.exp(token_log_ratio.clamp(max=10.0))
    return _clipped_surrogate(ratio, advantages, mask, epsilon_low, epsilon_high)


@register_policy_loss("cispo", CLIP, default_epsilon=(1.0, 4.0))
def cispo_loss(log_probs, old_log_probs, advantages, mask, epsilon_low, epsilon_high):
    """-sg[clip(r, 1 - eps_low, 1 + eps_high)] A log pi (CISPO, MiniMax-M1 2025): clips the importance
    weight, never the gradient, so every token keeps contributing.

    Default: above only, at 5 (eps_low 1: no lower bound, as MiniMax-M1 and TRL's min(r, epsilon_high); eps_high
    4: the cap 5.0 that TRL documents for its cispo, ScaleRL's eps_max). TRL's weight cap is epsilon_high
    itself, defaulting to epsilon = 0.2 when unset (a weight of at most 0.2), so set it there explicitly."""
    ratio = torch.exp(log_ratio(log_probs, old_log_probs)).detach()
    weight = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    metrics = {"clip_frac": masked_mean((weight != ratio).float(), mask)}
    return -weight * advantages * log_probs, metrics


def policy_loss(name: str, **params: float | None) -> Callable[..., tuple[torch.Tensor, dict[str, float]]]:
    """Loss `name` with its keys bound (`params`, else their defaults; an unset clip range is the loss's own):
    `(log_probs, old_log_probs, advantages, mask) -> (token_loss, metrics)`."""
    loss = POLICY_LOSSES.get(name)
    values = POLICY_LOSSES.bind(name, params)
    for key, default in zip(("epsilon_low", "epsilon_high"), loss.default_epsilon):
        if key in values and values[key] is None:
            values[key] = default
    return functools.partial(loss.fn, **values)


# ============================================================================ KL estimators

KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("algorithm.kl_estimator")


@KL_ESTIMATORS.register("k1")
def kl_k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """log pi - log pi_ref: unbiased for KL(pi || pi_ref), high variance, can be negative per token."""
    return log_probs - ref_log_probs


@KL_ESTIMATORS.register("k2")
def kl_k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """(log pi - log pi_ref)^2 / 2: biased, low variance, >= 0 (Schulman 2020)."""
    return 0.5 * (log_probs - ref_log_probs) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3: exp(d) - d - 1, d = log pi_ref - log pi (>= 0, unbiased). d is clamped to +-20 and the
    value to [-10, 10], as veRL's low_var_kl does: an infinite log-prob gives a finite value, and a token far
    from the reference contributes at most 10 and no gradient rather than exp(20) ~ 4.9e8 dominating the
    clipped gradient."""
    d = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(-10.0, 10.0)


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    return KL_ESTIMATORS.get(estimator)(log_probs, ref_log_probs)


# ============================================================================ the objective the update minimizes


def objective(policy_loss_name: str = "pg", loss_agg_mode: str = "token-mean", *, max_len: int | None = None,
              beta: float = 0.0, kl_estimator: str = "k3", entropy_coef: float = 0.0,
              teacher_forcing_coef: float = 0.0, **loss_params: float | None) -> Objective:
    """Per token: policy_loss(log pi, log pi_old, A x w), aggregated by `loss_agg_mode` unless the loss forces
    its own (GSPO's seq-mean-token-mean), plus beta x KL(pi || pi_ref) - entropy_coef x H aggregated by
    `loss_agg_mode` always (as veRL aggregates its kl_loss and entropy); plus teacher_forcing_coef x the NLL of
    reference completions. `loss_params`: the policy loss's keys."""
    if loss_agg_mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg_mode {loss_agg_mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")
    forced = POLICY_LOSSES.get(policy_loss_name).loss_agg_mode
    terms = functools.partial(aggregate_loss, mode=loss_agg_mode, max_len=max_len)
    return Objective(policy_loss=policy_loss(policy_loss_name, **loss_params),
                     aggregate=functools.partial(aggregate_loss, mode=forced or loss_agg_mode, max_len=max_len),
                     aggregate_terms=None if forced in (None, loss_agg_mode) else terms,
                     kl=KL_ESTIMATORS.get(kl_estimator), beta=beta, entropy_coef=entropy_coef,
                     teacher_forcing_coef=teacher_forcing_coef)


def configured_objective(config: Config) -> Objective:
    """`objective` as the algorithm section sets it, the generation budget as seq-mean-token-sum-norm's max_len."""
    a = config.algorithm
    return objective(a.policy_loss, a.loss_agg_mode, max_len=config.training.max_new_tokens, beta=a.beta,
                     kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
                     teacher_forcing_coef=a.teacher_forcing_coef, **POLICY_LOSSES.values(a.policy_loss, config))
