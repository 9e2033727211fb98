"""Per-token credit logger: one row per generated token that the policy update trained on.

Every `credit_save_interval` steps (and whenever a checkpoint is written) the rows buffered since the
last write go to `credit_logs_step_NNNNNN.pkl` (NNNNNN = the last step they hold), so memory is bounded
by one interval and the step files together hold every row once. At the end, `credit_logs_final.pkl` is their
index (one row per step file: its name and last step), which marks the run finished and holds no rows again.
Each file is a pandas DataFrame saved with `DataFrame.to_pickle`; `read_logs` (and `analyze_credit.py`) reads
a run's rows from its directory or its final file, in this layout or the first one (format 1), whose final
file held every row a second time.

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

FORMAT_VERSION = 2  # 2: the final file is an index of the step files; 1: it held the whole run's rows again
STEP_FILE = re.compile(r"^credit_logs_step_(\d+)\.pkl$")  # one interval's rows, NNNNNN = its last step
STEP_FILE_GLOB = "credit_logs_step_*.pkl"
FINAL_FILE = "credit_logs_final.pkl"  # the index of the step files (format 1: the whole run's rows)
INDEX = "index"  # attrs["kind"] of a final file that is an index
TEMP_FILE = re.compile(r"^\.credit_logs_.+\.tmp$")  # a write killed mid-way (fileio.atomic_write)


def step_file_name(step: int) -> str:
    return f"credit_logs_step_{step:06d}.pkl"


def step_files(directory: str | Path) -> list[tuple[int, Path]]:
    """The run's step files, sorted by step."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return sorted(found)


def is_index(frame: pd.DataFrame) -> bool:
    return frame.attrs.get("kind") == INDEX


def run_files(path: str | Path) -> list[Path]:
    """The files that hold a run's rows, each once: a directory's step files (none: its final file, an index
    or a format-1 file of rows); a final file that is an index: the step files it lists, beside it; any other
    file: itself. A listed file that is gone is a FileNotFoundError naming it."""
    path = Path(path)
    if path.is_dir():
        files = [f for _, f in step_files(path)]
        return files or (run_files(path / FINAL_FILE) if (path / FINAL_FILE).is_file() else [])
    if path.name != FINAL_FILE:
        return [path]
    frame = pd.read_pickle(path)
    if not isinstance(frame, pd.DataFrame) or not is_index(frame):
        return [path]
    files = [path.parent / name for name in frame["file"]]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} lists step files that are gone: {', '.join(missing)}")
    return files


def read_logs(path: str | Path) -> pd.DataFrame:
    """A run's rows from its credit-log directory or final file (either format), in step order."""
    files = run_files(path)
    if not files:
        raise FileNotFoundError(f"no credit log files in {path}: expected {STEP_FILE_GLOB} or {FINAL_FILE}")
    frames = [pd.read_pickle(f) for f in files]
    frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    frame.attrs = dict(frames[0].attrs)
    return frame


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
        """Flush what is left and write credit_logs_final.pkl, the index of the run's step files."""
        self.flush(self._last_step)
        files = step_files(self.directory)
        if not files:
            return None
        index = pd.DataFrame({"file": [p.name for _, p in files], "last_step": [step for step, _ in files]})
        index.attrs.update({"format_version": FORMAT_VERSION, "kind": INDEX, "mitigation": self.mitigation})
        path = self.directory / FINAL_FILE
        atomic_write(path, lambda p: index.to_pickle(p), "the final credit log")
        remove_temp_files(self.directory)
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
        remove_temp_files(self.directory)


def remove_temp_files(directory: Path) -> None:
    """The temporary files of credit-log writes that a crash (SIGKILL) cut short: never read, only in the way."""
    if directory.is_dir():
        for p in directory.iterdir():
            if TEMP_FILE.match(p.name) and p.is_file():
                p.unlink(missing_ok=True)
