"""Per-token loss weighters for credit assignment in GRPO.

Plain GRPO gives every token of a completion the same advantage A, so the per-token objective is
A x log pi(y_t). A weighter returns w_t per generated token and the objective becomes w_t x A x log pi(y_t).
Weights are detached (constants in the gradient) except the learned attribution head's, whose
gradient is the point. Each weighting rule is a small pure function on tensors; the classes only adapt
them to the update loop (`update.update_policy`) and are registered by the names the CLI uses.

Masked (padding) positions get weight 0; every weight below is for real generated tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn as nn

from config import Param
from data_types import TokenBatch
from registry import Registry

# ============================================================================ pure weighting rules


def outcome_conditional_weights(answer_mask: torch.Tensor, mask: torch.Tensor, think_discount: float) -> torch.Tensor:
    """think_discount before <answer>, 1 from the <answer> tag on (completions with no answer: all discounted)."""
    w = torch.where(answer_mask, 1.0, think_discount)
    return w * mask


def inverse_logprob_weights(log_probs: torch.Tensor, mask: torch.Tensor, logprob_offset: float) -> torch.Tensor:
    """1 / (|log pi| + logprob_offset), DETACHED.

    The seeds' version kept the gradient through the weight: then d/dθ [A log pi / (|log pi| + eps)] =
    A eps / (|log pi| + eps)^2 x d log pi, a different (and vanishing for unlikely tokens) update rule,
    not the reweighting it claims to be. Detached, the gradient is A / (|log pi| + eps) x d log pi.
    """
    return (1.0 / (log_probs.detach().abs() + logprob_offset)) * mask


def masked_softmax_times_count(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over each row's valid tokens, times their count: weights average 1 over a sequence."""
    scores = scores.masked_fill(~mask, float("-inf"))
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an all-masked row gives NaN: zero it
    return p * mask.sum(-1, keepdim=True)


def entropy_weighted_weights(entropy: torch.Tensor, mask: torch.Tensor, entropy_temp: float) -> torch.Tensor:
    """softmax(H_t / temp) over the sequence's valid tokens x their count (soft 80/20: forking tokens up)."""
    return masked_softmax_times_count(entropy.detach() / entropy_temp, mask)


def entropy_threshold(entropies: torch.Tensor, mask_percentile: float) -> float:
    """The batch's entropy value at `mask_percentile` (linear interpolation, as numpy.percentile)."""
    if entropies.numel() == 0:
        return float("inf")
    return float(torch.quantile(entropies.double(), mask_percentile / 100.0))


def entropy_mask_weights(entropy: torch.Tensor, mask: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 for tokens at or above the batch threshold, else 0 (Wang et al. 2025, "Beyond the 80/20 rule").

    Best with PPO clipping (algorithm.policy_loss=ppo, num_iterations > 1): the paper trains with DAPO; in plain GRPO the surviving
    high-entropy tokens have the most negative log-probs and the update concentrates on them.
    """
    return (entropy.detach() >= threshold).float() * mask


@torch.no_grad()
def answer_attention(
    last_q: torch.Tensor, last_k: torch.Tensor, prompt_lens: torch.Tensor, answer_mask: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean attention (last layer, averaged over heads and over the answer's query tokens) that the <answer>
    tokens pay to each generated token: [b, T]. Only the answer rows of the attention map are computed.
    Rows with no answer section are all zero."""
    b, n_heads, _, head_dim = last_q.shape
    rep = n_heads // last_k.shape[1]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=last_q.device)
    for row in range(b):
        gen_idx = answer_mask[row].nonzero().squeeze(-1)
        if gen_idx.numel() == 0:
            continue
        p0 = int(prompt_lens[row])
        q_pos = p0 + gen_idx  # positions of the answer tokens in the whole sequence
        q = last_q[row][:, q_pos].float()  # [H, Na, d]
        k = last_k[row].float().repeat_interleave(rep, dim=0)  # [H, L, d]
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [H, Na, L]
        key_pos = torch.arange(k.shape[1], device=k.device)
        scores = scores.masked_fill(key_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).mean(dim=(0, 1))  # [L]
        t = int(mask[row].sum())
        out[row, :t] = probs[p0: p0 + t]
    return out


def attention_credit_weights(
    credit: torch.Tensor, answer_mask: torch.Tensor, mask: torch.Tensor, credit_scale: float
) -> torch.Tensor:
    """Think-token weights from answer attention, normalized to mean 1 over the think tokens and clamped
    to [1 / credit_scale, credit_scale]; answer tokens keep weight 1; rows with no answer keep weight 1."""
    think = mask & ~answer_mask
    has_answer = (answer_mask & mask).any(dim=-1, keepdim=True)
    mean = (credit * think).sum(-1, keepdim=True) / think.sum(-1, keepdim=True).clamp(min=1)
    normalized = credit / mean.clamp(min=1e-12)
    w = normalized.clamp(1.0 / credit_scale, credit_scale)
    w = torch.where(think & has_answer, w, torch.ones_like(w))
    return w * mask


class AttributionHead(nn.Module):
    """Linear(hidden, 1, no bias) scoring each token from its hidden state; softmax over the sequence's valid
    tokens x their count gives the weights (learned advantage attribution). No bias: a softmax over one
    sequence is invariant to adding the same score to every token, so a bias never changes a weight and
    never gets a gradient. Init std 0.01: near-uniform start."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(self.proj.weight, std=0.01)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_softmax_times_count(self.scores(hidden), mask)


def masked_pearson(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, min_tokens: int = 3) -> torch.Tensor:
    """Per-row Pearson correlation of x and y over the valid tokens: [b], NaN for rows too short or constant."""
    m = mask.to(torch.float64)
    n = m.sum(-1)
    x, y = x.double(), y.double()
    xc = (x - (x * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    yc = (y - (y * m).sum(-1, keepdim=True) / n.clamp(min=1)[:, None]) * m
    denom = (xc.pow(2).sum(-1) * yc.pow(2).sum(-1)).sqrt()
    r = (xc * yc).sum(-1) / denom
    return torch.where((n >= min_tokens) & (denom > 0), r, torch.full_like(r, float("nan")))


def attribution_entropy(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row's attribution distribution p = w / count: [b]."""
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    p = (weights / count) * mask
    return -(p * torch.log(p.clamp(min=1e-30))).sum(-1)


# ============================================================================ weighters (the loop's adapters)

WEIGHTERS: Registry[type[TokenWeighter]] = Registry("mitigation.name")


class TokenWeighter:
    """Weight 1 everywhere: plain GRPO (`none`). Base class of the others; what update.update_policy asks of a
    weighter (update.Weighter)."""

    name = "none"
    needs_hidden = False  # reads the final hidden states (TokenBatch.hidden)
    needs_last_qk = False  # reads the last layer's queries and keys over the whole sequence
    detach_hidden = True  # its own loss reaches the policy's hidden states only when False
    learning_rate: float | None = None  # of its parameters, if it has any (None: the policy's)
    checkpoint_name = "weighter"  # its state's file in a checkpoint (<name>.safetensors), when it has state

    def __init__(self, **_: float):
        self._sums: dict[str, float] = {}
        self._count = 0

    def begin_batch(self, entropies: list[list[float]]) -> None:
        """Called once per update with the rollout's per-token entropies (batch-level statistics)."""

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return batch.mask.float()

    def aux_loss(self, batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor | None:
        return None

    def parameters(self) -> list[nn.Parameter]:
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"weighter {self.name!r} has no state, got keys {sorted(state)}")

    def checkpoint_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Its state as a checkpoint's extra tensor files (none when it has no state)."""
        state = self.state_dict()
        return {self.checkpoint_name: state} if state else {}

    def load_checkpoint_state(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore from a checkpoint's extra tensor files; a file it does not own is an error (the run that wrote
        the checkpoint used another weighter)."""
        other = sorted(set(files) - {self.checkpoint_name})
        if other:
            raise ValueError(f"the checkpoint holds {', '.join(other)}, which weighter {self.name!r} does not use")
        self.load_state_dict(files.get(self.checkpoint_name, {}))

    def _track(self, name: str, value: float, count: int = 1) -> None:
        self._sums[name] = self._sums.get(name, 0.0) + value * count

    def pop_metrics(self, reduce: Callable[[dict[str, float]], dict[str, float]] | None = None) -> dict[str, float]:
        """Metrics accumulated since the last call, averaged per sequence. `reduce` sums the running sums
        over processes (distributed.sum_values), so under torchrun they cover the whole batch."""
        sums = {**self._sums, "_sequences": float(self._count)}
        sums = reduce(sums) if reduce is not None else sums
        n = max(sums.pop("_sequences"), 1.0)
        self._sums, self._count = {}, 0
        return {k: v / n for k, v in sums.items()}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


WEIGHTERS.add("none", TokenWeighter)


@WEIGHTERS.register("outcome_conditional", params={
    "think_discount": Param(0.5, "weight of tokens before <answer>", "in [0, 1]", lambda v: 0 <= v <= 1)})
class OutcomeConditionalWeighter(TokenWeighter):
    def __init__(self, think_discount: float = 0.5, **_: Any):
        super().__init__()
        self.think_discount = think_discount

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return outcome_conditional_weights(batch.answer_mask, batch.mask, self.think_discount)


@WEIGHTERS.register("inverse_logprob", params={
    "logprob_offset": Param(0.1, "w = 1 / (|log_prob| + logprob_offset)", "> 0", lambda v: v > 0)})
class InverseLogprobWeighter(TokenWeighter):
    def __init__(self, logprob_offset: float = 0.1, **_: Any):
        super().__init__()
        self.logprob_offset = logprob_offset

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return inverse_logprob_weights(batch.log_probs, batch.mask, self.logprob_offset)


@WEIGHTERS.register("attention_credit", params={
    "credit_scale": Param(2.0, "think weights clamped to [1/scale, scale]", ">= 1", lambda v: v >= 1)})
class AttentionCreditWeighter(TokenWeighter):
    needs_last_qk = True

    def __init__(self, credit_scale: float = 2.0, **_: Any):
        super().__init__()
        self.credit_scale = credit_scale

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        credit = answer_attention(batch.last_q, batch.last_k, batch.prompt_lens, batch.answer_mask, batch.mask)
        return attention_credit_weights(credit, batch.answer_mask, batch.mask, self.credit_scale)


@WEIGHTERS.register("entropy_weighted", params={
    "entropy_temp": Param(1.0, "w = softmax(H / temp) x count", "> 0", lambda v: v > 0)})
class EntropyWeightedWeighter(TokenWeighter):
    def __init__(self, entropy_temp: float = 1.0, **_: Any):
        super().__init__()
        self.entropy_temp = entropy_temp

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        return entropy_weighted_weights(batch.rollout_entropy, batch.mask, self.entropy_temp)


@WEIGHTERS.register("entropy_masking", params={
    "mask_percentile": Param(80.0, "keep tokens at or above this batch entropy percentile", "in [0, 100)",
                             lambda v: 0 <= v < 100)})
class EntropyMaskingWeighter(TokenWeighter):
    def __init__(self, mask_percentile: float = 80.0, **_: Any):
        super().__init__()
        self.mask_percentile = mask_percentile
        self.threshold = float("inf")

    def begin_batch(self, entropies: list[list[float]]) -> None:
        flat = torch.tensor([h for row in entropies for h in row], dtype=torch.float64)
        self.threshold = entropy_threshold(flat, self.mask_percentile)

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        w = entropy_mask_weights(batch.rollout_entropy, batch.mask, self.threshold)
        self._track("entropy_mask/kept_frac", float(w.sum() / batch.mask.sum().clamp(min=1)), batch.mask.shape[0])
        self._count += batch.mask.shape[0]
        return w


ATTRIBUTION_OBJECTIVES = ("surrogate", "advantage_regression")


@WEIGHTERS.register("attribution", params={
    "attribution_entropy_coef": Param(0.0, "entropy regularizer on the learned weights", ">= 0", lambda v: v >= 0),
    "attribution_lr": Param(None, "learning rate of the head (default: the policy's)", "> 0",
                            lambda v: v > 0, Optional[float]),
    "detach_hidden": Param(True, "true: only the head learns from its loss; false: its gradient also reaches "
                           "the policy's hidden states", "true or false", lambda v: isinstance(v, bool), bool,
                           section="attribution"),
    "objective": Param("surrogate", "surrogate (the seed's) or advantage_regression", " or ".join(
        ATTRIBUTION_OBJECTIVES), lambda v: v in ATTRIBUTION_OBJECTIVES, str, section="attribution"),
})
class AttributionWeighter(TokenWeighter):
    """The learned attribution head (seed 002). Two objectives (`attribution.objective`):

    surrogate (the seed's): the weights stay in the policy loss with their gradient, so the head is trained
      by the same loss as the policy. For -A w_t log pi_t that gradient moves weight toward tokens where
      A x log pi_t is largest: for A > 0 the tokens the policy is already sure of, for A < 0 the least likely
      ones (CREDIT_ASSIGNMENT_ANALYSIS.md derives it). `attribution.detach_hidden: false` lets that gradient
      reach the policy's hidden states too (the seed's "gradients flow through both").
    advantage_regression: the head predicts per-token credit c_t whose sequence mean regresses the episode's
      advantage, (mean_t c_t - A)^2 (a return decomposition with per-sequence normalization). The weights
      n x softmax(sign(A) c_t) are detached in the policy loss: tokens predicted to push toward the outcome
      get more of it. The head is trained only by the regression.
    `attribution_entropy_coef` > 0 (surrogate) subtracts coef x entropy(weights) per sequence from the loss.
    """

    needs_hidden = True
    checkpoint_name = "attribution_head"

    def __init__(self, hidden_size: int = 0, attribution_entropy_coef: float = 0.0, detach_hidden: bool = True,
                 objective: str = "surrogate", attribution_lr: float | None = None,
                 device: torch.device | str = "cpu", **_: Any):
        super().__init__()
        _check(hidden_size > 0, "the attribution weighter needs the model's hidden_size")
        self.head = AttributionHead(hidden_size).to(device)
        self.entropy_coef = attribution_entropy_coef
        self.detach_hidden = detach_hidden
        self.objective = objective
        self.learning_rate = attribution_lr

    def weights(self, batch: TokenBatch) -> torch.Tensor:
        scores = self.head.scores(batch.hidden)
        if self.objective == "advantage_regression":
            sign = torch.sign(batch.advantages.to(scores.dtype))[:, None]
            w = masked_softmax_times_count((sign * scores).detach(), batch.mask)
        else:
            w = masked_softmax_times_count(scores, batch.mask)
        self._log(w.detach(), batch)
        return w

    def _log(self, w: torch.Tensor, batch: TokenBatch) -> None:
        """The seed's per-sequence metrics, and what the weights correlate with (within each sequence)."""
        mask = batch.mask
        rows = mask.any(-1)
        n = int(rows.sum())
        if n == 0:
            return
        big = torch.finfo(w.dtype).max
        count = mask.sum(-1).clamp(min=1)
        mean = (w * mask).sum(-1) / count
        var = (((w - mean[:, None]) ** 2) * mask).sum(-1) / count
        self._track("attribution/entropy", float(attribution_entropy(w, mask)[rows].mean()), n)
        self._track("attribution/max", float(w.masked_fill(~mask, -big).max(-1).values[rows].mean()), n)
        self._track("attribution/min", float(w.masked_fill(~mask, big).min(-1).values[rows].mean()), n)
        self._track("attribution/std", float(var.sqrt()[rows].mean()), n)
        position = torch.arange(mask.shape[1], device=mask.device)[None, :] / count[:, None]
        for name, other in (("log_prob", batch.log_probs.detach()), ("entropy", batch.entropy),
                            ("rel_position", position.expand_as(w))):
            r = masked_pearson(w, other, mask)
            ok = ~torch.isnan(r)
            self._track(f"attribution/corr_{name}", float(r[ok].mean()) if ok.any() else 0.0, n)
        self._count += n

    def aux_loss(self, batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor | None:
        rows = batch.mask.any(-1)
        if self.objective == "advantage_regression":
            scores = self.head.scores(batch.hidden)
            m = batch.mask.to(scores.dtype)
            predicted = (scores * m).sum(-1) / m.sum(-1).clamp(min=1)
            err = (predicted - batch.advantages.to(scores.dtype)) ** 2
            self._track("attribution/regression_mse", float(err[rows].detach().mean()) if rows.any() else 0.0,
                        int(rows.sum()))
            return err[rows].mean() if rows.any() else None
        if self.entropy_coef == 0:
            return None
        return -self.entropy_coef * attribution_entropy(weights, batch.mask)[rows].mean()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.head.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        # heads saved before the bias was removed: the bias never changed a weight, so it is dropped
        self.head.load_state_dict({k: v for k, v in state.items() if k != "proj.bias"})


def build_weighter(name: str, **params: Any) -> TokenWeighter:
    """A weighter by registered name, with its declared keys from `params` (checked; the defaults where absent)
    and what the loop supplies (`hidden_size`, `device`); it ignores the rest."""
    weighter = WEIGHTERS.get(name)(**{**params, **WEIGHTERS.bind(name, params)})
    weighter.name = name
    return weighter
