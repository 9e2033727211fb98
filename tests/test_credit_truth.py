"""credit_truth: the agreement metrics against textbook definitions and hand counts, the issue's test (a signal
equal to |MC advantage| scores a top-quartile share of 1 and rank correlation 1), and the command end to end on
a small random model with a reward that varies."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from scipy.stats import spearmanr

import credit_truth as ct
import tasks
from countdown_task import CountdownTask
from conftest import run_config


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ============================================================================ metrics


def test_rank_correlation_is_spearmans_rho_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.integers(0, 5, 12).astype(float), rng.normal(size=12)
        if np.ptp(x) > 0:
            assert ct.rank_correlation(x, y) == pytest.approx(spearmanr(x, y).statistic)
    assert math.isnan(ct.rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # a constant side
    assert math.isnan(ct.rank_correlation([1.0, 2.0], [1.0, 2.0]))  # too few


def test_top_quartile_takes_the_largest_quarter_with_ties_and_never_a_zero():
    assert ct.top_quartile(np.array([5, 1, 4, 2, 3, 0, 0, 6])).tolist() == [1, 0, 0, 0, 0, 0, 0, 1]
    assert ct.top_quartile(np.array([2, 2, 2, 1, 0])).tolist() == [1, 1, 1, 0, 0]  # ceil(5/4) = 2, ties join
    assert ct.top_quartile(np.array([0.0, 0, 0, 0, 0, 3])).tolist() == [0, 0, 0, 0, 0, 1]
    assert not ct.top_quartile(np.zeros(4)).any()


def test_a_signal_equal_to_the_truths_magnitude_scores_one():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=40)
    se = np.full(40, 0.3)
    signal = np.abs(truth)
    assert ct.rank_correlation(np.abs(signal), np.abs(truth)) == pytest.approx(1.0)
    assert ct.top_quartile_overlap(signal, truth) == 1.0
    top = ct.top_quartile(np.abs(truth))
    # its mass share is the truth's own concentration; a signal living on the top quartile alone scores 1
    assert ct.top_quartile_mass(signal, truth) == pytest.approx(np.abs(truth)[top].sum() / np.abs(truth).sum())
    assert ct.top_quartile_mass(np.where(top, 1.0, 0.0), truth) == 1.0
    # signs: the truth agrees with itself, its negation never; only tokens beyond 2 standard errors count
    beyond = int((np.abs(truth) > 0.6).sum())
    assert ct.sign_counts(truth, truth, se) == (beyond, beyond)
    assert ct.sign_counts(-truth, truth, se) == (0, beyond)
    # through the aggregation over episodes (the command's path): rho 1 and top-quartile overlap 1
    df = pd.DataFrame({"episode_idx": np.repeat([0, 1], 20), ct.TRUTH: truth, "mc_stderr": se,
                       "position_bin": np.tile(np.arange(20) // 4, 2), "signal": signal})
    parts = ct.agreement_parts(df, ["signal"])
    idx = ct.bootstrap_indices(2, 100)
    for metric in ("rank_correlation", "top_quartile_overlap"):
        assert ct.ratio_interval(*parts[("signal", "all", "all", metric)], idx) == pytest.approx((1.0, 1.0, 1.0))


def test_uniform_credit_scores_chance_and_has_no_rank():
    truth = np.array([0.9, -0.1, 0.05, 0.0, 0.4, -0.2, 0.01, 0.3])
    flat = np.full(8, 0.7)
    top = ct.top_quartile(np.abs(truth))
    assert top.sum() == 2
    assert math.isnan(ct.rank_correlation(np.abs(flat), np.abs(truth)))
    assert ct.top_quartile_mass(flat, truth) == pytest.approx(2 / 8)
    assert ct.top_quartile_overlap(flat, truth) == pytest.approx(2 / 8)
    assert math.isnan(ct.top_quartile_mass(np.zeros(8), truth))  # no mass: undefined, not 0


def test_group_parts_partition_the_mass_and_keep_the_episodes_top_quartile():
    truth = np.array([0.9, -0.1, 0.05, 0.2, 0.4, -0.2, 0.01, 0.3])
    signal = np.array([1.0, 2.0, 0.5, 0.0, 1.5, 0.5, 1.0, 2.0])
    se = np.full(8, 0.04)
    group = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    a, b = ct.episode_parts(signal, truth, se, group), ct.episode_parts(signal, truth, se, ~group)
    assert a["mass_share"][0] + b["mass_share"][0] == pytest.approx(1.0)
    assert a["mass_share"][0] == pytest.approx(3.5 / 8.5)
    # top quartile of the episode: 0.9 (group) and 0.4 (not): the group's mass on it is 1.0 of 3.5
    assert a["top_quartile_mass"] == pytest.approx((1.0 / 3.5, 1.0))
    # signs in the group: |truth| > 0.08 at 0.9 (+), -0.1 (+: disagrees), 0.2 (signal 0: not counted)
    assert a["sign_agreement"] == (1, 2)


def test_ratio_intervals_pool_episodes_and_pair_differences():
    num, den = np.array([1.0, 0.0, 3.0, 2.0]), np.array([1.0, 0.0, 1.0, 1.0])  # episode 1 undefined
    idx = ct.bootstrap_indices(4, 500, seed=3)
    value, low, high = ct.ratio_interval(num, den, idx)
    assert value == pytest.approx(2.0) and 1.0 <= low <= value <= high <= 3.0
    assert ct.paired_difference((num, den), (num, den), idx) == (0.0, 0.0, 0.0)
    shifted = ct.paired_difference((num + den, den), (num, den), idx)  # +1 in every defined episode
    assert shifted == pytest.approx((1.0, 1.0, 1.0))
    assert all(math.isnan(v) for v in ct.ratio_interval(np.zeros(3), np.zeros(3), idx))


def test_truth_noise_parts_by_hand():
    truth, se = np.array([0.5, -0.1, 0.2, 0.0]), np.array([0.1, 0.1, 0.2, 0.0])
    group = np.array([True, True, False, False])
    assert list(ct.truth_noise_parts(truth, se)) == ["noise_fraction"]
    assert ct.truth_noise_parts(truth, se)["noise_fraction"] == pytest.approx((0.06, 0.30))
    parts = ct.truth_noise_parts(truth, se, group)
    assert parts["noise_fraction"] == pytest.approx((0.02, 0.26))
    assert parts["excess_share"] == pytest.approx((0.24, 0.24))  # the other half: 0.04 - 0.04 = 0


def test_excess_enrichment_by_hand():
    truth, se = np.array([0.5, -0.1, 0.2, 0.0]), np.array([0.1, 0.1, 0.2, 0.0])
    x = truth ** 2 - se ** 2  # 0.24, 0, 0, 0
    signal = np.array([3.0, 1.0, 0.0, 0.0])
    assert ct.excess_enrichment(signal, truth, se) == pytest.approx((0.75 * 0.24, x.mean()))
    assert ct.excess_enrichment(np.zeros(4), truth, se) == (0.0, 0.0)  # no mass: undefined
    parts = ct.episode_parts(-signal, truth, se, np.array([True, True, False, False]))
    assert parts["excess_enrichment"] == pytest.approx((0.75 * 0.24, 0.12))  # within the group; the sign is no matter


def test_excess_share_finds_the_true_credit_where_the_truths_mass_share_counts_noise():
    """Values are K = 8 Bernoulli means at every state, the truth as credit_values makes it (independent
    estimates, sample SD with ddof=1 / sqrt K). Tokens of group `idle` leave the success probability where it was
    (a* = 0), those of `pivot` move it by 0.15: |a| gives `idle` about half the mass (noise), excess_share ~0."""
    rng = np.random.default_rng(0)
    k, n_tokens, n_episodes = 8, 40, 1500
    idle = np.arange(n_tokens) % 2 == 0
    sums = {"mass": np.zeros(2), "excess": np.zeros(2), "se2": np.zeros(2), "a2": np.zeros(2),
            "enrich_num": np.zeros(3), "enrich_den": np.zeros(3)}
    signals = (idle * 1.0, ~idle * 1.0, np.ones(n_tokens))  # credit on the idle tokens, on the pivots, uniform
    for _ in range(n_episodes):
        p = np.empty(n_tokens + 1)
        p[0] = rng.uniform(0.3, 0.7)
        for t in range(n_tokens):
            p[t + 1] = p[t] if idle[t] else np.clip(p[t] + rng.choice([-0.15, 0.15]), 0.05, 0.95)
        rewards = rng.random((n_tokens + 1, k)) < p[:, None]
        values, se = rewards.mean(1), rewards.std(1, ddof=1) / math.sqrt(k)
        truth, truth_se = np.diff(values), np.sqrt(se[1:] ** 2 + se[:-1] ** 2)
        for i, c in enumerate(signals):
            num, den = ct.excess_enrichment(c, truth, truth_se)
            sums["enrich_num"][i] += num
            sums["enrich_den"][i] += den
        for i, group in enumerate((idle, ~idle)):
            sums["mass"][i] += np.abs(truth[group]).sum()
            parts = ct.truth_noise_parts(truth, truth_se, group)
            sums["excess"][i] += parts["excess_share"][0]
            sums["se2"][i] += parts["noise_fraction"][0]
            sums["a2"][i] += parts["noise_fraction"][1]
    assert sums["mass"][0] / sums["mass"].sum() > 0.4  # the raw truth: idle tokens look nearly as credited
    excess = sums["excess"] / sums["excess"].sum()
    assert abs(excess[0]) < 0.05 and excess[1] == pytest.approx(1.0, abs=0.05)
    noise = sums["se2"] / sums["a2"]  # pooled over episodes, as the tables pool them
    assert noise[0] == pytest.approx(1.0, abs=0.05) and noise[1] < 0.8
    # excess_enrichment: credit on the pivots finds twice uniform's squared true advantage, on the idle ones none
    enrichment = sums["enrich_num"] / sums["enrich_den"]
    assert enrichment == pytest.approx([0.0, 2.0, 1.0], abs=0.1)
    assert enrichment[2] == pytest.approx(1.0, abs=1e-12)  # uniform credit: 1 exactly


def test_best_signal_is_named_only_when_separated():
    idx = ct.bootstrap_indices(30, 500)
    ones, den = np.ones(30), np.ones(30)
    rng = np.random.default_rng(0)
    parts = {}
    for metric in ct.METRICS:
        parts[("good", "all", "all", metric)] = (0.8 * ones, den)
        parts[("bad", "all", "all", metric)] = (0.2 * ones + 0.01 * rng.normal(size=30), den)
        parts[("close", "all", "all", metric)] = (0.8 * ones + 0.3 * rng.normal(size=30), den)
    lines = ct.best_signal_lines(parts, idx, ["good", "bad"])
    assert all("**good** agrees best" in line for line in lines)
    lines = ct.best_signal_lines(parts, idx, ["good", "close", "bad"])
    assert all("not separated" in line for line in lines)


def test_steps_sum_their_tokens():
    np.testing.assert_array_equal(ct.to_steps(np.arange(6.0), np.array([0, 2, 5, 6])), [1.0, 9.0, 5.0])


# ============================================================================ the command end to end


class DigitsTask(CountdownTask):
    """Countdown's problems with a reward that a random model varies: the share of digits in the completion."""

    def reward(self, problem, completion: str) -> dict:
        share = sum(c.isdigit() for c in completion) / 12
        return {"reward": share, "reward_info": {"format_reward": 0.0, "answer_reward": float(share > 0.5)}}


@pytest.fixture(scope="module", autouse=True)
def digits_task():
    """data.task=digits_for_credit_tests during this module's tests only (other modules list the tasks)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(tasks.TASKS._parts, "digits_for_credit_tests", DigitsTask)
        mp.setitem(tasks.TASKS._params, "digits_for_credit_tests", {})
        yield


def write_config(tmp_path, tiny_assets, task: str) -> str:
    cfg = run_config(tiny_assets, tmp_path / "run", data={"task": task})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_the_command_values_every_token_and_scores_every_signal(tmp_path, tiny_assets):
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    for f in tiny_assets["model"].iterdir():  # a checkpoint holding an attribution head
        (model_dir / f.name).write_bytes(f.read_bytes())
    save_file({"proj.weight": torch.randn(1, 32)}, str(model_dir / "attribution_head.safetensors"))
    out = tmp_path / "truth"
    report = ct.main(["--checkpoint", str(model_dir), "--config", write_config(tmp_path, tiny_assets,
                      "digits_for_credit_tests"), "--episodes", "8", "--k", "3", "--bootstrap", "200",
                      "--output_dir", str(out)])
    assert {p.name for p in out.iterdir()} == {"units.csv", "agreement.csv", "summary.md", "credit_truth.png",
                                               "meta.json"}
    units = pd.read_csv(out / "units.csv")
    assert report.signals == ["grpo", "abs_logprob", "grad_proxy", *ct.WEIGHTERS, "attribution"]
    assert len(units) == report.meta["units"] and units.groupby("episode_idx").size().tolist() == \
        units.groupby("episode_idx")["length"].first().tolist()  # one row per token
    for _, e in units.groupby("episode_idx"):
        # the advantages telescope: their sum is the final state's value (the reward) minus the prompt's
        assert e[ct.TRUTH].sum() == pytest.approx(e["reward"].iloc[0] - e["mc_value"].iloc[0], abs=1e-9)
        assert e["grpo"].nunique() == 1  # the broadcast advantage
    rewards = units.groupby("episode_idx")["reward"].first().to_numpy().reshape(-1, 4)
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, keepdims=True) + 1e-4)).flatten()
    np.testing.assert_allclose(units.groupby("episode_idx")["grpo"].first(), adv, atol=1e-5)
    table = pd.read_csv(out / "agreement.csv")
    assert set(table["breakdown"]) == {"all", "type", "position"}
    assert (table[(table["signal"] == ct.TRUTH) & (table["metric"] == "rank_correlation")
                  & (table["breakdown"] == "all")]["value"] == 1.0).all()
    summary = (out / "summary.md").read_text()
    assert "## Which signal agrees best" in summary and "| attribution |" in summary
    assert "## How much of the truth is sampling noise" in summary
    noise = table[(table["signal"] == ct.TRUTH) & (table["metric"] == "excess_share")]
    for kind in ("type", "position"):  # the groups' noise-corrected shares partition the whole
        assert noise[noise["breakdown"] == kind]["value"].sum() == pytest.approx(1.0)
    # --rescore: the same tables again from units.csv alone, without the model
    (out / "agreement.csv").unlink()
    ct.main(["--rescore", str(out), "--bootstrap", "200"])
    pd.testing.assert_frame_equal(pd.read_csv(out / "agreement.csv"), table)
    assert (out / "summary.md").read_text() == summary
    with pytest.raises(SystemExit):
        ct.main(["--output_dir", str(out)])  # neither a checkpoint nor --rescore


def test_the_command_values_steps_and_refuses_bad_input_writing_nothing(tmp_path, tiny_assets):
    config = write_config(tmp_path, tiny_assets, "countdown")
    out = tmp_path / "steps"
    report = ct.main(["--checkpoint", str(tiny_assets["model"]), "--config", config, "--episodes", "4", "--k", "2",
                      "--bootstrap", "50", "--unit", "step", "--output_dir", str(out)])
    units = pd.read_csv(out / "units.csv")
    assert "type" not in units and len(units) == report.meta["units"] >= 4  # at least one step per episode
    bad = tmp_path / "bad"
    for args, message in ((["--episodes", "6"], "--episodes must be a multiple of the group size 4"),
                          (["--k", "1"], "k must be an integer >= 2"),
                          (["--checkpoint", str(tmp_path)], "is not a model directory")):
        argv = ["--checkpoint", str(tiny_assets["model"]), "--config", config, "--episodes", "4", "--k", "2",
                "--output_dir", str(bad), *args]
        with pytest.raises(SystemExit, match=message):
            ct.main(argv)
        assert not bad.exists()
