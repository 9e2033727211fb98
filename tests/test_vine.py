"""VinePPO's advantages (`algorithm.adv_estimator: vine`): the per-token formula against hand values; on the
bandit r - V(prompt); and the trainer end to end on a small random model: it trains on exactly the Monte-Carlo
advantages of an independent estimate, keeps groups whose rewards are equal, runs with every policy loss and
weighter, resumes to the uninterrupted run's weights, gives one process's result on two torchrun ranks, and
refuses what it cannot honour before anything loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import bandit_task
import credit_values as cv
import grpo
import tasks
import trainer
import update
import vine
from config import ConfigError
from conftest import run_config
from countdown_task import CountdownTask
from parts import config_from_dict, load_config
from qwen2_model import Transformer
from rollout import stream_key
from tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DENSE = "vine_dense_for_tests"


class DenseTask(CountdownTask):
    """Countdown's problems with a reward that a random model varies (the share of digits in the completion)
    and steps of four characters: values and steps that are not trivial."""

    def reward(self, problem, completion: str) -> dict:
        share = sum(c.isdigit() for c in completion) / 12
        return {"reward": share, "reward_info": {"format_reward": 0.0, "answer_reward": float(share > 0.5)}}

    def step_ends(self, text: str) -> list[int]:
        return list(range(4, len(text), 4))


def register_dense_task(mp: pytest.MonkeyPatch) -> None:
    mp.setitem(tasks.TASKS._parts, DENSE, DenseTask)
    mp.setitem(tasks.TASKS._params, DENSE, {})


@pytest.fixture(scope="module", autouse=True)
def dense_task():
    """data.task=vine_dense_for_tests during this module's tests only (other modules list the tasks)."""
    with pytest.MonkeyPatch.context() as mp:
        register_dense_task(mp)
        yield


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def vine_config(assets: dict, out: Path, unit: str = "step", k: int = 3, **sections) -> dict:
    cfg = run_config(assets, out, data={"task": DENSE}, training={"max_steps": 1},
                     algorithm={"adv_estimator": "vine", "vine_k": k, "vine_unit": unit})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def capture_updates(monkeypatch) -> list[tuple[list, list]]:
    """Every update_policy call's (episodes, advantages), the call itself unchanged."""
    calls, real = [], update.update_policy

    def spy(model, optimizer, episodes, advantages, *args, **kwargs):
        calls.append((list(episodes), advantages))
        return real(model, optimizer, episodes, advantages, *args, **kwargs)

    monkeypatch.setattr(update, "update_policy", spy)
    return calls


# ============================================================================ the formula


def test_every_token_of_a_step_gets_its_steps_advantage():
    adv = cv.vine_advantages([0.2, 0.5, 0.1, 1.0], [0, 2, 5, 7], 7)
    np.testing.assert_allclose(adv, [0.3, 0.3, -0.4, -0.4, -0.4, 0.9, 0.9])
    values = np.random.default_rng(0).random(6)  # every token a step: V(t + 1) - V(t), telescoping to r - V(0)
    per_token = cv.vine_advantages(values, range(6), 5)
    np.testing.assert_allclose(per_token, np.diff(values))
    assert per_token.sum() == pytest.approx(values[-1] - values[0])
    assert cv.vine_advantages([0.7], [0], 0).shape == (0,)
    for positions in ([1, 2, 7], [0, 2, 6], [0, 2, 2, 7], [0, 5, 2, 7], []):
        with pytest.raises(ValueError, match="positions must increase strictly from 0 to the completion's length 7"):
            cv.vine_advantages(np.zeros(len(positions)), positions, 7)
    with pytest.raises(ValueError, match=r"values \(3\) and positions \(4\) must align"):
        cv.vine_advantages([0.0, 0.1, 0.2], [0, 2, 5, 7], 7)


def test_whitening_centres_and_scales_every_token_of_the_batch():
    rows = [np.array([0.1, 0.1, -0.3]), np.array([0.5]), np.array([]), np.array([0.0, 0.2])]
    out = cv.whiten(rows)
    flat = np.concatenate(out)
    assert [len(r) for r in out] == [3, 1, 0, 2]
    assert flat.mean() == pytest.approx(0.0, abs=1e-12) and flat.std(ddof=1) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_array_equal(np.argsort(flat, kind="stable"), np.argsort(np.concatenate(rows), kind="stable"))
    assert [r.tolist() for r in cv.whiten([np.array([0.4])])] == [[0.0]]  # one token: centred only


def test_the_registered_estimator_names_its_keys_and_is_not_a_function_of_rewards():
    assert {"vine_k", "vine_unit", "vine_temperature", "vine_whiten"} <= set(grpo.ADVANTAGES.params("vine"))
    assert load_config(None, ["algorithm.adv_estimator=vine"]).algorithm.vine_whiten is True  # VinePPO's
    with pytest.raises(ValueError, match="needs the Monte-Carlo values of each episode's states"):
        grpo.compute_advantages(torch.zeros(2, 4), "vine")
    for override, message in ((["algorithm.vine_k=1"], "algorithm.vine_k must be >= 2"),
                              (["algorithm.vine_unit=line"], "'line' is not one of 'step', 'token'"),
                              (["algorithm.vine_temperature=0"], "algorithm.vine_temperature must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["algorithm.adv_estimator=vine", *override])


def test_on_the_bandit_the_vine_advantage_is_the_reward_minus_the_prompts_value(tmp_path):
    arms = 5
    path = bandit_task.build_bandit_model(tmp_path / "bandit", num_arms=arms, num_contexts=1, seed=4)
    model, tok = Transformer.from_pretrained(path, dtype=torch.float32).eval(), Tokenizer(path)
    problem = bandit_task.make_problems(arms, 1, 1, seed=0)[0]
    prompt = tok.encode(bandit_task.build_prompt(problem))
    with torch.no_grad():  # temperature 0.5 sharpens the near-uniform random policy
        probs = torch.softmax(model(torch.tensor([prompt]))[0, -1].double() / 0.5, -1)
    exact = float(probs[tok.encode(bandit_task.ARM_SYMBOLS[problem.paying_arm])[0]])

    def arm_reward(ids: list[int]) -> float:
        return bandit_task.reward_function(problem, tok.decode(ids), arms)["reward"]

    k = 400
    for arm in range(arms):
        completion = tok.encode(bandit_task.ARM_SYMBOLS[arm])
        r = arm_reward(completion)
        for unit in ("step", "token"):  # the bandit has no steps: one step, one token, the same state
            positions = cv.unit_positions(unit, tok.decode, completion, [])
            (adv,), (est,), _ = cv.vine_episode_advantages(
                model, [cv.ValueQuery(prompt, completion, arm_reward, positions)], [r], k=k, max_new_tokens=1,
                eos_token_id=tok.end_token_ids, temperature=0.5, seed=9)
            assert positions == [0, 1] and list(est.positions) == [0]  # the final state is the reward, unsampled
            assert adv.tolist() == [r - est.values[0]] and (adv[0] > 0) == (arm == problem.paying_arm)
            assert abs(est.values[0] - exact) < 4 * math.sqrt(exact * (1 - exact) / k)


# ============================================================================ the trainer


def overlong(length: int, config) -> float:
    """DAPO's overlong penalty written out: 0 up to max_new_tokens - buffer tokens, then down to -penalty."""
    a, t = config.algorithm, config.training
    if a.overlong_buffer_len == 0:
        return 0.0
    return min(0.0, -(length - (t.max_new_tokens - a.overlong_buffer_len)) / a.overlong_buffer_len * a.overlong_penalty)


def expected_advantages(assets: dict, episodes: list, config, step: int) -> tuple[list[np.ndarray], cv.ValueCost]:
    """The per-token advantages of `episodes` recomputed apart from the trainer: the initial model's values at
    the task's step boundaries (or every token), the reward at the end, the step's key."""
    model, tok = Transformer.from_pretrained(assets["model"], dtype=torch.float32).eval(), Tokenizer(assets["model"])
    task, t, a = DenseTask(config), config.training, config.algorithm
    end = set(tok.end_token_ids)
    queries, positions = [], []
    for e in episodes:
        ids = e.generated_token_ids
        pos = (list(range(len(ids) + 1)) if a.vine_unit == "token"
               else cv.step_positions(tok.decode, ids, task.step_ends(e.text)))
        positions.append(pos)
        queries.append(cv.ValueQuery(e.prompt_token_ids, ids, lambda c, p=e.problem: task.reward(
            p, tok.decode(c[:-1] if c and c[-1] in end else c))["reward"] + overlong(len(c), config), pos[:-1]))
    estimates, cost = cv.estimate_values(model, queries, k=a.vine_k, max_new_tokens=t.max_new_tokens,
                                         eos_token_id=tok.end_token_ids, temperature=t.temperature,
                                         seed=stream_key(t.seed, step, vine.VINE_SALT))
    out = []
    for e, pos, est in zip(episodes, positions, estimates):
        values = list(est.values) + [e.reward]
        out.append(np.concatenate([np.full(pos[s + 1] - pos[s], values[s + 1] - values[s])
                                   for s in range(len(pos) - 1)]))
    return out, cost


@pytest.mark.parametrize("unit, buffer, whiten", [("step", 0, False), ("token", 0, False), ("step", 6, False),
                                                   ("step", 0, True)])
def test_the_trainer_trains_on_the_monte_carlo_advantages_of_its_episodes(tiny_assets, tmp_path, monkeypatch, unit,
                                                                          buffer, whiten):
    """Also with DAPO's overlong shaping (buffer > 0: a continuation's reward is shaped like an episode's) and
    whitened (VinePPO's (A - mean) / sqrt(var + 1e-8) over the step's tokens, the variance unbiased)."""
    calls = capture_updates(monkeypatch)
    cfg = config_from_dict(vine_config(tiny_assets, tmp_path, unit=unit, algorithm={
        "overlong_buffer_len": buffer, "vine_whiten": whiten}))
    trainer.train(cfg)
    (episodes, advantages), = calls
    assert len(advantages) == len(episodes) == 12 and all(isinstance(a, torch.Tensor) for a in advantages)
    want, cost = expected_advantages(tiny_assets, episodes, cfg, step=1)
    if whiten:
        flat = np.concatenate(want)
        want = [(w - flat.mean()) / np.sqrt(flat.var(ddof=1) + 1e-8) for w in want]
    for got, w in zip(advantages, want):
        np.testing.assert_allclose(got.numpy(), w, atol=1e-6)
    assert any(len(set(np.round(w, 6))) > 1 for w in want)  # an episode whose steps differ
    row = metrics(tmp_path)[1]
    assert (row["vine/states"], row["vine/continuations"], row["vine/kept_tokens"]) == (
        cost.states, cost.continuations, cost.kept_tokens)  # sampled tokens depend on the engine calls' layout
    assert row["vine/tokens"] >= row["vine/kept_tokens"]
    assert row["duration/vine"] > 0 and row["vine/value_stderr"] > 0
    # the credit log's advantage is each episode's mean token advantage
    credit = pd.concat([pd.read_pickle(f) for f in sorted((tmp_path / "credit").glob("credit_logs_step_*.pkl"))])
    logged = credit.groupby("episode_idx")["advantage"].first().to_numpy()
    np.testing.assert_allclose(logged, [w.mean() for w in want], atol=1e-6)


def test_groups_whose_answers_scored_the_same_are_trained_on(tmp_path, monkeypatch):
    """A random 16-armed bandit policy rarely pulls the paying arm: most groups score 0 throughout. GRPO's
    zero_variance_groups=drop drops them; under vine each such answer has advantage -V(prompt) != 0, so only
    groups whose token advantages are all 0 are dropped, and here none is."""
    model = bandit_task.build_bandit_model(tmp_path / "bandit", num_arms=16, num_contexts=1)
    base = {"model": {"path": str(model), "device": "cpu", "dtype": "float32"},
            "data": {"task": "bandit", "num_arms": 16, "test_size": 8},
            "training": {"max_steps": 1, "num_questions_per_batch": 6, "num_answers_per_question": 4,
                         "max_new_tokens": 1, "learning_rate": 1e-2, "eval_interval": 1},
            "eval": {"num_problems": 4, "batch_size": 4}}
    kept = {}
    for estimator in ("grpo", "vine"):
        out = tmp_path / estimator
        cfg = {**base, "training": {**base["training"], "log_dir": str(out / "logs"), "ckpt_dir": str(out / "ckpt")},
               "algorithm": {"adv_estimator": estimator, "zero_variance_groups": "drop", "vine_k": 64,
                             "vine_whiten": False}}
        calls = capture_updates(monkeypatch)
        trainer.train(config_from_dict(cfg))
        row = metrics(out)[1]
        kept[estimator] = (row["groups_kept"], row["groups/zero_variance_frac"])
        if estimator == "vine":
            (episodes, advantages), = calls
            flat = [(e.reward, float(a[0])) for e, a in zip(episodes, advantages)]
            assert all(a != 0 for _, a in flat) and any(r == 0 and a < 0 for r, a in flat)
    assert kept["grpo"][1] > 0 and kept["grpo"][0] == pytest.approx(1 - kept["grpo"][1])
    assert kept["vine"] == (1.0, kept["grpo"][1])  # the same episodes (the same rollout), every group kept


def test_group_filters_read_the_spread_of_token_advantages():
    adv = [np.array([0.0, 0.0]), np.array([0.0]), np.array([0.5, -0.5]), np.array([0.1]),
           np.array([0.0]), np.array([-0.2, 0.0, 0.0])]
    spread = vine.token_advantage_spread(adv, 2)
    np.testing.assert_allclose(spread, [0.0, math.sqrt(0.51 / 3), math.sqrt(0.04 / 4)])
    assert vine.select_by_spread(spread, None, drop_zero=True).tolist() == [1, 2]
    assert vine.select_by_spread(spread, None, drop_zero=False).tolist() == [0, 1, 2]
    assert vine.select_by_spread(spread, 1, drop_zero=False).tolist() == [1]
    assert vine.select_by_spread(spread, 0.5, drop_zero=False).tolist() == [1, 2]  # ceil(0.5 x 3) = 2
    assert vine.select_by_spread(torch.zeros(3, dtype=torch.float64), 2, drop_zero=False).tolist() == [0, 1]


@pytest.mark.parametrize("loss, weighter", [("pg", "outcome_conditional"), ("ppo", "entropy_masking"),
                                            ("dual_clip", "inverse_logprob"), ("gspo", "entropy_weighted"),
                                            ("cispo", "attention_credit"), ("pg", "attribution")])
def test_every_policy_loss_and_weighter_trains_with_vine(tiny_assets, tmp_path, loss, weighter):
    cfg = vine_config(tiny_assets, tmp_path, k=2, algorithm={"policy_loss": loss, "num_iterations": 2},
                      mitigation={"name": weighter})
    result = trainer.train(config_from_dict(cfg))
    row = metrics(tmp_path)[1]
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    start = Transformer.from_pretrained(tiny_assets["model"], dtype=torch.float32).state_dict()
    end = Transformer.from_pretrained(result.checkpoint, dtype=torch.float32).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in end.items())


def test_vine_trains_beside_the_other_options(tiny_assets, tmp_path, monkeypatch):
    """Ground-truth injection (a reference longer than max_new_tokens raises the values' budget), teacher
    forcing, the KL term, top-k group filtering and skipping unfinished episodes, all at once."""
    calls = capture_updates(monkeypatch)
    cfg = vine_config(tiny_assets, tmp_path, k=2, training={"skip_unfinished_episodes": True}, algorithm={
        "ground_truth_injection": True, "teacher_forcing_coef": 0.1, "beta": 0.05, "rollout_filter": "top_k",
        "rollout_filter_value": 2})
    trainer.train(config_from_dict(cfg))
    row = metrics(tmp_path)[1]
    (episodes, advantages), = calls
    assert math.isfinite(row["loss"]) and row["injection/groups"] == 3 and row["groups_kept"] == len(episodes) / 12
    assert all(e.finished for e in episodes) and len({e.group_idx for e in episodes}) <= 2  # top 2 groups
    assert [len(a) for a in advantages] == [len(e.generated_token_ids) for e in episodes]
    assert max(len(e.generated_token_ids) for e in episodes) > cfg["training"]["max_new_tokens"]  # a reference


def test_a_resumed_vine_run_equals_the_uninterrupted_one(tiny_assets, tmp_path):
    whole = tmp_path / "whole"
    trainer.train(config_from_dict(vine_config(tiny_assets, whole, training={"max_steps": 4})))
    halves = tmp_path / "halves"
    trainer.train(config_from_dict(vine_config(tiny_assets, halves, training={"max_steps": 2})))
    trainer.train(config_from_dict(vine_config(tiny_assets, halves, training={"max_steps": 4})), resume=True)
    a = Transformer.from_pretrained(whole / "ckpt" / "step_000004", dtype=torch.float32).state_dict()
    b = Transformer.from_pretrained(halves / "ckpt" / "step_000004", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for ra, rb in zip(metrics(whole), metrics(halves)):
        assert {k: v for k, v in ra.items() if not k.startswith(("duration", "tokens_per_s"))} == \
               {k: v for k, v in rb.items() if not k.startswith(("duration", "tokens_per_s"))}


@pytest.mark.parametrize("override, message", [
    ({"algorithm": {"dynamic_sampling": True}}, "algorithm.dynamic_sampling drops groups whose rewards are all equal"),
    ({"algorithm": {"soft_reweight": True}}, "algorithm.soft_reweight scales a group by its reward std"),
    ({"training": {"temperature": 0.0}}, "algorithm.vine_temperature must be > 0 when training.temperature is 0"),
])
def test_what_vine_cannot_honour_is_a_config_error_before_anything_loads(tiny_assets, tmp_path, override, message):
    cfg = config_from_dict(vine_config(tiny_assets, tmp_path, **override))
    with pytest.raises(ConfigError, match=message):
        trainer.train(cfg)
    assert not tmp_path.joinpath("logs").exists() and not tmp_path.joinpath("ckpt").exists()
    if "temperature" in override.get("training", {}):  # a greedy run with sampled continuations is fine
        cfg = vine_config(tiny_assets, tmp_path, **override)
        cfg["algorithm"]["vine_temperature"] = 1.0
        assert trainer.train(config_from_dict(cfg)).step == 1


# ============================================================================ torchrun


@pytest.mark.slow
def test_two_torchrun_ranks_value_and_train_like_one_process(tiny_assets, tmp_path):
    """The states are sharded over two gloo ranks (DDP) and gathered: the same values, advantages and weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    trainer.train(config_from_dict(vine_config(tiny_assets, one, training={"max_steps": 2})))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(vine_config(tiny_assets, two, training={"max_steps": 2})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for ra, rb in zip(metrics(one), metrics(two), strict=True):
        for key in ("vine/states", "vine/kept_tokens", "vine/value_stderr", "advantage/mean", "reward/mean"):
            assert ra.get(key) == pytest.approx(rb.get(key), abs=1e-6), (ra["step"], key)
    a = Transformer.from_pretrained(one / "ckpt" / "step_000002", dtype=torch.float32).state_dict()
    b = Transformer.from_pretrained(two / "ckpt" / "step_000002", dtype=torch.float32).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def _torchrun_worker(config_path: str) -> None:
    """Run under torchrun by the test above: the dense task registered, then the config trained."""
    with pytest.MonkeyPatch.context() as mp:
        register_dense_task(mp)
        trainer.train(config_from_dict(yaml.safe_load(Path(config_path).read_text())))


if __name__ == "__main__":
    _torchrun_worker(sys.argv[1])
