"""The words testbed (words_testbed.py): its vocabulary, its traces, their reward, the filler's independence
from the problem, the exact token parts, the model directory in both loaders, and its bad input."""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from fractions import Fraction

import pytest
import torch

import countdown_task as task
import train
from qwen2_model import Transformer
from tiny_model import SPECIAL_TOKENS
import words_testbed as wt
from tokenizer import Tokenizer

from conftest import make_random_model_dir


@pytest.fixture(scope="module")
def problems() -> list[task.CountdownProblem]:
    return task.generate_problems(2000, num_numbers=(3,), seed=3)


@pytest.fixture(scope="module")
def bpe(problems):
    return wt.train_bpe(wt.corpus(problems, seed=0), 600)


def solutions(problems, n: int, seed: int = 0) -> list[tuple[task.CountdownProblem, task.Solution]]:
    rng = random.Random(seed)
    return [(p, task.solve(p.numbers, p.target, rng)) for p in problems[:n]]


def fillers(trace: str) -> list[str]:
    """The pool phrases of a trace, in order (every sentence of <think> that is not a step sentence)."""
    think = trace[: trace.index("</think>")]
    sentences = [s.strip() for s in re.findall(r"[^.!?]+[.!?]", think)]
    return [s for s in sentences if not s.startswith("Take ") and ":" not in s]


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary_round_trips_every_warmup_trace(problems, bpe):
    assert bpe.get_vocab_size(with_added_tokens=True) == 600
    assert [bpe.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    texts = wt.corpus(problems, seed=0)  # the vocabulary's own corpus: the whole pool
    rng = random.Random(1)
    for variety in (0, 1, 5, len(wt.FILLER_POOL)):  # and the warm-up's traces at other varieties
        texts += [task.build_prompt(p, "compact") + wt.words_trace(s, variety, rng) for p, s in solutions(problems, 300)]
    for text in texts:
        encoding = bpe.encode(text, add_special_tokens=False)
        assert bpe.decode(encoding.ids, skip_special_tokens=False) == text
        for tag in ("<think>", "</think>", "<answer>", "</answer>"):  # each tag one special token
            assert encoding.tokens.count(tag) == text.count(tag)
    # numbers are digit tokens, a space before a digit its own token (Qwen's pre-tokenizer)
    assert all(not re.search(r"\d\d", token) for token in bpe.get_vocab())
    assert bpe.encode(" 12").tokens == ["Ġ", "1", "2"]
    assert len(bpe.encode(" Let me think.").ids) == 4  # pool words are whole tokens at this size


# ----------------------------------------------------------------------------- traces and reward


def test_traces_are_solver_correct_whatever_filler_they_carry(problems):
    for variety in (0, 1, 2, 17, len(wt.FILLER_POOL)):
        rng = random.Random(variety)
        for problem, solution in solutions(problems, 200, seed=variety):
            trace = wt.words_trace(solution, variety, rng)
            assert task.reward_function(trace, problem.numbers, problem.target)["reward"] == pytest.approx(1.1)
            # the sentences state the solver's steps: the pair taken, then the operator and a true equation
            pairs = re.findall(r"Take (\S+) and (\S+?)\.", trace)
            equations = re.findall(r"(Add|Subtract|Multiply|Divide): (\S+?)=(\S+?)\.(?= |<)", trace)
            assert [f"{lhs}={value}" for _, lhs, value in equations] == list(solution.steps)
            for (a, b), (word, lhs, value) in zip(pairs, equations, strict=True):
                symbol = {"Add": "+", "Subtract": "-", "Multiply": "*", "Divide": "/"}[word]
                assert lhs == f"{a}{symbol}{b}"
                x, y = Fraction(a.strip("()")), Fraction(b.strip("()"))
                assert {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[symbol] == Fraction(value)
            assert len(fillers(trace)) == (0 if variety == 0 else 1 + 2 * len(solution.steps))


def test_reward_of_a_words_completion_equals_the_character_testbeds():
    problem = task.CountdownProblem((55, 46, 13), 22)
    right = task.solve(problem.numbers, problem.target)
    cases = [right] + [task.Solution(e, right.steps) for e in ("55-46+12", "(55-46)+13+1", "55-(46+13)", "13+55-46",
                                                                "(55-46", "55 - 46 + 13", "", "x")]
    seen = set()
    for solution in cases:
        char = task.reward_function(task.format_trace(solution), problem.numbers, problem.target)
        for variety in (0, 3, len(wt.FILLER_POOL)):
            words = task.reward_function(wt.words_trace(solution, variety, random.Random(variety)), problem.numbers,
                                         problem.target)
            assert words == char
        seen.add(char["reward"])
    assert {round(r, 9) for r in seen} == {1.1, 0.1}  # both outcomes occur


def test_filler_choice_is_independent_of_the_problem(problems):
    (p1, s1), (p2, s2) = solutions(problems, 2)
    variety = 8
    by_seed = {seed: fillers(wt.words_trace(s1, variety, random.Random(seed))) for seed in range(20)}
    assert len({tuple(f) for f in by_seed.values()}) > 15  # same problem, different filler across seeds
    for seed, phrases in by_seed.items():  # another problem, same filler stream: the same phrases
        assert fillers(wt.words_trace(s2, variety, random.Random(seed))) == phrases
    # uniform over the first `variety` phrases of the pool, and never beyond
    rng = random.Random(0)
    counts = Counter(f for p, s in solutions(problems, 1000) for f in fillers(wt.words_trace(s, variety, rng)))
    assert set(counts) == set(wt.FILLER_POOL[:variety])
    n = sum(counts.values())
    chi2 = sum((c - n / variety) ** 2 / (n / variety) for c in counts.values())
    assert chi2 < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_pool_phrases_are_filler_by_qwens_rules():
    import analyze_credit as ac

    assert len(set(wt.FILLER_POOL)) == len(wt.FILLER_POOL)
    for phrase in wt.FILLER_POOL:
        assert not re.search(r"[0-9+\-*/=()<>]", phrase) and not phrase.startswith("Take ")
        assert re.fullmatch(r"[^.!?]+[.!?]", phrase)  # one sentence, so label_completion finds it whole
        assert all(ac.REASONING_PATTERN.fullmatch(w.strip(",.!?")) is None for w in phrase.split())


def test_label_completion_finds_exactly_the_pool_tokens(problems, bpe):
    added = set(bpe.get_added_tokens_decoder())
    for i, (problem, solution) in enumerate(solutions(problems, 200)):
        ids, expected = [], []
        for text, part in wt.trace_parts(solution, len(wt.FILLER_POOL), random.Random(i)):
            piece_ids = bpe.encode(text, add_special_tokens=False).ids
            ids += piece_ids
            expected += ["special" if t in added else part for t in piece_ids]
        pieces = [bpe.decode([t], skip_special_tokens=False) for t in ids]
        assert wt.label_completion(pieces, [t in added for t in ids]) == expected
    # a pool phrase written inside a step sentence, or after </think>, is not filler; a blend of phrases is
    pieces = ["Take", " 5", " and", " Hmm", ".", " Let", " me", " think", " so", " good", ".", "</think>", " Hmm", "."]
    assert wt.label_completion(pieces, [p == "</think>" for p in pieces]) == (
        ["reasoning"] * 5 + ["filler"] * 6 + ["special", "answer", "answer"])


# ----------------------------------------------------------------------------- the model directory


@pytest.fixture(scope="module")
def built(problems, tmp_path_factory):
    settings = wt.WordsSettings(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=64, warmup_steps=3, warmup_batch_size=4, bpe_vocab_size=600,
                                filler_variety=5)
    return wt.build_words_model(settings, tmp_path_factory.mktemp("words") / "model", problems)


def test_model_directory_loads_in_this_repo_and_in_transformers(built, problems):
    transformers = pytest.importorskip("transformers")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        f.name for f in built.iterdir()}
    ours_tok, hf_tok = Tokenizer(built), transformers.AutoTokenizer.from_pretrained(built)
    assert ours_tok.vocab_size == wt.check_vocab(built) == 600 and ours_tok.eos_token_id == 0
    text = task.build_prompt(problems[0], "compact") + wt.words_trace(task.solve(problems[0].numbers,
                                                                                problems[0].target), 5,
                                                                     random.Random(0)) + "<|endoftext|>"
    ids = ours_tok.encode(text)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.decode(ids) == ours_tok.decode(ids) == text
    ours = Transformer.from_pretrained(built, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32)
    with torch.no_grad():
        assert (ours(torch.tensor([ids])) - ref(torch.tensor([ids])).logits).abs().max() < 1e-4
    record = json.loads((built / "warmup.json").read_text())
    assert record["testbed"] == "words" and record["filler_variety"] == 5 and record["steps"] == 3
    assert wt.SPECIAL_TOKENS == SPECIAL_TOKENS  # tiny_model's, kept whole


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("variety", [-1, len(wt.FILLER_POOL) + 1, "high", 2.0, True, None])
def test_an_unknown_filler_setting_is_a_clear_error_before_anything_is_built(variety, problems, tmp_path):
    with pytest.raises(wt.WordsTestbedError, match=r"tiny\.filler_variety"):
        wt.build_words_model(wt.WordsSettings(filler_variety=variety), tmp_path / "m", problems)
    assert not any(tmp_path.iterdir())
    with pytest.raises(wt.WordsTestbedError, match=r"tiny\.filler_variety"):
        wt.words_trace(task.solve((1, 2, 3), 6), variety, random.Random(0))


def test_a_corpus_too_small_for_the_vocabulary_is_a_clear_error(problems, tmp_path):
    with pytest.raises(wt.WordsTestbedError, match="too few to train the vocabulary"):
        wt.train_bpe(wt.corpus(problems[:10], seed=0), 600)
    with pytest.raises(wt.WordsTestbedError, match=r"supports only \d+ BPE tokens, fewer than tiny.bpe_vocab_size=5000"):
        wt.train_bpe(wt.corpus(problems, seed=0), 5000)
    with pytest.raises(wt.WordsTestbedError, match=r"tiny.bpe_vocab_size=200: must exceed 263"):
        wt.train_bpe(wt.corpus(problems, seed=0), 200)
    with pytest.raises(wt.WordsTestbedError, match="too few"):  # through the build, before any model is written
        wt.build_words_model(wt.WordsSettings(num_train_problems=20), tmp_path / "m", problems)
    assert not (tmp_path / "m").exists()


def test_a_tokenizer_that_does_not_match_the_models_vocab_size_is_a_clear_error(built, tmp_path):
    mixed = make_random_model_dir(tmp_path / "mixed")  # the character tokenizer's 104 ids, a 104-row model
    assert wt.check_vocab(mixed) == 104
    (mixed / "tokenizer.json").write_bytes((built / "tokenizer.json").read_bytes())
    with pytest.raises(wt.WordsTestbedError, match=r"has 600 tokens but .*config.json says vocab_size=104"):
        wt.check_vocab(mixed)


# ----------------------------------------------------------------------------- through train.py


def run_words(root, *extra):
    """train.py on the countdown_words task with a 3-step warm-up and a 2-step GRPO run, small shapes."""
    return train.main(["--import", "words_testbed", "--config", "config_tiny.yaml", "data.task=countdown_words",
                       "tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_hidden_layers=2",
                       "tiny.warmup_steps=3", "tiny.warmup_batch_size=4", "tiny.bpe_vocab_size=600",
                       "tiny.num_train_problems=1500", "data.generate_if_missing=1600", "data.test_size=16",
                       "eval.num_problems=8", "eval.batch_size=8", "eval.transfer_num_numbers=[]",
                       "training.num_questions_per_batch=2", "training.num_answers_per_question=2",
                       "training.max_new_tokens=96", "training.max_steps=2", "training.eval_interval=2",
                       f"model.path={root}/model", f"data.path={root}/data", f"training.log_dir={root}/logs",
                       f"training.ckpt_dir={root}/ckpt", f"credit.dir={root}/credit", *extra])


@pytest.mark.slow
def test_the_countdown_words_task_builds_and_trains_through_train_py(tmp_path):
    assert run_words(tmp_path) == 0
    assert json.loads((tmp_path / "model" / "warmup.json").read_text())["testbed"] == "words"
    steps = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 2
    import parts  # the task's reference completion is a words trace that scores 1.1
    from tasks import build_task

    words_task = build_task(parts.load_config("config_tiny.yaml", ["data.task=countdown_words"]))
    problem = task.CountdownProblem((55, 46, 13), 22)
    reference = words_task.reference_completion(problem)
    assert "Take " in reference and words_task.reward(problem, reference)["reward"] == pytest.approx(1.1)


def test_bad_words_settings_stop_train_py_with_one_clear_line(tmp_path, capsys):
    assert run_words(tmp_path, "tiny.filler_variety=65") == 2
    assert "tiny.filler_variety must be an integer from 0 to 64" in capsys.readouterr().err
    assert run_words(tmp_path, "tiny.num_train_problems=20") == 1  # a corpus too small: before any model
    assert "too few to train the vocabulary on" in capsys.readouterr().err and not (tmp_path / "model").exists()
    mixed = make_random_model_dir(tmp_path / "mixed")  # a character model with this testbed's tokenizer
    wt.train_bpe(wt.corpus(task.generate_problems(2000, num_numbers=(3,), seed=3), seed=0), 600).save(
        str(mixed / "tokenizer.json"))
    assert run_words(tmp_path, f"model.path={mixed}", "model.build_tiny=false") == 1
    assert "has 600 tokens but" in capsys.readouterr().err and not (tmp_path / "logs").exists()
