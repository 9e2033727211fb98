"""The Countdown task: dataset, prompts, an exhaustive solver and the verifiable reward.

Given 3-4 numbers and a target, write an arithmetic expression that uses every number
exactly once with + - * / and parentheses and equals the target (TinyZero / GRPO-Zero).

Reward scale (as in GRPO-Zero): ``reward = 0.1 * format_reward + answer_reward``, with
format_reward in {0, 0.1, 0.5, 0.6, 1} and answer_reward in {0, 1}, so rewards lie in
[0, 1.1]; a fully correct, well-formatted response scores 1.1.

The model's output is hostile input. GRPO-Zero checks the answer with a regex and
``eval``; here the answer is read by a small tokenizer and recursive-descent parser over
``fractions.Fraction`` with hard limits on length, nesting depth and literal size, and the
tags are found with ``str.find`` (linear time, no regex backtracking). Nothing the model
writes is ever executed, and no string makes the reward raise or take more than a few ms.

Data: the published layout of ``Jiayi-Pan/Countdown-Tasks-3to4`` -- a directory with
``data/train-00000-of-00001.parquet`` holding columns ``target`` (int) and ``nums``
(list of int). ``python countdown_task.py generate --out DIR`` writes the same layout.

The task the trainer runs (`CountdownTask`, registered as ``data.task=countdown``) is at the end, with the
config keys it declares; its built-in model is tiny_model.py warmed up on this solver's traces.

CLI: ``python countdown_task.py {generate,solve,check} --help``.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence

from config import Param
from tasks import TASKS, Task
from tokenizer import chat_prompt  # Qwen's chat format lives with the tokenizer


@dataclass(frozen=True)
class CountdownProblem:
    numbers: tuple[int, ...]
    target: int


@dataclass(frozen=True)
class Solution:
    expression: str  # e.g. "(55-46)+13"; scores answer_reward 1.0
    steps: tuple[str, ...]  # e.g. ("55-46=9", "9+13=22"), in evaluation order


# --------------------------------------------------------------------------- dataset

DATASET_REPO = "Jiayi-Pan/Countdown-Tasks-3to4"
DATASET_FILE = "train-00000-of-00001.parquet"
_HOW_TO_GET = (
    f"obtain it with `hf download {DATASET_REPO} --repo-type dataset --local-dir Countdown-Tasks-3to4` "
    "or generate one with "
    "`python countdown_task.py generate --out DIR --n 10000`"
)


class DatasetError(ValueError):
    """A Countdown dataset path is missing, empty or malformed."""


def _parquet_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DatasetError(f"Countdown dataset not found at {str(path)!r}; {_HOW_TO_GET}")
    if path.is_file():
        return [path]
    for folder in (path / "data", path):
        if folder.is_dir():
            files = sorted(p for p in folder.glob("*.parquet") if p.is_file())
            if files:
                return files
    raise DatasetError(
        f"no *.parquet files in {str(path / 'data')!r} or {str(path)!r}; {_HOW_TO_GET}"
    )


def _read_parquet_file(file: Path) -> list[CountdownProblem]:
    import pyarrow as pa  # lazy: reward and solver users should not pay for pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:
        hint = ""
        try:
            with open(file, "rb") as f:
                if f.read(64).startswith(b"version https://git-lfs"):
                    hint = " (it is a Git LFS pointer: run `git lfs pull` in the clone)"
        except OSError:
            pass
        raise DatasetError(f"cannot read parquet file {str(file)!r}{hint}: {e}") from e

    missing = [c for c in ("target", "nums") if c not in table.column_names]
    if missing:
        raise DatasetError(
            f"{str(file)!r} is missing column(s) {missing}; found columns {table.column_names}"
        )
    target_type = table.schema.field("target").type
    nums_type = table.schema.field("nums").type
    if not pa.types.is_integer(target_type):
        raise DatasetError(f"{str(file)!r}: column 'target' must be integer, found {target_type}")
    if not (
        (pa.types.is_list(nums_type) or pa.types.is_large_list(nums_type))
        and pa.types.is_integer(nums_type.value_type)
    ):
        raise DatasetError(
            f"{str(file)!r}: column 'nums' must be lists of integers, found {nums_type}"
        )

    problems = []
    targets = table.column("target").to_pylist()
    all_nums = table.column("nums").to_pylist()
    for row, (target, nums) in enumerate(zip(targets, all_nums)):
        if target is None:
            raise DatasetError(f"{str(file)!r} row {row}: 'target' is null")
        if not nums or any(n is None for n in nums):
            raise DatasetError(f"{str(file)!r} row {row}: 'nums' is empty or has nulls: {nums}")
        problems.append(CountdownProblem(numbers=tuple(nums), target=target))
    return problems


def load_countdown_dataset(path: str | os.PathLike) -> list[CountdownProblem]:
    """Load Countdown problems from a cloned HF dataset repo (with ``data/``), a directory
    of parquet files, or a single parquet file. Files are read in sorted name order."""
    problems: list[CountdownProblem] = []
    for file in _parquet_files(Path(path)):
        problems.extend(_read_parquet_file(file))
    return problems


def split_dataset(
    problems: Sequence[CountdownProblem], test_size: int | float
) -> tuple[list[CountdownProblem], list[CountdownProblem]]:
    """Deterministic split as in GRPO-Zero: the LAST ``test_size`` rows are the test set.

    An int is a row count (0 allowed); a float in (0, 1) is a fraction of the rows,
    rounded up (as scikit-learn does). Returns ``(train, test)``."""
    n = len(problems)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)):
        raise ValueError(f"test_size must be an int or a float in (0, 1), got {test_size!r}")
    if isinstance(test_size, float):
        if not 0.0 < test_size < 1.0:
            raise ValueError(f"a float test_size must lie in (0, 1), got {test_size}")
        n_test = math.ceil(test_size * n)
    else:
        n_test = test_size
    if n_test < 0:
        raise ValueError(f"test_size must not be negative, got {test_size}")
    if n_test >= n:
        raise ValueError(f"test_size={test_size} leaves no training data out of {n} problems")
    problems = list(problems)
    return problems[: n - n_test], problems[n - n_test :]


def write_countdown_dataset(
    problems: Iterable[CountdownProblem], out_dir: str | os.PathLike
) -> Path:
    """Write ``out_dir/data/train-00000-of-00001.parquet`` (columns ``target``, ``nums``),
    the published layout, atomically (temp file then ``os.replace``). Returns the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    problems = list(problems)
    table = pa.table(
        {
            "target": pa.array([int(p.target) for p in problems], type=pa.int64()),
            "nums": pa.array([[int(n) for n in p.numbers] for p in problems],
                             type=pa.list_(pa.int64())),
        }
    )
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    final = data_dir / DATASET_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{DATASET_FILE}.", suffix=".tmp", dir=data_dir)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return final


# --------------------------------------------------------------------------- solver

@dataclass(frozen=True)
class _Node:
    value: Fraction
    expr: str
    steps: tuple[str, ...]
    is_leaf: bool


def _fmt(value: Fraction, operand: bool = False) -> str:
    """"9", "-5", "8/3"; as an operand in a step, "(-5)" and "(8/3)" to stay unambiguous."""
    text = str(value)  # Fraction prints "9" or "8/3"
    return f"({text})" if operand and (value < 0 or value.denominator != 1) else text


def _join(a: _Node, op: str, b: _Node, value: Fraction) -> _Node:
    left = a.expr if a.is_leaf else f"({a.expr})"
    right = b.expr if b.is_leaf else f"({b.expr})"
    step = f"{_fmt(a.value, True)}{op}{_fmt(b.value, True)}={_fmt(value)}"
    return _Node(value, f"{left}{op}{right}", a.steps + b.steps + (step,), False)


# A move is (op, swapped, value): "x op y" or, when swapped, "y op x".
def _moves_integer(x: int, y: int):
    """Moves whose result is a non-negative integer (the readable solutions)."""
    yield "+", False, x + y
    yield ("-", False, x - y) if x >= y else ("-", True, y - x)
    yield "*", False, x * y
    if y and x % y == 0:
        yield "/", False, x // y
    if x and x != y and y % x == 0:
        yield "/", True, y // x


def _moves_fraction(x: Fraction, y: Fraction):
    yield "+", False, x + y
    yield "-", False, x - y
    yield "-", True, y - x
    yield "*", False, x * y
    if y:
        yield "/", False, x / y
    if x:
        yield "/", True, y / x


def _in_order(items: list, rng: random.Random | None) -> list:
    if rng is not None:
        rng.shuffle(items)
    return items


def _search(values: tuple, target, moves, dead: set, rng: random.Random | None = None) -> list | None:
    """Depth-first search on values only (strings are built once, by ``_replay``).
    Returns the moves ``(i, j, op, swapped, value)`` that reach ``target``, or None.
    With ``rng`` the pairs and moves are tried in a random order (a random one of the solutions)."""
    if len(values) == 2:
        for op, swapped, value in _in_order(list(moves(values[0], values[1])), rng):
            if value == target:
                return [(0, 1, op, swapped, value)]
        return None
    key = tuple(sorted(values))
    if key in dead:  # the same multiset of values failed before via another path
        return None
    pairs = [(i, j) for i in range(len(values)) for j in range(i + 1, len(values))]
    for i, j in _in_order(pairs, rng):
        before, after = values[:i], values[i + 1 : j] + values[j + 1 :]
        seen = set()
        for op, swapped, value in _in_order(list(moves(values[i], values[j])), rng):
            if value in seen:  # same value from this pair -> same subproblem
                continue
            seen.add(value)
            path = _search(before + (value,) + after, target, moves, dead, rng)
            if path is not None:
                return [(i, j, op, swapped, value)] + path
    dead.add(key)
    return None


def _replay(numbers: tuple[int, ...], path: list) -> Solution:
    nodes = tuple(_Node(Fraction(n), str(n), (), True) for n in numbers)
    for i, j, op, swapped, value in path:
        a, b = (nodes[j], nodes[i]) if swapped else (nodes[i], nodes[j])
        nodes = nodes[:i] + (_join(a, op, b, Fraction(value)),) + nodes[i + 1 : j] + nodes[j + 1 :]
    return Solution(nodes[0].expr, nodes[0].steps)


def solve(numbers: Sequence[int], target: int, rng: random.Random | None = None) -> Solution | None:
    """Exhaustively search for an expression using every number exactly once.

    Deterministic by default; with ``rng``, a random one of the solutions (varied teacher traces).

    Searches solutions whose intermediates are all non-negative integers first, then
    falls back to exact rational intermediates (e.g. ``8/(3-(8/3))`` = 24), so it returns
    a Solution whenever one exists and None otherwise. Numbers must be non-negative
    (negative literals cannot be written without unary minus, which the reward rejects)."""
    numbers = tuple(int(n) for n in numbers)
    if not numbers:
        raise ValueError("solve needs at least one number")
    if any(n < 0 for n in numbers):
        raise ValueError(f"numbers must be non-negative, got {numbers}")
    target = Fraction(target)
    if len(numbers) == 1:
        return Solution(str(numbers[0]), ()) if numbers[0] == target else None
    if target.denominator == 1 and target >= 0:
        path = _search(numbers, int(target), _moves_integer, set(), rng)
        if path is not None:
            return _replay(numbers, path)
    path = _search(tuple(map(Fraction, numbers)), target, _moves_fraction, set(), rng)
    return None if path is None else _replay(numbers, path)


def format_trace(solution: Solution) -> str:
    """The ideal response continuing a prompt that ends in ``<think>``:
    ``"55-46=9, 9+13=22</think>\\n<answer>(55-46)+13</answer>"``."""
    return f"{', '.join(solution.steps)}</think>\n<answer>{solution.expression}</answer>"


def _random_target(numbers: Sequence[int], rng: random.Random) -> int:
    """Value of a random expression tree over all numbers with non-negative integer
    intermediates (ops whose result would not be one are simply not drawn)."""
    values = list(numbers)
    while len(values) > 1:
        i, j = rng.sample(range(len(values)), 2)
        x, y = values[i], values[j]
        results = [x + y, abs(x - y), x * y]
        if y and x % y == 0:
            results.append(x // y)
        values = [v for k, v in enumerate(values) if k not in (i, j)] + [rng.choice(results)]
    return values[0]


def generate_problems(
    n: int,
    num_numbers: Sequence[int] = (3, 4),
    seed: int = 0,
    number_range: tuple[int, int] = (1, 99),
    target_range: tuple[int, int] = (1, 99),
) -> list[CountdownProblem]:
    """``n`` distinct, solvable problems, deterministic for a seed.

    Numbers are drawn uniformly from ``number_range`` (inclusive), the count uniformly
    from ``num_numbers``; the target is the value of a random expression tree over them,
    kept if it lies in ``target_range`` (inclusive). Two problems are duplicates when
    they have the same multiset of numbers and the same target."""
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    if not num_numbers or any(k < 1 for k in num_numbers):
        raise ValueError(f"num_numbers must be positive counts, got {num_numbers}")
    if number_range[0] < 0 or number_range[0] > number_range[1]:
        raise ValueError(f"number_range must be (low, high) with 0 <= low <= high, got {number_range}")
    rng = random.Random(seed)
    problems: list[CountdownProblem] = []
    seen: set = set()
    misses, max_misses = 0, 10_000 + 100 * n
    while len(problems) < n:
        # Draw the count first and retry within it, so rejections (4 numbers overshoot the
        # target range more often) do not skew the mix of counts away from uniform.
        k = rng.choice(tuple(num_numbers))
        while True:
            numbers = tuple(rng.randint(*number_range) for _ in range(k))
            target = _random_target(numbers, rng)
            key = (tuple(sorted(numbers)), target)
            if target_range[0] <= target <= target_range[1] and key not in seen:
                break
            misses += 1
            if misses > max_misses:
                raise ValueError(
                    f"could only generate {len(problems)} of {n} distinct problems with "
                    f"num_numbers={tuple(num_numbers)}, number_range={number_range}, "
                    f"target_range={target_range}"
                )
        if solve(numbers, target) is None:  # cannot happen by construction; cheap to verify
            raise AssertionError(f"generated an unsolvable problem {numbers} -> {target}")
        seen.add(key)
        problems.append(CountdownProblem(numbers, target))
    return problems


# --------------------------------------------------------------------------- prompts

SYSTEM_MESSAGE = (
    "You are a helpful assistant. You first think about the reasoning process in your "
    "mind and then provide the user with the answer."
)
USER_TEMPLATE = (
    "Using the numbers {numbers}, create an equation that equals {target}. "
    "You can use basic arithmetic operations (+, -, *, /) and each number can only be "
    "used once. Show your work in <think> </think> tags. And return the final answer in "
    "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
RESPONSE_PROMPT = "Let me solve this step by step.\n<think>"
PROMPT_STYLES = ("chat", "compact")


def build_prompt(problem: CountdownProblem, style: str = "chat") -> str:
    """The prompt text; both styles end in ``<think>`` so ``reward_function`` applies.

    ``"chat"``: GRPO-Zero's Qwen chat prompt (numbers shown as a list, ``[55, 46, 13]``).
    ``"compact"``: ``"55 46 13 -> 22\\n<think>"`` for a tiny character-level model."""
    if style == "chat":
        user = USER_TEMPLATE.format(numbers=list(problem.numbers), target=problem.target)
        return chat_prompt(SYSTEM_MESSAGE, user, RESPONSE_PROMPT)
    if style == "compact":
        return f"{' '.join(map(str, problem.numbers))} -> {problem.target}\n<think>"
    raise ValueError(f"unknown prompt style {style!r}; valid styles: {PROMPT_STYLES}")


# --------------------------------------------------------------------------- reward

MAX_RESPONSE_CHARS = 1_000_000  # longer responses score 0; bounds even the linear scans
MAX_EXPRESSION_CHARS = 256
MAX_NESTING_DEPTH = 32
MAX_LITERAL_DIGITS = 6
_DIGITS = frozenset("0123456789")  # ASCII only: str.isdigit() and int() accept e.g. "٣"
_WHITESPACE = frozenset(" \t\n\r")
_OPERATORS = frozenset("+-*/()")


def _tokenize(expr: str) -> list[str] | None:
    """Tokens (integer literals, operators, parentheses), or None if anything is off."""
    if len(expr) > MAX_EXPRESSION_CHARS:
        return None
    tokens: list[str] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in _WHITESPACE:
            i += 1
        elif c in _OPERATORS:
            tokens.append(c)
            i += 1
        elif c in _DIGITS:
            j = i
            while j < n and expr[j] in _DIGITS:
                j += 1
            literal = expr[i:j]
            if j - i > MAX_LITERAL_DIGITS or (literal[0] == "0" and len(literal) > 1):
                return None  # huge or zero-padded literal
            tokens.append(literal)
            i = j
        else:
            return None  # letters, '.', '_', unicode digits, anything else
    return tokens


class _Parser:
    """expr := term (('+'|'-') term)* ; term := factor (('*'|'/') factor)* ;
    factor := INT | '(' expr ')'. No unary operators. Methods return None on failure."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self) -> Fraction | None:
        value = self._expr()
        return value if value is not None and self.pos == len(self.tokens) else None

    def _expr(self) -> Fraction | None:
        value = self._term()
        while value is not None and self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            right = self._term()
            if right is None:
                return None
            value = value + right if op == "+" else value - right
        return value

    def _term(self) -> Fraction | None:
        value = self._factor()
        while value is not None and self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            right = self._factor()
            if right is None or (op == "/" and right == 0):
                return None
            value = value * right if op == "*" else value / right
        return value

    def _factor(self) -> Fraction | None:
        token = self._peek()
        if token is None:
            return None
        if token == "(":
            self.depth += 1
            if self.depth > MAX_NESTING_DEPTH:
                return None
            self.pos += 1
            value = self._expr()
            if value is None or self._peek() != ")":
                return None
            self.pos += 1
            self.depth -= 1
            return value
        if token[0] in _DIGITS:
            self.pos += 1
            return Fraction(int(token))
        return None


def evaluate_expression(expr: str) -> Fraction | None:
    """Exact value of an arithmetic expression over non-negative integer literals with
    + - * / and parentheses, or None if it is malformed, over a limit, or divides by 0."""
    tokens = _tokenize(expr)
    return None if tokens is None else _Parser(tokens).parse()


def _tag_content(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the first ``open_tag ... close_tag`` pair; same as the leftmost match
    of ``re.search(open_tag + "(.*?)" + close_tag, text, re.DOTALL)``."""
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return None if end < 0 else text[start:end]


def extract_answer(response: str) -> str | None:
    """Content of the first ``<answer>...</answer>``, or None."""
    if len(response) > MAX_RESPONSE_CHARS:
        return None
    return _tag_content(response, "<answer>", "</answer>")


def format_reward_function(response: str, end_token: str | None = None) -> float:
    """GRPO-Zero's format reward on the text that starts with ``<think>``: 1.0 if it
    matches ``^<think>.*?</think>\\n<answer>.*?</answer>$`` (DOTALL; like Python's ``$``,
    one trailing newline is tolerated), else 0.1 for a ``<think>...</think>`` plus 0.5
    for an ``<answer>...</answer>`` anywhere. A trailing ``end_token`` is stripped first."""
    if end_token and response.endswith(end_token):
        response = response[: -len(end_token)]
    if len(response) > MAX_RESPONSE_CHARS:
        return 0.0
    body = response[:-1] if response.endswith("\n") else response
    middle = "</think>\n<answer>"
    if body.startswith("<think>") and body.endswith("</answer>"):
        # ".*?" can absorb anything, so the earliest separator is the best witness.
        sep = body.find(middle, len("<think>"))
        if 0 <= sep and sep + len(middle) <= len(body) - len("</answer>"):
            return 1.0
    reward = 0.0
    if _tag_content(response, "<think>", "</think>") is not None:
        reward += 0.1
    if _tag_content(response, "<answer>", "</answer>") is not None:
        reward += 0.5
    return reward


def answer_reward_function(response: str, numbers: Sequence[int], target: int) -> float:
    """1.0 if the first ``<answer>`` holds an expression that uses every number exactly
    once (as a multiset of integer literals) and equals ``target`` exactly, else 0.0."""
    answer = extract_answer(response)
    if answer is None:
        return 0.0
    tokens = _tokenize(answer)
    if tokens is None:
        return 0.0
    literals = [int(t) for t in tokens if t[0] in _DIGITS]
    if Counter(literals) != Counter(int(n) for n in numbers):
        return 0.0
    value = _Parser(tokens).parse()
    return 1.0 if value is not None and value == int(target) else 0.0


def reward_function(
    response: str, numbers: Sequence[int], target: int, end_token: str | None = None
) -> dict:
    """Reward of a completion that continues a prompt ending in ``<think>``:
    ``0.1 * format_reward + answer_reward`` in [0, 1.1] (GRPO-Zero's scheme)."""
    text = "<think>" + response
    format_reward = format_reward_function(text, end_token)
    answer_reward = answer_reward_function(text, numbers, target)
    return {
        "reward": 0.1 * format_reward + answer_reward,
        "reward_info": {"format_reward": format_reward, "answer_reward": answer_reward},
    }


# --------------------------------------------------------------------------- the task


# An equation of the trace, "55-46=9"; the lookbehind starts a match only at a digit run's first digit, so a
# long run of digits is scanned once (linear time on whatever the model writes)
EQUATION = re.compile(r"(?<!\d)\d+\s*[-+*/]\s*\d+\s*=\s*\d+")


def equation_ends(text: str) -> list[int]:
    """Countdown's reasoning steps end after each equation ("55-46=9"); the answer runs to the end."""
    return [m.end() for m in EQUATION.finditer(text)]


def _counts(v: list[int]) -> bool:
    return all(n >= 2 for n in v)


@TASKS.register("countdown", params={
    "generate_if_missing": Param(0, ">0: write this many solver-checked problems to data.path if it is missing",
                                 ">= 0", lambda v: v >= 0, int),
    "generate_num_numbers": Param([3, 4], "numbers per generated problem (one of these counts each)",
                                  "counts >= 2", _counts, list[int]),
    # a transfer set: generated problems with these numbers counts (e.g. [4] for a model trained on 3-number
    # problems), evaluated beside the held-out split and logged as success_rate/transfer
    "transfer_num_numbers": Param([], "numbers counts of the generated transfer eval set (empty: none)",
                                  "counts >= 2", _counts, list[int], section="eval"),
    "transfer_problems": Param(128, "problems in the transfer eval set", ">= 1", lambda v: v >= 1, int,
                               section="eval"),
})
class CountdownTask(Task):
    def load(self) -> tuple[list[Any], list[Any]]:
        d = self.config.data
        path = Path(d.path)
        if not path.exists() and d.generate_if_missing > 0:
            print(f"[data] {path} is missing: generating {d.generate_if_missing} solvable Countdown problems there")
            problems = generate_problems(d.generate_if_missing, seed=d.generate_seed,
                                         num_numbers=tuple(d.generate_num_numbers))
            write_countdown_dataset(problems, path)
        test_size = d.test_size
        return split_dataset(load_countdown_dataset(path), int(test_size) if test_size >= 1 else test_size)

    def prompt(self, problem: CountdownProblem) -> str:
        return build_prompt(problem, self.config.data.prompt_style)

    def reward(self, problem: CountdownProblem, completion: str) -> dict:
        return reward_function(completion, problem.numbers, problem.target)

    def reference_completion(self, problem: CountdownProblem) -> str | None:
        solution = solve(problem.numbers, problem.target)
        return None if solution is None else format_trace(solution)

    def step_ends(self, text: str) -> list[int]:
        return equation_ends(text)

    def eval_group(self, problem: CountdownProblem) -> str:
        return f"{len(problem.numbers)}num"

    def extra_eval_sets(self) -> dict[str, list[Any]]:
        e = self.config.eval
        if not e.transfer_num_numbers:
            return {}
        return {"transfer": generate_problems(e.transfer_problems, seed=e.seed,
                                              num_numbers=tuple(e.transfer_num_numbers))}

    def build_model(self, path: Path, train_set: Sequence[Any]) -> None:
        """The tiny model, warmed up on solver traces of the training split (a random one of each problem's
        solutions per example when tiny.varied_traces: more entropy at the choice points GRPO explores)."""
        import tiny_model  # torch: not for the reward and solver, which run without it (.ci/run's floor venv)

        s, style = self.config.tiny, self.config.data.prompt_style
        problems = [p for p in train_set[: s.num_train_problems] if solve(p.numbers, p.target) is not None]

        def draw(rng: random.Random) -> tuple[str, str]:
            p = problems[rng.randrange(len(problems))]
            return build_prompt(p, style), format_trace(solve(p.numbers, p.target, rng if s.varied_traces else None))

        tiny_model.build_tiny_model(s, path, draw, len(problems))


# --------------------------------------------------------------------------- CLI

def _cmd_generate(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    problems = generate_problems(
        args.n, tuple(args.num_numbers), args.seed,
        tuple(args.number_range), tuple(args.target_range),
    )
    path = write_countdown_dataset(problems, args.out)
    sizes = Counter(len(p.numbers) for p in problems)
    print(f"wrote {len(problems)} problems to {path} in {time.perf_counter() - start:.1f}s")
    print("numbers per problem: " + ", ".join(f"{k}: {sizes[k]}" for k in sorted(sizes)))
    for p in problems[:3]:
        print(f"  e.g. {list(p.numbers)} -> {p.target}")


def _cmd_solve(args: argparse.Namespace) -> None:
    solution = solve(args.numbers, args.target)
    if solution is None:
        print(f"no solution for {args.numbers} -> {args.target}")
        return
    for step in solution.steps:
        print(step)
    print(f"expression: {solution.expression}")


def _cmd_check(args: argparse.Namespace) -> None:
    problems = load_countdown_dataset(args.data)
    sizes = Counter(len(p.numbers) for p in problems)
    print(f"{len(problems)} problems in {args.data}")
    print("numbers per problem: " + ", ".join(f"{k}: {sizes[k]}" for k in sorted(sizes)))
    if not problems:
        return
    sample = random.Random(args.seed).sample(problems, min(args.sample, len(problems)))
    start = time.perf_counter()
    solutions = [(p, solve(p.numbers, p.target)) for p in sample]
    elapsed = time.perf_counter() - start
    solved = [(p, s) for p, s in solutions if s is not None]
    print(f"solver solves {len(solved)}/{len(sample)} sampled problems "
          f"({1000 * elapsed / len(sample):.2f} ms per problem)")
    wrong = [(p, s) for p, s in solved
             if reward_function(format_trace(s), p.numbers, p.target)["reward"] != 1.1]
    if wrong:  # would be a solver/reward bug
        print(f"ERROR: {len(wrong)} solver traces do not score 1.1, e.g. {wrong[0]}")
        sys.exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="countdown_task.py",
        description="Countdown task tools: generate a dataset, solve a problem, check a dataset.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate", help="write a solvable synthetic dataset in the published parquet layout",
        description="Generate distinct solvable problems and write "
                    f"OUT/data/{DATASET_FILE} (columns target, nums).",
    )
    gen.add_argument("--out", required=True, help="output directory (created if missing)")
    gen.add_argument("--n", type=int, default=10_000, help="number of problems (default 10000)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    gen.add_argument("--num_numbers", type=int, nargs="+", default=[3, 4],
                     help="allowed counts of numbers per problem (default: 3 4)")
    gen.add_argument("--number_range", type=int, nargs=2, default=[1, 99], metavar=("LOW", "HIGH"),
                     help="inclusive range of the numbers (default: 1 99)")
    gen.add_argument("--target_range", type=int, nargs=2, default=[1, 99], metavar=("LOW", "HIGH"),
                     help="inclusive range of the targets (default: 1 99)")
    gen.set_defaults(func=_cmd_generate)

    sol = sub.add_parser(
        "solve", help="solve one problem",
        description="Print the solver's steps and expression, or 'no solution'.",
    )
    sol.add_argument("--numbers", type=int, nargs="+", required=True, help="e.g. 55 46 13")
    sol.add_argument("--target", type=int, required=True, help="e.g. 22")
    sol.set_defaults(func=_cmd_solve)

    chk = sub.add_parser(
        "check", help="load a dataset and run the solver on a sample",
        description="Load a dataset (repo dir, parquet dir or file), report its size, and "
                    "how many of a random sample the solver solves.",
    )
    chk.add_argument("--data", required=True, help=f"path, e.g. a clone of {DATASET_REPO}")
    chk.add_argument("--sample", type=int, default=200, help="problems to solve (default 200)")
    chk.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    chk.set_defaults(func=_cmd_check)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (DatasetError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
