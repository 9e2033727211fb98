"""The experiment runner: statistics against hand computation, the scheduler with fake jobs, planning and
bad input, and one real (bandit) experiment end to end from the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import run_experiment as rx
import stats

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ the scheduler


class FakeProcess:
    """Finishes after `ticks` polls with `rc`; records how many jobs run at once on each slot."""

    live: dict[str, int] = {}
    max_live: dict[str, int] = {}

    def __init__(self, job: rx.Job, slot: str, ticks: int, rc: int):
        self.job, self.slot, self.ticks, self.rc = job, slot, ticks, rc
        FakeProcess.live[slot] = FakeProcess.live.get(slot, 0) + 1
        FakeProcess.max_live[slot] = max(FakeProcess.max_live.get(slot, 0), FakeProcess.live[slot])

    def poll(self):
        self.ticks -= 1
        if self.ticks > 0:
            return None
        FakeProcess.live[self.slot] -= 1
        if self.rc == 0:  # a finished run leaves its metrics behind
            logs = self.job.dir / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            (logs / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "success_rate/eval": 0.1 * s})
                                                        + "\n" for s in (0, 2, 4)))
        else:
            self.job.dir.mkdir(parents=True, exist_ok=True)
            self.job.log.write_text("step 1/4 | ...\nTraceback (most recent call last):\nRuntimeError: boom\n")
        return self.rc


def fake_jobs(tmp_path: Path, n: int) -> list[rx.Job]:
    return rx.plan_jobs(["baseline", "softmax"], {"baseline": [], "softmax": ["algorithm.adv_estimator=softmax"]},
                        list(range(1, n // 2 + 1)), 4, tmp_path, "bandit")


def test_scheduler_runs_one_job_per_slot_and_reports_failures(tmp_path):
    FakeProcess.live, FakeProcess.max_live = {}, {}
    jobs = fake_jobs(tmp_path, 8)
    started = []

    def start(job, slot):
        started.append((job.name, slot))
        return FakeProcess(job, slot, ticks=1 + len(started) % 3, rc=1 if job.name == "softmax seed=2" else 0)

    rx.schedule(jobs, ["0", "1", "2"], start, poll_seconds=0)
    assert len(started) == 8 and len({n for n, _ in started}) == 8  # every job ran, once
    assert set(FakeProcess.max_live) == {"0", "1", "2"} and max(FakeProcess.max_live.values()) == 1
    failed = [j for j in jobs if j.status == "failed"]
    assert [j.name for j in failed] == ["softmax seed=2"] and "RuntimeError: boom" in failed[0].log_tail
    assert all((j.dir / "done.json").is_file() for j in jobs if j.status == "done")

    # a rerun skips the finished jobs and runs only the failed one again
    again = fake_jobs(tmp_path, 8)
    rx.mark_finished(again)
    assert [j.name for j in again if j.status == "pending"] == ["softmax seed=2"]
    rerun = []
    rx.schedule(again, ["0"], lambda job, slot: rerun.append(job.name) or FakeProcess(job, slot, 1, 0), poll_seconds=0)
    assert rerun == ["softmax seed=2"] and all(j.status in ("done", "skipped") for j in again)


def test_gpu_groups_run_each_job_under_torchrun(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rx.check_gpus("0,1,2,3") == ["0", "1", "2", "3"]
    assert rx.check_gpus("0,1,2,3", per_job=2) == ["0,1", "2,3"]
    with pytest.raises(rx.ExperimentError, match="groups of --gpus-per-job 2"):
        rx.check_gpus("0,1,2", per_job=2)
    job = fake_jobs(tmp_path, 2)[0]
    job.resume = True
    cmd = rx.job_command("c.yaml", job, "2,3", gpu=True, threads=1)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    assert cmd[6].endswith("train.py") and "model.device=cuda" in cmd and cmd[-1] == "--resume"
    single = rx.job_command("c.yaml", job, "1", gpu=True, threads=1)
    assert single[1].endswith("train.py") and "torch.distributed.run" not in single
    cpu = rx.job_command("c.yaml", job, "cpu0", gpu=False, threads=2)
    assert "training.num_threads=2" in cpu and "torch.distributed.run" not in cpu


def test_interrupted_run_with_a_checkpoint_resumes_and_one_without_restarts(tmp_path):
    jobs = fake_jobs(tmp_path, 4)
    (jobs[0].dir / "ckpt" / "step_000002").mkdir(parents=True)
    (jobs[0].dir / "ckpt" / "step_000002" / "trainer_state.json").write_text("{}")
    (jobs[1].dir / "logs").mkdir(parents=True)  # started, never checkpointed
    rx.mark_finished(jobs)
    assert jobs[0].resume and jobs[0].status == "pending"
    assert not jobs[1].resume and not jobs[1].dir.exists()


def test_summary_and_verdicts_from_run_metrics(tmp_path):
    jobs = fake_jobs(tmp_path, 6)
    finals = {("baseline", 1): 0.40, ("baseline", 2): 0.44, ("baseline", 3): 0.42,
              ("softmax", 1): 0.46, ("softmax", 2): 0.47, ("softmax", 3): 0.49}
    for job in jobs:
        logs = job.dir / "logs"
        logs.mkdir(parents=True)
        rows = [{"step": 0, "success_rate/eval": 0.3}, {"step": 1, "response_length": 30.0, "entropy": 0.5},
                {"step": 2, "success_rate/eval": finals[(job.ablation, job.seed)], "response_length": 32.0}]
        (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        job.status = "done"
    summary = rx.summarize(jobs, ["baseline", "softmax"], "baseline")
    base, soft = summary.rows
    assert base["final_eval_mean"] == pytest.approx(0.42) and base["p_value"] is None
    hand = stats.paired_test([0.46, 0.47, 0.49], [0.40, 0.44, 0.42])
    assert soft["diff_vs_baseline"] == pytest.approx(0.0533333, rel=1e-4) and soft["p_value"] == pytest.approx(hand.p_value)
    assert soft["auc_eval_mean"] == pytest.approx(np.mean([(0.3 + f) / 2 for f in (0.46, 0.47, 0.49)]))
    assert soft["response_length_mean"] == pytest.approx(31.0) and soft["entropy_mean"] == pytest.approx(0.5)
    text = rx.write_summary(summary, tmp_path, "# test")
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table.columns[:8]) == ["ablation", "n_seeds", "final_eval_mean", "final_eval_ci95", "auc_eval_mean",
                                       "auc_eval_ci95", "diff_vs_baseline", "diff_ci95"]
    assert "p_value" in table.columns
    expected = "better than baseline at 95%" if hand.p_value < 0.05 else "no significant difference"
    assert "final: " + expected in text
    hand_auc = stats.paired_test([(0.3 + f) / 2 for f in (0.46, 0.47, 0.49)], [(0.3 + f) / 2 for f in (0.40, 0.44, 0.42)])
    assert soft["auc_p_value"] == pytest.approx(hand_auc.p_value) and "; AUC: " in text
    rx.plot_curves(summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_verdict_is_never_stronger_than_its_interval():
    row = {"ablation": "x", "n_seeds": 3, "diff_vs_baseline": 0.05, "diff_ci95": 0.08, "p_value": 0.21}
    assert rx.verdict(row, "baseline").startswith("final: no significant difference from baseline at 3 seeds")
    row.update(diff_ci95=0.03, p_value=0.01)
    assert rx.verdict(row, "baseline").startswith("final: better than baseline at 95%")
    row.update(diff_vs_baseline=-0.05, auc_diff_vs_baseline=-0.02, auc_diff_ci95=0.05, auc_p_value=0.4)
    assert rx.verdict(row, "baseline") .startswith("final: worse")
    assert rx.verdict(row, "baseline").endswith("AUC: no significant difference from baseline at 3 seeds "
                                                "(-0.020 [-0.070, +0.030], p = 0.400)")


# ------------------------------------------------------------------ planning and bad input


def test_presets_and_groups_resolve(tmp_path):
    presets, groups = rx.load_presets()
    for name in ("baseline", "softmax", "softmax_anneal", "dr_grpo", "dr_grpo_soft", "dr_grpo_filter0.5",
                 "dr_grpo_soft_filter0.5", "baseline_filter0.5", "gt_injection", "ppo", "gspo", "cispo", "dual_clip",
                 "outcome_conditional_0.25", "entropy_masking", "attribution"):
        assert name in presets, name
    assert rx.resolve_ablations("drgrpo_stage1,softmax", presets, groups) == ["baseline", "dr_grpo", "dr_grpo_soft",
                                                                              "softmax"]
    with pytest.raises(rx.ExperimentError, match="unknown ablation 'nope'"):
        rx.resolve_ablations("baseline,nope", presets, groups)
    with pytest.raises(rx.ExperimentError, match="listed twice"):
        rx.resolve_ablations("softmax,softmax", presets, groups)
    # every preset is a valid config
    from config import load_config

    for name, overrides in presets.items():
        load_config("config_bandit.yaml", overrides)
    jobs = rx.plan_jobs(["baseline", "softmax"], presets, [1, 2], 30, tmp_path, "bandit")
    assert [j.seed for j in jobs] == [1, 1, 2, 2]  # the same seeds for every ablation
    assert "training.seed=2" in jobs[3].overrides and "algorithm.adv_estimator=softmax" in jobs[3].overrides


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "run_experiment.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["--task", "sokoban", "--ablations", "baseline", "--steps", "2"], "unknown task 'sokoban'; valid: bandit, countdown, gsm8k"),
    (["--task", "bandit", "--ablations", "baseline,nope", "--steps", "2"], "unknown ablation 'nope'; presets: baseline"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--gpus", "7"], "GPU id(s) 7 do not exist"),
    (["--task", "gsm8k", "--ablations", "baseline", "--steps", "2"], "pass --config"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--set", "training.nope=1"], "config error"),
])
def test_bad_requests_fail_before_anything_starts(tmp_path, args, message):
    out = tmp_path / "exp"
    result = run_cli(*args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_overlapping_output_directories_are_refused(tmp_path):
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / rx.SPEC_FILE).write_text(json.dumps({"task": "bandit", "config": "c", "steps": 3,
                                                             "overrides": [], "ablations": {}}))
    spec = {"task": "bandit", "config": "c", "steps": 3, "overrides": [], "ablations": {"baseline": []}}
    with pytest.raises(rx.ExperimentError, match="inside the experiment"):
        rx.check_output_dir(tmp_path / "exp" / "inner", spec)
    with pytest.raises(rx.ExperimentError, match="already holds another experiment"):
        rx.check_output_dir(tmp_path, spec)
    with pytest.raises(rx.ExperimentError, match="steps=3"):
        rx.check_output_dir(tmp_path / "exp", {**spec, "steps": 5})
    rx.check_output_dir(tmp_path / "exp", spec)  # the same experiment again: fine (it resumes)


@pytest.mark.slow
def test_bandit_experiment_end_to_end_and_rerun_skips_everything(tmp_path):
    out = tmp_path / "exp"
    args = ["--task", "bandit", "--ablations", "baseline,softmax", "--seeds", "2", "--steps", "12", "--out", str(out),
            "--set", f"model.path={tmp_path / 'model'}"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    table = pd.read_csv(out / "summary.csv")
    assert table["ablation"].tolist() == ["baseline", "softmax"] and table["n_seeds"].tolist() == [2, 2]
    assert (out / "summary.md").is_file() and (out / "curves.png").is_file()
    assert (out / "credit" / "comparison.csv").is_file()
    for ab in ("baseline", "softmax"):
        for seed in (1, 2):
            run = out / "runs" / ab / f"seed{seed}"
            assert (run / "logs" / "metrics.jsonl").is_file() and (run / "done.json").is_file()
            assert list((run / "logs").glob("events.out.tfevents.*"))
    assert "[1/4] baseline seed=1 on cpu0" in first.stdout
    second = run_cli(*args)
    assert second.returncode == 0 and "4 already finished" in second.stdout
    assert "running" not in second.stdout
