"""experiments/credit_truth_runs.py: which runs it analyzes and how it pools them over seeds.

credit_truth itself is tested in test_credit_truth.py; here its per-run output (agreement.csv) is written by hand,
so the pooling can be checked against a hand-computed t-interval and the run selection without sampling.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def ctr():
    spec = importlib.util.spec_from_file_location("credit_truth_runs", ROOT / "experiments" / "credit_truth_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _agreement(rank: float, filler_share: float) -> pd.DataFrame:
    return pd.DataFrame([
        ("grpo", "all", "all", "rank_correlation", rank, rank - 0.1, rank + 0.1, 32),
        ("grpo", "type", "filler", "mass_share", filler_share, 0, 1, 32),
        ("grpo", "position", "0", "mass_share", 0.5, 0, 1, 32),  # position bins are not pooled
        ("mc_advantage", "type", "filler", "excess_share", filler_share / 2, 0, 1, 32),
        ("mc_advantage", "all", "all", "noise_fraction", 0.9, 0.8, 1.0, 32),
    ], columns=["signal", "breakdown", "group", "metric", "value", "low", "high", "episodes"])


def _experiment(tmp_path: Path, analyzed: dict[tuple[str, int], tuple[float, float]], unanalyzed: list) -> Path:
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps({
        "config": "/elsewhere/config_tiny_words.yaml",
        "ablations": {"baseline": ["training.log_dir=/x"], "inverse_logprob": ["mitigation.epsilon=0.1"]}}))
    for (ablation, seed), (rank, share) in analyzed.items():
        run = exp / "runs" / ablation / f"seed{seed}"
        (run / "credit_truth").mkdir(parents=True)
        (run / "done.json").write_text("{}")
        _agreement(rank, share).to_csv(run / "credit_truth" / "agreement.csv", index=False)
        (run / "credit_truth" / "summary.md").write_text("done")
    for ablation, seed in unanalyzed:
        run = exp / "runs" / ablation / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "done.json").write_text("{}")
    return exp


def test_pools_over_seeds_with_a_t_interval(tmp_path, ctr):
    ranks, shares = [0.2, 0.35, 0.5], [0.4, 0.45, 0.6]
    exp = _experiment(tmp_path, {("baseline", s + 1): (ranks[s], shares[s]) for s in range(3)}, [])
    ctr.main([str(exp), "--episodes", "32", "--k", "4"])
    table = pd.read_csv(exp / "credit_truth.csv").set_index(["ablation", "signal", "figure"])
    runs = pd.read_csv(exp / "credit_truth_per_seed.csv")
    assert sorted(runs[runs.figure == "rank_correlation"].value) == ranks
    for figure, values in (("rank_correlation", ranks), ("mass_share_filler", shares)):
        row = table.loc[("baseline", "grpo", figure)]
        mean = sum(values) / 3
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
        assert row.seeds == 3
        assert row["mean"] == pytest.approx(mean)
        assert row.ci95 == pytest.approx(sps.t.ppf(0.975, 2) * sd / math.sqrt(3))
    assert table.loc[("baseline", "mc_advantage", "excess_share_filler"), "mean"] == pytest.approx(sum(shares) / 6)
    assert table.loc[("baseline", "mc_advantage", "noise_fraction"), "mean"] == pytest.approx(0.9)
    assert not any(f.startswith("mass_share_0") for f in table.index.get_level_values("figure"))
    text = (exp / "credit_truth.md").read_text()
    assert "| `baseline` |" in text and "K = 4" in text
    assert "### the truth's excess_share by token type" in text and "### noise_fraction" in text


def test_analyzes_only_the_seeds_asked_and_pools_every_finished_one(tmp_path, ctr, monkeypatch):
    exp = _experiment(tmp_path, {("baseline", 1): (0.3, 0.5)}, [("inverse_logprob", 1), ("inverse_logprob", 2)])
    calls = []

    def fake_analyze(run, config, overrides, episodes, k):
        calls.append((run.parent.name, run.name, config, overrides))
        out = run / "credit_truth"
        out.mkdir()
        _agreement(0.1, 0.2).to_csv(out / "agreement.csv", index=False)
        (out / "summary.md").write_text("done")
        return out

    monkeypatch.setattr(ctr, "analyze_run", fake_analyze)
    ctr.main([str(exp), "--seeds", "2"])
    # seed 1 of inverse_logprob is finished but not asked for; baseline seed 1 was analyzed before, so it is pooled
    # the config recorded at another path is looked up by name in the current directory
    assert calls == [("inverse_logprob", "seed2", "config_tiny_words.yaml", ["mitigation.epsilon=0.1"])]
    table = pd.read_csv(exp / "credit_truth.csv")
    assert set(zip(table.ablation, table.seeds)) == {("baseline", 1), ("inverse_logprob", 1)}


def test_renamed_keys_and_runner_keys(ctr):
    assert ctr.current_names(["mitigation.epsilon=0.1", "algorithm.loss=ppo"]) == [
        "mitigation.logprob_offset=0.1", "algorithm.loss=ppo"]


def test_rescore_recomputes_each_runs_tables_from_its_units(tmp_path, ctr):
    exp = _experiment(tmp_path, {("baseline", 1): (0.3, 0.5)}, [])
    out = exp / "runs" / "baseline" / "seed1" / "credit_truth"
    rng = np.random.default_rng(0)
    truth = rng.normal(size=12)
    pd.DataFrame({"episode_idx": np.repeat([0, 1], 6), "position": np.tile(np.arange(6), 2), "length": 6,
                  "reward": 1.0, "mc_value": 0.5, "mc_advantage": truth, "mc_stderr": 0.1,
                  "position_bin": np.tile(np.arange(6) * 5 // 6, 2), "grpo": 1.0}).to_csv(out / "units.csv", index=False)
    (out / "meta.json").write_text(json.dumps({
        "signals": ["grpo"], "checkpoint": "ckpt", "episodes": 2, "questions": 1, "group_size": 2, "split": "test",
        "unit": "token", "k": 4, "seed": 0, "temperature": 1.0, "mean_reward": 1.0, "states": 12, "kept_tokens": 0,
        "sampled_tokens": 0, "value_seconds": 1.0, "units": 12, "significant": 0, "bootstrap": 50,
        "total_seconds": 1.0}))
    ctr.main([str(exp), "--rescore"])
    # the hand-written agreement.csv (rank 0.3) is replaced by the one computed from units.csv
    table = pd.read_csv(exp / "credit_truth.csv").set_index(["ablation", "signal", "figure"])
    assert table.loc[("baseline", "grpo", "excess_enrichment"), "mean"] == pytest.approx(1.0)  # uniform credit
    assert table.loc[("baseline", "mc_advantage", "noise_fraction"), "mean"] == pytest.approx(0.12 / (truth ** 2).sum())
    assert ("baseline", "grpo", "rank_correlation") not in table.index or \
        math.isnan(table.loc[("baseline", "grpo", "rank_correlation"), "mean"])  # a constant signal has no rank
