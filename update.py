"""The policy update: completions packed into micro-batches, forwards with per-token statistics, token
weights, old log-probs, the loss (an `Objective` built by grpo.py from its registries), gradient accumulation
and sync, clipping and the step.

`update_policy` reads as its steps: forward, token weights, old log-probs, policy loss, KL and entropy
terms, aggregation, backward, clipped step. It is handed everything it needs: the model, the optimizer, the
episodes and their advantages, how to run (`UpdateSettings`), what to minimize (`Objective`) and the token
weighter (`Weighter`, grpo_mitigations.py), so it knows no registry and no config section.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from config import Config
from data_types import Episode, TokenBatch, UpdateStats
from distributed import (Dist, all_sum, clip_grad_norm, gather, grad_scale, gradient_sync, split_work, sum_gradients,
                         sum_values)
from qwen2_model import SharedPrompts, left_pad

# ============================================================================ what the update is handed


@dataclass(frozen=True)
class Objective:
    """What the update minimizes (grpo.objective builds one): per token policy_loss(log pi, log pi_old, A x w)
    reduced by `aggregate`, plus beta x kl(log pi, log pi_ref) - entropy_coef x H reduced by `aggregate_terms`
    (None: by `aggregate`, summed with the policy term first); plus teacher_forcing_coef x the mean NLL of
    reference completions."""

    policy_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]]  # (log_probs, old, adv, mask) [B, T] each
    aggregate: Callable[..., torch.Tensor]  # (token_loss, mask, total_tokens=, total_seqs=) -> scalar
    aggregate_terms: Callable[..., torch.Tensor] | None = None  # the KL and entropy terms', when it differs
    kl: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # per token; used when beta > 0
    beta: float = 0.0
    entropy_coef: float = 0.0
    teacher_forcing_coef: float = 0.0


@dataclass(frozen=True)
class UpdateSettings:
    """How the update runs (what it minimizes is the Objective)."""

    micro_batch_size: int = 8
    max_tokens_per_micro_batch: int | None = None  # also cap each micro-batch's padded tokens
    # a prompt shared by several completions of a micro-batch (GRPO's groups) runs once, forward and backward
    share_prompts: bool = True
    num_iterations: int = 1  # passes over the same batch (each one optimizer step)
    old_log_probs: str = "recompute"  # recompute: the training forward's before the first step; rollout: the sampler's
    # the sampling temperature T: every training log-prob and entropy (policy, reference model, teacher) is of
    # softmax(logits / T), the distribution the rollout sampled from (rollout.sample_next); T = 0 (greedy): logits / 1
    temperature: float = 1.0
    max_grad_norm: float = 1.0
    pad_token_id: int = 0
    # log-probs over chunks of this many tokens, recomputed in the backward: the [b, T, vocab] logits never
    # exist whole. None: one pass over the full logits.
    logits_chunk_tokens: int | None = 512
    # episodes whose loss has exactly zero gradient (zero_gradient_episodes) run their forward without autograd
    # and skip the backward: the same update, metrics and per-token arrays, for about a third of the cost
    skip_zero_gradient: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.old_log_probs not in ("recompute", "rollout"):
            raise ValueError(f"old_log_probs must be 'recompute' or 'rollout', got {self.old_log_probs!r}")

    @classmethod
    def from_config(cls, config: Config, pad_token_id: int, progress: bool = True) -> UpdateSettings:
        t, a = config.training, config.algorithm
        return cls(micro_batch_size=t.micro_batch_size, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch,
                   share_prompts=t.share_prompts, num_iterations=a.num_iterations, old_log_probs=a.old_log_probs,
                   temperature=t.temperature, max_grad_norm=t.max_grad_norm, pad_token_id=pad_token_id,
                   progress=progress)


class Weighter(Protocol):
    """What the update asks of a token weighter (grpo_mitigations.TokenWeighter implements it)."""

    needs_hidden: bool  # reads the final hidden states (TokenBatch.hidden)
    needs_last_qk: bool  # reads the last layer's queries and keys over the whole sequence
    detach_hidden: bool  # its own loss reaches the policy's hidden states only when False

    def begin_batch(self, entropies: list[list[float]]) -> None: ...
    def weights(self, batch: TokenBatch) -> torch.Tensor: ...
    def aux_loss(self, batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor | None: ...
    def parameters(self) -> list[torch.nn.Parameter]: ...
    def pop_metrics(self, reduce: Callable[[dict[str, float]], dict[str, float]] | None = None
                    ) -> dict[str, float]: ...


# ============================================================================ the advantages it is handed

# One scalar per episode ([B] tensor), or one value per generated token (a sequence of B 1-D tensors/lists)
Advantages = torch.Tensor | Sequence[Sequence[float] | torch.Tensor]


@dataclass(frozen=True)
class EpisodeAdvantages:
    """The advantages of a batch of episodes: one scalar each (`tokens` None: broadcast over its tokens, GRPO's
    form) or one value per generated token (`tokens`, VinePPO's form), with `episode` the per-token mean."""

    episode: torch.Tensor  # [B] float32: the scalar, or the mean of the episode's token advantages
    tokens: list[torch.Tensor] | None = None  # per episode [len(generated_token_ids)] float32

    @classmethod
    def of(cls, advantages: Advantages, episodes: Sequence[Episode], device: Any) -> EpisodeAdvantages:
        """Check `advantages` against `episodes` (one per episode; per token: one per generated token)."""
        if isinstance(advantages, torch.Tensor) and advantages.dim() == 1:
            if len(advantages) != len(episodes):
                raise ValueError(f"advantages: {len(advantages)} values for {len(episodes)} episodes")
            return cls(advantages.to(device=device, dtype=torch.float32))
        if isinstance(advantages, torch.Tensor) or len(advantages) != len(episodes):
            raise ValueError(f"advantages: one scalar per episode ([B] tensor) or one row per episode of per-token "
                             f"values, for {len(episodes)} episodes")
        rows = [torch.as_tensor(r, dtype=torch.float32, device=device) for r in advantages]
        if any(row.dim() != 1 for row in rows):
            raise ValueError("advantages: per-token rows must be 1-D (one scalar per episode is a [B] tensor)")
        for i, (row, e) in enumerate(zip(rows, episodes)):
            if len(row) != len(e.generated_token_ids):
                raise ValueError(f"advantages[{i}]: {len(row)} values for {len(e.generated_token_ids)} generated "
                                 "tokens")
        # the mean in float64: a row of n equal values gives back exactly that value (the scalar form's)
        means = [row.double().mean() if len(row) else row.new_zeros((), dtype=torch.float64) for row in rows]
        return cls(torch.stack(means).float() if means else torch.zeros(0, device=device), rows)

    def select(self, index: Sequence[int]) -> EpisodeAdvantages:
        return EpisodeAdvantages(self.episode[list(index)],
                                 None if self.tokens is None else [self.tokens[i] for i in index])

    def per_token(self, width: int) -> torch.Tensor:
        """[b, width]: each token's advantage (the episode's scalar broadcast, or its own; 0 past its end)."""
        if self.tokens is None:
            return self.episode[:, None]
        out = self.episode.new_zeros(len(self.tokens), width)
        for i, row in enumerate(self.tokens):
            out[i, : len(row)] = row
        return out


# ============================================================================ forwards and per-token statistics


def token_statistics(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From logits [b, T, V] and targets [b, T], for pi = softmax(logits / temperature) (the sampling
    distribution; temperature 0, greedy, keeps logits / 1): log pi(target) and entropy (both with gradient: the
    policy loss and the entropy bonus) and ||onehot(target) - pi||_2 / temperature (detached).

    The last one is the size of d(log pi(y))/d(logits): the true per-token gradient scale at the logits
    (times |A|), unlike |A x log pi|.
    """
    scale = 1.0 if temperature in (0.0, 1.0) else temperature
    logits = logits.float()
    logp = torch.log_softmax(logits if scale == 1.0 else logits / scale, dim=-1)
    token_logp = logp.gather(-1, targets[..., None]).squeeze(-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    with torch.no_grad():
        grad_norm = (1.0 - 2.0 * token_logp.exp() + (p * p).sum(-1)).clamp(min=0).sqrt()
        if scale != 1.0:
            grad_norm = grad_norm / scale
    return token_logp, entropy, grad_norm


def _head_statistics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return token_statistics(hidden @ weight.t(), targets, temperature)


def chunked_token_statistics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int,
                             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`token_statistics` of logits = hidden @ weight.T, computed over chunks of the sequence and recomputed
    in the backward (activation checkpointing), so the [b, T, vocab] logits never exist at once: at Qwen's
    151,936-token vocabulary one fp32 copy of them for 16 x 256 tokens is 2.3 GiB."""
    step = max(1, chunk_tokens // max(hidden.shape[0], 1))
    parts = []
    for start in range(0, hidden.shape[1], step):
        h, t = hidden[:, start: start + step], targets[:, start: start + step]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            parts.append(checkpoint(_head_statistics, h, weight, t, temperature, use_reentrant=False))
        else:
            parts.append(_head_statistics(h, weight, t, temperature))
    return tuple(torch.cat([p[i] for p in parts], dim=1) for i in range(3))  # type: ignore[return-value]


def _pad(rows: Sequence[Sequence[float]], width: int, value: float, dtype: torch.dtype, device: Any) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype, device=device)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=dtype, device=device)
    return out


@dataclass
class CompletionForward:
    """The policy's outputs on prompt + completion, aligned on the completion's tokens."""

    logits: torch.Tensor | None  # [b, T, V] at the positions that predict each token; None when chunked
    targets: torch.Tensor  # [b, T] the generated tokens (0 where masked)
    mask: torch.Tensor  # [b, T] real generated tokens
    prompt_lens: torch.Tensor  # [b] where each completion starts in the whole sequence
    hidden: torch.Tensor | None = None  # [b, T, hidden] at the same positions as the logits
    last_q: torch.Tensor | None = None  # [b, H, L, head_dim] last layer, whole sequence
    last_k: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None  # [b, T] log pi(target), with gradient
    entropy: torch.Tensor | None = None  # [b, T] policy entropy, with gradient
    logit_grad_norm: torch.Tensor | None = None  # [b, T] ||onehot(target) - pi||_2 / T, detached


def prompt_groups(episodes: Sequence[Episode]) -> tuple[list[tuple[int, ...]], list[int]]:
    """The distinct prompts of `episodes` (by their tokens, in first-seen order) and each episode's index there."""
    index: dict[tuple[int, ...], int] = {}
    rows = [index.setdefault(tuple(e.prompt_token_ids), len(index)) for e in episodes]
    return list(index), rows


def _shared_prompts(episodes: Sequence[Episode], pad_token_id: int, device: Any) -> SharedPrompts | None:
    """The distinct prompts of `episodes` (left-padded) and each episode's, or None when none repeats."""
    prompts, rows = prompt_groups(episodes)
    if len(prompts) == len(episodes):
        return None
    tokens, pad_lens = left_pad(prompts, pad_token_id, device)
    return SharedPrompts(tokens, pad_lens, torch.tensor(rows, device=device))


def forward_completions(
    model: torch.nn.Module,
    episodes: Sequence[Episode],
    pad_token_id: int,
    need_hidden: bool = False,
    need_last_qk: bool = False,
    chunk_tokens: int | None = None,
    share_prompts: bool = False,
    temperature: float = 1.0,
) -> CompletionForward:
    """Run prompt + completion (right-padded) through the model; logits only where completion tokens are
    predicted: position prompt_len - 1 + t predicts completion token t. Also the per-token statistics. With
    `chunk_tokens` the logits are never materialized whole (`logits` is None; chunked_token_statistics).
    `share_prompts`: a prompt that several episodes share runs once (the model's SharedPrompts forward; same
    values, fewer FLOPs); not with need_last_qk, whose consumers index the whole sequence. The statistics are of
    softmax(logits / temperature) (token_statistics); the returned logits are the model's own."""
    device = next(model.parameters()).device
    shared = _shared_prompts(episodes, pad_token_id, device) if share_prompts and not need_last_qk else None
    if shared is not None and any(e.generated_token_ids for e in episodes):
        return _forward_continuations(model, episodes, shared, need_hidden, chunk_tokens, temperature)
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
    return _forward_with_statistics(model, tokens, targets, mask, prompt_lens, chunk_tokens, temperature,
                                    output_hidden=need_hidden, output_last_qk=need_last_qk, logits_positions=pred_pos)


def _forward_continuations(model: torch.nn.Module, episodes: Sequence[Episode], shared: SharedPrompts,
                           need_hidden: bool, chunk_tokens: int | None, temperature: float) -> CompletionForward:
    """forward_completions over shared prompts: the model's outputs come aligned on the completion tokens."""
    device = shared.tokens.device
    gen_lens = torch.tensor([len(e.generated_token_ids) for e in episodes], device=device)
    mask = torch.arange(int(gen_lens.max()), device=device)[None, :] < gen_lens[:, None]
    targets = _pad([e.generated_token_ids for e in episodes], mask.shape[1], 0, torch.long, device)
    prompt_lens = torch.tensor([len(e.prompt_token_ids) for e in episodes], device=device)
    return _forward_with_statistics(model, targets, targets, mask, prompt_lens, chunk_tokens, temperature,
                                    prompts=shared, output_hidden=need_hidden)


def _forward_with_statistics(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                             prompt_lens: torch.Tensor, chunk_tokens: int | None, temperature: float,
                             **options: Any) -> CompletionForward:
    """model(tokens, **options), whose outputs are aligned on `targets`, and the per-token statistics: over
    chunks inside the forward (chunked_token_statistics) or from the whole logits."""
    if chunk_tokens:
        out = model(tokens, compute_logits=False, **options,
                    head_fn=lambda h, w: chunked_token_statistics(h, w, targets, chunk_tokens, temperature))
        return CompletionForward(None, targets, mask, prompt_lens, out.hidden, out.last_q, out.last_k,
                                 *out.head_output)
    out = model(tokens, **options)
    if isinstance(out, torch.Tensor):  # neither hidden states nor q/k were asked for
        return CompletionForward(out, targets, mask, prompt_lens, None, None, None,
                                 *token_statistics(out, targets, temperature))
    return CompletionForward(out.logits, targets, mask, prompt_lens, out.hidden, out.last_q, out.last_k,
                             *token_statistics(out.logits, targets, temperature))



# ============================================================================ packing into micro-batches


def micro_batches(episodes: Sequence[Episode], max_size: int, max_tokens: int | None = None) -> list[range]:
    """Consecutive micro-batches of at most `max_size` episodes and, with `max_tokens`, at most that many
    padded tokens (rows x the longest prompt + completion in the micro-batch); an episode longer than the
    budget goes alone. Order is kept, and the update's full-batch normalizers make the gradient the same
    whatever the packing."""
    out: list[range] = []
    start, width = 0, 0
    for i, e in enumerate(episodes):
        n = len(e.prompt_token_ids) + len(e.generated_token_ids)
        rows = i - start
        if rows and (rows >= max_size or (max_tokens is not None and (rows + 1) * max(width, n) > max_tokens)):
            out.append(range(start, i))
            start, width = i, 0
        width = max(width, n)
    if start < len(episodes):
        out.append(range(start, len(episodes)))
    return out


def padded_tokens(episodes: Sequence[Episode], share_prompts: bool) -> int:
    """The padded tokens one forward over `episodes` runs: rows x the longest prompt + completion, or with
    shared prompts each distinct prompt once (left-padded to the longest) plus rows x the longest completion."""
    if not share_prompts:
        return len(episodes) * max(len(e.prompt_token_ids) + len(e.generated_token_ids) for e in episodes)
    prompts, _ = prompt_groups(episodes)
    if len(prompts) == len(episodes):
        return padded_tokens(episodes, False)
    return (len(prompts) * max(len(p) for p in prompts)
            + len(episodes) * max(len(e.generated_token_ids) for e in episodes))


def pack_episodes(episodes: Sequence[Episode], size: int, max_tokens: int | None, share_prompts: bool
                  ) -> list[list[int]]:
    """Micro-batches (episode indices) for the update: in order of length, so a micro-batch pads little, or
    with shared prompts also group by group (each group's prompt then runs once), whichever runs fewer tokens."""
    n = len(episodes)
    orders = [sorted(range(n), key=lambda i: len(episodes[i].prompt_token_ids) + len(episodes[i].generated_token_ids))]
    if share_prompts:
        prompts, of = prompt_groups(episodes)
        groups: list[list[int]] = [[] for _ in prompts]
        for i, g in enumerate(of):
            groups[g].append(i)
        gen = [len(e.generated_token_ids) for e in episodes]
        orders.append([i for group in sorted(groups, key=lambda rows: sum(gen[i] for i in rows) / len(rows))
                       for i in sorted(group, key=lambda i: gen[i])])
    best, best_cost = [], math.inf
    for order in orders:
        packed = [[order[j] for j in idx] for idx in micro_batches([episodes[i] for i in order], size, max_tokens)]
        cost = sum(padded_tokens([episodes[i] for i in mb], share_prompts) for mb in packed)
        if cost < best_cost:
            best, best_cost = packed, cost
    return best



@dataclass(frozen=True)
class _Unit:
    """One micro-batch of the update: policy episodes or teacher completions, by index."""

    kind: str  # "policy" | "teacher"
    index: list[int]  # episode indices (policy micro-batches hold episodes of similar length)
    key: int  # its position among the policy micro-batches (the old-log-prob cache key)
    frozen: bool = False  # every episode's loss has zero gradient: forward without autograd, no backward


def zero_gradient_episodes(advantages: torch.Tensor | EpisodeAdvantages, settings: UpdateSettings,
                           objective: Objective, weighter: Weighter | None = None) -> torch.Tensor:
    """[B] bool: episodes whose loss contributes exactly zero gradient, so the update can skip their backward.

    Every registered policy loss is A x (something finite) per token, token weights included (a test checks
    each loss's gradient at A = 0), so an episode whose advantage is exactly 0 on every token (a GRPO group
    whose rewards are all equal) adds exact zeros to the gradient, unless a term does not scale with A: the KL
    penalty, the entropy bonus, or a learned weighter's own loss (its parameters)."""
    adv = advantages if isinstance(advantages, EpisodeAdvantages) else EpisodeAdvantages(advantages)
    learned = weighter is not None and bool(weighter.parameters())
    if not settings.skip_zero_gradient or objective.beta > 0 or objective.entropy_coef > 0 or learned:
        return torch.zeros(len(adv.episode), dtype=torch.bool)
    if adv.tokens is None:
        return adv.episode.detach().cpu() == 0
    return torch.tensor([bool((row == 0).all()) for row in adv.tokens], dtype=torch.bool)


def _work_units(episodes: Sequence[Episode], teachers: Sequence[Episode], settings: UpdateSettings, d: Dist,
                share_prompts: bool, frozen: Sequence[bool]) -> list[tuple[_Unit | None, bool]]:
    """This rank's micro-batches (None = an empty one, to keep ranks in step), each with whether it runs its
    backward. Episodes are packed in order of length, so a micro-batch pads little (or by group, when the
    forward shares prompts and that runs fewer tokens); with several ranks the micro-batches are made small
    enough that each rank gets some. The full-batch normalizers make the gradient the same whatever the packing.

    `frozen` episodes (zero gradient) are packed apart and split over the ranks apart, first: every rank then
    skips the backward at the same positions (FSDP2 gathers weights in each backward, so ranks must make the
    same calls). The last position always runs it: the gradient sync, and every gradient exists (zeros when no
    episode carries any, so AdamW still steps as it would)."""
    size = settings.micro_batch_size
    if d.enabled:
        size = max(1, min(size, math.ceil(len(episodes) / d.world_size)))
    kinds: list[tuple[list[_Unit], bool]] = []  # (micro-batches, whether they run a backward)
    key = 0  # numbers the policy micro-batches
    for is_frozen in (True, False):
        part = [i for i in range(len(episodes)) if bool(frozen[i]) == is_frozen]
        packed = pack_episodes([episodes[i] for i in part], size, settings.max_tokens_per_micro_batch,
                               share_prompts) if part else []
        kinds.append(([_Unit("policy", [part[j] for j in mb], key + k, is_frozen) for k, mb in enumerate(packed)],
                      not is_frozen))
        key += len(packed)
    if teachers:
        kinds.append(([_Unit("teacher", list(idx), -1) for idx in
                       micro_batches(teachers, settings.micro_batch_size, settings.max_tokens_per_micro_batch)],
                      True))
    mine: list[tuple[_Unit | None, bool]] = []
    for units, backward in kinds:
        part, count = split_work(len(units), d)
        mine += [(units[i], backward) for i in part] + [(None, backward)] * (count - len(part))
    if mine:
        mine[-1] = (mine[-1][0], True)
    return mine


# ============================================================================ one micro-batch's loss


@dataclass
class _BatchTotals:
    """Full-batch normalizers, so micro-batch losses sum exactly to the full-batch loss."""

    seqs: int
    tokens: int
    teacher_tokens: int


@dataclass
class _Sums:
    """Token-weighted running sums of one update's scalar metrics, by (kind, name): "token" for the first
    pass's per-token statistics, "policy" and "policy_later" for the policy loss's own metrics in the first
    pass and in the later ones (num_iterations > 1). Summed over ranks at the end, then normalized."""

    totals: dict[tuple[str, str], float] = field(default_factory=dict)

    def add(self, kind: str, name: str, value: float) -> None:
        self.totals[kind, name] = self.totals.get((kind, name), 0.0) + value


@dataclass
class _MicroBatchTokens:
    """One micro-batch's forward, aligned on its completion tokens."""

    fwd: CompletionForward
    log_probs: torch.Tensor  # [b, T] with grad
    entropy: torch.Tensor  # [b, T] detached
    logit_grad_norm: torch.Tensor  # [b, T] detached
    rollout_log_probs: torch.Tensor  # [b, T] from the sampler (0 where missing)
    has_rollout: torch.Tensor  # [b, T] bool: tokens with a rollout log-prob
    rollout_entropy: torch.Tensor  # [b, T]
    answer_mask: torch.Tensor  # [b, T]


def _forward_tokens(model: torch.nn.Module, mb: Sequence[Episode], weighter: Weighter | None,
                    settings: UpdateSettings) -> _MicroBatchTokens:
    """Step 1, forward + token statistics: log pi, entropy and the logit-gradient norm of each completion token."""
    need_hidden = weighter is not None and weighter.needs_hidden
    need_qk = weighter is not None and weighter.needs_last_qk
    fwd = forward_completions(model, mb, settings.pad_token_id, need_hidden, need_qk, settings.logits_chunk_tokens,
                              settings.share_prompts, settings.temperature)
    width, device = fwd.mask.shape[1], fwd.mask.device
    rollout_lp = _pad([e.log_probs for e in mb], width, 0.0, torch.float32, device)
    n_rollout = torch.tensor([len(e.log_probs) for e in mb], device=device)
    has_rollout = (torch.arange(width, device=device)[None, :] < n_rollout[:, None]) & fwd.mask
    answer_mask = torch.zeros_like(fwd.mask)
    for row, e in enumerate(mb):
        if e.answer_start is not None:
            answer_mask[row, e.answer_start:] = True
    return _MicroBatchTokens(fwd, fwd.log_probs, fwd.entropy.detach(), fwd.logit_grad_norm, rollout_lp, has_rollout,
                             _pad([e.entropies for e in mb], width, 0.0, torch.float32, device), answer_mask & fwd.mask)


def _token_weights(weighter: Weighter | None, tok: _MicroBatchTokens, adv: EpisodeAdvantages
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 2, the weighter's per-token weights (1 without one) and its auxiliary loss."""
    if weighter is None:
        return tok.fwd.mask.float(), None
    fwd = tok.fwd
    hidden = fwd.hidden
    if hidden is not None and weighter.detach_hidden:  # the head alone learns from its loss
        hidden = hidden.detach()
    batch = TokenBatch(
        token_ids=fwd.targets, mask=fwd.mask, log_probs=tok.log_probs, entropy=tok.entropy,
        rollout_entropy=tok.rollout_entropy, answer_mask=tok.answer_mask, hidden=hidden,
        last_q=fwd.last_q.detach() if fwd.last_q is not None else None,
        last_k=fwd.last_k.detach() if fwd.last_k is not None else None, prompt_lens=fwd.prompt_lens,
        advantages=adv.episode,  # one per episode: per-token advantages give their mean
    )
    weights = weighter.weights(batch)
    return weights, weighter.aux_loss(batch, weights)


def _old_log_probs(tok: _MicroBatchTokens, settings: UpdateSettings, iteration: int,
                   cache: dict[int, torch.Tensor], key: int) -> torch.Tensor:
    """Step 3, the "old" policy's log-probs for the ratio.

    recompute: the training forward's own log-probs before the first optimizer step. In iteration 0 the
    weights have not moved yet, so the detached log-probs of this very forward are exactly what a separate
    no-grad forward would give (the first ratio is exactly 1) at no extra cost; later iterations reuse them.
    rollout: the sampler's (KV-cached, possibly lower-precision) log-probs; tokens without one (injected or
    teacher completions) fall back to the recomputed value.
    """
    if iteration == 0:
        cache[key] = tok.log_probs.detach()
    recomputed = cache[key]
    if settings.old_log_probs == "rollout":
        return torch.where(tok.has_rollout, tok.rollout_log_probs, recomputed)
    return recomputed


def _kl_and_entropy_terms(tok: _MicroBatchTokens, mb: Sequence[Episode], objective: Objective,
                          settings: UpdateSettings, ref_model: torch.nn.Module | None, sums: _Sums
                          ) -> torch.Tensor | None:
    """Step 5, beta x KL(pi || pi_ref) - entropy_coef x H per token (None when both are off)."""
    if objective.beta <= 0 and objective.entropy_coef <= 0:
        return None
    extra = torch.zeros_like(tok.log_probs)
    if objective.beta > 0:
        if ref_model is None or objective.kl is None:
            raise ValueError("beta > 0 needs a reference model and a KL estimator")
        with torch.no_grad():
            ref_log_probs = forward_completions(ref_model, mb, settings.pad_token_id,
                                                chunk_tokens=settings.logits_chunk_tokens,
                                                share_prompts=settings.share_prompts,
                                                temperature=settings.temperature).log_probs
        kl = objective.kl(tok.log_probs, ref_log_probs)
        extra = extra + objective.beta * kl
        sums.add("token", "kl", float(torch.where(tok.fwd.mask, kl.detach(), 0.0).sum()))
    if objective.entropy_coef > 0:
        extra = extra - objective.entropy_coef * tok.fwd.entropy
    return extra


def _record_tokens(stats: UpdateStats, tok: _MicroBatchTokens, weights: torch.Tensor, sums: _Sums) -> None:
    """First-iteration per-token arrays for the credit logger, and token-summed metrics."""
    mask = tok.fwd.mask
    m = mask.float()
    w = weights.detach()
    sums.add("token", "entropy", float((tok.entropy * m).sum()))
    sums.add("token", "weight_sum", float((w * m).sum()))
    sums.add("token", "weight_sq_sum", float((w ** 2 * m).sum()))
    gap = (tok.rollout_log_probs - tok.log_probs.detach()).abs() * tok.has_rollout
    sums.add("token", "rollout_gap_sum", float(gap.sum()))
    sums.add("token", "rollout_gap_tokens", float(tok.has_rollout.sum()))
    lengths = mask.sum(-1).tolist()
    for rows, t in ((stats.token_log_probs, tok.log_probs.detach()), (stats.token_entropies, tok.entropy),
                    (stats.token_weights, w), (stats.token_logit_grad_norms, tok.logit_grad_norm)):
        rows.extend(r[:k] for r, k in zip(t.tolist(), lengths))


@dataclass
class _Pass:
    """What every micro-batch of one pass over the batch shares."""

    objective: Objective
    settings: UpdateSettings
    weighter: Weighter | None
    ref_model: torch.nn.Module | None
    totals: _BatchTotals
    iteration: int
    old_cache: dict[int, torch.Tensor]
    stats: UpdateStats
    sums: _Sums


def _micro_batch_loss(model: torch.nn.Module, mb: Sequence[Episode], adv: EpisodeAdvantages, key: int, p: _Pass
                      ) -> torch.Tensor:
    """Steps 1-6 for one micro-batch: the scalar loss whose gradient this micro-batch contributes."""
    tok = _forward_tokens(model, mb, p.weighter, p.settings)
    weights, aux_loss = _token_weights(p.weighter, tok, adv)
    old = _old_log_probs(tok, p.settings, p.iteration, p.old_cache, key)
    token_adv = adv.per_token(weights.shape[1]) * weights  # step 4: the policy loss sees weighted per-token advantages
    token_loss, loss_metrics = p.objective.policy_loss(tok.log_probs, old, token_adv, tok.fwd.mask)
    terms = _kl_and_entropy_terms(tok, mb, p.objective, p.settings, p.ref_model, p.sums)
    totals = {"total_tokens": p.totals.tokens, "total_seqs": p.totals.seqs}  # step 6, full-batch normalizers
    if terms is not None and p.objective.aggregate_terms is None:
        token_loss = token_loss + terms
    loss = p.objective.aggregate(token_loss, tok.fwd.mask, **totals)
    if terms is not None and p.objective.aggregate_terms is not None:  # GSPO's own mode for its term alone
        loss = loss + p.objective.aggregate_terms(terms, tok.fwd.mask, **totals)
    if aux_loss is not None:
        loss = loss + aux_loss * (len(mb) / p.totals.seqs)
    n_tok = float(tok.fwd.mask.sum())
    for name, value in loss_metrics.items():
        p.sums.add("policy" if p.iteration == 0 else "policy_later", name, value * n_tok)
    if p.iteration == 0:
        _record_tokens(p.stats, tok, weights, p.sums)
    return loss


def _teacher_forcing_loss(model: torch.nn.Module, teachers: Sequence[Episode], p: _Pass) -> torch.Tensor:
    """teacher_forcing_coef x mean NLL of one micro-batch of reference completions (full-batch normalizer)."""
    fwd = forward_completions(model, teachers, p.settings.pad_token_id, chunk_tokens=p.settings.logits_chunk_tokens,
                              temperature=p.settings.temperature)
    nll = torch.where(fwd.mask, -fwd.log_probs, 0.0)
    if p.iteration == 0:
        p.sums.add("token", "teacher_nll", float(nll.detach().sum()))
    return p.objective.teacher_forcing_coef * (nll.sum() / max(p.totals.teacher_tokens, 1))


def _empty_unit_loss(model: torch.nn.Module, episodes: Sequence[Episode], settings: UpdateSettings) -> torch.Tensor:
    """A zero loss through the whole model, for a rank with fewer micro-batches than the others: DDP and FSDP2
    synchronize inside forward/backward, so every rank must make the same calls."""
    fwd = forward_completions(model, episodes[:1], settings.pad_token_id, chunk_tokens=settings.logits_chunk_tokens)
    return fwd.log_probs.sum() * 0.0


# ============================================================================ the update


def _clip_and_step(optimizer: torch.optim.Optimizer, params: list, loss_total: float, max_grad_norm: float
                   ) -> tuple[bool, float]:
    """Step 7, clip the gradient norm and step, unless the loss or gradient is non-finite (then nothing moves)."""
    grad_norm = clip_grad_norm(params, max_grad_norm)
    ok = math.isfinite(loss_total) and bool(torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return ok, float(grad_norm)


def _summarize(stats: UpdateStats, sums: dict[tuple[str, str], float], totals: _BatchTotals,
               num_iterations: int) -> None:
    """Token-weighted sums -> per-token means; the policy loss's metrics per pass group."""
    tok = max(totals.tokens, 1)
    token = {name: v for (kind, name), v in sums.items() if kind == "token"}
    stats.metrics["clip_frac"] = 0.0  # losses without a ratio never clip
    for (kind, name), value in sums.items():
        if kind == "policy":
            stats.metrics[name] = value / tok
        elif kind == "policy_later":
            stats.metrics[f"{name}/later_iterations"] = value / (tok * (num_iterations - 1))
    if "entropy" in token:
        stats.metrics["entropy"] = token["entropy"] / tok
        mean_w = token["weight_sum"] / tok
        stats.metrics["weight/mean"] = mean_w
        stats.metrics["weight/std"] = math.sqrt(max(token["weight_sq_sum"] / tok - mean_w ** 2, 0.0))
        stats.metrics["rollout_logprob_gap"] = token["rollout_gap_sum"] / max(token["rollout_gap_tokens"], 1.0)
    if "kl" in token:
        stats.metrics["kl"] = token["kl"] / (tok * num_iterations)
    if "teacher_nll" in token:
        stats.metrics["teacher_nll"] = token["teacher_nll"] / max(totals.teacher_tokens, 1)


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    episodes: Sequence[Episode],
    advantages: Advantages,
    settings: UpdateSettings,
    objective: Objective,
    weighter: Weighter | None = None,
    ref_model: torch.nn.Module | None = None,
    teacher_episodes: Sequence[Episode] = (),
    dist: Dist = Dist(),
) -> UpdateStats:
    """One GRPO update on `episodes`; `num_iterations` optimizer steps. `advantages`: one scalar per episode
    ([B] tensor, broadcast over its tokens) or one value per generated token (a sequence of B rows).

    Minimizes `objective` (its per-token loss aggregated over the whole batch: micro-batches accumulate with
    the full batch's normalizers), with the weighter's weight w on each token's advantage (1 without one) and
    its parameters trained beside the model's. `teacher_episodes` add teacher_forcing_coef x mean NLL of
    reference completions. A non-finite loss or gradient skips the step and leaves the weights unchanged.

    Under torchrun every rank passes the same whole batch and `model` wrapped by `distributed.wrap`: each rank
    runs its share of the micro-batches, DDP / FSDP2 sum the gradients, and the per-token arrays and
    metrics are gathered, so the result is the single-process one.
    """
    device = next(model.parameters()).device
    head = weighter.parameters() if weighter is not None else []
    params = [p for p in model.parameters() if p.requires_grad] + head
    adv = EpisodeAdvantages.of(advantages, episodes, device)
    teachers = teacher_episodes if objective.teacher_forcing_coef > 0 else ()
    totals = _BatchTotals(len(episodes), sum(len(e.generated_token_ids) for e in episodes),
                          sum(len(e.generated_token_ids) for e in teachers))
    if weighter is not None:
        weighter.begin_batch([e.entropies for e in episodes])
    stats, sums, old_cache = UpdateStats(metrics={}), _Sums(), {}
    # the attention-credit weighter reads whole-sequence attention, so its forwards never share prompts
    share = settings.share_prompts and not (weighter is not None and weighter.needs_last_qk)
    frozen = zero_gradient_episodes(adv, settings, objective, weighter).tolist()
    units = _work_units(episodes, teachers, settings, dist, share, frozen)
    model.train()
    for iteration in range(settings.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        p = _Pass(objective, settings, weighter, ref_model, totals, iteration, old_cache, stats, sums)
        loss_total = 0.0
        bar = tqdm(units, desc="update", leave=False, disable=None if settings.progress and dist.is_main else True)
        for i, (unit, backward) in enumerate(bar):
            with torch.set_grad_enabled(backward):  # no autograd for a micro-batch without gradient
                if unit is None:
                    loss = _empty_unit_loss(model, episodes, settings)
                elif unit.kind == "teacher":
                    loss = _teacher_forcing_loss(model, [teachers[j] for j in unit.index], p)
                else:
                    loss = _micro_batch_loss(model, [episodes[j] for j in unit.index], adv.select(unit.index), unit.key,
                                             p)
            if backward:
                with gradient_sync(model, dist, sync=i == len(units) - 1):
                    (loss * grad_scale(dist)).backward()
            loss_total += float(loss.detach())
        sum_gradients(head, dist)
        loss_total = all_sum(loss_total, dist)
        ok, grad_norm = _clip_and_step(optimizer, params, loss_total, settings.max_grad_norm)
        if iteration == 0 or not ok:
            stats.metrics.update({"loss": loss_total, "grad_norm": grad_norm})
        if not ok:
            stats.skipped = True
            break
    _gather_token_arrays(stats, [j for u, _ in units if u is not None and u.kind == "policy" for j in u.index], dist)
    _summarize(stats, sum_values(sums.totals, dist), totals, settings.num_iterations)
    if weighter is not None:
        stats.metrics.update(weighter.pop_metrics(lambda s: sum_values(s, dist)))
    return stats


def _gather_token_arrays(stats: UpdateStats, processed: list[int], d: Dist) -> None:
    """Every rank's per-token arrays (rows in the order its micro-batches processed episodes `processed`),
    put back in episode order."""
    where = {episode: row for row, episode in enumerate(gather(processed, d))}
    for name in ("token_log_probs", "token_entropies", "token_weights", "token_logit_grad_norms"):
        rows = gather(getattr(stats, name), d)
        setattr(stats, name, [rows[where[i]] for i in range(len(where))])
