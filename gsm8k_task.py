"""GSM8K: grade-school math word problems with a numeric final answer.

Reads the public layout from a local path (no download): a `.jsonl` or `.parquet` file, or a directory
holding such files (the openai/gsm8k dataset repo has `main/train-*.parquet` and `main/test-*.parquet`, and the
same problems with Socratic sub-questions in `socratic/`: at the repo's root, `data.gsm8k_config` picks one;
the original release has `train.jsonl` and `test.jsonl`). Every row has `question` and `answer`, and the final
answer follows `####` at the end of `answer`. The reward is the exact numeric match of the completion's
`<answer>` against it, with a format reward for the tags, parsed without eval. `GSM8KTask` is
``data.task=gsm8k``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from config import Param
from countdown_task import DatasetError, extract_answer, format_reward_function, split_dataset
from tasks import TASKS, Task
from tokenizer import chat_prompt

HOW_TO_GET = ("obtain it with `hf download openai/gsm8k --repo-type dataset --local-dir gsm8k` and point data.path "
              "at that directory, or at a .jsonl/.parquet file with question and answer columns")
CONFIGS = ("main", "socratic")  # the dataset's two configurations, one directory each
SYSTEM_MESSAGE = ("You are a helpful assistant. You first think about the reasoning process in your mind and "
                  "then provide the user with the answer.")
USER_TEMPLATE = ("{question}\nShow your work in <think> </think> tags. Return only the final number in "
                 "<answer> </answer> tags, for example <answer> 42 </answer>.")
RESPONSE_PROMPT = "Let me solve this step by step.\n<think>"
MAX_NUMBER_CHARS = 64
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)(/\d+)?")


@dataclass(frozen=True)
class GSM8KProblem:
    question: str
    answer: float | str  # the final answer as written after ####, e.g. "72" or "1,080"
    solution: str = ""  # the worked solution before ####


def parse_number(text: str) -> Fraction | None:
    """A number as people write it: 1,080 / $18 / 2.50 / -3 / 3/4 / 15% -> exact Fraction, else None."""
    if len(text) > MAX_NUMBER_CHARS:
        return None
    s = text.strip().replace(",", "").replace("$", "").rstrip(".").rstrip("%").strip()
    if not _NUMBER.fullmatch(s):
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def split_answer(answer: str) -> tuple[str, str]:
    """(worked solution, final answer) from a GSM8K answer field `...\\n#### 72`."""
    if "####" not in answer:
        raise ValueError("no '####' before the final answer")
    solution, final = answer.rsplit("####", 1)
    return solution.strip(), final.strip()


def _rows(file: Path) -> list[dict]:
    if file.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{file}:{n}: not valid JSON ({e.msg})") from e
        return rows
    import pyarrow.parquet as pq

    try:
        return pq.read_table(file).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise DatasetError(f"{file}: not a readable parquet file ({e})") from e


def load_file(file: Path) -> list[GSM8KProblem]:
    problems = []
    for n, row in enumerate(_rows(file), 1):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("answer"), str):
            raise DatasetError(f"{file}: row {n} needs string columns 'question' and 'answer' (GSM8K layout)")
        try:
            solution, final = split_answer(row["answer"])
        except ValueError as e:
            raise DatasetError(f"{file}: row {n}: {e}") from e
        if parse_number(final) is None:
            raise DatasetError(f"{file}: row {n}: final answer {final!r} is not a number")
        problems.append(GSM8KProblem(row["question"], final, solution))
    return problems


def one_configuration(path: Path, files: list[Path], config: str) -> list[Path]:
    """The files of one configuration: a directory whose data sit in several subdirectories (the dataset's root:
    main/ and socratic/) is read from the one named `config`; any other mix is an error, never a merge."""
    if path.name in CONFIGS and path.name != config:
        raise DatasetError(f"data.path {path} is the {path.name}/ configuration but data.gsm8k_config is {config!r}: "
                           f"set data.gsm8k_config={path.name}, or point data.path at the dataset's root")
    where = {f.relative_to(path).parts[0] if f.parent != path else "." for f in files}
    if len(where) == 1:
        (only,) = where
        if only in CONFIGS and only != config:
            raise DatasetError(f"{path} holds only the {only}/ configuration, not data.gsm8k_config={config!r}")
        return files
    if config in where and "." not in where:
        return [f for f in files if f.relative_to(path).parts[0] == config]
    raise DatasetError(f"{path} holds data files in several places ({', '.join(sorted(where))}), which would be "
                       f"merged: point data.path at one of them (data.gsm8k_config picks main/ or socratic/ at the "
                       f"dataset's root)")


def find_files(path: Path, config: str = "main") -> tuple[list[Path], list[Path]]:
    """(train files, test files) under `path`: a file is its own train set; in a directory (of one configuration,
    one_configuration), files whose name starts with 'test' are the test split (sorted, .jsonl and .parquet)."""
    if not path.exists():
        raise DatasetError(f"GSM8K data not found at {path}; {HOW_TO_GET}")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet") and p.is_file())
        files = one_configuration(path, files, config) if files else files
    if not files:
        raise DatasetError(f"no .jsonl or .parquet files in {path}; {HOW_TO_GET}")
    test = [f for f in files if f.name.startswith("test")]
    return [f for f in files if f not in test], test


def load_gsm8k(path: str | Path, config: str = "main") -> tuple[list[GSM8KProblem], list[GSM8KProblem]]:
    """(train, test) problems of configuration `config` (main or socratic, when `path` is the dataset's root);
    test is empty when the path has no test file (the caller then splits)."""
    train_files, test_files = find_files(Path(path), config)
    train = [p for f in train_files for p in load_file(f)]
    test = [p for f in test_files for p in load_file(f)]
    if not train:
        raise DatasetError(f"{path}: no training rows")
    return train, test


def build_prompt(problem: GSM8KProblem, style: str = "chat") -> str:
    if style == "chat":
        return chat_prompt(SYSTEM_MESSAGE, USER_TEMPLATE.format(question=problem.question), RESPONSE_PROMPT)
    if style == "compact":
        return f"{problem.question}\n<think>"
    raise ValueError(f"unknown prompt style {style!r}; valid: chat, compact")


def reward_function(response: str, problem: GSM8KProblem) -> dict:
    """0.1 x format_reward + answer_reward, as for Countdown: answer_reward is 1 when the first <answer> holds a
    number exactly equal to the reference final answer."""
    text = "<think>" + response
    fmt = format_reward_function(text)
    answer = extract_answer(text)
    value = parse_number(answer) if answer is not None else None
    correct = float(value is not None and value == parse_number(str(problem.answer)))
    return {"reward": 0.1 * fmt + correct, "reward_info": {"format_reward": fmt, "answer_reward": correct}}


def reference_completion(problem: GSM8KProblem) -> str:
    """The dataset's worked solution in the answer format (its <<48/2=24>> calculator notes removed)."""
    worked = re.sub(r"<<[^>]*>>", "", problem.solution)
    return f"{worked}</think>\n<answer>{problem.answer}</answer>"


@TASKS.register("gsm8k", params={"gsm8k_config": Param(
        "main", "the dataset's configuration read when data.path is its root: main, or socratic (the same "
        "problems, solutions written as sub-questions)", "main or socratic", lambda v: v in CONFIGS, str)})
class GSM8KTask(Task):
    def load(self) -> tuple[list[Any], list[Any]]:
        d = self.config.data
        train, test = load_gsm8k(d.path, d.gsm8k_config)
        return (train, test) if test else split_dataset(train, int(d.test_size) if d.test_size >= 1 else d.test_size)

    def prompt(self, problem: GSM8KProblem) -> str:
        return build_prompt(problem, self.config.data.prompt_style)

    def reward(self, problem: GSM8KProblem, completion: str) -> dict:
        return reward_function(completion, problem)

    def reference_completion(self, problem: GSM8KProblem) -> str:
        return reference_completion(problem)

    def step_ends(self, text: str) -> list[int]:
        """A step is a line of the worked solution (its newline included)."""
        return [m.end() for m in re.finditer("\n", text)]
