"""Per-token credit logger: one row per generated token that the policy update trained on.

Every `credit_save_interval` steps (and whenever a checkpoint is written) the rows buffered since the
last write go to `credit_logs_step_NNNNNN.pkl` (NNNNNN = the last step they hold), so memory is bounded
by one interval. At the end, `credit_logs_final.pkl` concatenates the run's step files. Each file is a
pandas DataFrame saved with `DataFrame.to_pickle`; `analyze_credit.py` reads them.

Columns: step, episode_idx, group_idx, position, length, token_id, log_prob, entropy, reward (raw),
advantage (after normalization, filtering and reweighting), weight (the mitigation's), contribution
(= advantage x log_prob), weighted_contribution (= weight x contribution), logit_grad_norm
(||onehot(y) - p||_2, so |advantage| x logit_grad_norm is the gradient size at the logits), in_answer,
answer_reward, finished.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from data_types import Episode, UpdateStats
from fileio import atomic_write, ensure_free_space

FORMAT_VERSION = 1
STEP_FILE = re.compile(r"^credit_logs_step_(\d+)\.pkl$")  # one interval's rows, NNNNNN = its last step
STEP_FILE_GLOB = "credit_logs_step_*.pkl"
FINAL_FILE = "credit_logs_final.pkl"  # the whole run's rows again


def step_file_name(step: int) -> str:
    return f"credit_logs_step_{step:06d}.pkl"


def step_files(directory: str | Path) -> list[tuple[int, Path]]:
    """The run's step files, sorted by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def episode_rows(
    step: int, episode_idx: int, episode: Episode, advantage: float, log_probs: Sequence[float],
    entropies: Sequence[float], weights: Sequence[float], logit_grad_norms: Sequence[float],
) -> dict[str, np.ndarray]:
    """The columns for one episode's tokens."""
    n = len(episode.generated_token_ids)
    log_prob = np.asarray(log_probs, dtype=np.float32)
    weight = np.asarray(weights, dtype=np.float32)
    contribution = np.float32(advantage) * log_prob
    position = np.arange(n, dtype=np.int32)
    answer_start = n if episode.answer_start is None else episode.answer_start
    return {
        "step": np.full(n, step, dtype=np.int32),
        "episode_idx": np.full(n, episode_idx, dtype=np.int64),
        "group_idx": np.full(n, episode.group_idx, dtype=np.int32),
        "position": position,
        "length": np.full(n, n, dtype=np.int32),
        "token_id": np.asarray(episode.generated_token_ids, dtype=np.int64),
        "log_prob": log_prob,
        "entropy": np.asarray(entropies, dtype=np.float32),
        "reward": np.full(n, episode.reward, dtype=np.float32),
        "advantage": np.full(n, advantage, dtype=np.float32),
        "weight": weight,
        "contribution": contribution,
        "weighted_contribution": weight * contribution,
        "logit_grad_norm": np.asarray(logit_grad_norms, dtype=np.float32),
        "in_answer": position >= answer_start,
        "answer_reward": np.full(n, episode.reward_info.get("answer_reward", np.nan), dtype=np.float32),
        "finished": np.full(n, episode.finished, dtype=bool),
    }


class CreditLogger:
    def __init__(self, directory: str | Path, save_interval: int, mitigation: str = "none"):
        self.directory = Path(directory)
        self.save_interval = save_interval
        self.mitigation = mitigation
        self.next_episode_idx = 0
        self._chunks: list[dict[str, np.ndarray]] = []
        self._last_step = 0

    def log_step(self, step: int, episodes: Sequence[Episode], advantages: Sequence[float], stats: UpdateStats) -> None:
        """Buffer the rows of one update; write a step file when the interval is complete."""
        for i, ep in enumerate(episodes):
            self._chunks.append(episode_rows(
                step, self.next_episode_idx, ep, float(advantages[i]), stats.token_log_probs[i],
                stats.token_entropies[i], stats.token_weights[i], stats.token_logit_grad_norms[i]))
            self.next_episode_idx += 1
        self._last_step = step
        if step % self.save_interval == 0:
            self.flush(step)

    def flush(self, step: int) -> Path | None:
        """Write the buffered rows as credit_logs_step_{step}.pkl (nothing buffered: no file)."""
        if not self._chunks:
            return None
        frame = pd.DataFrame({k: np.concatenate([c[k] for c in self._chunks]) for k in self._chunks[0]})
        frame.attrs.update({"format_version": FORMAT_VERSION, "mitigation": self.mitigation})
        path = self.directory / step_file_name(step)
        ensure_free_space(self.directory, int(frame.memory_usage(deep=True).sum()), "a credit log")
        atomic_write(path, lambda p: frame.to_pickle(p), "a credit log")
        self._chunks = []
        return path

    def finalize(self) -> Path | None:
        """Flush what is left and write credit_logs_final.pkl, the whole run's rows."""
        self.flush(self._last_step)
        files = step_files(self.directory)
        if not files:
            return None
        frame = pd.concat([pd.read_pickle(p) for _, p in files], ignore_index=True)
        frame.attrs.update({"format_version": FORMAT_VERSION, "mitigation": self.mitigation})
        path = self.directory / FINAL_FILE
        ensure_free_space(self.directory, int(frame.memory_usage(deep=True).sum()), "the final credit log")
        atomic_write(path, lambda p: frame.to_pickle(p), "the final credit log")
        return path

    def state_dict(self) -> dict[str, int]:
        return {"next_episode_idx": self.next_episode_idx}

    def load_state_dict(self, state: dict[str, int], resume_step: int) -> None:
        """Continue after a checkpoint at `resume_step`: step files from later steps (written by the run that
        crashed after the checkpoint) are removed, since those steps are about to be redone."""
        self.next_episode_idx = int(state["next_episode_idx"])
        self._last_step = resume_step
        for step, path in step_files(self.directory):
            if step > resume_step:
                path.unlink()
        (self.directory / FINAL_FILE).unlink(missing_ok=True)
