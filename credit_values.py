"""Monte-Carlo values of the prefixes of a completion: the credit ground truth (VinePPO, Kazemnejad et al.,
arXiv 2410.01679, ICML 2025), and VinePPO's advantages from them (`algorithm.adv_estimator: vine`).

State p of an episode is the prompt plus the first p completion tokens (p = 0: the prompt alone). Its value
V(p) = E[r(completion)] over continuations sampled from the policy at `temperature` (and `top_p`) until the
end token or until the completion holds `max_new_tokens` tokens, estimated by the mean reward of K
continuations with standard error sample SD / sqrt(K). A finished state (the completion ends with an end
token, or is full) is worth its reward exactly, error 0. The MC advantage of the token at position p is
V(p + 1) - V(p) (its error sqrt(se(p)^2 + se(p + 1)^2): the states' continuations are drawn independently);
at task-defined step boundaries b_0 < b_1 < ... the step advantage is V(b_{s+1}) - V(b_s), VinePPO's
r + V(s_{t+1}) - V(s_t) (vine_advantages gives it to every token of the step).

Sampling runs on the rollout engine: the K continuations of a state are one engine group (one prefill),
many states of many episodes go in one call, and identical states (the prompt-alone state of a GRPO group)
are sampled once. Continuation j of a state is keyed by (seed, the state's tokens, j) through the engine's
keyed noise, so every estimate is a function of the seed and the state only: not of the batch layout, the
other episodes, or how states are sharded over ranks.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

import distributed
from config import Param
from distributed import Dist
from grpo import ADVANTAGES
from rollout import RolloutEngine, row_keys, stream_key

RewardFn = Callable[[list[int]], float]
STATE_SALT = 0x5EED_C0DE  # the state hash's start: apart from every other stream built from small integers
BUDGET_SLACK = 1.25  # one engine call holds states whose budgets lie within this factor (see _engine_calls)


@dataclass(frozen=True)
class ValueQuery:
    """One episode to estimate: the values of its states at `positions` (None: every p in 0..len)."""

    prompt_ids: Sequence[int]
    completion_ids: Sequence[int]
    reward_fn: RewardFn  # list of completion token ids (end token included when present) -> float
    positions: Sequence[int] | None = None


@dataclass
class ValueEstimate:
    """One episode's estimates, aligned with its positions."""

    positions: np.ndarray  # int64 [S]
    values: np.ndarray  # float64 [S]
    stderr: np.ndarray  # float64 [S]: sample SD / sqrt(K); 0 for finished states


@dataclass
class ValueCost:
    """What one batch of estimates sampled: distinct states, continuations, and tokens (sampled by the engine,
    and kept: within each state's own budget)."""

    states: int = 0
    continuations: int = 0
    sampled_tokens: int = 0
    kept_tokens: int = 0


@dataclass(frozen=True)
class StateSpec:
    """A distinct unfinished state to sample: its tokens, its key, and the most tokens a user of it needs."""

    tokens: tuple[int, ...]
    key: int
    budget: int


@dataclass
class ValuePlan:
    """The distinct states of a batch of queries, and where each query's positions read from."""

    states: list[StateSpec]
    # per query, per position: (index into states, that position's budget), or None for a finished state
    slots: list[list[tuple[int, int] | None]] = field(default_factory=list)
    positions: list[list[int]] = field(default_factory=list)


# ============================================================================ validation


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_settings(k: Any, max_new_tokens: Any, temperature: Any, eos_ids: Sequence[int], top_p: Any = 1.0) -> None:
    """ValueError naming the first bad argument (a caller may check before it samples the episodes)."""
    if not _is_int(k) or k < 2:
        raise ValueError(f"k must be an integer >= 2 (a standard error needs two continuations), got {k!r}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, numbers.Real) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if not eos_ids or not all(_is_int(e) for e in eos_ids):
        raise ValueError(f"eos_token_id must be a token id or a non-empty sequence of them, got {eos_ids!r}")


def _check_query(i: int, q: ValueQuery, max_new_tokens: int, eos: set[int], vocab_size: int | None) -> list[int]:
    """The query's positions, after checking everything about it that sampling cannot fix."""
    where = f"episode {i}"
    if not callable(q.reward_fn):
        raise ValueError(f"{where}: reward_fn must be callable, got {type(q.reward_fn).__name__}")
    if len(q.prompt_ids) == 0:
        raise ValueError(f"{where}: prompt_ids is empty (a state needs at least one token)")
    ids = list(q.prompt_ids) + list(q.completion_ids)
    bad = [t for t in ids if not _is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        raise ValueError(f"{where}: token id {bad[0]!r} is not in the model's vocabulary of {vocab_size} ids")
    n = len(q.completion_ids)
    if n > max_new_tokens:
        raise ValueError(f"{where}: completion_ids holds {n} tokens, more than max_new_tokens={max_new_tokens}")
    if any(t in eos for t in list(q.completion_ids)[:-1]):
        raise ValueError(f"{where}: completion_ids has an end token before its last position")
    positions = list(range(n + 1)) if q.positions is None else list(q.positions)
    outside = [p for p in positions if not _is_int(p) or not 0 <= p <= n]
    if outside:
        raise ValueError(f"{where}: positions must be integers in 0..{n} (the completion's length), "
                         f"got {outside[0]!r}")
    return [int(p) for p in positions]


def _reward(i: int, fn: RewardFn, ids: list[int], memo: dict[tuple[int, ...], float]) -> float:
    """fn(ids) as a float, memoized per episode; any failure is one error naming the episode."""
    key = tuple(ids)
    if key in memo:
        return memo[key]
    try:
        r = fn(list(ids))
    except Exception as err:
        raise ValueError(f"episode {i}: reward_fn raised {type(err).__name__}: {err} "
                         f"(on a completion of {len(ids)} tokens)") from err
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
        raise ValueError(f"episode {i}: reward_fn returned {r!r}; it must return a finite real number "
                         f"(not a bool)")
    memo[key] = float(r)
    return memo[key]


# ============================================================================ planning


def state_keys(tokens: Sequence[int], start: int = 0) -> list[int]:
    """Keys of the prefixes tokens[:start], tokens[:start + 1], ..., tokens: a chained hash of the prefix's
    tokens, so a function of the state alone (63-bit: collisions are negligible), all in one pass."""
    key, out = stream_key(STATE_SALT), []
    for n in range(len(tokens) + 1):
        if n >= start:
            out.append(key)
        if n < len(tokens):
            key = stream_key(key, tokens[n])
    return out


def is_finished(completion_ids: Sequence[int], p: int, max_new_tokens: int, eos: set[int]) -> bool:
    """State p is finished when it holds the whole completion and that ends with an end token or is full."""
    return p == len(completion_ids) and (p == max_new_tokens or (p > 0 and completion_ids[-1] in eos))


def plan_states(queries: Sequence[ValueQuery], max_new_tokens: int, eos_ids: Sequence[int],
                vocab_size: int | None = None) -> ValuePlan:
    """Check every query (ValueError naming the episode) and list the distinct unfinished states to sample.
    A state's budget is the most continuation tokens any of its users needs (max_new_tokens - p)."""
    eos = set(eos_ids)
    all_positions = [_check_query(i, q, max_new_tokens, eos, vocab_size) for i, q in enumerate(queries)]
    index: dict[tuple[int, ...], int] = {}
    specs: list[list[Any]] = []  # [tokens, key, budget], budgets raised as users are found
    plan = ValuePlan([], [], all_positions)
    for q, positions in zip(queries, all_positions):
        prompt, completion = list(q.prompt_ids), list(q.completion_ids)
        keys = state_keys(prompt + completion, start=len(prompt))
        row: list[tuple[int, int] | None] = []
        for p in positions:
            if is_finished(completion, p, max_new_tokens, eos):
                row.append(None)
                continue
            tokens, budget = tuple(prompt + completion[:p]), max_new_tokens - p
            s = index.setdefault(tokens, len(specs))
            if s == len(specs):
                specs.append([tokens, keys[p], budget])
            specs[s][2] = max(specs[s][2], budget)
            row.append((s, budget))
        plan.slots.append(row)
    plan.states = [StateSpec(*s) for s in specs]
    return plan


# ============================================================================ sampling


def _engine_calls(states: Sequence[StateSpec], k: int, max_rows: int) -> list[list[int]]:
    """States (indices) grouped into engine calls: by budget, so a call's states need about as many tokens
    (the engine samples every row up to the call's largest budget; tokens past a state's own are dropped),
    at most `max_rows` rows (states x K, which bounds the KV cache) per call."""
    order = sorted(range(len(states)), key=lambda i: (states[i].budget, len(states[i].tokens)))
    per_call = max(1, max_rows // k)
    calls: list[list[int]] = []
    for i in order:
        if calls and len(calls[-1]) < per_call and states[i].budget <= BUDGET_SLACK * states[calls[-1][0]].budget + 2:
            calls[-1].append(i)
        else:
            calls.append([i])
    return calls


def sample_continuations(engine: RolloutEngine, states: Sequence[StateSpec], k: int, eos_ids: Sequence[int], *,
                         temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, max_rows: int = 2048,
                         pad_token_id: int = 0, cost: ValueCost | None = None) -> list[list[list[int]]]:
    """K continuations of each state, each cut to the state's budget: [state][j] -> token ids. Continuation j
    of a state is keyed by (seed, the state's key, j), so the result does not depend on which states are
    sampled together: a trainer may shard `states` over ranks and concatenate."""
    stream = stream_key(seed)
    out: list[list[list[int]]] = [[] for _ in states]
    cost = cost if cost is not None else ValueCost()
    for call in _engine_calls(states, k, max_rows):
        keys = row_keys(stream, [states[i].key for i in call for _ in range(k)], [j for _ in call for j in range(k)])
        budget = max(states[i].budget for i in call)
        res = engine.generate([list(states[i].tokens) for i in call], keys, k, budget, list(eos_ids), temperature,
                              top_p, pad_token_id)
        for n, i in enumerate(call):
            rows = res.tokens[n * k:(n + 1) * k]
            out[i] = [r[:states[i].budget] for r in rows]
            cost.sampled_tokens += sum(len(r) for r in rows)
            cost.kept_tokens += sum(len(r) for r in out[i])
        cost.states += len(call)
        cost.continuations += len(call) * k
    return out


# ============================================================================ scoring


def _score_query(i: int, q: ValueQuery, positions: list[int], slots: list[tuple[int, int] | None],
                 continuations: Sequence[Sequence[Sequence[int]]]) -> ValueEstimate:
    """Mean reward and standard error of each position's continuations (a finished state: its reward, 0)."""
    completion = list(q.completion_ids)
    memo: dict[tuple[int, ...], float] = {}
    values, errors = np.empty(len(positions)), np.empty(len(positions))
    for n, (p, slot) in enumerate(zip(positions, slots)):
        if slot is None:
            values[n], errors[n] = _reward(i, q.reward_fn, completion, memo), 0.0
            continue
        s, budget = slot
        rewards = np.array([_reward(i, q.reward_fn, completion[:p] + list(c[:budget]), memo)
                            for c in continuations[s]])
        values[n] = rewards.mean()
        errors[n] = rewards.std(ddof=1) / math.sqrt(len(rewards))
    return ValueEstimate(np.array(positions, dtype=np.int64), values, errors)


def estimate_values(model: torch.nn.Module, queries: Sequence[ValueQuery], *, k: int, max_new_tokens: int,
                    eos_token_id: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                    engine: RolloutEngine | None = None, max_rows: int = 2048, pad_token_id: int = 0,
                    dist: Dist = Dist()) -> tuple[list[ValueEstimate], ValueCost]:
    """mc_values for many episodes at once: their distinct states sampled together (plan_states,
    sample_continuations), then scored. Under torchrun every rank passes the same queries; each samples its
    contiguous share of the states and the continuations are gathered, so every rank returns the
    single-process estimates. Every check runs (and each reward_fn is tried on its completion) before any
    sampling; a reward_fn failing later still raises before anything is returned."""
    eos_ids = [eos_token_id] if _is_int(eos_token_id) else list(eos_token_id)
    check_settings(k, max_new_tokens, temperature, eos_ids, top_p)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    plan = plan_states(queries, max_new_tokens, eos_ids, vocab)
    for i, q in enumerate(queries):  # a broken reward function fails now, not after the sampling
        _reward(i, q.reward_fn, list(q.completion_ids), {})
    engine = engine or RolloutEngine(model)
    mine = distributed.shard(len(plan.states), dist)
    cost = ValueCost()
    part = sample_continuations(engine, plan.states[mine.start:mine.stop], k, eos_ids, temperature=temperature,
                                top_p=top_p, seed=seed, max_rows=max_rows, pad_token_id=pad_token_id, cost=cost)
    continuations = distributed.gather(part, dist)
    if dist.enabled:
        totals = distributed.sum_values(vars(cost), dist)
        cost = ValueCost(**{name: int(v) for name, v in totals.items()})
    estimates = [_score_query(i, q, plan.positions[i], plan.slots[i], continuations) for i, q in enumerate(queries)]
    return estimates, cost


def mc_values(model: torch.nn.Module, prompt_ids: Sequence[int], completion_ids: Sequence[int], reward_fn: RewardFn,
              *, k: int, max_new_tokens: int, eos_token_id: int | Sequence[int], temperature: float = 1.0,
              seed: int = 0, positions: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, stderr) of one episode's states at `positions` (None: every p in 0..len(completion_ids)):
    the mean reward of K continuations of each state and its standard error (module docstring)."""
    (est,), _ = estimate_values(model, [ValueQuery(prompt_ids, completion_ids, reward_fn, positions)], k=k,
                                max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, temperature=temperature,
                                seed=seed)
    return est.values, est.stderr


# ============================================================================ advantages and steps


def mc_advantages(values: np.ndarray, stderr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token (or per-step) MC advantages values[p + 1] - values[p] and their standard errors
    sqrt(se[p]^2 + se[p + 1]^2) (independent estimates), from the values at consecutive positions."""
    values, stderr = np.asarray(values, dtype=float), np.asarray(stderr, dtype=float)
    return np.diff(values), np.sqrt(stderr[1:] ** 2 + stderr[:-1] ** 2)


def token_boundaries(decode: Callable[[list[int]], str], token_ids: Sequence[int], char_offsets: Sequence[int]
                     ) -> list[int]:
    """Each character offset of the decoded completion as a state position: the smallest p whose first p
    tokens decode to at least that many characters (a boundary inside a token falls after it). Works for a
    character vocabulary and a BPE one alike; binary search over prefix decodes, O(B log n) decodes."""
    ids = list(token_ids)
    lengths: dict[int, int] = {}

    def decoded_len(p: int) -> int:
        if p not in lengths:
            lengths[p] = len(decode(ids[:p])) if p else 0
        return lengths[p]

    out = []
    for c in char_offsets:
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if decoded_len(mid) >= c:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
    return out


def step_positions(decode: Callable[[list[int]], str], completion_ids: Sequence[int], step_ends: Sequence[int]
                   ) -> list[int]:
    """The states at step boundaries: 0, each step end's token position, and the whole completion."""
    inner = token_boundaries(decode, completion_ids, step_ends)
    return sorted({0, len(completion_ids), *inner})


def step_of_token(positions: Sequence[int], n_tokens: int) -> np.ndarray:
    """[n_tokens] the step each token belongs to: token t is in step s when positions[s] <= t < positions[s+1]."""
    return np.array([bisect.bisect_right(positions, t) - 1 for t in range(n_tokens)], dtype=np.int64)


# ============================================================================ VinePPO: advantages from the values

VINE_UNITS = ("step", "token")


@ADVANTAGES.register("vine", params={
    "vine_k": Param(8, "vine: Monte-Carlo continuations per state", ">= 2", lambda v: v >= 2, int),
    "vine_unit": Param("step", "vine: a value at each task-defined step end (Task.step_ends) or at every token",
                       "step or token", lambda v: v in VINE_UNITS, Literal["step", "token"]),
    "vine_temperature": Param(None, "vine: the continuations' temperature (default: training.temperature)", "> 0",
                              lambda v: v > 0, float | None),
    "vine_whiten": Param(True, "vine: whiten the step's token advantages (minus their mean, over their std), as "
                               "VinePPO's PPO trainer does", "true or false", type=bool),
})
def vine_group_advantages(rewards: torch.Tensor, vine_k: int, vine_unit: str, vine_temperature: float | None,
                          vine_whiten: bool) -> torch.Tensor:
    """Registered for its name and keys only: VinePPO's advantages are per token, from the Monte-Carlo values
    of each episode's states (the trainer calls vine_episode_advantages), not from a group's rewards."""
    raise ValueError("algorithm.adv_estimator=vine needs the Monte-Carlo values of each episode's states: "
                     "use credit_values.vine_episode_advantages (the trainer does), not grpo.compute_advantages")


def check_unit_positions(positions: Sequence[int], length: int, where: str = "") -> np.ndarray:
    """positions as an array, or ValueError unless they increase strictly from 0 to `length`."""
    pos = np.asarray(positions, dtype=np.int64)
    if pos.ndim != 1 or len(pos) == 0 or pos[0] != 0 or pos[-1] != length or (np.diff(pos) <= 0).any():
        raise ValueError(f"{where}positions must increase strictly from 0 to the completion's length {length}, "
                         f"got {pos.tolist()}")
    return pos


def vine_advantages(values: Sequence[float], positions: Sequence[int], length: int) -> np.ndarray:
    """[length] per-token VinePPO advantages (Kazemnejad et al. 2024, eq. 4 with MC values): states
    s_0 .. s_S at token positions 0 = positions[0] < ... < positions[S] = length, values[s] = V(s_s), and
    V(s_S) the episode's reward (the only reward, at the end). Every token t of step s
    (positions[s] <= t < positions[s + 1]) gets A_s = r_s + V(s_{s+1}) - V(s_s) with r_s = 0, so a
    completion's advantages telescope: summed per step they give r - V(prompt)."""
    pos = check_unit_positions(positions, length)
    v = np.asarray(values, dtype=np.float64)
    if v.shape != pos.shape:
        raise ValueError(f"values ({len(v)}) and positions ({len(pos)}) must align")
    return np.repeat(np.diff(v), np.diff(pos))


def whiten(token_advantages: Sequence[np.ndarray], eps: float = 1e-8) -> list[np.ndarray]:
    """(A - mean) / sqrt(var + eps) over every token of the batch, the variance unbiased: VinePPO's PPO trainer
    whitens its Monte-Carlo advantages so (masked_whiten), which puts them on GRPO's scale (one standard
    deviation) whatever the rewards'. Fewer than two tokens: centred only."""
    flat = np.concatenate(token_advantages) if len(token_advantages) else np.zeros(0)
    if len(flat) == 0:
        return [np.asarray(a, dtype=np.float64) for a in token_advantages]
    mean, var = flat.mean(), flat.var(ddof=1) if len(flat) > 1 else 0.0
    scale = 1.0 / math.sqrt(var + eps) if len(flat) > 1 else 1.0
    return [(np.asarray(a, dtype=np.float64) - mean) * scale for a in token_advantages]


def unit_positions(unit: str, decode: Callable[[list[int]], str], completion_ids: Sequence[int],
                   step_ends: Sequence[int]) -> list[int]:
    """The states to value: every token's (0..n), or the step boundaries of `step_ends` (character offsets
    of the decoded completion; step_positions)."""
    if unit == "token":
        return list(range(len(completion_ids) + 1))
    if unit == "step":
        return step_positions(decode, completion_ids, step_ends)
    raise ValueError(f"vine unit {unit!r} is unknown; valid: {', '.join(VINE_UNITS)}")


def vine_episode_advantages(model: torch.nn.Module, queries: Sequence[ValueQuery], rewards: Sequence[float], *,
                            k: int, max_new_tokens: int, eos_token_id: int | Sequence[int], **sampling: Any
                            ) -> tuple[list[np.ndarray], list[ValueEstimate], ValueCost]:
    """Per-token VinePPO advantages of each episode (vine_advantages), with its values and the sampling cost.
    Each query's `positions` run from 0 to its completion's length (None: every token's); the last state is
    worth the episode's reward (`rewards`, as trained on: shaping included) and is never sampled, so only the
    states before it are estimated (estimate_values; `sampling`: temperature, top_p, seed, engine, max_rows,
    pad_token_id, dist)."""
    positions = [check_unit_positions(range(len(q.completion_ids) + 1) if q.positions is None else q.positions,
                                      len(q.completion_ids), f"episode {i}: ") for i, q in enumerate(queries)]
    inner = [dataclasses.replace(q, positions=p[:-1].tolist()) for q, p in zip(queries, positions)]
    estimates, cost = estimate_values(model, inner, k=k, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                      **sampling)
    advantages = [vine_advantages(np.append(est.values, float(r)), p, len(q.completion_ids))
                  for q, p, est, r in zip(queries, positions, estimates, rewards)]
    return advantages, estimates, cost
