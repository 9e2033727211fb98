"""Records passed between rollout, update, logging and the credit logger."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Episode:
    """One sampled completion of one question, with its reward and what the sampler saw."""

    prompt: str
    prompt_token_ids: list[int]
    generated_token_ids: list[int]  # up to and including the end token when finished
    text: str  # the completion decoded, without the end token
    reward: float
    reward_info: dict[str, float]
    finished: bool  # ended with an end token before the length limit
    group_idx: int  # the question's index within the step
    problem: Any = None  # the task instance (e.g. a CountdownProblem)
    # Per generated token, from the sampling forward pass (policy at temperature 1, not the tempered one):
    # the rollout-time log-probs are PPO's "old" log-probs; the entropies feed entropy-based weighters.
    log_probs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    answer_start: int | None = None  # index of the first generated token of the task's answer section

    # Every task's reward_info reports these two parts (tasks.Task.reward)
    @property
    def solved(self) -> bool:
        """The answer is right: an evaluation's success."""
        return self.reward_info["answer_reward"] == 1.0

    @property
    def format_reward(self) -> float:
        return self.reward_info["format_reward"]


@dataclass
class UpdateStats:
    """What one policy update reports: scalars for the logs and per-token arrays for the credit logger."""

    metrics: dict[str, float]
    skipped: bool = False  # a non-finite loss or gradient: no optimizer step was taken
    # Per episode (in the order given to the update), per generated token, from the first iteration's forward:
    token_log_probs: list[list[float]] = field(default_factory=list)
    token_entropies: list[list[float]] = field(default_factory=list)
    token_weights: list[list[float]] = field(default_factory=list)
    token_logit_grad_norms: list[list[float]] = field(default_factory=list)  # ||onehot(y) - p||_2


@dataclass
class TokenBatch:
    """One micro-batch of completions, aligned on generated tokens: every tensor is [b, T] (T = the longest
    completion in the micro-batch) unless noted. What a token weighter may read."""

    token_ids: Any  # LongTensor [b, T]
    mask: Any  # BoolTensor [b, T]: real generated tokens
    log_probs: Any  # [b, T], carries gradient: weighters that use it must detach
    entropy: Any  # [b, T], detached, policy entropy at each position (this forward)
    rollout_entropy: Any  # [b, T], entropy seen at sampling time (fixed across PPO iterations)
    answer_mask: Any  # BoolTensor [b, T]: tokens in the <answer> section
    hidden: Any = None  # [b, T, hidden] final hidden states at the positions that predict each token (detached)
    last_q: Any = None  # [b, H, L, head_dim] last layer queries over the whole sequence (prompt + completion)
    last_k: Any = None  # [b, KV, L, head_dim]
    prompt_lens: Any = None  # LongTensor [b]: where each completion starts in the whole sequence
    advantages: Any = None  # [b] each completion's (episode-level) advantage
