"""Tasks behind one interface, selected by `data.task`: what the trainer needs from a problem set.

A task gives the dataset (train and test problems), the prompt, the reward (with its parts `format_reward`
and `answer_reward`; an eval counts `answer_reward == 1` as solved), an optional reference solution (for
teacher forcing and ground-truth injection), how an eval is broken down, and how to build the built-in model
when `model.build_tiny` is set. Each task's own logic lives in its module (countdown_task.py, bandit_task.py,
gsm8k_task.py); the classes here only adapt them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bandit_task
import countdown_task
import gsm8k_task

if TYPE_CHECKING:
    from config import Config

TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        cls.name = name
        TASKS[name] = cls
        return cls
    return add


def build_task(config: Config) -> Task:
    name = config.data.task
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}")
    return TASKS[name](config)


class Task:
    """The interface. `problems` are opaque to the trainer; only the task reads them."""

    name = "task"

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

    def eval_group(self, problem: Any) -> str | None:
        """A label to break eval success down by (e.g. "3num"), or None."""
        return None

    def extra_eval_sets(self) -> dict[str, list[Any]]:
        """More eval sets beside the held-out split (e.g. a transfer set), by name."""
        return {}

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        raise ValueError(f"task {self.name!r} has no built-in model; set model.build_tiny=false and model.path")


def _split(problems: list[Any], test_size: float) -> tuple[list[Any], list[Any]]:
    return countdown_task.split_dataset(problems, int(test_size) if test_size >= 1 else test_size)


@register_task("countdown")
class CountdownTask(Task):
    def load(self) -> tuple[list[Any], list[Any]]:
        d = self.config.data
        path = Path(d.path)
        if not path.exists() and d.generate_if_missing > 0:
            print(f"[data] {path} is missing: generating {d.generate_if_missing} solvable Countdown problems there")
            problems = countdown_task.generate_problems(d.generate_if_missing, seed=d.generate_seed,
                                                        num_numbers=tuple(d.generate_num_numbers))
            countdown_task.write_countdown_dataset(problems, path)
        return _split(countdown_task.load_countdown_dataset(path), d.test_size)

    def prompt(self, problem: countdown_task.CountdownProblem) -> str:
        return countdown_task.build_prompt(problem, self.config.data.prompt_style)

    def reward(self, problem: countdown_task.CountdownProblem, completion: str) -> dict:
        return countdown_task.reward_function(completion, problem.numbers, problem.target)

    def reference_completion(self, problem: countdown_task.CountdownProblem) -> str | None:
        solution = countdown_task.solve(problem.numbers, problem.target)
        return None if solution is None else countdown_task.format_trace(solution)

    def eval_group(self, problem: countdown_task.CountdownProblem) -> str:
        return f"{len(problem.numbers)}num"

    def extra_eval_sets(self) -> dict[str, list[Any]]:
        e = self.config.eval
        if not e.transfer_num_numbers:
            return {}
        return {"transfer": countdown_task.generate_problems(e.transfer_problems, seed=e.seed,
                                                             num_numbers=tuple(e.transfer_num_numbers))}

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        import tiny_model  # only needed for the built-in default

        tiny_model.build_tiny_model(self.config, path, list(train_set))


@register_task("bandit")
class BanditTask(Task):
    def load(self) -> tuple[list[Any], list[Any]]:
        d = self.config.data
        n_test = int(d.test_size) if d.test_size >= 1 else max(1, int(d.test_size * 1000))
        problems = bandit_task.make_problems(d.num_arms, d.num_contexts, 1000 + n_test, d.generate_seed)
        return problems[:1000], problems[1000:]

    def prompt(self, problem: bandit_task.BanditProblem) -> str:
        return bandit_task.build_prompt(problem)

    def reward(self, problem: bandit_task.BanditProblem, completion: str) -> dict:
        return bandit_task.reward_function(problem, completion, self.config.data.num_arms)

    def reference_completion(self, problem: bandit_task.BanditProblem) -> str:
        return bandit_task.reference_completion(problem)

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        d, s = self.config.data, self.config.tiny
        print(f"[bandit] {path} not found: building a random-weight policy there ({d.num_arms} arms)")
        bandit_task.build_bandit_model(path, d.num_arms, d.num_contexts, hidden_size=s.hidden_size,
                                       num_layers=s.num_hidden_layers, seed=s.seed)


@register_task("gsm8k")
class GSM8KTask(Task):
    def load(self) -> tuple[list[Any], list[Any]]:
        train, test = gsm8k_task.load_gsm8k(self.config.data.path)
        return (train, test) if test else _split(train, self.config.data.test_size)

    def prompt(self, problem: gsm8k_task.GSM8KProblem) -> str:
        return gsm8k_task.build_prompt(problem, self.config.data.prompt_style)

    def reward(self, problem: gsm8k_task.GSM8KProblem, completion: str) -> dict:
        return gsm8k_task.reward_function(completion, problem)

    def reference_completion(self, problem: gsm8k_task.GSM8KProblem) -> str:
        return gsm8k_task.reference_completion(problem)
