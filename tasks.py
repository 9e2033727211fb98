"""The task interface and its registry, selected by `data.task`: what the trainer needs from a problem set.

A task gives the dataset (train and test problems), the prompt, the reward (with its parts `format_reward`
and `answer_reward`; an eval counts `answer_reward == 1` as solved), an optional reference solution (for
teacher forcing and ground-truth injection), how an eval is broken down, where a completion's reasoning steps
end (step-level credit: `algorithm.vine_unit=step`), and how to build its built-in model when `model.build_tiny`
is set. Each task is one class in its own module, registered there with the config keys it declares
(countdown_task.py, bandit_task.py, gsm8k_task.py; parts.py imports them):

    @TASKS.register("sokoban", params={"board_size": Param(6, "board side", ">= 4", lambda v: v >= 4, int)})
    class SokobanTask(Task):
        ...  # reads self.config.data.board_size
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import Config
from registry import Registry


class Task:
    """The interface. `problems` are opaque to the trainer; only the task reads them."""

    name = "task"
    answer_tag: str | None = "<answer>"  # where a completion's answer section starts (weighters, credit logs)

    def __init__(self, config: Config):
        self.config = config

    def load(self) -> tuple[list[Any], list[Any]]:
        """(train, test) problems."""
        raise NotImplementedError

    def prompt(self, problem: Any) -> str:
        raise NotImplementedError

    def reward(self, problem: Any, completion: str) -> dict:
        """{"reward": float, "reward_info": {"format_reward": float, "answer_reward": float, ...}}."""
        raise NotImplementedError

    def reference_completion(self, problem: Any) -> str | None:
        """A correct completion (without the end token), or None when the task has no solver for it."""
        return None

    def step_ends(self, text: str) -> list[int]:
        """Where the reasoning steps of a completion end, as character offsets into its text (the end token
        not included): the state boundaries of step-level Monte-Carlo values (credit_values.step_positions,
        `algorithm.vine_unit=step`, credit_truth.py --unit step). Default: none, one step is the whole
        completion."""
        return []

    def eval_group(self, problem: Any) -> str | None:
        """A label to break eval success down by (e.g. "3num"), or None."""
        return None

    def extra_eval_sets(self) -> dict[str, list[Any]]:
        """More eval sets beside the held-out split (e.g. a transfer set), by name."""
        return {}

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        raise ValueError(f"task {self.name!r} has no built-in model; set model.build_tiny=false and model.path")

    def model_path(self, train_set: Sequence[Any]) -> Path:
        """`model.path`, where the built-in model is built first when `model.build_tiny` asks and it is missing."""
        path = Path(self.config.model.path)
        if self.config.model.build_tiny and not (path / "config.json").is_file():
            self.build_model(path, train_set)
        return path


TASKS: Registry[type[Task]] = Registry("data.task")


def build_task(config: Config) -> Task:
    task = TASKS.get(config.data.task)(config)
    task.name = config.data.task
    return task
