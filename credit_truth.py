"""Every credit signal against the Monte-Carlo ground truth (issue 25, item 2).

On a checkpoint and a fresh sample of its own completions, the MC advantage of every token (or reasoning
step) is a_t = V(t + 1) - V(t), with V the mean reward of K continuations of each prefix (credit_values.py).
Each credit signal gives every token a signed credit c_t: its sign is the direction the update pushes the
token's log-probability, its magnitude how hard.

    grpo          c = A                      GRPO's broadcast advantage (one value per episode)
    abs_logprob   c = A |log pi(y_t)|        |A x log pi|, the credit logger's contribution, signed by A
    grad_proxy    c = A ||onehot(y_t) - p||  the gradient size at the logits (analyze_credit's proxy)
    <weighter>    c = w_t A                  the effective per-token advantage of each weighter

Agreement with the truth, per episode, then over episodes with bootstrap 95% intervals (resampling episodes):

    rank_correlation      Spearman's rho of |c| and |a| within the episode (magnitudes: does the signal rank
                          tokens as the truth does?); NaN for a signal constant within the episode (grpo)
    sign_agreement        on tokens with |a| > 2 standard errors and c != 0: the share where sign(c) = sign(a)
                          (pooled over episodes)
    top_quartile_mass     the share of the signal's mass sum|c| on the top quartile T of |a| (the ceil(n/4)
                          largest |a|, ties included, zeros never): uniform credit scores about 0.25; the truth
                          itself scores its own concentration (the `mc_advantage` row)
    top_quartile_overlap  the share of the signal's own top quartile (by |c|) that lies in T: 1 for a signal
                          ranked like |a| (the issue's "top-quartile share of 1" for a signal equal to |a|)
    excess_enrichment     sum_t m_t (a_t^2 - se_t^2) / mean_t (a_t^2 - se_t^2), m = |c| / sum |c| (pooled over
                          episodes as a ratio of sums): the squared true advantage per unit of the signal's mass,
                          relative to uniform credit (1; grpo's broadcast scores 1 exactly). The signal never sees
                          the continuations, so numerator and denominator are unbiased whatever the noise: the
                          metric to read where the truth is noisy (the three above are diluted by its noise)

Broken down by token type (analyze_credit.classify_tokens) and relative position, where `mass_share` is the
share of each signal's mass (and of the truth's, |a|) on that group: where each puts credit.

The truth is itself an estimate: a = a* + e, with e the sampling noise of two independent K-sample means and
E[e^2] = se^2 (unbiased sample variances). |a| therefore carries noise mass on every token whose continuations
vary, in proportion to how many such tokens a group has. Two figures of the truth alone say how much:

    noise_fraction        sum se^2 / sum a^2 (overall and per group): about 1 where the truth cannot tell the
                          group's tokens from noise, near 0 where its a is mostly signal
    excess_share          the group's share of sum(a^2 - se^2), an unbiased estimate of where the squared
                          true advantage a*^2 lies (noise-corrected; an estimate, so it can leave [0, 1])

`--rescore DIR` recomputes the tables and summary of an earlier output directory from its units.csv (no
sampling): for new metrics, or another --bootstrap.

    python credit_truth.py --checkpoint runs/tiny/ckpt/step_000300 --config config_tiny.yaml \
        --episodes 64 --k 8 --output_dir runs/tiny/credit_truth [--unit token|step] [--split test|train]
    python credit_truth.py --rescore runs/tiny/credit_truth
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

import analyze_credit
import credit_values as cv
import grpo
from config import Config
from data_types import Episode, TokenBatch
from fileio import atomic_write_dir
from grpo_mitigations import WEIGHTERS as WEIGHTER_REGISTRY, build_weighter
from parts import load_config
from qwen2_model import Transformer
from rollout import RolloutEngine, rollout, stream_key
from tasks import Task, build_task
from tokenizer import Tokenizer
from update import forward_completions

WEIGHTERS = ("outcome_conditional", "inverse_logprob", "attention_credit", "entropy_weighted", "entropy_masking")
TRUTH = "mc_advantage"  # the truth scored as a signal: the reference row of every table
METRICS = ("rank_correlation", "sign_agreement", "top_quartile_mass", "top_quartile_overlap", "excess_enrichment")
N_POSITION_BINS = 5
SIGNIFICANCE_Z = 2.0
UNIT_COLUMNS = ("episode_idx", "position", "length", "reward", "mc_value", TRUTH, "mc_stderr", "token_id",
                "position_bin", "type")  # units.csv's columns that are not signals
EPISODE_SALT = 0xC4ED17  # the stream of the sampled completions, apart from training's and evaluation's


# ============================================================================ metrics (pure, on arrays)


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN below 3 values or when a side is constant."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def top_quartile(magnitude: np.ndarray, frac: float = 0.25) -> np.ndarray:
    """[n] bool: the ceil(frac x n) largest values (every value tied with the last one too), never a zero."""
    m = np.asarray(magnitude, dtype=float)
    if len(m) == 0:
        return np.zeros(0, dtype=bool)
    cut = np.sort(m)[::-1][math.ceil(frac * len(m)) - 1]
    return (m >= cut) & (m > 0)


def top_quartile_mass(signal: np.ndarray, truth: np.ndarray) -> float:
    """sum over T of |signal| / sum |signal|, T = top_quartile(|truth|); NaN without mass or without T."""
    mass, top = np.abs(signal), top_quartile(np.abs(truth))
    if mass.sum() == 0 or not top.any():
        return math.nan
    return float(mass[top].sum() / mass.sum())


def top_quartile_overlap(signal: np.ndarray, truth: np.ndarray) -> float:
    """The share of top_quartile(|signal|) lying in top_quartile(|truth|); NaN when either is empty."""
    mine, top = top_quartile(np.abs(signal)), top_quartile(np.abs(truth))
    if not mine.any() or not top.any():
        return math.nan
    return float((mine & top).sum() / mine.sum())


def sign_counts(signal: np.ndarray, truth: np.ndarray, truth_se: np.ndarray, z: float = SIGNIFICANCE_Z
                ) -> tuple[int, int]:
    """(agreeing, counted): tokens with |truth| > z x se and a nonzero signal, and how many share its sign."""
    signal, truth = np.asarray(signal, dtype=float), np.asarray(truth, dtype=float)
    counted = (np.abs(truth) > z * np.asarray(truth_se, dtype=float)) & (signal != 0)
    return int((np.sign(signal[counted]) == np.sign(truth[counted])).sum()), int(counted.sum())


def excess_enrichment(signal: np.ndarray, truth: np.ndarray, truth_se: np.ndarray) -> tuple[float, float]:
    """(sum_t m_t x_t, mean_t x_t) with m = |signal| / sum |signal| and x = a^2 - se^2, the unbiased estimate of
    each token's squared true advantage: their ratio, pooled over episodes, is excess_enrichment; (0, 0) for a
    signal without mass."""
    mass = np.abs(np.asarray(signal, dtype=float))
    if len(mass) == 0 or mass.sum() == 0:
        return 0.0, 0.0
    x = np.asarray(truth, dtype=float) ** 2 - np.asarray(truth_se, dtype=float) ** 2
    return float((mass / mass.sum() * x).sum()), float(x.mean())


def _defined(value: float) -> tuple[float, float]:
    """A per-episode value as (numerator, denominator) of a mean over the episodes where it is defined."""
    return (0.0, 0.0) if math.isnan(value) else (value, 1.0)


def episode_parts(signal: np.ndarray, truth: np.ndarray, truth_se: np.ndarray, group: np.ndarray | None = None
                  ) -> dict[str, tuple[float, float]]:
    """One episode's metrics as (numerator, denominator) pairs, so every aggregate over episodes is
    sum(numerators) / sum(denominators): a mean over the episodes where a metric is defined, or (sign
    agreement) a share pooled over tokens. `group` [n] bool restricts them to some tokens (the top quartile
    is still the episode's); then mass_share is the group's share of the signal's mass."""
    signal, truth, truth_se = (np.asarray(v, dtype=float) for v in (signal, truth, truth_se))
    if group is None:
        return {"rank_correlation": _defined(rank_correlation(np.abs(signal), np.abs(truth))),
                "sign_agreement": sign_counts(signal, truth, truth_se),
                "top_quartile_mass": _defined(top_quartile_mass(signal, truth)),
                "top_quartile_overlap": _defined(top_quartile_overlap(signal, truth)),
                "excess_enrichment": excess_enrichment(signal, truth, truth_se)}
    mass, top = np.abs(signal), top_quartile(np.abs(truth))
    in_group = mass[group].sum()
    return {"rank_correlation": _defined(rank_correlation(mass[group], np.abs(truth[group]))),
            "sign_agreement": sign_counts(signal[group], truth[group], truth_se[group]),
            "top_quartile_mass": _defined(mass[group & top].sum() / in_group if in_group > 0 and top.any()
                                          else math.nan),
            "mass_share": _defined(in_group / mass.sum() if mass.sum() > 0 else math.nan),
            "excess_enrichment": excess_enrichment(signal[group], truth[group], truth_se[group])}


def truth_noise_parts(truth: np.ndarray, truth_se: np.ndarray, group: np.ndarray | None = None
                      ) -> dict[str, tuple[float, float]]:
    """How much of the truth is its own sampling noise, as (numerator, denominator) pairs pooled over episodes:
    noise_fraction = sum se^2 / sum a^2 on the group's tokens; with a group, excess_share = its share of the
    episode's sum(a^2 - se^2), which estimates sum a*^2 without bias (a = a* + e, E[e^2] = se^2)."""
    a2, s2 = np.asarray(truth, dtype=float) ** 2, np.asarray(truth_se, dtype=float) ** 2
    g = np.ones(len(a2), dtype=bool) if group is None else group
    out = {"noise_fraction": (float(s2[g].sum()), float(a2[g].sum()))}
    if group is not None:
        out["excess_share"] = (float((a2[g] - s2[g]).sum()), float((a2 - s2).sum()))
    return out


def bootstrap_indices(n_episodes: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, n_episodes] episode indices drawn with replacement: shared by every statistic, so that two
    signals' differences are paired."""
    return np.random.default_rng(seed).integers(0, n_episodes, size=(n_boot, n_episodes))


def ratio_interval(num: np.ndarray, den: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    """sum(num) / sum(den) over the episodes and its percentile bootstrap 95% interval (NaN: no episode)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if den.sum() == 0:
        return math.nan, math.nan, math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = num[idx].sum(1) / den[idx].sum(1)
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (math.nan, math.nan)
    return float(num.sum() / den.sum()), float(low), float(high)


def paired_difference(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], idx: np.ndarray
                      ) -> tuple[float, float, float]:
    """(a - b) of two ratio statistics over the same episodes, with its paired bootstrap 95% interval."""
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = a[0][idx].sum(1) / a[1][idx].sum(1) - b[0][idx].sum(1) / b[1][idx].sum(1)
    boot = boot[np.isfinite(boot)]
    point = a[0].sum() / a[1].sum() - b[0].sum() / b[1].sum()
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (math.nan, math.nan)
    return float(point), float(low), float(high)


# ============================================================================ the ground truth


def task_reward_fn(task: Task, tokenizer: Tokenizer, problem: Any) -> cv.RewardFn:
    """The task's reward of a completion given as token ids, decoded as the rollout decodes it (the end
    token is not part of the answer text)."""
    end = set(tokenizer.end_token_ids)

    def reward(ids: list[int]) -> float:
        body = ids[:-1] if ids and ids[-1] in end else ids
        return float(task.reward(problem, tokenizer.decode(body))["reward"])
    return reward


def unit_positions(episode: Episode, tokenizer: Tokenizer, task: Task, unit: str) -> list[int] | None:
    """The states to value: every token's (None), or the task's step boundaries (Task.step_ends: a task without
    steps gives one step, the whole completion)."""
    if unit == "token":
        return None
    return cv.step_positions(tokenizer.decode, episode.generated_token_ids, task.step_ends(episode.text))


@dataclass
class Truth:
    """Per episode: the valued positions, the MC advantage of each unit between them, and its error."""

    positions: list[np.ndarray]
    advantages: list[np.ndarray]
    stderr: list[np.ndarray]
    values: list[np.ndarray]
    cost: cv.ValueCost
    seconds: float


def ground_truth(model: Transformer, tokenizer: Tokenizer, task: Task, episodes: Sequence[Episode], *, k: int,
                 max_new_tokens: int, temperature: float, seed: int, unit: str, max_rows: int) -> Truth:
    queries = [cv.ValueQuery(e.prompt_token_ids, e.generated_token_ids, task_reward_fn(task, tokenizer, e.problem),
                             unit_positions(e, tokenizer, task, unit)) for e in episodes]
    start = time.perf_counter()
    estimates, cost = cv.estimate_values(model, queries, k=k, max_new_tokens=max_new_tokens,
                                         eos_token_id=tokenizer.end_token_ids, temperature=temperature, seed=seed,
                                         max_rows=max_rows, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    adv = [cv.mc_advantages(e.values, e.stderr) for e in estimates]
    return Truth([e.positions for e in estimates], [a for a, _ in adv], [s for _, s in adv],
                 [e.values for e in estimates], cost, seconds)


# ============================================================================ the signals


def token_batch(fwd: Any, episodes: Sequence[Episode], advantages: torch.Tensor) -> TokenBatch:
    """The weighters' inputs, built as the update builds them (update._forward_tokens, _token_weights)."""
    mask, width = fwd.mask, fwd.mask.shape[1]
    answer = torch.zeros_like(mask)
    for row, e in enumerate(episodes):
        if e.answer_start is not None:
            answer[row, e.answer_start:] = True
    rollout_entropy = torch.zeros(mask.shape)
    for row, e in enumerate(episodes):
        rollout_entropy[row, : len(e.entropies)] = torch.tensor(e.entropies[:width], dtype=torch.float32)
    return TokenBatch(token_ids=fwd.targets, mask=mask, log_probs=fwd.log_probs, entropy=fwd.entropy.detach(),
                      rollout_entropy=rollout_entropy, answer_mask=answer & mask, hidden=fwd.hidden,
                      last_q=fwd.last_q, last_k=fwd.last_k, prompt_lens=fwd.prompt_lens, advantages=advantages)


def build_weighters(config: Config, model: Transformer, checkpoint: Path) -> dict[str, Any]:
    """Every weighter with the config's parameters; the attribution head too when the checkpoint holds one."""
    def build(name: str) -> Any:
        return build_weighter(name, hidden_size=model.config.hidden_size, **WEIGHTER_REGISTRY.values(name, config))

    out = {name: build(name) for name in WEIGHTERS}
    head = checkpoint / "attribution_head.safetensors"
    if head.is_file():
        from safetensors.torch import load_file

        out["attribution"] = build("attribution")
        out["attribution"].load_state_dict(load_file(str(head)))
    return out


@torch.no_grad()
def token_signals(model: Transformer, episodes: Sequence[Episode], advantages: torch.Tensor,
                  weighters: dict[str, Any], pad_token_id: int, micro_batch: int = 16) -> dict[str, list[np.ndarray]]:
    """Every signal's per-token credit c_t per episode (module docstring), from the same forward and token
    inputs the update gives the weighters."""
    for w in weighters.values():  # batch-level statistics (entropy_masking's threshold) over the whole batch
        w.begin_batch([e.entropies for e in episodes])
    out: dict[str, list[np.ndarray]] = {name: [] for name in ("grpo", "abs_logprob", "grad_proxy", *weighters)}
    for start in range(0, len(episodes), micro_batch):
        mb, adv = episodes[start:start + micro_batch], advantages[start:start + micro_batch].float()
        fwd = forward_completions(model, mb, pad_token_id, need_hidden="attribution" in weighters, need_last_qk=True)
        batch = token_batch(fwd, mb, adv)
        per_token = {"grpo": fwd.mask.float(), "abs_logprob": fwd.log_probs.abs(), "grad_proxy": fwd.logit_grad_norm}
        per_token.update({name: w.weights(batch).detach() for name, w in weighters.items()})
        for name, scale in per_token.items():
            rows = (scale.float() * adv[:, None]).tolist()
            out[name].extend(np.array(r[: len(e.generated_token_ids)]) for r, e in zip(rows, mb))
    return out


def episode_advantages(episodes: Sequence[Episode], group_size: int, config: Config) -> torch.Tensor:
    """[B] the episode-level advantages the training run would give (its estimator; grpo for vine, whose
    advantages are per token)."""
    a = config.algorithm
    method = "grpo" if a.adv_estimator == "vine" else a.adv_estimator
    rewards = torch.tensor([e.reward for e in episodes]).view(-1, group_size)
    return grpo.compute_advantages(rewards, method, soft_reweight=a.soft_reweight, reweight_eps=a.soft_reweight_eps,
                                   **grpo.ADVANTAGES.values(method, config)).flatten()


def to_steps(token_signal: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """A step's credit: the sum of its tokens' (steps between consecutive valued positions)."""
    return np.add.reduceat(token_signal, positions[:-1]) if len(positions) > 1 else np.zeros(0)


# ============================================================================ tables


def unit_frame(episodes: Sequence[Episode], truth: Truth, signals: dict[str, list[np.ndarray]],
               types: Callable[[pd.DataFrame], pd.Series] | None) -> pd.DataFrame:
    """One row per unit (token or step): its episode, position, relative-position bin, type (tokens only), the
    MC value before it, MC advantage and error, and every signal's credit."""
    rows = []
    for i, e in enumerate(episodes):
        pos = truth.positions[i]
        n_units, length = len(pos) - 1, len(e.generated_token_ids)
        frame = {"episode_idx": np.full(n_units, i), "position": pos[:-1], "length": np.full(n_units, length),
                 "reward": np.full(n_units, e.reward), "mc_value": truth.values[i][:-1],
                 TRUTH: truth.advantages[i], "mc_stderr": truth.stderr[i]}
        if n_units == length:  # every token: the token's id, for its type
            frame["token_id"] = np.asarray(e.generated_token_ids, dtype=np.int64)
        for name, per_episode in signals.items():
            c = per_episode[i]
            frame[name] = c if n_units == length else to_steps(c, pos)
        rows.append(pd.DataFrame(frame))
    df = pd.concat(rows, ignore_index=True)
    df["position_bin"] = np.minimum(N_POSITION_BINS * df["position"] // df["length"].clip(lower=1), N_POSITION_BINS - 1)
    if types is not None and "token_id" in df:
        df["type"] = types(df).to_numpy()
    return df


def agreement_parts(df: pd.DataFrame, signal_names: Sequence[str]) -> dict[tuple[str, str, str, str], tuple]:
    """(signal, breakdown, group, metric) -> per-episode (numerators, denominators) arrays."""
    episodes = sorted(df["episode_idx"].unique())
    parts: dict[tuple[str, str, str, str], tuple[list[float], list[float]]] = {}
    breakdowns = [("position", "position_bin")] + ([("type", "type")] if "type" in df else [])
    groups = {kind: sorted(df[col].unique()) for kind, col in breakdowns}
    for ep in episodes:
        e = df[df["episode_idx"] == ep]
        truth, se = e[TRUTH].to_numpy(), e["mc_stderr"].to_numpy()
        for name in signal_names:
            c = e[name].to_numpy()
            noise = truth_noise_parts if name == TRUTH else (lambda *_: {})
            found = [("all", "all", {**episode_parts(c, truth, se), **noise(truth, se)})]
            for kind, col in breakdowns:
                for g in groups[kind]:
                    in_g = (e[col] == g).to_numpy()
                    found.append((kind, str(g), {**episode_parts(c, truth, se, in_g), **noise(truth, se, in_g)}))
            for kind, group, metrics in found:
                for metric, (num, den) in metrics.items():
                    nums, dens = parts.setdefault((name, kind, group, metric), ([], []))
                    nums.append(num)
                    dens.append(den)
    return {key: (np.array(n), np.array(d)) for key, (n, d) in parts.items()}


def agreement_table(parts: dict, idx: np.ndarray) -> pd.DataFrame:
    """The long table: signal, breakdown, group, metric, value and its 95% interval, episodes counted."""
    rows = []
    for (name, kind, group, metric), (num, den) in parts.items():
        value, low, high = ratio_interval(num, den, idx)
        counted = int((den != 0).sum())
        rows.append({"signal": name, "breakdown": kind, "group": group, "metric": metric, "value": value,
                     "low": low, "high": high, "episodes": counted})
    return pd.DataFrame(rows)


def score(units: pd.DataFrame, signals: Sequence[str], n_boot: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """The agreement table and the best-signal lines of a units frame (one bootstrap draw shared by all)."""
    parts = agreement_parts(units, [TRUTH, *signals])
    idx = bootstrap_indices(units["episode_idx"].nunique(), n_boot, seed)
    return agreement_table(parts, idx), best_signal_lines(parts, idx, signals)


def best_signal_lines(parts: dict, idx: np.ndarray, signals: Sequence[str]) -> list[str]:
    """Per metric, the signal that agrees best with the truth, named only when the paired bootstrap interval
    of its lead over the runner-up excludes 0."""
    lines = []
    for metric in METRICS:
        scored = [(ratio_interval(*parts[(s, "all", "all", metric)], idx)[0], s) for s in signals
                  if (s, "all", "all", metric) in parts and parts[(s, "all", "all", metric)][1].sum() > 0]
        scored = sorted((v, s) for v, s in scored if not math.isnan(v))[::-1]
        if len(scored) < 2:
            lines.append(f"- {metric}: fewer than two signals are defined")
            continue
        (v1, s1), (v2, s2) = scored[0], scored[1]
        d, low, high = paired_difference(parts[(s1, "all", "all", metric)], parts[(s2, "all", "all", metric)], idx)
        if low > 0:
            lines.append(f"- {metric}: **{s1}** agrees best ({v1:.3f}), ahead of {s2} ({v2:.3f}) by {d:.3f} "
                         f"[{low:.3f}, {high:.3f}] (paired bootstrap 95%)")
        else:
            lines.append(f"- {metric}: not separated: {s1} ({v1:.3f}) leads {s2} ({v2:.3f}) by {d:.3f} "
                         f"[{low:.3f}, {high:.3f}] (paired bootstrap 95% includes 0)")
    return lines


# ============================================================================ outputs


def _cell(row: pd.Series) -> str:
    if math.isnan(row["value"]):
        return "n/a"
    return f"{row['value']:.3f} [{row['low']:.3f}, {row['high']:.3f}]"


def overall_markdown(table: pd.DataFrame, signals: Sequence[str]) -> str:
    """Signals x metrics, overall."""
    overall = table[table["breakdown"] == "all"]
    lines = ["| signal | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in signals:
        cells = []
        for metric in METRICS:
            row = overall[(overall["signal"] == name) & (overall["metric"] == metric)]
            cells.append(_cell(row.iloc[0]) if len(row) else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def breakdown_markdown(table: pd.DataFrame, kind: str, metric: str, signals: Sequence[str]) -> str:
    """Signals x groups of one breakdown, one metric."""
    sub = table[(table["breakdown"] == kind) & (table["metric"] == metric)]
    groups = sorted(sub["group"].unique(), key=lambda g: (len(g), g))
    lines = [f"| signal | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name in signals:
        cells = [_cell(r.iloc[0]) if len(r := sub[(sub["signal"] == name) & (sub["group"] == g)]) else "n/a"
                 for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Report:
    """Everything the command writes."""

    units: pd.DataFrame
    table: pd.DataFrame
    best: list[str]
    signals: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def noise_markdown(table: pd.DataFrame) -> str:
    """The truth's noise_fraction and excess_share, overall and per group."""
    sub = table[(table["signal"] == TRUTH) & table["metric"].isin(["noise_fraction", "excess_share"])]
    lines = ["| tokens | noise_fraction | excess_share |", "|---|---|---|"]
    keys = sorted({(k, g) for k, g in zip(sub["breakdown"], sub["group"])},
                  key=lambda kg: (["all", "type", "position"].index(kg[0]), len(kg[1]), kg[1]))
    for kind, group in keys:
        cells = [_cell(r.iloc[0]) if len(r := sub[(sub["breakdown"] == kind) & (sub["group"] == group)
                                                 & (sub["metric"] == m)]) else "n/a"
                 for m in ("noise_fraction", "excess_share")]
        lines.append(f"| {'all' if kind == 'all' else f'{kind} {group}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(r: Report) -> str:
    m = r.meta
    kinds = [k for k in ("type", "position") if k in set(r.table["breakdown"])]
    out = [f"# Credit signals against the Monte-Carlo ground truth\n",
           f"Checkpoint `{m['checkpoint']}`, {m['episodes']} completions of {m['questions']} {m['split']} problems "
           f"(groups of {m['group_size']}, mean reward {m['mean_reward']:.3f}), {m['unit']} values from K = {m['k']} "
           f"continuations at temperature {m['temperature']}, seed {m['seed']}: {m['states']} states, "
           f"{m['kept_tokens']} tokens kept of {m['sampled_tokens']} sampled in {m['value_seconds']:.0f} s "
           f"({m['total_seconds']:.0f} s in all). {m['significant']} of {m['units']} units have "
           f"|MC advantage| > 2 standard errors. Intervals: bootstrap 95% over episodes ({m['bootstrap']} draws).\n",
           "## Which signal agrees best\n", *r.best, "",
           "## Agreement with the MC advantage\n", overall_markdown(r.table, [TRUTH, *r.signals]), "",
           "`mc_advantage` is the truth scored against itself: the ceiling of each metric (its top-quartile mass is "
           "how concentrated the truth is). Every weight is >= 0, so every signal carries the sign of A: sign "
           "agreement is GRPO's, except on tokens a signal zeroes (entropy_masking). Definitions: the module "
           "docstring of credit_truth.py.\n",
           "## How much of the truth is sampling noise\n", noise_markdown(r.table), "",
           "noise_fraction: sum se^2 / sum a^2 (about 1: the truth cannot tell these tokens from noise); "
           "excess_share: the tokens' share of sum(a^2 - se^2), the noise-corrected estimate of where the squared "
           "true advantage lies. Read the truth's mass_share below with these: its |a| carries noise mass on every "
           "token whose continuations vary.\n"]
    for kind in kinds:
        out += [f"## Where the credit goes, by {kind}: share of each signal's mass\n",
                breakdown_markdown(r.table, kind, "mass_share", [TRUTH, *r.signals]), "",
                f"## Sign agreement by {kind}\n", breakdown_markdown(r.table, kind, "sign_agreement", r.signals), ""]
    return "\n".join(out)


def plot_report(r: Report, path: Path) -> None:
    """Each metric per signal with its interval, and where the truth and each signal put their mass."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(20, 9))
    FigureCanvasAgg(fig)
    names = [TRUTH, *r.signals]
    overall = r.table[r.table["breakdown"] == "all"]
    for i, metric in enumerate(METRICS):
        ax = fig.add_subplot(2, 4, i + 1)
        rows = [overall[(overall["signal"] == n) & (overall["metric"] == metric)] for n in names]
        vals = [row["value"].iloc[0] if len(row) else math.nan for row in rows]
        err = [[v - row["low"].iloc[0], row["high"].iloc[0] - v] if len(row) and not math.isnan(v) else [0, 0]
               for v, row in zip(vals, rows)]
        ax.barh(range(len(names)), np.nan_to_num(vals), xerr=np.array(err).T, color="tab:blue", alpha=0.7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.invert_yaxis()
    for j, kind in enumerate(k for k in ("position", "type") if k in set(r.table["breakdown"])):
        ax = fig.add_subplot(2, 4, 6 + j)
        sub = r.table[(r.table["breakdown"] == kind) & (r.table["metric"] == "mass_share")]
        groups = sorted(sub["group"].unique(), key=lambda g: (len(g), g))
        for n in names:
            vals = [sub[(sub["signal"] == n) & (sub["group"] == g)]["value"].mean() for g in groups]
            ax.plot(range(len(groups)), vals, marker="o", lw=2.5 if n == TRUTH else 1, label=n)
        ax.set_xticks(range(len(groups)), groups, fontsize=7)
        ax.set_title(f"share of mass by {kind} ({TRUTH} = the truth)", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(r: Report, output_dir: Path) -> None:
    """The whole output directory at once (fileio.atomic_write_dir): a failed run leaves nothing behind."""
    def write(tmp: Path) -> None:
        r.units.to_csv(tmp / "units.csv", index=False)
        r.table.to_csv(tmp / "agreement.csv", index=False)
        (tmp / "summary.md").write_text(summary_markdown(r))
        (tmp / "meta.json").write_text(json.dumps(r.meta, indent=2))
        plot_report(r, tmp / "credit_truth.png")
    atomic_write_dir(output_dir, write, "the credit truth analysis")


# ============================================================================ the command


def sample_episodes(model: Transformer, tokenizer: Tokenizer, task: Task, problems: Sequence[Any], n_questions: int,
                    config: Config, seed: int, engine: RolloutEngine) -> list[Episode]:
    """Fresh completions of `n_questions` problems drawn by the seed, G per problem, at the training settings."""
    if n_questions > len(problems):
        raise ValueError(f"--episodes needs {n_questions} problems; the split has {len(problems)}")
    chosen = sorted(np.random.default_rng(seed).choice(len(problems), n_questions, replace=False).tolist())
    t = config.training
    return rollout(model, tokenizer, [problems[i] for i in chosen], [task.prompt(problems[i]) for i in chosen],
                   task.reward, t.num_answers_per_question, t.max_new_tokens, t.temperature, t.top_p,
                   stream=stream_key(seed, EPISODE_SALT), question_ids=chosen, engine=engine)


def load_checkpoint(checkpoint: Path) -> tuple[Transformer, Tokenizer]:
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"--checkpoint {checkpoint} is not a model directory (no config.json)")
    return Transformer.from_pretrained(checkpoint, dtype=torch.float32).eval(), Tokenizer(checkpoint)


def analyze(args: argparse.Namespace) -> Report:
    """Sample, value, score every signal, aggregate: the Report (nothing written)."""
    start = time.perf_counter()
    config = load_config(args.config, args.overrides)
    g = config.training.num_answers_per_question
    if args.episodes < g or args.episodes % g:
        raise ValueError(f"--episodes must be a multiple of the group size {g} (training.num_answers_per_question)")
    if args.bootstrap < 1:
        raise ValueError(f"--bootstrap must be >= 1, got {args.bootstrap}")
    model, tokenizer = load_checkpoint(Path(args.checkpoint))
    cv.check_settings(args.k, config.training.max_new_tokens, config.training.temperature, tokenizer.end_token_ids)
    task = build_task(config)
    train, test = task.load()
    engine = RolloutEngine(model)
    episodes = sample_episodes(model, tokenizer, task, test if args.split == "test" else train, args.episodes // g,
                               config, args.seed, engine)
    t = config.training
    truth = ground_truth(model, tokenizer, task, episodes, k=args.k, max_new_tokens=t.max_new_tokens,
                         temperature=t.temperature, seed=args.seed, unit=args.unit, max_rows=args.max_rows)
    weighters = build_weighters(config, model, Path(args.checkpoint))
    signals = token_signals(model, episodes, episode_advantages(episodes, g, config), weighters, tokenizer.pad_token_id)
    hf_tokenizer = analyze_credit.load_tokenizer(Path(args.checkpoint))
    units = unit_frame(episodes, truth, signals, lambda df: analyze_credit.classify_tokens(df, hf_tokenizer))
    names = list(signals)
    table, best = score(units, names, args.bootstrap, args.seed)
    meta = {"signals": names, "checkpoint": str(args.checkpoint), "episodes": len(episodes),
            "questions": len(episodes) // g, "group_size": g, "split": args.split, "unit": args.unit, "k": args.k,
            "seed": args.seed,
            "temperature": t.temperature, "mean_reward": float(np.mean([e.reward for e in episodes])),
            "states": truth.cost.states, "kept_tokens": truth.cost.kept_tokens,
            "sampled_tokens": truth.cost.sampled_tokens, "value_seconds": truth.seconds, "units": len(units),
            "significant": int((units[TRUTH].abs() > SIGNIFICANCE_Z * units["mc_stderr"]).sum()),
            "bootstrap": args.bootstrap, "total_seconds": time.perf_counter() - start}
    return Report(units, table, best, names, meta)


def rescore(directory: Path, n_boot: int) -> Report:
    """An earlier output directory's Report recomputed from its units.csv and meta.json (no sampling)."""
    if not (directory / "units.csv").is_file() or not (directory / "meta.json").is_file():
        raise FileNotFoundError(f"--rescore {directory}: no units.csv and meta.json (a credit_truth output directory)")
    units = pd.read_csv(directory / "units.csv")
    meta = json.loads((directory / "meta.json").read_text())
    names = meta.get("signals") or [c for c in units.columns if c not in UNIT_COLUMNS]
    table, best = score(units, names, n_boot, meta["seed"])
    return Report(units, table, best, names, {**meta, "signals": names, "bootstrap": n_boot})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a model directory (a training checkpoint step_*/)")
    p.add_argument("--config", default="config_tiny.yaml", help="the run's config: task, data, sampling, weighters")
    p.add_argument("--output_dir")
    p.add_argument("--rescore", type=Path, metavar="DIR",
                   help="recompute an earlier output directory's tables from its units.csv (no sampling)")
    p.add_argument("--episodes", type=int, default=64, help="completions sampled (a multiple of the group size)")
    p.add_argument("--k", type=int, default=8, help="continuations per state")
    p.add_argument("--unit", choices=("token", "step"), default="token", help="value every token, or step ends")
    p.add_argument("--split", choices=("test", "train"), default="test", help="held-out or training problems")
    p.add_argument("--seed", type=int, default=0, help="the problems drawn, their completions, the MC noise")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the episodes")
    p.add_argument("--max_rows", type=int, default=2048, help="rows (states x K) per rollout engine call")
    p.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> Report:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rescore is None and not (args.checkpoint and args.output_dir):
        parser.error("--checkpoint and --output_dir are required (or --rescore DIR)")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    try:
        report = rescore(args.rescore, args.bootstrap) if args.rescore else analyze(args)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"credit_truth: {err}") from err
    out = Path(args.output_dir or args.rescore)
    write_report(report, out)
    print("\n".join(report.best))
    print(f"[credit_truth] wrote {out} ({report.meta['total_seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
