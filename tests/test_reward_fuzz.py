"""Fuzzing the Countdown reward: the model's output is hostile input.

For any string the reward must not raise, must lie in [0, 1.1], must finish in a few ms,
and must never run code (eval/exec/compile/__import__ are replaced by traps while it runs).
Near-miss expressions are also checked against an independent oracle: Python's own parser
(``ast``, which only parses) walked with exact Fractions."""
import ast
import builtins
import contextlib
import re
import time
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import countdown_task as ct

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TIME_LIMIT_S = 0.05
TAGS = ["<think>", "</think>", "<answer>", "</answer>", "\n", "<|im_end|>", "<", ">", "/"]


@contextlib.contextmanager
def no_code_execution():
    def trap(*args, **kwargs):
        raise AssertionError("the reward tried to execute or import code")

    saved = {name: getattr(builtins, name) for name in ("eval", "exec", "compile", "__import__")}
    for name in saved:
        setattr(builtins, name, trap)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(builtins, name, fn)


def checked_reward(response, numbers, target, end_token=None):
    """reward_function under the traps, with its invariants and time asserted."""
    def call():
        with no_code_execution():
            start = time.perf_counter()
            out = ct.reward_function(response, numbers, target, end_token)
            return out, time.perf_counter() - start

    out, elapsed = call()
    if elapsed > TIME_LIMIT_S:  # one retry absorbs a scheduler hiccup on a shared runner
        out, elapsed = call()
    assert elapsed < TIME_LIMIT_S, f"{elapsed * 1000:.1f} ms for {response[:80]!r}"
    info = out["reward_info"]
    assert info["format_reward"] in (0.0, 0.1, 0.5, 0.6, 1.0)
    assert info["answer_reward"] in (0.0, 1.0)
    assert out["reward"] == 0.1 * info["format_reward"] + info["answer_reward"]
    assert 0.0 <= out["reward"] <= 1.1
    return out


numbers_st = st.lists(st.integers(1, 99), min_size=3, max_size=4).map(tuple)


@FUZZ
@given(text=st.text(max_size=400), numbers=numbers_st, target=st.integers(1, 99))
def test_arbitrary_text(text, numbers, target):
    checked_reward(text, numbers, target)
    checked_reward(text, numbers, target, end_token="<|im_end|>")


@FUZZ
@given(parts=st.lists(st.sampled_from(TAGS) | st.text(max_size=6), max_size=30),
       numbers=numbers_st, target=st.integers(1, 99))
def test_tag_soup(parts, numbers, target):
    checked_reward("".join(parts), numbers, target, end_token="<|im_end|>")


# ------------------------------------------------------------- format vs GRPO-Zero regex

def grpo_zero_format_reward(response):
    """GRPO-Zero's regex version, safe here because the fuzzed strings are short."""
    if re.match(r"^<think>.*?<\/think>\n<answer>.*?<\/answer>$", response, re.DOTALL):
        return 1.0
    reward = 0.0
    if re.search(r"<think>.*?<\/think>", response, re.DOTALL):
        reward += 0.1
    if re.search(r"<answer>.*?<\/answer>", response, re.DOTALL):
        reward += 0.5
    return reward


@FUZZ
@given(parts=st.lists(st.sampled_from(TAGS + ["x", " ", "</think>\n<answer>"]), max_size=25))
def test_format_reward_matches_grpo_zero_regex(parts):
    text = "".join(parts)
    assert ct.format_reward_function(text) == grpo_zero_format_reward(text)
    prefixed = "<think>" + text
    assert ct.format_reward_function(prefixed) == grpo_zero_format_reward(prefixed)


# ------------------------------------------------------------- near-miss expressions

def oracle_value(expr):
    """Exact value via Python's parser (parse only, never evaluated), same limits."""
    literals = re.findall(r"[0-9]+", expr)
    if any(len(x) > ct.MAX_LITERAL_DIGITS or (len(x) > 1 and x[0] == "0") for x in literals):
        return None
    if len(expr) > ct.MAX_EXPRESSION_CHARS or not expr.strip():
        return None
    if re.search(r"[A-Za-z_.]", expr):  # Python reads 0x1, 1_0 and 1. as numbers; Countdown literals are decimal digits
        return None
    try:
        tree = ast.parse(expr.lstrip(" "), mode="eval")
    except SyntaxError:
        return None

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            left, right = walk(node.left), walk(node.right)
            if left is None or right is None:
                return None
            if isinstance(node.op, ast.Add):
                return left + right
            if isinstance(node.op, ast.Sub):
                return left - right
            if isinstance(node.op, ast.Mult):
                return left * right
            return None if right == 0 else left / right
        return None  # unary ops, powers, floor division, calls, tuples, floats...

    return walk(tree.body)


@st.composite
def expression_tree(draw, numbers):
    """A random binary tree over a permutation of ``numbers``: (text, exact value or None)."""
    leaves = [(str(n), Fraction(n)) for n in draw(st.permutations(numbers))]
    while len(leaves) > 1:
        i = draw(st.integers(0, len(leaves) - 2))
        (a, x), (b, y) = leaves[i], leaves[i + 1]
        op = draw(st.sampled_from("+-*/"))
        if x is None or y is None or (op == "/" and y == 0):
            value = None
        else:
            value = {"+": x + y, "-": x - y, "*": x * y}[op] if op != "/" else x / y
        spaces = draw(st.sampled_from(["", " "]))
        leaves[i : i + 2] = [(f"({a}{spaces}{op}{spaces}{b})", value)]
    return leaves[0]


@st.composite
def near_miss(draw):
    """A random expression tree over the numbers with 0-3 small edits: an inserted atom
    (a number, operator, '**', '.', unary minus, zero-padded literal, letter, Arabic
    digit...) or a deleted character. Returns (numbers, text, value of the unedited tree)."""
    numbers = draw(numbers_st)
    text, value = draw(expression_tree(numbers))
    atoms = [str(n) for n in numbers] + ["+", "-", "*", "/", "(", ")", " ", "0", "1", "**",
                                         "//", ".", "5.0", "-1", "07", "x", "=", "\u0665"]
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:pos] + draw(st.sampled_from(atoms)) + text[pos:]
        else:
            text = text[:pos] + text[pos + 1 :]
    return numbers, text, value


@FUZZ
@given(case=near_miss(), other_target=st.integers(-5, 99), wrap=st.sampled_from(range(4)))
def test_near_miss_expressions(case, other_target, wrap):
    numbers, expr, tree_value = case
    # Aim at the unedited tree's value half the time, so edits that keep it are scored.
    aim = tree_value is not None and tree_value.denominator == 1 and other_target % 2
    target = int(tree_value) if aim else other_target
    expected_value = oracle_value(expr)
    with no_code_execution():
        value = ct.evaluate_expression(expr)
    assert value == expected_value, expr

    uses_all = sorted(int(x) for x in re.findall(r"[0-9]+", expr)) == sorted(numbers)
    expected_answer = float(value is not None and uses_all and value == target)
    response = [
        f"thinking</think>\n<answer>{expr}</answer>",
        f"</think><answer>{expr}</answer>",
        f"<answer>{expr}</answer></think>",
        f"x</think>\n<answer>{expr}</answer><|im_end|>",
    ][wrap]
    out = checked_reward(response, numbers, target, end_token="<|im_end|>")
    assert out["reward_info"]["answer_reward"] == expected_answer, (expr, numbers, target)


@FUZZ
@given(data=st.data(), numbers=st.lists(st.integers(0, 20), min_size=2, max_size=4).map(tuple),
       hit=st.booleans())
def test_correct_iff_tree_value_equals_target(data, numbers, hit):
    text, value = data.draw(expression_tree(numbers))
    # Aim at the tree's value half the time, so both outcomes are well covered.
    if hit and value is not None and value.denominator == 1:
        target = int(value)
    else:
        target = data.draw(st.integers(-50, 50))
    out = checked_reward(f"ok</think>\n<answer>{text}</answer>", numbers, target)
    assert out["reward_info"]["format_reward"] == 1.0
    assert out["reward_info"]["answer_reward"] == float(value is not None and value == target)


@FUZZ
@given(numbers=numbers_st, target=st.integers(1, 99))
def test_solver_answers_pass_the_reward(numbers, target):
    solution = ct.solve(numbers, target)
    if solution is not None:
        out = checked_reward(ct.format_trace(solution), numbers, target)
        assert out["reward"] == 1.1
