"""Countdown task: reward, solver, generator, dataset I/O, prompts and CLI.

Expected values are worked out by hand in the comments next to them."""
import subprocess
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import countdown_task as ct
from countdown_task import CountdownProblem

REPO = Path(__file__).resolve().parents[1]
NUMS, TARGET = (55, 46, 13), 22  # 55 - 46 = 9, 9 + 13 = 22


def reward(response, numbers=NUMS, target=TARGET, end_token=None):
    return ct.reward_function(response, numbers, target, end_token)


def answer_only(expr, numbers=NUMS, target=TARGET):
    return ct.answer_reward_function(f"<answer>{expr}</answer>", numbers, target)


# ----------------------------------------------------------------------------- reward

def test_correct_answer_full_format_scores_1_1():
    out = reward("55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>")
    assert out["reward_info"] == {"format_reward": 1.0, "answer_reward": 1.0}
    assert out["reward"] == pytest.approx(1.1)


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("(55-46)+13", 1.0),
        (" 55 - 46 + 13 ", 1.0),  # whitespace allowed; left-assoc: (55-46)+13 = 22
        ("13 + 55 - 46", 1.0),  # any order of the numbers
        ("55-(46+13)", 0.0),  # = -4
        ("55+46-13", 0.0),  # wrong value: 88
        ("55-46+46", 0.0),  # reuses 46, misses 13 (value 55)
        ("55-46", 0.0),  # misses 13
        ("(55-46)+13*1", 0.0),  # extra number 1, value still 22
        ("(55-46)+13+0", 0.0),  # extra 0
        ("(55-46)+013", 0.0),  # zero-padded literal
        ("(55-46)+13.0", 0.0),  # decimal
        ("-(46-55)+13", 0.0),  # unary minus: -(-9)+13 = 22
        ("+55-46+13", 0.0),  # unary plus
        ("(55-46)+13=22", 0.0),  # '=' not allowed
        ("55-46+13 ** 1", 0.0),  # '**' is not an operator here
        ("(55-46)(13)", 0.0),  # implicit multiplication
        ("((55-46)+13", 0.0),  # unbalanced
        ("", 0.0),
    ],
)
def test_answer_reward_cases(expr, expected):
    assert answer_only(expr) == expected


def test_division_by_zero_scores_zero():
    # numbers 5, 5, 3: 3/(5-5) divides by zero; (5-5)/3 = 0 is fine (zero numerator).
    assert answer_only("3/(5-5)", (5, 5, 3), 0) == 0.0
    assert answer_only("(5-5)/3", (5, 5, 3), 0) == 1.0
    assert answer_only("3*(5/(5-5))*0", (5, 5, 3, 0), 0) == 0.0  # 0 * (1/0) is still invalid
    assert ct.evaluate_expression("1/(2-2)") is None


def test_exact_non_integer_intermediates():
    # 8/3 = 8/3; 3 - 8/3 = 1/3; 8 / (1/3) = 24 exactly (floats give 23.999999999999993).
    assert answer_only("8/(3-8/3)", (3, 3, 8, 8), 24) == 1.0
    # 1/3 * 18 = 6
    assert answer_only("(1/3)*18", (1, 3, 18), 6) == 1.0
    # close but not equal: 1/3 + 1/3 + ... never mind floats: 10/3 != 3
    assert answer_only("10/3", (10, 3), 3) == 0.0


def test_evaluate_expression_precedence_and_associativity():
    assert ct.evaluate_expression("2+3*4") == 14
    assert ct.evaluate_expression("(2+3)*4") == 20
    assert ct.evaluate_expression("8/4/2") == 1  # (8/4)/2
    assert ct.evaluate_expression("8/(4/2)") == 4
    assert ct.evaluate_expression("8-4-2") == 2  # (8-4)-2
    assert ct.evaluate_expression("2*3-4/8") == Fraction(11, 2)
    assert ct.evaluate_expression("1/3") == Fraction(1, 3)
    assert ct.evaluate_expression("-1") is None
    assert ct.evaluate_expression("1.5") is None
    assert ct.evaluate_expression("1234567") is None  # over the 6-digit literal limit
    assert ct.evaluate_expression("((((1))))") == 1


@pytest.mark.parametrize(
    "response, end_token, expected",
    [
        ("work</think>\n<answer>1</answer>", None, 1.0),  # full format
        ("work</think>\n<answer>1</answer>\n", None, 1.0),  # like regex '$': one trailing \n
        ("work</think>\n<answer>1</answer><|im_end|>", "<|im_end|>", 1.0),  # end token stripped
        ("work</think>\n<answer>1</answer><|im_end|>", None, 0.6),  # not stripped: both tags
        ("work</think><answer>1</answer>", None, 0.6),  # missing newline: 0.1 + 0.5
        ("work</think>\n<answer>1</answer> more", None, 0.6),  # text after the answer
        ("work</think>", None, 0.1),  # think only
        ("work<answer>1</answer>", None, 0.5),  # answer only: no </think>
        ("work", None, 0.0),
        ("</think>\n<answer></answer>", None, 1.0),  # empty think and answer still match
    ],
)
def test_format_reward_variants(response, end_token, expected):
    out = reward(response, end_token=end_token)
    assert out["reward_info"]["format_reward"] == pytest.approx(expected)
    assert out["reward_info"]["answer_reward"] == 0.0
    assert out["reward"] == pytest.approx(0.1 * expected)


def test_answer_uses_first_answer_tag():
    two = "x</think>\n<answer>1+1</answer><answer>(55-46)+13</answer>"
    assert reward(two)["reward_info"]["answer_reward"] == 0.0
    assert ct.extract_answer("<answer> a </answer><answer>b</answer>") == " a "
    assert ct.extract_answer("<answer>unclosed") is None


HOSTILE = [
    "</think>\n<answer>__import__('os').system('echo pwned')</answer>",
    "</think>\n<answer>" + "(" * 10_000 + "1" + ")" * 10_000 + "</answer>",
    "</think>\n<answer>" + "(" * 31 + "55-46+13" + ")" * 31 + "</answer>",  # fine: depth 31
    "</think>\n<answer>" + "(" * 40 + "55-46+13" + ")" * 40 + "</answer>",  # too deep
    "</think>\n<answer>1" + "0" * 100 + "</answer>",  # 10**100 written out
    "</think>\n<answer>10**100</answer>",
    "</think>\n<answer>９*９*９</answer>",  # full-width digits
    "</think>\n<answer>٥٥-٤٦+١٣</answer>",  # Arabic-Indic 55-46+13
    "</think>\n<answer>" + "+".join(["999999"] * 36) + "</answer>",
    "</think>\n<answer>" + "*".join(["999999"] * 36) + "</answer>",
    "</think>\n<answer>" + "/".join(["999999", "999998"] * 18) + "</answer>",
    "<think>" * 200_000 + "</think>\n<answer>" * 20_000 + "</answer>",
    "<think>" * 50_000 + "</think>\n<answer>" * 20_000 + "</answer>",  # under the 1M cap
    "</think>\n<answer>" * 50_000,
    "a" * 2_000_000 + "</think>\n<answer>(55-46)+13</answer>",  # over MAX_RESPONSE_CHARS
    "\x00\udcff\U0010ffff</think>\n<answer>\u202e13+46-55</answer>",
    "</think>\n<answer>" + "1+" * 5_000 + "1</answer>",
]


@pytest.mark.parametrize("response", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_responses_are_fast_and_bounded(response):
    start = time.perf_counter()
    out = reward(response)
    elapsed = time.perf_counter() - start
    assert 0.0 <= out["reward"] <= 1.1
    assert elapsed < 0.05, f"{elapsed * 1000:.1f} ms"


def test_hostile_specifics():
    assert reward(HOSTILE[0])["reward_info"]["answer_reward"] == 0.0
    assert reward(HOSTILE[2])["reward_info"]["answer_reward"] == 1.0  # depth 31 is allowed
    assert reward(HOSTILE[3])["reward_info"]["answer_reward"] == 0.0
    assert reward(HOSTILE[7], (55, 46, 13), 22)["reward"] == pytest.approx(0.1)
    assert reward(HOSTILE[14]) == {
        "reward": 0.0, "reward_info": {"format_reward": 0.0, "answer_reward": 0.0}}


@pytest.mark.parametrize(
    "expr",
    ["*".join(["999999"] * 36), "/".join(["999999", "999998"] * 18),
     "+".join(f"{99999}/{99990 + i}" for i in range(20))],  # 249 chars, 20 coprime-ish terms
)
def test_worst_case_expressions_within_limits_are_fast(expr):
    assert len(expr) <= ct.MAX_EXPRESSION_CHARS
    start = time.perf_counter()
    assert ct.evaluate_expression(expr) is not None
    assert time.perf_counter() - start < 0.05


def test_nesting_and_length_limits():
    depth = ct.MAX_NESTING_DEPTH
    assert ct.evaluate_expression("(" * depth + "1" + ")" * depth) == 1
    assert ct.evaluate_expression("(" * (depth + 1) + "1" + ")" * (depth + 1)) is None
    long_expr = "1" + "+1" * 200  # 401 chars > 256
    assert ct.evaluate_expression(long_expr) is None
    assert ct.evaluate_expression("1" + "+1" * 127) == 128  # 255 chars


def test_reward_accepts_numpy_like_ints():
    np = pytest.importorskip("numpy")
    out = reward("x</think>\n<answer>(55-46)+13</answer>",
                 np.array([55, 46, 13], dtype=np.int64), np.int64(22))
    assert out["reward"] == pytest.approx(1.1)


# ----------------------------------------------------------------------------- solver

def test_solve_known_problem():
    solution = ct.solve((55, 46, 13), 22)
    assert solution == ct.Solution("(55-46)+13", ("55-46=9", "9+13=22"))
    assert ct.format_trace(solution) == "55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>"


def test_solve_falls_back_to_fractions():
    # 3, 3, 8, 8 -> 24 has no solution with integer intermediates; 8/(3-8/3) is the one.
    solution = ct.solve((3, 3, 8, 8), 24)
    assert solution is not None
    assert ct.evaluate_expression(solution.expression) == 24
    assert sorted(solution.steps) == sorted(["8/3=8/3", "3-(8/3)=1/3", "8/(1/3)=24"])
    assert reward(ct.format_trace(solution), (3, 3, 8, 8), 24)["reward"] == pytest.approx(1.1)


@pytest.mark.parametrize("numbers, target", [((1, 1, 1), 99), ((2, 2), 5), ((1, 1, 1, 1), 99)])
def test_solve_returns_none_when_unsolvable(numbers, target):
    # (1,1,1): the largest reachable value is (1+1)+1 = 3; (2,2): {4, 0, 4, 1}.
    assert ct.solve(numbers, target) is None


def test_solve_edge_cases():
    assert ct.solve((7,), 7) == ct.Solution("7", ())
    assert ct.solve((7,), 8) is None
    assert ct.solve((2, 3), -1) == ct.Solution("2-3", ("2-3=-1",))
    with pytest.raises(ValueError):
        ct.solve((), 1)
    with pytest.raises(ValueError):
        ct.solve((-1, 2), 1)


def test_solver_answers_score_full_reward_on_generated_problems():
    problems = ct.generate_problems(200, num_numbers=(3, 4), seed=123)
    worst = 0.0
    for p in problems:
        start = time.perf_counter()
        solution = ct.solve(p.numbers, p.target)
        worst = max(worst, time.perf_counter() - start)
        assert solution is not None, p
        out = reward(ct.format_trace(solution), p.numbers, p.target, end_token="<|im_end|>")
        assert out["reward"] == pytest.approx(1.1), (p, solution)
        # generated problems have integer solutions, which the solver prefers
        for step in solution.steps:
            result = step.rsplit("=", 1)[1]
            assert result.isdigit(), (p, solution)
    assert worst < 0.2


def test_solver_finds_solutions_for_random_problems():
    # Random (mostly unsolvable) 4-number problems: every solution found must be right.
    import random

    rng = random.Random(7)
    found = 0
    for _ in range(40):
        numbers = tuple(rng.randint(1, 30) for _ in range(4))
        target = rng.randint(1, 99)
        solution = ct.solve(numbers, target)
        if solution is not None:
            found += 1
            assert answer_only(solution.expression, numbers, target) == 1.0
    assert found > 10


# ----------------------------------------------------------------------------- generator

def test_generator_is_deterministic_distinct_and_in_range():
    a = ct.generate_problems(300, seed=5)
    assert a == ct.generate_problems(300, seed=5)
    assert a != ct.generate_problems(300, seed=6)
    keys = Counter((tuple(sorted(p.numbers)), p.target) for p in a)
    assert len(keys) == 300
    sizes = Counter(len(p.numbers) for p in a)
    assert set(sizes) == {3, 4} and 110 <= sizes[3] <= 190  # count drawn uniformly (~150)
    assert all(1 <= n <= 99 for p in a for n in p.numbers)
    assert all(1 <= p.target <= 99 for p in a)
    assert all(isinstance(n, int) for p in a for n in p.numbers)


def test_generator_options_and_impossible_request():
    probs = ct.generate_problems(20, num_numbers=(3,), seed=0, number_range=(1, 9),
                                 target_range=(10, 20))
    assert all(len(p.numbers) == 3 and 10 <= p.target <= 20 for p in probs)
    assert all(ct.solve(p.numbers, p.target) is not None for p in probs)
    assert ct.generate_problems(0) == []
    # one number from 1..3, target = that number: only 3 distinct problems exist
    with pytest.raises(ValueError, match="could only generate 3"):
        ct.generate_problems(10, num_numbers=(1,), number_range=(1, 3), target_range=(1, 3))


# ----------------------------------------------------------------------------- dataset

def test_write_load_round_trip(tmp_path):
    problems = ct.generate_problems(50, seed=1)
    path = ct.write_countdown_dataset(problems, tmp_path / "ds")
    assert path == tmp_path / "ds" / "data" / "train-00000-of-00001.parquet"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert ct.load_countdown_dataset(tmp_path / "ds") == problems  # repo dir
    assert ct.load_countdown_dataset(str(tmp_path / "ds" / "data")) == problems  # parquet dir
    assert ct.load_countdown_dataset(path) == problems  # one file
    table = pq.read_table(path)
    assert table.column_names == ["target", "nums"]
    assert pa.types.is_list(table.schema.field("nums").type)


def test_load_reads_files_in_sorted_order(tmp_path):
    first = [CountdownProblem((1, 2, 3), 6)]
    second = [CountdownProblem((4, 5, 6), 15), CountdownProblem((2, 2, 2), 8)]
    ct.write_countdown_dataset(second, tmp_path / "b")
    ct.write_countdown_dataset(first, tmp_path / "a")
    folder = tmp_path / "mixed"
    folder.mkdir()
    (tmp_path / "b/data/train-00000-of-00001.parquet").rename(folder / "part-1.parquet")
    (tmp_path / "a/data/train-00000-of-00001.parquet").rename(folder / "part-0.parquet")
    assert ct.load_countdown_dataset(folder) == first + second


def test_load_accepts_published_schema_like_table(tmp_path):
    # The HF dataset stores nums as list<int64> and target as int64; int32 also works.
    pq.write_table(pa.table({"target": pa.array([22], pa.int32()),
                             "nums": pa.array([[55, 46, 13]], pa.list_(pa.int32()))}),
                   tmp_path / "x.parquet")
    assert ct.load_countdown_dataset(tmp_path) == [CountdownProblem((55, 46, 13), 22)]


def test_split_semantics():
    problems = [CountdownProblem((i, 1, 1), i) for i in range(10)]
    train, test = ct.split_dataset(problems, 3)
    assert train == problems[:7] and test == problems[7:]  # the LAST rows are the test set
    train, test = ct.split_dataset(problems, 0.25)  # ceil(2.5) = 3
    assert len(train) == 7 and test == problems[7:]
    assert ct.split_dataset(problems, 0) == (problems, [])
    assert ct.split_dataset(problems, 9) == (problems[:1], problems[1:])
    for bad in (-1, 10, 11, 0.0, 1.0, 1.5, True, "3"):
        with pytest.raises(ValueError):
            ct.split_dataset(problems, bad)


def test_missing_path_explains_how_to_get_data(tmp_path):
    with pytest.raises(ct.DatasetError, match="hf download Jiayi-Pan/Countdown-Tasks-3to4 "
                                              "--repo-type dataset") as err:
        ct.load_countdown_dataset(tmp_path / "nope")
    assert "countdown_task.py generate" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_dir_without_parquet_files(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ct.DatasetError, match="no \\*.parquet files"):
        ct.load_countdown_dataset(tmp_path)


def test_missing_column_is_named(tmp_path):
    pq.write_table(pa.table({"target": [1], "numbers": [[1, 2]]}), tmp_path / "x.parquet")
    with pytest.raises(ct.DatasetError) as err:
        ct.load_countdown_dataset(tmp_path)
    message = str(err.value)
    assert "'nums'" in message and "numbers" in message and "x.parquet" in message


@pytest.mark.parametrize(
    "table, match",
    [
        (pa.table({"target": [1.5], "nums": [[1, 2]]}), "'target' must be integer"),
        (pa.table({"target": [1], "nums": [[1.0, 2.0]]}), "'nums' must be lists of integers"),
        (pa.table({"target": [1], "nums": ["1 2"]}), "'nums' must be lists of integers"),
        (pa.table({"target": [1, 2], "nums": [[1, 2], []]}), "row 1: 'nums' is empty"),
        (pa.table({"target": [1, None], "nums": [[1], [2]]}), "row 1: 'target' is null"),
        (pa.table({"target": [1], "nums": [[1, None]]}), "row 0: 'nums' is empty or has nulls"),
    ],
)
def test_bad_values_are_reported(tmp_path, table, match):
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ct.DatasetError, match=match) as err:
        ct.load_countdown_dataset(tmp_path)
    assert "bad.parquet" in str(err.value)


def test_corrupt_parquet_and_lfs_pointer(tmp_path):
    (tmp_path / "data").mkdir()
    corrupt = tmp_path / "data" / "train-00000-of-00001.parquet"
    corrupt.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(ct.DatasetError, match="cannot read parquet file .*train-00000"):
        ct.load_countdown_dataset(tmp_path)
    corrupt.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ct.DatasetError, match="git lfs pull"):
        ct.load_countdown_dataset(tmp_path)


# ----------------------------------------------------------------------------- prompts

def test_chat_prompt():
    prompt = ct.build_prompt(CountdownProblem((55, 46, 13), 22))
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant. You first think about the reasoning "
        "process in your mind and then provide the user with the answer.<|im_end|>\n"
        "<|im_start|>user\nUsing the numbers [55, 46, 13], create an equation that equals 22. "
        "You can use basic arithmetic operations (+, -, *, /) and each number can only be used "
        "once. Show your work in <think> </think> tags. And return the final answer in "
        "<answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>.<|im_end|>\n"
        "<|im_start|>assistant\nLet me solve this step by step.\n<think>"
    )
    assert ct.chat_prompt("S", "U", "A") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nA")
    assert ct.chat_prompt(None, "U") == "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_compact_prompt_and_styles():
    problem = CountdownProblem((55, 46, 13), 22)
    assert ct.build_prompt(problem, "compact") == "55 46 13 -> 22\n<think>"
    assert ct.PROMPT_STYLES == ("chat", "compact")
    for style in ct.PROMPT_STYLES:
        assert ct.build_prompt(problem, style).endswith("<think>")
    with pytest.raises(ValueError, match="chat.*compact"):
        ct.build_prompt(problem, "alpaca")


# ----------------------------------------------------------------------------- CLI

def _cli(*args):
    return subprocess.run([sys.executable, "countdown_task.py", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_cli_help():
    out = _cli("--help")
    assert out.returncode == 0
    for command in ("generate", "solve", "check"):
        assert command in out.stdout
    assert "--num_numbers" in _cli("generate", "--help").stdout


def test_cli_solve():
    out = _cli("solve", "--numbers", "55", "46", "13", "--target", "22")
    assert out.returncode == 0
    assert out.stdout.splitlines() == ["55-46=9", "9+13=22", "expression: (55-46)+13"]
    assert "no solution" in _cli("solve", "--numbers", "1", "1", "1", "--target", "99").stdout


def test_cli_generate_then_check(tmp_path):
    out = _cli("generate", "--out", str(tmp_path), "--n", "30", "--seed", "3",
               "--num_numbers", "3", "4")
    assert out.returncode == 0, out.stderr
    assert "wrote 30 problems" in out.stdout
    assert ct.load_countdown_dataset(tmp_path) == ct.generate_problems(30, seed=3)
    out = _cli("check", "--data", str(tmp_path), "--sample", "10")
    assert out.returncode == 0, out.stderr
    assert "30 problems" in out.stdout and "solves 10/10" in out.stdout
    out = _cli("check", "--data", str(tmp_path / "missing"))
    assert out.returncode == 2 and "hf download" in out.stderr


def test_solve_with_rng_returns_varied_valid_solutions():
    import random
    rng = random.Random(0)
    seen = set()
    for _ in range(40):
        sol = ct.solve((55, 46, 13), 22, rng)
        assert ct.reward_function(ct.format_trace(sol), (55, 46, 13), 22)["reward_info"]["answer_reward"] == 1.0
        seen.add(sol.expression)
    assert len(seen) >= 3  # (55-46)+13, 55-(46-13), (55+13)-46
    assert ct.solve((55, 46, 13), 22) == ct.solve((55, 46, 13), 22)  # without rng: deterministic
    assert ct.solve((1, 1, 1), 99, rng) is None
