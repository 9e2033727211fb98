"""The task interface: each task's dataset, reward on known and hostile answers, reference solutions,
ground-truth injection, and end-to-end runs through the trainer."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import bandit_task
import countdown_task
import gsm8k_task
import trainer
from config import ConfigError
from conftest import run_config
from countdown_task import DatasetError
from data_types import Episode
from parts import config_from_dict, load_config
from tasks import TASKS, build_task
from tokenizer import Tokenizer

GSM8K_ROWS = [
    {"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in all?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether she sold 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "A shirt costs $1,080 after tax. What is the price?", "answer": "It is 1,080.\n#### 1,080"},
    {"question": "Half of 5?", "answer": "5/2 = 2.5\n#### 2.5"},
    {"question": "How much is owed?", "answer": "Nothing is left, she owes 3.\n#### -3"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_registry_and_unknown_task_error():
    assert set(TASKS) == {"countdown", "bandit", "gsm8k", "countdown_words"}
    with pytest.raises(ConfigError, match="data.task 'sokoban' is unknown; valid: bandit, countdown, countdown_words, gsm8k"):
        load_config(None, ["data.task=sokoban"])


# ------------------------------------------------------------------ bandit


def test_bandit_problems_have_one_paying_arm_per_context():
    problems = bandit_task.make_problems(16, 3, 300, seed=4)
    arms = {}
    for p in problems:
        assert arms.setdefault(p.context, p.paying_arm) == p.paying_arm
    assert set(arms) == {0, 1, 2}
    assert [p.context for p in problems].count(0) == 100
    with pytest.raises(ValueError, match="num_arms"):
        bandit_task.make_problems(1, 1, 10, 0)


@pytest.mark.parametrize("response, reward, fmt", [
    ("c", 1.0, 1.0), ("cab", 1.0, 1.0), ("d", 0.0, 1.0), ("", 0.0, 0.0), ("z", 0.0, 0.0),  # z: not one of 16 arms
    ("C", 0.0, 0.0), ("<answer>c</answer>", 0.0, 0.0), ("\x00" * 10_000, 0.0, 0.0)])
def test_bandit_reward_pays_only_the_paying_arm(response, reward, fmt):
    problem = bandit_task.BanditProblem(context=0, paying_arm=2)  # arm 2 is "c"
    got = bandit_task.reward_function(problem, response, num_arms=16)
    assert got["reward"] == reward and got["reward_info"] == {"format_reward": fmt, "answer_reward": reward}
    assert bandit_task.reward_function(problem, bandit_task.reference_completion(problem), 16)["reward"] == 1.0


def test_bandit_baseline_reaches_80_percent_within_30_steps(tmp_path):
    """The smoke test of every ablation: plain GRPO from a random policy (chance 1/16) on CPU in seconds."""
    cfg = load_config("config_bandit.yaml", [f"model.path={tmp_path / 'model'}", f"training.log_dir={tmp_path / 'logs'}",
                                             f"training.ckpt_dir={tmp_path / 'ckpt'}", f"credit.dir={tmp_path / 'credit'}"])
    result = trainer.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["success_rate/eval"] for r in rows if "success_rate/eval" in r}
    assert result.step == 30 and cfg.training.max_steps == 30
    assert evals[0] < 0.2
    assert max(evals.values()) >= 0.8 and evals[30] >= 0.8, evals


# ------------------------------------------------------------------ gsm8k


def test_gsm8k_reads_jsonl_and_parquet_layouts(tmp_path):
    write_jsonl(tmp_path / "jsonl" / "train.jsonl", GSM8K_ROWS[:3])
    write_jsonl(tmp_path / "jsonl" / "test.jsonl", GSM8K_ROWS[3:])
    train, test = gsm8k_task.load_gsm8k(tmp_path / "jsonl")
    assert [p.answer for p in train] == ["72", "1,080", "2.5"] and [p.answer for p in test] == ["-3"]
    assert train[0].solution.startswith("Natalia sold 48/2")

    main = tmp_path / "repo" / "main"
    main.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[:3]), main / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS[3:]), main / "test-00000-of-00001.parquet")
    train_p, test_p = gsm8k_task.load_gsm8k(tmp_path / "repo")
    assert train_p == train and test_p == test
    # a single file is a training set; the task then holds out the last test_size rows
    cfg = config_from_dict({"data": {"task": "gsm8k", "path": str(tmp_path / "jsonl" / "train.jsonl"), "test_size": 1}})
    tr, te = build_task(cfg).load()
    assert len(tr) == 2 and te[0].answer == "2.5"


@pytest.mark.parametrize("content, message", [
    ('{"question": "q"}\n', "needs string columns 'question' and 'answer'"),
    ('{"question": "q", "answer": "no final answer"}\n', "no '####'"),
    ('{"question": "q", "answer": "x\\n#### seventy"}\n', "'seventy' is not a number"),
    ('{"question": "q", "answer": "x\\n#### 7"}\n{oops\n', ":2: not valid JSON"),
])
def test_gsm8k_malformed_data_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    with pytest.raises(DatasetError, match=message):
        gsm8k_task.load_gsm8k(tmp_path / "train.jsonl")


def test_gsm8k_missing_path_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetError, match="hf download openai/gsm8k --repo-type dataset"):
        gsm8k_task.load_gsm8k(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .jsonl or .parquet files"):
        gsm8k_task.load_gsm8k(tmp_path / "empty")


def write_configurations(root: Path, names=("main", "socratic")) -> Path:
    """The openai/gsm8k repository's layout: one directory of parquet files per configuration, the socratic rows'
    questions marked so the two can be told apart."""
    for name in names:
        (root / name).mkdir(parents=True)
        rows = [{**r, "question": f"{name}: {r['question']}"} for r in GSM8K_ROWS]
        pq.write_table(pa.Table.from_pylist(rows[:3]), root / name / "train-00000-of-00001.parquet")
        pq.write_table(pa.Table.from_pylist(rows[3:]), root / name / "test-00000-of-00001.parquet")
    (root / "README.md").write_text("# gsm8k")
    return root


def test_gsm8k_root_reads_one_configuration_never_both(tmp_path):
    root = write_configurations(tmp_path / "gsm8k")
    for name in ("main", "socratic"):
        train, test = gsm8k_task.load_gsm8k(root, name)
        assert len(train) == 3 and len(test) == 1  # not 6 and 2: the two configurations are not merged
        assert all(p.question.startswith(f"{name}: ") for p in train + test)
    cfg = load_config(None, ["data.task=gsm8k", f"data.path={root}", "data.gsm8k_config=socratic"])
    train, _ = build_task(cfg).load()
    assert {p.question.split(":")[0] for p in train} == {"socratic"}
    assert load_config(None, ["data.task=gsm8k"]).data.gsm8k_config == "main"  # the default
    with pytest.raises(ConfigError, match="data.gsm8k_config must be main or socratic"):
        load_config(None, ["data.task=gsm8k", "data.gsm8k_config=Main"])


@pytest.mark.parametrize("layout, config, message", [
    (("main",), "socratic", "holds only the main/ configuration, not data.gsm8k_config='socratic'"),
    (("main", "extra"), "socratic", r"several places \(extra, main\)"),
    (("first", "second"), "main", r"several places \(first, second\)"),
])
def test_gsm8k_ambiguous_or_missing_configuration_is_an_error(tmp_path, layout, config, message):
    root = write_configurations(tmp_path / "gsm8k", layout)
    with pytest.raises(DatasetError, match=message):
        gsm8k_task.load_gsm8k(root, config)


def test_gsm8k_files_beside_a_configuration_directory_are_ambiguous_and_a_named_directory_must_match(tmp_path):
    root = write_configurations(tmp_path / "gsm8k")
    write_jsonl(root / "train.jsonl", GSM8K_ROWS)
    with pytest.raises(DatasetError, match=r"several places \(\., main, socratic\)"):
        gsm8k_task.load_gsm8k(root, "main")
    assert len(gsm8k_task.load_gsm8k(root / "socratic", "socratic")[0]) == 3
    with pytest.raises(DatasetError, match="is the socratic/ configuration but data.gsm8k_config is 'main'"):
        gsm8k_task.load_gsm8k(root / "socratic", "main")


@pytest.mark.parametrize("text, expected", [
    ("72", Fraction(72)), (" 1,080 ", Fraction(1080)), ("$18.00", Fraction(18)), ("2.5", Fraction(5, 2)),
    ("-3", Fraction(-3)), ("3/4", Fraction(3, 4)), ("15%", Fraction(15)), ("72.", Fraction(72)),
    ("seventy", None), ("1e5", None), ("0x10", None), ("", None), ("1/0", None), ("9" * 100, None),
    ("__import__('os')", None), ("7 8", None)])
def test_gsm8k_number_parsing(text, expected):
    assert gsm8k_task.parse_number(text) == expected


@pytest.mark.parametrize("response, answer, correct, fmt", [
    ("48/2=24, 48+24=72</think>\n<answer>72</answer>", "72", 1.0, 1.0),
    ("...</think>\n<answer> 1080 </answer>", "1,080", 1.0, 1.0),
    ("...</think>\n<answer>$2.50</answer>", "2.5", 1.0, 1.0),
    ("...</think>\n<answer>71</answer>", "72", 0.0, 1.0),
    ("no tags, just 72", "72", 0.0, 0.0),
    ("<answer>72</answer><answer>73</answer>", "72", 1.0, 0.5),  # the first answer tag counts
    ("</think>\n<answer>" + "9" * 10_000 + "</answer>", "72", 0.0, 1.0),
    ("</think>\n<answer>eval('72')</answer>", "72", 0.0, 1.0),
])
def test_gsm8k_reward_on_known_and_hostile_answers(response, answer, correct, fmt):
    got = gsm8k_task.reward_function(response, gsm8k_task.GSM8KProblem("q", answer))
    assert got["reward_info"] == {"format_reward": fmt, "answer_reward": correct}
    assert got["reward"] == pytest.approx(0.1 * fmt + correct)


def test_gsm8k_reference_completion_scores_full_reward():
    for row in GSM8K_ROWS:
        solution, final = gsm8k_task.split_answer(row["answer"])
        problem = gsm8k_task.GSM8KProblem(row["question"], final, solution)
        ref = gsm8k_task.reference_completion(problem)
        assert "<<" not in ref
        assert gsm8k_task.reward_function(ref, problem)["reward"] == pytest.approx(1.1)


def test_countdown_task_adapter_is_the_module(tiny_assets):
    cfg = config_from_dict({"data": {"path": str(tiny_assets["data"]), "test_size": 16, "prompt_style": "compact"}})
    task = build_task(cfg)
    train, test = task.load()
    p = train[0]
    assert task.prompt(p) == countdown_task.build_prompt(p, "compact")
    ref = task.reference_completion(p)
    assert task.reward(p, ref) == countdown_task.reward_function(ref, p.numbers, p.target)
    assert task.reward(p, ref)["reward_info"]["answer_reward"] == 1.0
    assert task.eval_group(p) == f"{len(p.numbers)}num"


# ------------------------------------------------------------------ ground-truth injection


def test_injection_puts_exactly_one_correct_completion_in_each_group(tiny_assets, tmp_path):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, algorithm={"ground_truth_injection": True}))
    task = build_task(cfg)
    problems = task.load()[0][:3]
    tokenizer = Tokenizer(tiny_assets["model"])
    g = 4
    wrong = {"reward": 0.0, "reward_info": {"format_reward": 0.0, "answer_reward": 0.0}}
    episodes = [Episode(prompt=task.prompt(p), prompt_token_ids=tokenizer.encode(task.prompt(p)), generated_token_ids=[5],
                        text="x", reward=0.0, reward_info=dict(wrong["reward_info"]), finished=False, group_idx=q,
                        problem=p) for q, p in enumerate(problems) for _ in range(g)]
    # group 1 already has a correct answer: the injected one is then not the only correct one
    episodes[g].reward_info["answer_reward"] = 1.0
    metrics = trainer.inject_references(task, tokenizer, episodes, g, {})
    for q in range(3):
        group = episodes[q * g:(q + 1) * g]
        injected = group[-1]
        assert injected.reward_info["answer_reward"] == 1.0 and injected.reward == pytest.approx(1.1)
        assert injected.problem == problems[q] and injected.generated_token_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(injected.generated_token_ids[:-1]) == task.reference_completion(problems[q])
        assert injected.log_probs == []  # no rollout log-probs: the update recomputes them
        assert sum(e.reward_info["answer_reward"] == 1.0 for e in group) == (2 if q == 1 else 1)
    assert metrics == {"injection/groups": 3.0, "injection/only_correct_frac": pytest.approx(2 / 3)}


@pytest.mark.parametrize("adv", ["grpo", "dr_grpo", "softmax", "rloo"])
def test_injection_trains_end_to_end_with_every_estimator(tiny_assets, tmp_path, adv):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 1},
                                      algorithm={"ground_truth_injection": True, "adv_estimator": adv,
                                                 "teacher_forcing_coef": 0.5}))
    trainer.train(cfg)
    row = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["injection/groups"] == 3 and row["injection/only_correct_frac"] == 1.0  # a random model solves none
    assert row["success_rate/train"] == pytest.approx(1 / 4)
    assert row["teacher_nll"] > 0


def test_gsm8k_trains_end_to_end(tiny_assets, tmp_path):
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM8K_ROWS * 3)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM8K_ROWS)
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 2},
                                      data={"task": "gsm8k", "path": str(tmp_path / "gsm8k")},
                                      eval={"num_problems": 4, "batch_size": 4},
                                      algorithm={"ground_truth_injection": True}))
    result = trainer.train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert result.step == 2 and "success_rate/eval" in rows[-1]
    assert rows[-1]["injection/groups"] == 3
