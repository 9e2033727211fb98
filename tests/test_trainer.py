"""End-to-end runs of the training loop on a tiny random model (CPU): logging, checkpoints, resume,
signals, the non-finite guard and determinism."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml

import checkpoint as ckpt
import grpo
import rollout
import train
import trainer
import update
from conftest import run_config
from parts import config_from_dict
from qwen2_model import Transformer

REPO = Path(__file__).resolve().parent.parent


def read_metrics(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def credit_rows(directory: Path) -> pd.DataFrame:
    """A run's credit-log rows: its step files, each holding one interval's rows once (whatever the final file
    holds)."""
    return pd.concat([pd.read_pickle(f) for f in sorted(directory.glob("credit_logs_step_*.pkl"))], ignore_index=True)


def untimed(metrics: dict) -> dict:
    """A step's metrics without its wall-clock timings: what two equal runs must log alike."""
    return {k: v for k, v in metrics.items() if not k.startswith(("duration", "tokens_per_s"))}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(path, dtype=torch.float32).state_dict()


def test_three_steps_write_events_metrics_and_a_reference_loadable_checkpoint(tiny_assets, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 3},
                                      eval={"transfer_num_numbers": [4], "transfer_problems": 4}))
    result = trainer.train(cfg)
    assert result.step == 3 and result.checkpoint == tmp_path / "ckpt" / "step_000003"

    rows = read_metrics(tmp_path / "logs")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for key in ("loss", "reward/mean", "reward/std", "success_rate/train", "format_reward/train", "grad_norm",
                "entropy", "response_length", "finished_frac", "clip_frac", "groups/zero_variance_frac", "rollout_logprob_gap",
                "advantage/mean", "advantage/std", "advantage/max", "advantage/ess", "duration/step", "tokens_per_s"):
        assert key in rows[1], key
    assert "success_rate/eval" in rows[0] and "success_rate/eval" in rows[2] and "success_rate/eval" in rows[3]
    assert "success_rate/eval" not in rows[1]
    assert "success_rate/transfer" in rows[0] and "success_rate/transfer_4num" in rows[3]
    assert "success_rate/eval_3num" in rows[0] and "success_rate/eval_4num" not in rows[0]
    assert list((tmp_path / "logs").glob("events.out.tfevents.*"))

    ours = Transformer.from_pretrained(result.checkpoint, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(result.checkpoint, dtype=torch.float32)
    tokens = torch.tensor([[5, 9, 30, 41, 12, 3]])
    with torch.no_grad():
        assert (ours(tokens) - ref(tokens).logits).abs().max() < 1e-4
    assert (result.checkpoint / "tokenizer.json").is_file()
    # the policy actually changed
    start = weights(tiny_assets["model"])
    assert any(not torch.equal(start[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_the_24gb_configs_memory_settings_train_and_resume(tiny_assets, tmp_path, device):
    """config_24GB.yaml's memory settings on the tiny random model: bf16, activation checkpointing, AdamW state
    offloaded, the rollout's cache released for the update, rollouts in calls of one group (on CUDA also the
    compiled decode step). Every update is finite and moves the weights; a resumed run ends where a whole one
    does (bit for bit on CPU)."""
    def config(out: Path, steps: int):
        return config_from_dict(run_config(
            tiny_assets, out, model={"device": device.type, "dtype": "bfloat16", "gradient_checkpointing": True,
                                     "release_rollout_cache": True},
            training={"optimizer": "adamw_offload", "rollout_batch_size": 4, "max_steps": steps}))
    result = trainer.train(config(tmp_path / "whole", 3))
    assert result.step == 3
    rows = read_metrics(tmp_path / "whole" / "logs")
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows[1:])
    assert not any(r.get("nonfinite_skipped") or r.get("update_skipped_no_groups") for r in rows)
    start, end = weights(tiny_assets["model"]), weights(result.checkpoint)
    assert any(not torch.equal(start[k], v) for k, v in end.items())
    trainer.train(config(tmp_path / "halves", 2))
    resumed = trainer.train(config(tmp_path / "halves", 3), resume=True)
    assert resumed.step == 3
    if device.type == "cpu":
        again = weights(resumed.checkpoint)
        assert all(torch.equal(again[k], v) for k, v in end.items())


def test_resume_is_bit_identical_and_logs_continue_without_gaps(tiny_assets, tmp_path):
    full = config_from_dict(run_config(tiny_assets, tmp_path / "full"))
    trainer.train(full)

    half_dir = tmp_path / "half"
    trainer.train(config_from_dict(run_config(tiny_assets, half_dir, training={"max_steps": 2})))
    trainer.train(config_from_dict(run_config(tiny_assets, half_dir)), resume=True)

    a, b = weights(tmp_path / "full" / "ckpt" / "step_000004"), weights(half_dir / "ckpt" / "step_000004")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_metrics(tmp_path / "full" / "logs"), read_metrics(half_dir / "logs")
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        for key in ("reward/mean", "loss", "success_rate/train", "advantage/mean"):
            assert ra.get(key) == rb.get(key), (ra["step"], key)
    ca, cb = credit_rows(tmp_path / "full" / "credit"), credit_rows(half_dir / "credit")
    assert sorted(cb["step"].unique()) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(ca, cb)


def test_a_resumed_run_keeps_copying_the_tokenizer_after_its_source_checkpoint_is_pruned(tiny_assets, tmp_path):
    """A resumed run copied the tokenizer from the checkpoint it resumed from; once pruning removed that one,
    later checkpoints had no tokenizer.json and were no usable model directory (credit_truth failed on them)."""
    keep_one = {"ckpt_save_interval": 1, "keep_last_n": 1}
    trainer.train(config_from_dict(run_config(tiny_assets, tmp_path, training={**keep_one, "max_steps": 1})))
    trainer.train(config_from_dict(run_config(tiny_assets, tmp_path, training=keep_one)), resume=True)
    (last,) = sorted((tmp_path / "ckpt").glob("step_*"))
    assert last.name == "step_000004"
    assert (last / "tokenizer.json").read_bytes() == (Path(tiny_assets["model"]) / "tokenizer.json").read_bytes()


def test_resume_after_a_crash_redoes_the_lost_steps_once(tiny_assets, tmp_path):
    """A run that died after step 3 (checkpoint at 2) left metrics and credit rows for step 3:
    resuming removes them and redoes step 3, so nothing is duplicated."""
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 3, "ckpt_save_interval": 2},
                                      credit={"credit_save_interval": 1}))
    trainer.train(cfg)
    ckpt_dir = tmp_path / "ckpt"
    import shutil
    shutil.rmtree(ckpt_dir / "step_000003")  # as if the crash came before the step-3 checkpoint
    (tmp_path / "credit" / "credit_logs_final.pkl").unlink()
    trainer.train(config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 3})), resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "logs")] == [0, 1, 2, 3]
    credit = credit_rows(tmp_path / "credit")
    per_step = credit.groupby("step")["episode_idx"].nunique()
    assert per_step.to_dict() == {1: 12, 2: 12, 3: 12}
    assert credit.groupby("episode_idx")["step"].nunique().max() == 1  # no episode logged twice


def test_crash_during_a_checkpoint_write_leaves_the_previous_one_loadable(tiny_assets, tmp_path, monkeypatch):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 2, "ckpt_save_interval": 1}))
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if "step_000002" in str(Path(f).parent.name) or ".step_000002." in str(f):
            raise OSError("simulated crash while writing the optimizer state")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "step_000001"
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_000001"]  # no half-written leftovers
    Transformer.from_pretrained(tmp_path / "ckpt" / "step_000001")
    result = trainer.train(cfg, resume=True)
    assert result.step == 2


def test_keep_last_n_checkpoints(tiny_assets, tmp_path):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 4, "ckpt_save_interval": 1,
                                                                        "keep_last_n": 2}))
    trainer.train(cfg)
    assert [p.name for p in sorted((tmp_path / "ckpt").iterdir())] == ["step_000003", "step_000004"]


def test_non_finite_updates_are_skipped_then_abort(tiny_assets, tmp_path, monkeypatch):
    real = grpo.compute_advantages
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        adv = real(*args, **kwargs)
        return adv if calls["n"] == 1 else adv * float("nan")  # step 1 fine, then NaN forever

    monkeypatch.setattr(grpo, "compute_advantages", poisoned)
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={
        "max_steps": 10, "ckpt_save_interval": 1, "max_nonfinite_steps": 2}))
    with pytest.raises(trainer.NonFiniteError, match="2 consecutive updates") as err:
        trainer.train(cfg)
    assert "step_000002" in str(err.value)  # the last good checkpoint is named
    rows = read_metrics(tmp_path / "logs")
    assert [r.get("nonfinite_skipped") for r in rows[1:]] == [None, 1.0, 1.0]
    # the skipped update did not touch the weights: the step-2 checkpoint equals the step-1 one
    w1, w2 = weights(tmp_path / "ckpt" / "step_000001"), weights(tmp_path / "ckpt" / "step_000002")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_deterministic_mode_gives_identical_metrics(tiny_assets, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = config_from_dict(run_config(tiny_assets, tmp_path / name, training={"max_steps": 2, "deterministic": True}))
        trainer.train(cfg)
        runs.append([untimed(r) for r in read_metrics(tmp_path / name / "logs")])
    torch.use_deterministic_algorithms(False)
    assert runs[0] == runs[1]


def test_a_released_rollout_cache_is_gone_during_the_update_and_changes_no_result(tiny_assets, tmp_path, monkeypatch):
    real_update = update.update_policy
    caches_in_update = []

    def spy(model, *args, **kwargs):
        caches_in_update.append([layer.self_attn.kv_cache for layer in model.model.layers])
        return real_update(model, *args, **kwargs)

    monkeypatch.setattr(update, "update_policy", spy)
    runs = []
    for release in (False, True):
        out = tmp_path / str(release)
        cfg = config_from_dict(run_config(tiny_assets, out, model={"release_rollout_cache": release},
                                          training={"max_steps": 3, "eval_interval": 2}))
        trainer.train(cfg)
        runs.append([untimed(r) for r in read_metrics(out / "logs")])
    kept, released = caches_in_update[:3], caches_in_update[3:]
    assert all(c is not None for step in kept for c in step)  # kept: the cache lives through the update
    assert all(c is None for step in released for c in step)
    assert runs[0] == runs[1]  # the same rollouts, updates and evaluations


def test_a_capped_rollout_batch_samples_the_same_completions_in_a_smaller_cache(tiny_assets, tmp_path, monkeypatch):
    real_update = update.update_policy
    completions = []

    def spy(model, optimizer, episodes, *args, **kwargs):
        completions.append([e.generated_token_ids for e in episodes])
        return real_update(model, optimizer, episodes, *args, **kwargs)

    monkeypatch.setattr(update, "update_policy", spy)
    runs, rows = [], []
    for cap in (None, 4):  # all 12 completions in one call, or one group of 4 per call
        out = tmp_path / str(cap)
        cfg = config_from_dict(run_config(tiny_assets, out, training={"rollout_batch_size": cap, "eval_interval": 100}))
        run = trainer.setup(cfg, resume=None)
        runs.append([trainer.train_step(run, s) for s in (1, 2, 3)])
        rows.append(run.engine.capacity[0])
    assert completions[:3] == completions[3:]
    assert rows == [16, 8]  # the cache holds 12 rows (rounded up to 8s), then 4
    for a, b in zip(*runs):
        for k in untimed(a):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k


def test_config_errors_come_before_any_model_is_loaded(tmp_path, capsys):
    missing_model = tmp_path / "nowhere"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"path": str(missing_model)}}))
    assert train.main(["--config", str(cfg_file), "training.max_stepz=3"]) == 2
    assert "training.max_stepz" in capsys.readouterr().err
    assert train.main(["--config", str(cfg_file), "algorithm.adv_eps=0"]) == 2
    assert "adv_eps" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_config_without_cuda_is_an_error_not_a_traceback(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"model": {"path": str(tmp_path / "nowhere"), "device": "cuda"}}))
    assert train.main(["--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert "model.device='cuda'" in err and "model.device=cpu" in err and "Traceback" not in err


def test_missing_model_directory_says_how_to_get_weights(tiny_assets, tmp_path):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, model={"path": str(tmp_path / "Qwen2.5-3B-Instruct")}))
    with pytest.raises(ValueError, match="git clone|huggingface"):
        trainer.train(cfg)


def test_sigterm_finishes_the_step_checkpoints_and_resumes(tiny_assets, tmp_path):
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 500, "ckpt_save_interval": 1000,
                                                      "eval_interval": 1000})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(cfg_file)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = tmp_path / "logs" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "--resume" in out
    last = ckpt.latest_checkpoint(tmp_path / "ckpt")
    assert last is not None
    step = ckpt.read_checkpoint(last).step
    assert 2 <= step < 500
    assert [r["step"] for r in read_metrics(tmp_path / "logs")] == list(range(step + 1))
    cfg["training"]["max_steps"] = step + 1
    result = trainer.train(config_from_dict(cfg), resume=True)
    assert result.step == step + 1
    assert [r["step"] for r in read_metrics(tmp_path / "logs")] == list(range(step + 2))


def test_a_fresh_run_never_overwrites_an_existing_one(tiny_assets, tmp_path, capsys):
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 1})
    trainer.train(config_from_dict(cfg))
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(cfg_file)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step_000001"


def test_bad_inputs_are_one_line_errors_not_tracebacks(tiny_assets, tmp_path, capsys):
    cfg = run_config(tiny_assets, tmp_path, data={"path": str(tmp_path / "no_data")})
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    assert train.main(["--config", str(cfg_file)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "hf download" in err
    assert train.main(["--config", str(cfg_file), f"data.path={tiny_assets['data']}",
                       f"model.path={tmp_path / 'Qwen2.5-3B-Instruct'}"]) == 1
    assert "Qwen2.5-3B-Instruct" in capsys.readouterr().err


def _fake_rollout(informative: set[int]):
    """A rollout stand-in: question q's group has rewards [1, 0, 0, ...] if q is informative, else all 0."""
    def rollout(model, tokenizer, problems, prompts, reward_fn, num_answers_per_question, *args, **kwargs):
        from data_types import Episode
        g = num_answers_per_question
        return [Episode(prompt=str(p), prompt_token_ids=[1], generated_token_ids=[2], text="",
                        reward=float(p in informative and j == 0), reward_info={"answer_reward": 0.0, "format_reward": 0.0},
                        finished=True, group_idx=q, problem=p) for q, p in enumerate(problems) for j in range(g)]
    return rollout


class _Problems:
    """A stand-in task: problems are ints, prompts their text, rewards come from the fake rollout."""

    answer_tag = None

    def prompt(self, p):
        return str(p)

    def reward(self, p, text):
        raise AssertionError("the fake rollout scores episodes itself")


def _fake_run(cfg, train_set):
    return SimpleNamespace(config=cfg, task=_Problems(), train_set=train_set, model=None, tokenizer=None,
                           engine=None, sampler=trainer.QuestionSampler(len(train_set), 0), dist=trainer.Dist())


@pytest.mark.parametrize("rounds_allowed, expect_groups", [(10, 4), (2, 2)])
def test_dynamic_sampling_fills_the_batch_with_informative_groups_or_says_it_stopped(
        tiny_assets, tmp_path, monkeypatch, capsys, rounds_allowed, expect_groups):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"num_questions_per_batch": 4},
                                      algorithm={"dynamic_sampling": True, "max_sampling_rounds": rounds_allowed}))
    train_set = list(range(40))
    informative = {q for q in train_set if q % 4 == 0}  # one informative question in four
    monkeypatch.setattr(rollout, "rollout", _fake_rollout(informative))
    episodes, metrics = trainer.collect_groups(_fake_run(cfg, train_set), 1)
    g = cfg.training.num_answers_per_question
    rewards = trainer.group_rewards(episodes, g)
    assert rewards.shape == (expect_groups, g) and len(episodes) == expect_groups * g
    assert all(e.problem in informative for e in episodes)
    assert [e.group_idx for e in episodes] == [i // g for i in range(len(episodes))]
    assert (rewards.std(-1) > 0).all()
    assert metrics["sampling/informative_groups"] == expect_groups
    rounds = metrics["sampling/rounds"]
    assert rounds >= 2
    assert metrics["groups/zero_variance_frac"] == pytest.approx(1 - 1 / 4, abs=0.26)
    said = capsys.readouterr().out
    assert ("after 2 rounds" in said) == (rounds_allowed == 2)


def test_without_dynamic_sampling_zero_variance_groups_are_counted_and_kept(tiny_assets, tmp_path, monkeypatch):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"num_questions_per_batch": 4}))
    monkeypatch.setattr(rollout, "rollout", _fake_rollout({0}))
    episodes, metrics = trainer.collect_groups(_fake_run(cfg, list(range(8))), 1)
    assert len(episodes) == 4 * cfg.training.num_answers_per_question
    assert metrics["groups/zero_variance_frac"] == (3 / 4 if 0 in {e.problem for e in episodes} else 1.0)
    assert "sampling/rounds" not in metrics


@pytest.mark.parametrize("loss_name", sorted(grpo.POLICY_LOSSES))
def test_every_policy_loss_trains_end_to_end(tiny_assets, tmp_path, loss_name):
    cfg = config_from_dict(run_config(tiny_assets, tmp_path, training={"max_steps": 2},
                                      algorithm={"policy_loss": loss_name, "num_iterations": 2,
                                                 "overlong_buffer_len": 4}))
    result = trainer.train(cfg)
    rows = read_metrics(tmp_path / "logs")
    assert result.step == 2 and all(math.isfinite(rows[-1][k]) for k in ("loss", "grad_norm", "rollout_logprob_gap"))
    assert rows[-1]["clip_frac"] == 0.0  # recompute: the first pass's ratio is exactly 1
    assert ("clip_frac/later_iterations" in rows[-1]) == grpo.POLICY_LOSSES.get(loss_name).uses_ratio


def test_a_signal_that_lands_during_the_stop_all_reduce_is_not_lost(tiny_assets, tmp_path, monkeypatch):
    """On a waiting rank the SIGTERM handler often runs while the stop flag is being all-reduced; its flag must
    survive that call (it once was overwritten by the call's stale result, and the run went on to the end)."""
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 6, "ckpt_save_interval": 100})
    calls = []
    real = trainer.distributed.all_sum

    def all_sum_signalled_midway(value, dist):
        calls.append(value)
        if len(calls) == 2:  # step 2: the flag was read as 0, then the signal arrives inside the collective
            os.kill(os.getpid(), signal.SIGTERM)
        return real(value, dist)
    monkeypatch.setattr(trainer.distributed, "all_sum", all_sum_signalled_midway)
    result = trainer.train(config_from_dict(cfg))
    assert result.stopped_by_signal and result.step == 3  # the next step's all-reduce carries it
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "ckpt")).step == 3
