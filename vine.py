"""VinePPO (Kazemnejad et al., arXiv 2410.01679) in the training loop: `algorithm.adv_estimator: vine`.

Each step, every episode's per-token advantages come from Monte-Carlo values of its states (credit_values.py:
K continuations of each state at the unit's boundaries, r + V(s_{t+1}) - V(s_t)); the group filters then read
the spread of those advantages where GRPO's read the rewards' std. The trainer calls `check_vine` at setup and
`token_advantages` once per step; `token_advantage_spread` and `select_by_spread` serve its group filtering.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

import credit_values as cv
import distributed
import grpo
from config import Config, ConfigError
from data_types import Episode
from distributed import Dist
from qwen2_model import Transformer
from rollout import RolloutEngine, stream_key
from tasks import Task
from tokenizer import Tokenizer

VINE_SALT = 0x56494E45  # "VINE": the continuations' noise stream, apart from the rollout's (seed, step, round)


def check_vine(config: Config) -> None:
    """ConfigError for what vine cannot honour, before anything loads. dynamic_sampling and soft_reweight judge
    a group by its rewards' spread, but under vine a group whose answers all scored the same still carries
    per-token advantages; a greedy run (temperature 0) has no continuations to average."""
    a = config.algorithm
    if a.adv_estimator != "vine":
        return
    problems = []
    if a.dynamic_sampling:
        problems.append("algorithm.dynamic_sampling drops groups whose rewards are all equal, which vine trains on "
                        "(algorithm.zero_variance_groups=drop drops the groups whose token advantages are all 0)")
    if a.soft_reweight:
        problems.append("algorithm.soft_reweight scales a group by its reward std, 0 for equal rewards whose vine "
                        "advantages are not")
    if vine_temperature(config) <= 0:
        problems.append("algorithm.vine_temperature must be > 0 when training.temperature is 0 (greedy): the values "
                        "average sampled continuations")
    if problems:
        raise ConfigError("algorithm.adv_estimator=vine: " + "; ".join(problems))


def vine_temperature(config: Config) -> float:
    a = config.algorithm
    return config.training.temperature if a.vine_temperature is None else a.vine_temperature


def continuation_reward_fn(task: Task, tokenizer: Tokenizer, problem: Any, config: Config) -> cv.RewardFn:
    """A completion's reward from its token ids, as the rollout and shape_rewards give it: the task's reward of
    the text (decoded without the end token), plus DAPO's overlong penalty of its length."""
    end = set(tokenizer.end_token_ids)
    a, t = config.algorithm, config.training

    def reward(ids: list[int]) -> float:
        body = ids[:-1] if ids and ids[-1] in end else ids
        r = float(task.reward(problem, tokenizer.decode(body))["reward"])
        if a.overlong_buffer_len > 0:
            r += float(grpo.overlong_penalty(torch.tensor([len(ids)]), t.max_new_tokens, a.overlong_buffer_len,
                                             a.overlong_penalty)[0])
        return r
    return reward


def token_advantages(config: Config, task: Task, tokenizer: Tokenizer, model: Transformer, engine: RolloutEngine,
                     dist: Dist, episodes: Sequence[Episode], step: int) -> tuple[list[np.ndarray], dict[str, float]]:
    """VinePPO's per-token advantages of every episode (credit_values.vine_episode_advantages): K continuations
    of each state at the unit's boundaries (`vine_unit`: the task's step ends or every token), a state shared
    within a group sampled once, keyed by (training.seed, step) so that a resumed run draws the same ones, and
    sharded over ranks like the rollout. Also what they cost (vine/*, duration/vine)."""
    t, a, tok = config.training, config.algorithm, tokenizer
    start = time.perf_counter()
    queries = [cv.ValueQuery(e.prompt_token_ids, e.generated_token_ids,
                             continuation_reward_fn(task, tok, e.problem, config),
                             cv.unit_positions(a.vine_unit, tok.decode, e.generated_token_ids,
                                               task.step_ends(e.text)))
               for e in episodes]
    # a reference completion longer than the budget (ground-truth injection) needs continuations that long: in
    # such a step every state may continue that far (only then do the values see a longer horizon than rollouts)
    budget = max([t.max_new_tokens, *(len(e.generated_token_ids) for e in episodes)])
    with distributed.full_weights(model, dist):
        advantages, estimates, cost = cv.vine_episode_advantages(
            model, queries, [e.reward for e in episodes], k=a.vine_k, max_new_tokens=budget,
            eos_token_id=tok.end_token_ids, temperature=vine_temperature(config), top_p=t.top_p,
            seed=stream_key(t.seed, step, VINE_SALT), engine=engine, max_rows=vine_rows(config),
            pad_token_id=tok.pad_token_id, dist=dist)
    stderr = np.concatenate([e.stderr for e in estimates])
    tokens = np.concatenate(advantages) if advantages else np.zeros(0)
    return advantages, {
        "vine/states": float(cost.states), "vine/continuations": float(cost.continuations),
        "vine/tokens": float(cost.sampled_tokens), "vine/kept_tokens": float(cost.kept_tokens),
        "vine/value_stderr": float(stderr.mean()) if len(stderr) else 0.0,
        "vine/token_advantage_abs_mean": float(np.abs(tokens).mean()) if len(tokens) else 0.0,
        "duration/vine": time.perf_counter() - start}


def vine_rows(config: Config) -> int:
    """Continuation rows per engine call: as many as one rollout call holds, so the values never need a larger
    KV cache than the rollout."""
    t = config.training
    return t.rollout_batch_size or t.num_questions_per_batch * t.num_answers_per_question


def token_advantage_spread(token_advantages: Sequence[np.ndarray], group_size: int) -> torch.Tensor:
    """[groups] the root mean square of each group's token advantages: vine's group filters read it where
    GRPO's read the reward std. It is 0 exactly when every token advantage of the group is 0; a group whose
    answers all scored the same is not, unless its states were all valued at that score."""
    groups = [np.concatenate(token_advantages[q:q + group_size]) for q in range(0, len(token_advantages), group_size)]
    return torch.tensor([float(np.sqrt(np.mean(a * a))) if len(a) else 0.0 for a in groups], dtype=torch.float64)


def select_by_spread(spread: torch.Tensor, top_k: float | None, drop_zero: bool) -> torch.Tensor:
    """grpo.select_groups on a given per-group spread: the top_k groups by spread (a count >= 1 or a fraction < 1,
    rounded up; ties keep the earlier group), then without those of spread 0 when `drop_zero`."""
    n = len(spread)
    keep = torch.arange(n)
    if top_k is not None:
        k = max(1, min(n, math.ceil(top_k * n) if top_k < 1 else int(top_k)))
        keep = torch.tensor(sorted(sorted(range(n), key=lambda i: (-float(spread[i]), i))[:k]), dtype=torch.long)
    if drop_zero:
        keep = keep[spread[keep] > 0]
    return keep
