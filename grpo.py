"""GRPO: batched sampling with a KV cache, rollouts, group-relative advantages, loss aggregation and the
policy update.

The math is in small pure functions on tensors (advantages, group filtering, loss aggregation, the
clipped surrogate, the k3 KL estimator) that tests call directly; the two stateful pieces are
`sample` (owns the model's KV cache for one rollout) and `update_policy` (one optimizer step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data_types import Episode, TokenBatch, UpdateStats

# ============================================================================ sampling


def sample_next_token(
    logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), optionally nucleus-truncated.

    Uses the exponential race (argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i),
    which is exact categorical sampling without a host sync (gpt-fast's trick). temperature 0 = greedy.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always survives
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


@dataclass
class SampleOutput:
    tokens: list[list[int]]  # new tokens per prompt, up to and including the first end token
    log_probs: list[list[float]]  # log pi(token) under the untempered policy, from the cached forward
    entropies: list[list[float]]  # entropy of the untempered policy at each sampled position
    finished: list[bool]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
    progress: bool = False,
) -> SampleOutput:
    """Batched sampling for prompts of different lengths: left-pad, prefill once, decode with the KV cache.

    Left padding keeps every row's next token in the same cache slot; `pad_lens` makes the model ignore
    the padding and shift RoPE positions, so each row sees exactly its unpadded prompt.
    """
    device = next(model.parameters()).device
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device)
    batch = len(prompt_token_ids)
    if batch == 0:
        return SampleOutput([], [], [], [])
    lens = [len(p) for p in prompt_token_ids]
    if min(lens) == 0:
        raise ValueError("every prompt needs at least one token")
    prompt_len = max(lens)
    tokens = torch.full((batch, prompt_len), pad_token_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompt_token_ids):
        tokens[i, prompt_len - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
    pad_lens = torch.tensor([prompt_len - n for n in lens], device=device)

    model.setup_caches(max_batch_size=batch, max_seq_len=prompt_len + max_new_tokens)
    out_tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    out_logp = torch.zeros(batch, max_new_tokens, device=device)
    out_ent = torch.zeros(batch, max_new_tokens, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    lengths = torch.full((batch,), max_new_tokens, dtype=torch.long, device=device)
    try:
        last = torch.full((batch, 1), prompt_len - 1, device=device)  # the prompt's other logits are never used
        logits = model(tokens, input_pos=torch.arange(prompt_len, device=device), pad_lens=pad_lens,
                       logits_positions=last)[:, -1]
        steps = range(max_new_tokens)
        for t in tqdm(steps, desc="rollout", leave=False, disable=None if progress else True):
            next_token = sample_next_token(logits, temperature, top_p, generator)
            logp = torch.log_softmax(logits.float(), dim=-1)
            out_logp[:, t] = logp.gather(-1, next_token[:, None]).squeeze(-1)
            out_ent[:, t] = -(logp.exp() * logp).sum(-1)
            next_token = torch.where(finished, torch.full_like(next_token, pad_token_id), next_token)
            out_tokens[:, t] = next_token
            just_ended = ~finished & torch.isin(next_token, eos)
            lengths = torch.where(just_ended, torch.full_like(lengths, t + 1), lengths)
            finished |= just_ended
            if t + 1 == max_new_tokens or bool(finished.all()):
                break
            logits = model(
                next_token[:, None], input_pos=torch.tensor([prompt_len + t], device=device), pad_lens=pad_lens
            )[:, -1]
    finally:
        model.clear_caches()
    lengths_l = lengths.tolist()
    toks, lps, ents = out_tokens.tolist(), out_logp.tolist(), out_ent.tolist()
    return SampleOutput(
        tokens=[toks[i][: lengths_l[i]] for i in range(batch)],
        log_probs=[lps[i][: lengths_l[i]] for i in range(batch)],
        entropies=[ents[i][: lengths_l[i]] for i in range(batch)],
        finished=finished.tolist(),
    )


def generate(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> list[list[int]]:
    """Each prompt's completion: new tokens up to and including the first end token."""
    return sample(
        model, prompt_token_ids, max_new_tokens, eos_token_id, temperature, top_p, seed, generator, pad_token_id
    ).tokens


def section_start(tokenizer: Any, token_ids: Sequence[int], text: str, tag: str = "<answer>") -> int | None:
    """Index of the first token whose text overlaps `tag`'s first occurrence in the decoded completion.

    Works whether the tag is one token (a char-level vocabulary) or split over several (Qwen's BPE);
    binary search over prefix decodes keeps it O(n log n).
    """
    char_start = text.find(tag)
    if char_start < 0:
        return None
    lo, hi = 0, len(token_ids) - 1
    while lo < hi:  # smallest k with len(decode(ids[:k+1])) > char_start
        mid = (lo + hi) // 2
        if len(tokenizer.decode(list(token_ids[: mid + 1]))) > char_start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Any],
    prompts: Sequence[str],
    reward_fn: Callable[[Any, str], dict],
    num_answers_per_question: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> list[Episode]:
    """Sample `num_answers_per_question` completions per question and score them.

    Episodes come back group-major: episodes[q * group_size + j] is answer j to question q.
    `reward_fn(problem, completion_text)` returns {"reward": float, "reward_info": {...}}.
    """
    group_size = num_answers_per_question
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    flat_ids = [ids for ids in prompt_ids for _ in range(group_size)]
    chunk = batch_size or len(flat_ids)
    outputs: list[SampleOutput] = []
    for start in range(0, len(flat_ids), chunk):
        outputs.append(
            sample(model, flat_ids[start: start + chunk], max_new_tokens, tokenizer.end_token_ids,
                   temperature, top_p, generator=generator, pad_token_id=tokenizer.pad_token_id,
                   progress=progress)
        )
    tokens = [t for o in outputs for t in o.tokens]
    log_probs = [t for o in outputs for t in o.log_probs]
    entropies = [t for o in outputs for t in o.entropies]
    finished = [f for o in outputs for f in o.finished]

    episodes = []
    for i, gen in enumerate(tokens):
        q = i // group_size
        body = gen[:-1] if finished[i] else gen  # the end token is not part of the answer text
        text = tokenizer.decode(body)
        scored = reward_fn(problems[q], text)
        episodes.append(Episode(
            prompt=prompts[q], prompt_token_ids=prompt_ids[q], generated_token_ids=gen, text=text,
            reward=float(scored["reward"]), reward_info=dict(scored["reward_info"]), finished=finished[i],
            group_idx=q, problem=problems[q], log_probs=log_probs[i], entropies=entropies[i],
            answer_start=section_start(tokenizer, body, text) if body else None,
        ))
    return episodes


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


def policy_loss_per_token(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip: bool = False,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token loss to minimize, and which tokens were clipped.

    Plain: -A * log pi. Clipped (PPO; DAPO's asymmetric clip-higher): -min(r A, clip(r, 1-eps_low,
    1+eps_high) A) with r = pi / pi_old. With old == current (one iteration), r = 1 and the gradient is
    exactly the plain one's.
    """
    if not clip:
        return -advantages * log_probs, torch.zeros_like(log_probs, dtype=torch.bool)
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def kl_k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = log pi_ref - log pi (>= 0)."""
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1


def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits [b, T, V] and targets [b, T]: log pi(target), entropy, and ||onehot(target) - p||_2.

    The last one is the size of d(log pi(y))/d(logits): the true per-token gradient scale at the logits
    (times |A|), unlike |A x log pi|. Entropy and the norm are detached.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        sq = 1.0 - 2.0 * token_logp.exp() + (p * p).sum(-1)
        grad_norm = sq.clamp(min=0).sqrt()
    return token_logp, entropy, grad_norm


def entropy_with_grad(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ============================================================================ the update


@dataclass
class UpdateConfig:
    micro_batch_size: int = 8
    loss_agg_mode: str = "token-mean"
    max_len: int | None = None  # the generation budget, for seq-mean-token-sum-norm
    max_grad_norm: float = 1.0
    ppo_clip: bool = False
    num_iterations: int = 1
    epsilon_low: float = 0.2
    epsilon_high: float = 0.28
    beta: float = 0.0  # KL coefficient (needs ref_model)
    entropy_coef: float = 0.0
    teacher_forcing_coef: float = 0.0
    pad_token_id: int = 0
    progress: bool = False


def _pad(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype, device=device)
    return out


@dataclass
class CompletionForward:
    """The policy's outputs on prompt + completion, aligned on the completion's tokens."""

    logits: torch.Tensor  # [b, T, V] at the positions that predict each generated token
    targets: torch.Tensor  # [b, T] the generated tokens (0 where masked)
    mask: torch.Tensor  # [b, T] real generated tokens
    prompt_lens: torch.Tensor  # [b] where each completion starts in the whole sequence
    hidden: torch.Tensor | None = None  # [b, T, hidden] at the same positions as the logits
    last_q: torch.Tensor | None = None  # [b, H, L, head_dim] last layer, whole sequence
    last_k: torch.Tensor | None = None


def forward_completions(
    model: torch.nn.Module,
    episodes: Sequence[Episode],
    pad_token_id: int,
    need_hidden: bool = False,
    need_last_qk: bool = False,
) -> CompletionForward:
    """Run prompt + completion (right-padded) through the model; logits only where completion tokens are
    predicted: position prompt_len - 1 + t predicts completion token t."""
    device = next(model.parameters()).device
    seqs = [list(e.prompt_token_ids) + list(e.generated_token_ids) for e in episodes]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_token_id, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long, device=device)
    gen_lens = torch.tensor([len(e.generated_token_ids) for e in episodes], device=device)
    prompt_lens = torch.tensor([len(e.prompt_token_ids) for e in episodes], device=device)
    offsets = torch.arange(int(gen_lens.max()), device=device)
    mask = offsets[None, :] < gen_lens[:, None]
    pred_pos = (prompt_lens[:, None] - 1 + offsets[None, :]).clamp(max=width - 1)
    targets = tokens.gather(1, (pred_pos + 1).clamp(max=width - 1)).masked_fill(~mask, 0)
    out = model(tokens, output_hidden=need_hidden, output_last_qk=need_last_qk, logits_positions=pred_pos)
    if not (need_hidden or need_last_qk):
        return CompletionForward(out, targets, mask, prompt_lens)
    return CompletionForward(out.logits, targets, mask, prompt_lens, out.hidden, out.last_q, out.last_k)


def _micro_batches(n: int, size: int) -> list[range]:
    return [range(s, min(n, s + size)) for s in range(0, n, size)]


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    episodes: Sequence[Episode],
    advantages: torch.Tensor,
    config: UpdateConfig,
    weighter: Any = None,
    ref_model: torch.nn.Module | None = None,
    extra_parameters: Sequence[torch.nn.Parameter] = (),
    teacher_episodes: Sequence[Episode] = (),
) -> UpdateStats:
    """One GRPO update on `episodes` (advantages: one scalar per episode).

    Per token: loss = policy_loss(A x w) + beta x KL_k3 - entropy_coef x H, aggregated by `loss_agg_mode`
    over the whole batch (micro-batches accumulate gradients with the full batch's normalizers), where w is
    the token weighter's weight (1 without one). With `num_iterations` > 1 the same batch is reused with the
    clipped surrogate against the rollout's log-probs. `teacher_episodes` (optional) add
    teacher_forcing_coef x mean NLL of reference completions. A non-finite loss or gradient skips the step.
    """
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_parameters)
    n = len(episodes)
    adv = advantages.to(device=device, dtype=torch.float32)
    total_tokens = sum(len(e.generated_token_ids) for e in episodes)
    tf_tokens = sum(len(e.generated_token_ids) for e in teacher_episodes)
    if weighter is not None:
        weighter.begin_batch([e.entropies for e in episodes])
    clip = config.ppo_clip or config.num_iterations > 1
    stats = UpdateStats(metrics={})
    sums: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        sums[name] = sums.get(name, 0.0) + value

    model.train()
    for iteration in range(config.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        loss_total = 0.0
        batches = _micro_batches(n, config.micro_batch_size)
        for idx in tqdm(batches, desc="update", leave=False, disable=None if config.progress else True):
            mb = [episodes[i] for i in idx]
            need_hidden = bool(weighter is not None and weighter.needs_hidden)
            need_qk = bool(weighter is not None and weighter.needs_last_qk)
            fwd = forward_completions(model, mb, config.pad_token_id, need_hidden, need_qk)
            logits, targets, mask = fwd.logits, fwd.targets, fwd.mask
            log_probs, entropy, grad_norm = token_statistics(logits, targets)
            width = mask.shape[1]
            old_log_probs = _pad([e.log_probs for e in mb], width, 0.0, torch.float32, device)
            rollout_entropy = _pad([e.entropies for e in mb], width, 0.0, torch.float32, device)
            answer_mask = torch.zeros_like(mask)
            for row, e in enumerate(mb):
                if e.answer_start is not None:
                    answer_mask[row, e.answer_start:] = True
            answer_mask &= mask

            weights = torch.ones_like(log_probs)
            aux_loss = None
            if weighter is not None:
                batch = TokenBatch(
                    token_ids=targets, mask=mask, log_probs=log_probs, entropy=entropy,
                    rollout_entropy=rollout_entropy, answer_mask=answer_mask,
                    hidden=fwd.hidden.detach() if need_hidden else None,
                    last_q=fwd.last_q.detach() if need_qk else None,
                    last_k=fwd.last_k.detach() if need_qk else None, prompt_lens=fwd.prompt_lens,
                )
                weights = weighter.weights(batch)
                aux_loss = weighter.aux_loss(batch, weights)

            token_adv = adv[list(idx)][:, None] * weights
            # with one iteration the "old" policy is the current one: ratio 1, plain policy gradient
            old = old_log_probs if iteration > 0 or config.num_iterations > 1 else log_probs.detach()
            token_loss, clipped = policy_loss_per_token(
                log_probs, old, token_adv, clip, config.epsilon_low, config.epsilon_high)
            if config.beta > 0:
                if ref_model is None:
                    raise ValueError("beta > 0 needs a reference model")
                with torch.no_grad():
                    ref_logits = forward_completions(ref_model, mb, config.pad_token_id).logits
                    ref_log_probs, _, _ = token_statistics(ref_logits, targets)
                kl = kl_k3(log_probs, ref_log_probs)
                token_loss = token_loss + config.beta * kl
                add("kl", float((kl.detach() * mask).sum()))
            if config.entropy_coef > 0:
                token_loss = token_loss - config.entropy_coef * entropy_with_grad(logits)
            loss = aggregate_loss(token_loss, mask, config.loss_agg_mode, max_len=config.max_len,
                                  total_tokens=total_tokens, total_seqs=n)
            if aux_loss is not None:
                loss = loss + aux_loss * (len(idx) / n)
            loss.backward()
            loss_total += float(loss.detach())

            if iteration == 0:
                m = mask.float()
                add("entropy", float((entropy * m).sum()))
                add("clip_frac", float((clipped.float() * m).sum()))
                add("weight_sum", float((weights.detach() * m).sum()))
                add("weight_sq_sum", float((weights.detach() ** 2 * m).sum()))
                for row in range(len(mb)):
                    k = int(mask[row].sum())
                    stats.token_log_probs.append(log_probs[row, :k].detach().tolist())
                    stats.token_entropies.append(entropy[row, :k].tolist())
                    stats.token_weights.append(weights[row, :k].detach().tolist())
                    stats.token_logit_grad_norms.append(grad_norm[row, :k].tolist())
            elif config.num_iterations > 1:
                add("clip_frac_late", float((clipped.float() * mask).sum()))

        if teacher_episodes and config.teacher_forcing_coef > 0:
            for idx in _micro_batches(len(teacher_episodes), config.micro_batch_size):
                mb = [teacher_episodes[i] for i in idx]
                fwd = forward_completions(model, mb, config.pad_token_id)
                logp, _, _ = token_statistics(fwd.logits, fwd.targets)
                mask = fwd.mask
                loss = config.teacher_forcing_coef * aggregate_loss(-logp, mask, "token-mean", total_tokens=tf_tokens)
                loss.backward()
                loss_total += float(loss.detach())
                if iteration == 0:
                    add("teacher_nll", float((-logp.detach() * mask).sum()))

        grad_norm_total = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        if not (math.isfinite(loss_total) and torch.isfinite(grad_norm_total)):
            optimizer.zero_grad(set_to_none=True)
            stats.skipped = True
            stats.metrics.update({"loss": loss_total, "grad_norm": float(grad_norm_total)})
            break
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if iteration == 0:
            stats.metrics["loss"] = loss_total
            stats.metrics["grad_norm"] = float(grad_norm_total)

    tok = max(total_tokens, 1)
    if "entropy" in sums:
        stats.metrics["entropy"] = sums["entropy"] / tok
        stats.metrics["clip_frac"] = sums["clip_frac"] / tok
        mean_w = sums["weight_sum"] / tok
        stats.metrics["weight/mean"] = mean_w
        stats.metrics["weight/std"] = math.sqrt(max(sums["weight_sq_sum"] / tok - mean_w ** 2, 0.0))
    if "clip_frac_late" in sums:  # with num_iterations > 1 the ratio moves away from 1 after the first pass
        stats.metrics["clip_frac/later_iterations"] = sums["clip_frac_late"] / (tok * (config.num_iterations - 1))
    if "kl" in sums:
        stats.metrics["kl"] = sums["kl"] / (tok * config.num_iterations)
    if "teacher_nll" in sums:
        stats.metrics["teacher_nll"] = sums["teacher_nll"] / max(tf_tokens, 1)
    if weighter is not None:
        stats.metrics.update(weighter.pop_metrics())
    return stats
