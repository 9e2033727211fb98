"""The experiment runner: the scheduler with fake jobs and real process groups (cleanup on error and SIGTERM),
planning and bad input, records (commit, config hash, seed scope), per_seed.csv, the summary's comparisons and
verdicts, the lock on --out, and real (bandit) experiments end to end from the command line. The statistics
themselves are tested in test_stats.py."""

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
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
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


def test_gpus_are_positions_within_an_existing_cuda_visible_devices(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert rx.visible_devices() == ["4", "6"] and rx.check_gpus("1") == ["1"]
    assert rx.device_env("1", rx.visible_devices()) == "6"  # not physical GPU 1, which this process cannot see
    assert rx.device_env("0,1", ["GPU-aa", "GPU-bb"]) == "GPU-aa,GPU-bb"
    with pytest.raises(rx.ExperimentError, match=r"valid: 0, 1 \(positions within CUDA_VISIBLE_DEVICES=4,6\)"):
        rx.check_gpus("2")
    # the job's environment: the launcher writes the mapped entries
    monkeypatch.setattr(rx, "write_run_record", lambda *a: None)
    seen = {}
    monkeypatch.setattr(rx.subprocess, "Popen", lambda cmd, env, **kw: seen.update(env=env) or FakeProcess(job, "1", 1, 0))
    job = fake_jobs(tmp_path, 2)[0]
    rx.launcher("c.yaml", gpu=True, threads=1, visible=["4", "6"])(job, "1")
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "6"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert rx.visible_devices() == []


def test_cpu_count_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(rx.os, "sched_getaffinity", lambda pid: {3})
    monkeypatch.setattr(rx.os, "cpu_count", lambda: 64)
    assert rx.cpu_count() == 1


def test_interrupted_run_with_a_checkpoint_resumes_and_one_without_restarts(tmp_path):
    jobs = fake_jobs(tmp_path, 4)
    (jobs[0].dir / "ckpt" / "step_000002").mkdir(parents=True)
    (jobs[0].dir / "ckpt" / "step_000002" / "trainer_state.json").write_text("{}")
    (jobs[1].dir / "logs").mkdir(parents=True)  # started, never checkpointed
    rx.mark_finished(jobs)
    assert jobs[0].resume and jobs[0].status == "pending"
    assert not jobs[1].resume and not jobs[1].dir.exists()


def write_run(job: rx.Job, final: float, first: float = 0.3, record: dict | None = None) -> None:
    """A finished run's directory: metrics with evals at steps 0 and 2, done.json, optionally a run.json."""
    logs = job.dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = [{"step": 0, "success_rate/eval": first}, {"step": 1, "response_length": 30.0, "entropy": 0.5},
            {"step": 2, "success_rate/eval": final, "response_length": 32.0}]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (job.dir / "done.json").write_text("{}")
    if record is not None:
        (job.dir / rx.RUN_RECORD).write_text(json.dumps(record))
    job.status = "skipped"


def record(commit: str, config_hash: str = "c0ffee", dirty: bool = False, unrecorded_start: bool = False) -> dict:
    return {"seed_scope": "training", "config_hash": config_hash, "started_unrecorded": unrecorded_start,
            "launches": [{"commit": commit, "dirty": dirty, "time": 0.0, "resume": False}]}


def test_summary_and_verdicts_from_run_metrics(tmp_path):
    jobs = fake_jobs(tmp_path, 6)
    finals = {("baseline", 1): 0.40, ("baseline", 2): 0.44, ("baseline", 3): 0.42,
              ("softmax", 1): 0.46, ("softmax", 2): 0.47, ("softmax", 3): 0.49}
    for job in jobs:
        write_run(job, finals[(job.ablation, job.seed)], record=record("a" * 40))
    rows = rx.collect_rows(jobs, {}, None, "training")
    summary = rx.summarize(rows, ["baseline", "softmax"], "baseline")
    base, soft = summary.rows
    assert base["final_eval_mean"] == pytest.approx(0.42) and base["p_value"] is None and base["n_pairs"] is None
    hand = stats.paired_test([0.46, 0.47, 0.49], [0.40, 0.44, 0.42])
    assert soft["diff_vs_baseline"] == pytest.approx(0.0533333, rel=1e-4) and soft["p_value"] == pytest.approx(hand.p_value)
    assert soft["n_pairs"] == 3 and soft["p_holm"] == pytest.approx(hand.p_value)  # a family of one
    assert soft["p_sign"] == 0.25 and soft["mdd80"] == pytest.approx(hand.mdd80)
    assert soft["auc_eval_mean"] == pytest.approx(np.mean([(0.3 + f) / 2 for f in (0.46, 0.47, 0.49)]))
    assert soft["response_length_mean"] == pytest.approx(31.0) and soft["entropy_mean"] == pytest.approx(0.5)
    assert soft["commits"] == "a" * 12
    text = rx.write_summary(summary, tmp_path, "# test", rx.records_lines(list(rows.values()), ["baseline", "softmax"],
                                                                           "training"))
    table = pd.read_csv(tmp_path / "summary.csv")
    assert list(table.columns[:8]) == ["ablation", "n_seeds", "final_eval_mean", "final_eval_ci95", "auc_eval_mean",
                                       "auc_eval_ci95", "diff_vs_baseline", "diff_ci95"]
    for column in ("p_value", "p_holm", "p_sign", "p_wilcoxon", "mdd80", "n_pairs", "auc_p_holm", "auc_mdd80"):
        assert column in table.columns, column
    assert f"| `softmax` | final | 3 | +0.053 [{hand.diff.low:+.3f}, {hand.diff.high:+.3f}] | {hand.p_value:.3f} |" in text
    assert "- Code: every run at commit `aaaaaaaaaaaa`." in text and "Seed scope `training`" in text
    hand_auc = stats.paired_test([(0.3 + f) / 2 for f in (0.46, 0.47, 0.49)], [(0.3 + f) / 2 for f in (0.40, 0.44, 0.42)])
    assert soft["auc_p_value"] == pytest.approx(hand_auc.p_value) and "; AUC: " in text
    rx.plot_curves(summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_verdicts_count_the_pairs_actually_tested(tmp_path):
    jobs = fake_jobs(tmp_path, 6)
    for job in jobs:
        if (job.ablation, job.seed) != ("baseline", 2):  # one failed baseline seed: 3 softmax seeds, 2 pairs
            write_run(job, 0.4 + 0.01 * job.seed + (0.05 if job.ablation == "softmax" else 0))
    summary = rx.summarize(rx.collect_rows(jobs, {}, None, "training"), ["baseline", "softmax"], "baseline")
    soft = summary.rows[1]
    assert soft["n_seeds"] == 3 and soft["n_pairs"] == 2
    assert rx.verdict(soft, "baseline").startswith("final: undetermined: 2 pairs with baseline (at least 3 needed)")


def row(n=4, d=0.05, h=0.03, p=0.01, ph=None, ps=0.125, pw=0.125, mdd=0.04, **auc):
    base = {"ablation": "x", "n_pairs": n, "diff_vs_baseline": d, "diff_ci95": h, "p_value": p,
            "p_holm": p if ph is None else ph, "p_sign": ps, "p_wilcoxon": pw, "mdd80": mdd}
    return {**base, **{f"auc_{k}": v for k, v in base.items() if k != "ablation"}, **auc}


def test_a_verdict_is_never_stronger_than_its_tests():
    v = rx.verdict(row(n=4, p=0.21, h=0.08), "baseline")
    assert v.startswith("final: no significant difference from baseline at 4 pairs (+0.050 [-0.030, +0.130], "
                        "t-test p = 0.210; exact p: sign 0.125, Wilcoxon 0.125); a true difference of ±0.040 or more "
                        "would be detected with 80% power")
    # the softmax AUC case: t-test p = 0.012 at 4 seeds, exact tests 0.125: suggestive, not established
    v = rx.verdict(row(n=4, d=-0.037, h=0.022, p=0.012), "baseline")
    assert v.startswith("final: worse than baseline by the t-test only") and "cannot go below p = 0.125" in v
    assert "suggestive, not established" in v
    # at 6 pairs and more a Holm-adjusted p < 0.05 is a result; the exact p-values stay beside it
    v = rx.verdict(row(n=6, p=0.004, ph=0.012, ps=0.031, pw=0.031), "baseline", family=3)
    assert v.startswith("final: better than baseline at 95% at 6 pairs (+0.050 [+0.020, +0.080], t-test p = 0.004, "
                        "Holm p = 0.012 over 3; exact p: sign 0.031, Wilcoxon 0.031)")
    v = rx.verdict(row(n=8, p=0.03, ph=0.09), "baseline", family=3)
    assert v.startswith("final: no significant difference from baseline after Holm's correction over 3 comparisons")
    assert rx.verdict(row(n=2), "baseline").startswith("final: undetermined: 2 pairs with baseline")
    v = rx.verdict(row(n=3, p=math.nan, h=math.nan, ps=0.25, pw=0.25), "baseline")
    assert v.startswith("final: undetermined: the same difference (+0.050) on all 3 pairs")
    assert rx.verdict({"ablation": "baseline"}, "baseline") == "baseline"


def test_holm_runs_over_the_ablations_compared(tmp_path):
    presets = {"baseline": [], "a": ["x"], "b": ["y"], "c": ["z"]}
    jobs = rx.plan_jobs(list(presets), presets, [1, 2, 3, 4], 4, tmp_path, "bandit")
    gains = {"baseline": 0.0, "a": 0.02, "b": 0.05, "c": -0.01}
    for job in jobs:
        write_run(job, 0.4 + gains[job.ablation] + 0.01 * (job.seed % 3) * (job.ablation != "baseline"))
    summary = rx.summarize(rx.collect_rows(jobs, {}, None, "training"), list(presets), "baseline")
    compared = summary.rows[1:]
    assert summary.family == 3
    expected = stats.holm([r["p_value"] for r in compared])
    assert [r["p_holm"] for r in compared] == pytest.approx(expected)
    assert [r["auc_p_holm"] for r in compared] == pytest.approx(stats.holm([r["auc_p_value"] for r in compared]))


# ------------------------------------------------------------------ records, per_seed.csv


def test_run_record_lists_every_launch_and_its_commit(tmp_path, monkeypatch):
    job = fake_jobs(tmp_path, 2)[0]
    job.dir.mkdir(parents=True)
    monkeypatch.setattr(rx, "code_version", lambda repo=rx.REPO: ("1" * 40, False))
    rx.write_run_record(job, "config_bandit.yaml", "training")
    first = json.loads((job.dir / rx.RUN_RECORD).read_text())
    assert first["overrides"] == job.overrides and first["config"]["training"]["seed"] == 1
    assert first["config_hash"] == rx.config_hash(first["config"]) and len(first["config_hash"]) == 12
    assert rx.run_provenance(job, None, "training") == rx.Provenance("1" * 12, False, first["config_hash"], "training")
    # resumed at another commit, with uncommitted changes: both commits, dirty
    monkeypatch.setattr(rx, "code_version", lambda repo=rx.REPO: ("2" * 40, True))
    job.resume = True
    rx.write_run_record(job, "config_bandit.yaml", "training")
    assert rx.run_provenance(job, None, "training").commit == "1" * 12 + "+" + "2" * 12
    assert rx.run_provenance(job, None, "training").dirty is True
    # a run interrupted before records existed and resumed now: its first part is unrecorded
    other = fake_jobs(tmp_path, 2)[1]
    other.dir.mkdir(parents=True)
    other.resume = True
    rx.write_run_record(other, "config_bandit.yaml", "training")
    assert rx.run_provenance(other, None, "training").commit == f"{rx.UNRECORDED}+" + "2" * 12


def test_config_hash_ignores_where_a_run_is_and_sees_what_it_computes(tmp_path):
    presets = {"baseline": [], "softmax": ["algorithm.adv_estimator=softmax"]}
    jobs = rx.plan_jobs(["baseline", "softmax"], presets, [1, 2], 5, tmp_path, "bandit")
    hashes = {(j.ablation, j.seed): rx.config_hash(rx.config_dict(rx.resolve_config("config_bandit.yaml", j.overrides)))
              for j in jobs}
    assert hashes[("baseline", 1)] == hashes[("baseline", 2)] != hashes[("softmax", 1)] == hashes[("softmax", 2)]
    more = rx.plan_jobs(["baseline"], presets, [1], 5, tmp_path, "bandit", ["training.learning_rate=0.5"])
    assert rx.config_hash(rx.config_dict(rx.resolve_config("config_bandit.yaml", more[0].overrides))) != \
        hashes[("baseline", 1)]


def test_runs_at_other_commits_or_without_records_are_pooled_and_said_so(tmp_path):
    jobs = fake_jobs(tmp_path, 6)
    for job in jobs:
        commit = "a" * 40 if job.seed < 3 else "b" * 40
        write_run(job, 0.4 + 0.01 * job.seed, record=None if job.name == "softmax seed=1" else
                  record(commit, config_hash="h1" if job.seed < 3 else "h2", dirty=job.seed == 3))
    rows = rx.collect_rows(jobs, {}, None, "training")
    assert rows[("softmax", 1)].commit == rx.UNRECORDED and rows[("softmax", 1)].config_hash == ""
    lines = "\n".join(rx.records_lines(list(rows.values()), ["baseline", "softmax"], "training"))
    assert "the runs come from 3 commits, pooled in every figure below" in lines
    assert "`bbbbbbbbbbbb` with uncommitted changes to tracked files: `baseline` seeds 3; `softmax` seeds 3" in lines
    assert f"`{rx.UNRECORDED}`: `softmax` seeds 1" in lines and "--assume-commit REV" in lines
    assert "`baseline` pools runs of 2 resolved configs (h1, h2)" in lines
    summary = rx.summarize(rows, ["baseline", "softmax"], "baseline")
    assert summary.rows[1]["commits"] == f"{'a' * 12};{'b' * 12};{rx.UNRECORDED}"
    assumed = rx.collect_rows(jobs, {}, "c" * 40, "training")
    noted = rx.collect_rows(jobs, {}, None, "training", {"softmax/seed1": "d" * 12 + " (assumed)"})
    assert noted[("softmax", 1)].commit == "d" * 12 + " (assumed)" and noted[("softmax", 2)].commit == "a" * 12
    assert assumed[("softmax", 1)].commit == "c" * 12 + " (assumed)"
    assert "`(assumed)`: a commit named by `--assume-commit`" in "\n".join(
        rx.records_lines(list(assumed.values()), ["baseline", "softmax"], "training"))


def test_per_seed_csv_round_trips_and_stands_in_for_a_missing_run(tmp_path):
    jobs = fake_jobs(tmp_path, 6)
    for job in jobs:
        gain = {1: 0.02, 2: 0.05, 3: 0.03}[job.seed] if job.ablation == "softmax" else 0.0
        write_run(job, 0.4 + 0.01 * job.seed + gain, record=record("a" * 40))
    rows = rx.collect_rows(jobs, {}, None, "training")
    rx.write_per_seed(list(rows.values()), tmp_path)
    back = rx.read_per_seed(tmp_path)
    assert set(back) == set(rows)
    for key, r in rows.items():
        b = back[key]
        assert b.source == rx.PER_SEED_FILE and (b.commit, b.dirty, b.config_hash) == (r.commit, r.dirty, r.config_hash)
        assert b.final_eval == r.final_eval and b.auc_eval == pytest.approx(r.auc_eval)
        assert b.result().steps == [0, 2] and b.result().evals == r.result().evals
    # a run directory deleted: the row stands in; not re-run; the summary is the same
    import shutil

    shutil.rmtree(jobs[1].dir)
    again = fake_jobs(tmp_path, 6)
    rx.mark_finished(again, set(back))
    assert again[1].status == "recorded" and [j.status for j in again].count("skipped") == 5
    pooled = rx.collect_rows(again, back, None, "training")
    assert pooled[(again[1].ablation, again[1].seed)].source == rx.PER_SEED_FILE
    before = rx.summarize(rows, ["baseline", "softmax"], "baseline").rows
    after = rx.summarize(pooled, ["baseline", "softmax"], "baseline").rows
    assert after[1]["p_value"] == pytest.approx(before[1]["p_value"]) and after[1]["n_pairs"] == 3
    assert "- From per_seed.csv (run directory absent): `softmax` seed 1." in rx.records_lines(
        list(pooled.values()), ["baseline", "softmax"], "training")


def test_seed_scope_all_varies_the_warm_up_and_the_eval_draw(tmp_path):
    """Per-seed overrides, and per-seed tiny models built (once each, in turn) with their own seed: a tiny
    countdown config (2 warm-up steps of a 1-layer, 32-wide model on 300 problems) so it runs in seconds."""
    presets = {"baseline": [], "softmax": ["algorithm.adv_estimator=softmax"]}
    common = [f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'data'}", "data.generate_if_missing=300",
              "tiny.warmup_steps=2", "tiny.warmup_batch_size=4", "tiny.hidden_size=32", "tiny.num_hidden_layers=1",
              "tiny.num_attention_heads=2", "tiny.num_key_value_heads=1", "tiny.intermediate_size=32",
              "tiny.num_train_problems=200", "data.test_size=16"]
    jobs = rx.plan_jobs(["baseline", "softmax"], presets, [1, 2], 2, tmp_path / "exp", "countdown", common, "all",
                        str(tmp_path / "model"))
    assert jobs[0].overrides[-3:] == ["tiny.seed=1", "eval.seed=1", f"model.path={tmp_path / 'model'}_seed1"]
    cfg = rx.resolve_config("config_tiny.yaml", jobs[3].overrides)
    assert (cfg.tiny.seed, cfg.eval.seed, cfg.model.path) == (2, 2, f"{tmp_path / 'model'}_seed2")
    training = rx.plan_jobs(["baseline"], presets, [1, 2], 2, tmp_path / "exp", "countdown", common, "training",
                            str(tmp_path / "model"))
    assert not any(o.startswith(("tiny.seed", "eval.seed")) for j in training for o in j.overrides)
    plan = rx.Plan(["baseline", "softmax"], jobs, {"config": "config_tiny.yaml", "seed_scope": "all"}, ["cpu0"],
                   "baseline", None)
    rx.build_models(plan)
    assert {j.model_dir for j in jobs} == {tmp_path / "model_seed1", tmp_path / "model_seed2"}
    for seed in (1, 2):
        assert json.loads((tmp_path / f"model_seed{seed}" / "warmup.json").read_text())["seed"] == seed
    w1, w2 = ((tmp_path / f"model_seed{s}" / "model.safetensors").read_bytes() for s in (1, 2))
    assert w1 != w2 and not (tmp_path / "model").exists()
    swapped = rx.plan_jobs(["baseline"], presets, [1], 2, tmp_path / "exp", "countdown",
                           common, "all", str(tmp_path / "model"))
    swapped[0].overrides[-1] = f"model.path={tmp_path / 'model'}_seed2"  # a model warmed up with another seed
    with pytest.raises(rx.ExperimentError, match="warmed up with tiny.seed=2, not 1"):
        rx.build_models(rx.Plan(["baseline"], swapped, plan.spec, ["cpu0"], "baseline", None))


# ------------------------------------------------------------------ planning and bad input


def test_presets_and_groups_resolve(tmp_path):
    presets, groups = rx.load_presets()
    for name in ("baseline", "softmax", "softmax_anneal", "dr_grpo", "dr_grpo_soft", "dr_grpo_filter0.5",
                 "dr_grpo_soft_filter0.5", "baseline_filter0.5", "gt_injection", "ppo", "gspo", "cispo", "dual_clip",
                 "outcome_conditional_0.25", "entropy_masking", "attribution"):
        assert name in presets, name
    assert rx.resolve_ablations("drgrpo_stage1,softmax", presets, groups) == ["baseline", "dr_grpo", "dr_grpo_soft",
                                                                              "softmax"]
    # groups may share members (a common baseline) ...
    assert rx.resolve_ablations("softmax_vs_baseline,drgrpo_stage1", presets, groups) == [
        "baseline", "softmax", "dr_grpo", "dr_grpo_soft"]
    with pytest.raises(rx.ExperimentError, match="unknown ablation 'nope'"):
        rx.resolve_ablations("baseline,nope", presets, groups)
    # ... but a preset named twice is refused, in either order
    for names, where in (("softmax,softmax", "on its own and on its own"),
                         ("softmax_vs_baseline,softmax", "in group 'softmax_vs_baseline' and on its own"),
                         ("softmax,softmax_vs_baseline", "on its own and in group 'softmax_vs_baseline'")):
        with pytest.raises(rx.ExperimentError, match=f"ablation 'softmax' is listed twice \\({where}\\)"):
            rx.resolve_ablations(names, presets, groups)
    # every preset is a valid config, and none sets what the runner sets
    for name, overrides in presets.items():
        rx.resolve_config("config_bandit.yaml", overrides)
        rx.check_runner_keys(overrides, name, "all")
    jobs = rx.plan_jobs(["baseline", "softmax"], presets, [1, 2], 30, tmp_path, "bandit")
    assert [j.seed for j in jobs] == [1, 1, 2, 2]  # the same seeds for every ablation
    assert "training.seed=2" in jobs[3].overrides and "algorithm.adv_estimator=softmax" in jobs[3].overrides


def test_mitigations_all_is_the_issue_26_comparison():
    presets, groups = rx.load_presets()
    assert groups["mitigations_all"] == ["baseline", "outcome_conditional", "outcome_conditional_0.75",
                                         "inverse_logprob", "attention_credit", "entropy_weighted", "entropy_masking",
                                         "attribution", "attribution_regression"]
    assert presets["outcome_conditional"] == ["mitigation.name=outcome_conditional", "mitigation.think_discount=0.5"]
    assert presets["attribution_regression"] == ["mitigation.name=attribution",
                                                 "attribution.objective=advantage_regression"]
    assert groups["mitigations"] == ["baseline", "outcome_conditional", "inverse_logprob", "attention_credit",
                                     "entropy_weighted", "entropy_masking", "attribution"]


def test_runner_keys_are_refused_in_presets_and_set():
    with pytest.raises(rx.ExperimentError, match="training.seed is set by the runner per run \\(--seeds\\)"):
        rx.check_runner_keys(["training.seed=3"], "--set", "training")
    with pytest.raises(rx.ExperimentError, match="eval.seed is set by the runner per run \\(--seed-scope all\\)"):
        rx.check_runner_keys(["eval.seed=3"], "--set", "all")
    rx.check_runner_keys(["eval.seed=3", "tiny.seed=1"], "--set", "training")  # fixed for every run: fine


def run_cli(*args, cwd=REPO, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "run_experiment.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--task", "sokoban", "--ablations", "baseline", "--steps", "2"], "unknown task 'sokoban'; valid: bandit, countdown, countdown_words, gsm8k"),
    (["--task", "bandit", "--ablations", "baseline,nope", "--steps", "2"], "unknown ablation 'nope'; presets: baseline"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--gpus", "7"], "GPU id(s) 7 do not exist"),
    (["--task", "gsm8k", "--ablations", "baseline", "--steps", "2"], "pass --config"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--set", "training.nope=1"], "config error"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--set", "training.max_steps=9"],
     "--set 'training.max_steps=9': training.max_steps is set by the runner per run (--steps)"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--seed-scope", "all", "--set", "tiny.seed=4"],
     "tiny.seed is set by the runner per run (--seed-scope all)"),
    (["--task", "bandit", "--ablations", "softmax,softmax_vs_baseline", "--steps", "2"], "listed twice"),
    (["--task", "bandit", "--ablations", "baseline", "--steps", "2", "--assume-commit", "nonesuch"],
     "--assume-commit nonesuch: not a commit of the repository"),
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
    spec = {"task": "bandit", "config": "c", "steps": 3, "overrides": [], "seed_scope": "training",
            "ablations": {"baseline": []}}
    with pytest.raises(rx.ExperimentError, match="inside the experiment"):
        rx.check_output_dir(tmp_path / "exp" / "inner", spec)
    with pytest.raises(rx.ExperimentError, match="already holds another experiment"):
        rx.check_output_dir(tmp_path, spec)
    with pytest.raises(rx.ExperimentError, match="steps=3"):
        rx.check_output_dir(tmp_path / "exp", {**spec, "steps": 5})
    # an experiment.json from before --seed-scope ran with `training`: the same experiment, another scope is not
    rx.check_output_dir(tmp_path / "exp", spec)
    with pytest.raises(rx.ExperimentError, match="seed_scope='training'"):
        rx.check_output_dir(tmp_path / "exp", {**spec, "seed_scope": "all"})


# ------------------------------------------------------------------ the lock, cleanup of child jobs


def test_one_invocation_per_output_directory(tmp_path, capsys):
    out = tmp_path / "exp"
    out.mkdir()
    with rx.OutputLock(out):
        assert f"pid {__import__('os').getpid()}" in (out / rx.LOCK_FILE).read_text()
        with pytest.raises(rx.ExperimentError, match="is in use by another run_experiment.py \\(pid "):
            rx.OutputLock(out).__enter__()
        busy = run_cli("--task", "bandit", "--ablations", "baseline", "--steps", "2", "--out", str(out))
        assert busy.returncode == 2 and "is in use by another run_experiment.py" in busy.stderr
        assert not (out / rx.SPEC_FILE).exists()  # refused before writing anything
    assert not (out / rx.LOCK_FILE).exists()
    # a lock file whose holder died (no flock held on it) is taken over
    (out / rx.LOCK_FILE).write_text("pid 999999, started 2000-01-01 00:00:00")
    with rx.OutputLock(out):
        assert "taking over a stale lock left by a process that has exited (pid 999999" in capsys.readouterr().out


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that will not reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sleeper(job: rx.Job, pids: Path) -> subprocess.Popen:
    """A job that runs a child of its own (like torchrun's workers) and records both pids."""
    script = f"sleep 60 & echo $$ $! >> {pids}; wait"
    return subprocess.Popen(["sh", "-c", script], preexec_fn=rx._die_with_parent)


def test_an_error_in_the_scheduler_stops_the_running_jobs_and_their_children(tmp_path):
    jobs, pids = fake_jobs(tmp_path, 4), tmp_path / "pids"
    ticks = []

    def on_tick(js):
        ticks.append(1)
        if len(pids.read_text().split()) == 4 if pids.exists() else False:
            raise RuntimeError("the progress printer broke")

    with pytest.raises(RuntimeError, match="printer broke"):
        rx.schedule(jobs, ["cpu0", "cpu1"], lambda job, slot: sleeper(job, pids), on_tick, poll_seconds=0.05,
                    stop=lambda p: rx.stop_process(p, grace=2.0))
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 4 and not any(alive(p) for p in started)
    assert [j.status for j in jobs] == ["interrupted", "interrupted", "pending", "pending"]


DRIVER = """
import sys, time
sys.path.insert(0, {repo!r})
import run_experiment as rx
from pathlib import Path
jobs = rx.plan_jobs(["baseline"], {{"baseline": []}}, [1, 2], 4, Path({out!r}), "bandit")
def start(job, slot):
    import subprocess
    return subprocess.Popen(["sh", "-c", "sleep 60 & echo $$ $! >> {pids}; wait"], preexec_fn=rx._die_with_parent)
try:
    with rx.signals_raise():
        rx.schedule(jobs, ["cpu0", "cpu1"], start, poll_seconds=0.05)
except rx.Interrupted as e:
    print("interrupted", e.signum, [j.status for j in jobs], flush=True)
    sys.exit(143)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_running_jobs_and_their_children(tmp_path, sig):
    import signal
    import time

    pids = tmp_path / "pids"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), out=str(tmp_path), pids=pids)],
                              stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 4) and time.time() < deadline:
        time.sleep(0.05)
    started = [int(p) for p in pids.read_text().split()]
    assert all(alive(p) for p in started)
    driver.send_signal(getattr(signal, sig))
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 143 and f"interrupted {getattr(signal, sig).value} ['interrupted', 'interrupted']" in out
    assert not any(alive(p) for p in started)


# ------------------------------------------------------------------ end to end


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
    commit, dirty = rx.code_version()
    spec = json.loads((out / rx.SPEC_FILE).read_text())
    assert spec["seed_scope"] == "training" and set(spec["runs"]) == {f"{a}/seed{s}" for a in ("baseline", "softmax")
                                                                      for s in (1, 2)}
    assert spec["runs"]["softmax/seed2"]["commit"] == commit[:12] and spec["runs"]["softmax/seed2"]["dirty"] == dirty
    for ab in ("baseline", "softmax"):
        for seed in (1, 2):
            run = out / "runs" / ab / f"seed{seed}"
            assert (run / "logs" / "metrics.jsonl").is_file() and (run / "done.json").is_file()
            assert list((run / "logs").glob("events.out.tfevents.*"))
            assert json.loads((run / rx.RUN_RECORD).read_text())["launches"][0]["commit"] == commit
    per_seed = pd.read_csv(out / rx.PER_SEED_FILE)
    assert len(per_seed) == 4 and per_seed["commit"].eq(commit[:12]).all()
    # the credit figures are analyze_credit's for that run's log
    import analyze_credit as ac

    key = ac.compute_analysis(ac.load_credit_logs(out / "runs" / "softmax" / "seed1" / "credit"),
                              ac.load_tokenizer(tmp_path / "model")).key
    mine = per_seed[(per_seed["ablation"] == "softmax") & (per_seed["seed"] == 1)].iloc[0]
    for name in ("mean_abs_contribution", "mean_grad_proxy"):
        assert mine[name] == pytest.approx(key[name])
    assert "[1/4] baseline seed=1 on cpu0" in first.stdout
    second = run_cli(*args)
    assert second.returncode == 0 and "4 already finished" in second.stdout
    assert "running" not in second.stdout
    # a run directory gone, one more seed asked for: the gone run comes from per_seed.csv, only seed 3 runs
    import shutil

    shutil.rmtree(out / "runs" / "softmax" / "seed1")
    third = run_cli(*[a if a != "2" else "3" for a in args])
    assert third.returncode == 0, third.stdout + third.stderr
    assert "4 already finished (1 from per_seed.csv)" in third.stdout and "softmax seed=1 on" not in third.stdout
    assert pd.read_csv(out / "summary.csv")["n_seeds"].tolist() == [3, 3] and len(pd.read_csv(out / rx.PER_SEED_FILE)) == 6
    assert "From per_seed.csv (run directory absent): `softmax` seed 1." in (out / "summary.md").read_text()


@pytest.mark.slow
def test_seed_scope_all_and_old_runs_end_to_end(tmp_path):
    """--seed-scope all on the bandit (its policy is built per seed, at once); then an experiment directory as
    the runner before records left it (no run.json, no seed_scope, no per_seed.csv) is summarized without
    re-running anything, as unrecorded or at the commit --assume-commit names."""
    out = tmp_path / "exp"
    args = ["--task", "bandit", "--ablations", "baseline", "--seeds", "2", "--steps", "6", "--out", str(out),
            "--set", f"model.path={tmp_path / 'model'}", "--seed-scope", "all", "--no-credit"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "model_seed1" / "config.json").is_file() and (tmp_path / "model_seed2" / "config.json").is_file()
    run = json.loads((out / "runs" / "baseline" / "seed2" / rx.RUN_RECORD).read_text())
    assert (run["config"]["tiny"]["seed"], run["config"]["eval"]["seed"]) == (2, 2)
    assert "seed scope `all`" in (out / "summary.md").read_text() and "also sets tiny.seed = k" in (
        out / "summary.md").read_text()
    # make it look like an experiment from before records existed (which ran with the `training` scope)
    for seed in (1, 2):
        (out / "runs" / "baseline" / f"seed{seed}" / rx.RUN_RECORD).unlink()
    (out / rx.PER_SEED_FILE).unlink()
    old = json.loads((out / rx.SPEC_FILE).read_text())
    (out / rx.SPEC_FILE).write_text(json.dumps({k: old[k] for k in ("task", "config", "steps", "overrides",
                                                                     "ablations")}))
    refused = run_cli(*args)
    assert refused.returncode == 2 and "seed_scope='training'" in refused.stderr
    plain = [a for a in args if a not in ("--seed-scope", "all")]
    unnamed = run_cli(*plain)
    assert unnamed.returncode == 0 and "2 already finished" in unnamed.stdout, unnamed.stdout + unnamed.stderr
    assert f"`{rx.UNRECORDED}`: runs recorded before records existed" in unnamed.stdout
    parent = subprocess.run(["git", "-C", str(REPO), "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                            text=True).stdout.split()[0]  # the first commit: HEAD moves while others commit
    named = run_cli(*plain, "--assume-commit", parent[:7])
    assert named.returncode == 0, named.stdout + named.stderr
    assert pd.read_csv(out / rx.PER_SEED_FILE)["commit"].tolist() == [f"{parent[:12]} (assumed)"] * 2
    assert json.loads((out / rx.SPEC_FILE).read_text())["runs"]["baseline/seed1"]["commit"] == f"{parent[:12]} (assumed)"
    kept = run_cli(*plain)  # the assumed commit is kept in experiment.json for later invocations
    assert kept.returncode == 0 and f"`{parent[:12]} (assumed)`" in kept.stdout and rx.UNRECORDED not in kept.stdout
