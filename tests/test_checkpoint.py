"""Checkpoints on a bad day: a save killed mid-write (SIGKILL) leaves a hidden temporary directory that the next
start-up and every pruning remove; every file of a checkpoint is fsynced; a broken model directory, a resume
directory that is no checkpoint and other broken inputs are one line from train.py, never a traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import checkpoint as ckpt
import fileio
import train
import train_mitigations
import trainer
from conftest import random_model, run_config
from parts import config_from_dict

ROOT = Path(__file__).resolve().parent.parent


def save(ckpt_dir: Path, step: int, **kwargs) -> Path:
    model = random_model()
    return ckpt.save_checkpoint(ckpt_dir, step, model, torch.optim.AdamW(model.parameters()), {"sampler": {}},
                                **kwargs)


def leftovers(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------ a save killed mid-write


KILLED_SAVE = """
import sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch
import checkpoint
from conftest import random_model

model = random_model()
opt = torch.optim.AdamW(model.parameters())
checkpoint.save_checkpoint({ckpt_dir!r}, 1, model, opt, {{}})
real_save = torch.save

def stalled(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    print("WRITING", flush=True)
    time.sleep(120)  # SIGKILLed here, in the middle of the step-2 checkpoint

torch.save = stalled
checkpoint.save_checkpoint({ckpt_dir!r}, 2, model, opt, {{}})
"""


def test_a_save_killed_by_sigkill_leaves_a_hidden_directory_that_start_up_removes(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    code = KILLED_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), ckpt_dir=str(ckpt_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (left,) = leftovers(ckpt_dir)  # what the issue found: never pruned, ~40 GB at the 3B shape
    assert left.startswith(".step_000002.") and left.endswith(".tmp")
    assert (ckpt_dir / left / "model.safetensors").is_file()
    # the next start-up resolves the directory (trainer.resolve_resume, fresh or --resume): the leftover goes
    assert ckpt.latest_checkpoint(ckpt_dir) == ckpt_dir / "step_000001"
    assert leftovers(ckpt_dir) == [] and [p.name for p in ckpt_dir.iterdir()] == ["step_000001"]


def test_pruning_removes_leftovers_too(tmp_path):
    save(tmp_path, 1)
    for name in (".step_000002.k1ll3d.tmp", ".step_000003.x.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"0" * 1000)
    (tmp_path / ".step_000001.json.tmp").write_text("{}")  # not a checkpoint's leftover (a file): kept
    save(tmp_path, 2, keep_last_n=5)
    assert leftovers(tmp_path) == [".step_000001.json.tmp"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2]


def test_a_checkpoint_moved_aside_whose_replacement_never_landed_is_restored(tmp_path):
    """Killed between atomic_write_dir's two renames: `.step_N.old` is the only whole copy of step N."""
    first = save(tmp_path, 1)
    first.rename(tmp_path / ".step_000001.old")
    (tmp_path / ".step_000001.half.tmp").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == first
    assert ckpt.read_checkpoint(first).step == 1 and leftovers(tmp_path) == []
    save(tmp_path, 2)
    shutil.copytree(first, tmp_path / ".step_000001.old")  # step 1 exists as well: the copy is garbage
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000002" and leftovers(tmp_path) == []


def test_resume_at_start_up_removes_a_leftover_and_continues(tiny_assets, tmp_path):
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 1, "ckpt_save_interval": 1})
    trainer.train(config_from_dict(cfg))
    stale = tmp_path / "ckpt" / ".step_000002.abcd1234.tmp"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    assert trainer.resolve_resume(config_from_dict(cfg), True) == tmp_path / "ckpt" / "step_000001"
    assert not stale.exists()  # at start-up, before any step or save
    stale.mkdir()
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    # `--resume training.max_steps=2`: the newest checkpoint and an override, not a checkpoint named so
    assert train.main(["--config", str(cfg_file), "--resume", "training.max_steps=2"]) == 0
    assert not stale.exists()
    assert ckpt.read_checkpoint(ckpt.latest_checkpoint(tmp_path / "ckpt")).step == 2


def test_a_fresh_run_removes_the_leftover_of_a_first_save_that_was_killed(tiny_assets, tmp_path):
    (tmp_path / "ckpt" / ".step_000001.abcd1234.tmp").mkdir(parents=True)
    assert trainer.resolve_resume(config_from_dict(run_config(tiny_assets, tmp_path)), None) is None
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_every_file_of_a_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(fileio.os, "fsync", record)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "tokenizer.json").write_text("{}")
    path = save(tmp_path / "ckpt", 3, tokenizer_dir=model_dir, extra_tensors={"head": {"w": torch.ones(2)}})
    files = {p.name for p in path.iterdir()}
    assert files == {"config.json", "model.safetensors", "optimizer.pt", "rng_state.pt", "trainer_state.json",
                     "tokenizer.json", "head.safetensors"}
    for name in files:  # each written under a temporary name (atomic_write), fsynced, then renamed
        assert any(f"/.{name}." in s and s.endswith(".tmp") for s in synced), name
    names = [Path(s).name for s in synced]
    assert any(re.fullmatch(r"\.step_000003\.[^.]+\.tmp", n) for n in names)  # the directory, before its rename
    assert str(tmp_path / "ckpt") in synced  # its parent, after it


# ------------------------------------------------------------------ broken inputs: one line from train.py


@pytest.fixture
def model_copy(tiny_assets, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_assets["model"], tmp_path / "model"))


def run_train(tiny_assets, tmp_path, capsys, *args: str, model: Path | None = None) -> tuple[int, str]:
    cfg = run_config(tiny_assets, tmp_path / "run", training={"max_steps": 1})
    if model is not None:
        cfg["model"]["path"] = str(model)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    code = train.main(["--config", str(cfg_file), *args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "key 'model_type' = 'llama' is not supported; supported: qwen2, qwen3"),
    ({"vocab_size": None}, "required key 'vocab_size' is missing"),
    ({"hidden_size": "32"}, "key 'hidden_size' must be a positive integer, got '32'"),
    ({"num_key_value_heads": 3}, "must be a multiple of num_key_value_heads=3"),
])
def test_a_model_config_json_that_is_not_ours_is_one_line(model_copy, tiny_assets, tmp_path, capsys, change,
                                                          message):
    edit_json(model_copy / "config.json", **change)
    code, err = run_train(tiny_assets, tmp_path, capsys, model=model_copy)
    assert code == 1 and err.startswith(f"error: {model_copy / 'config.json'}: ") and message in err


@pytest.mark.parametrize("name, damage, message", [
    ("config.json", lambda b: b[: len(b) // 2], "config.json: not valid JSON"),
    ("config.json", lambda b: b"\xff\xfe" + b, "config.json: not valid JSON"),
    ("model.safetensors", lambda b: b[: len(b) // 2], "model.safetensors: not a readable safetensors file"),
    ("model.safetensors", lambda b: b"garbage" * 10, "model.safetensors: not a readable safetensors file"),
])
def test_a_damaged_model_file_is_one_line_naming_it(model_copy, tiny_assets, tmp_path, capsys, name, damage,
                                                    message):
    path = model_copy / name
    path.write_bytes(damage(path.read_bytes()))
    code, err = run_train(tiny_assets, tmp_path, capsys, model=model_copy)
    assert code == 1 and message in err and "download or copy it again" in err


def test_a_resume_directory_that_is_no_checkpoint_says_what_is_missing(tiny_assets, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run_train(tiny_assets, tmp_path, capsys, "--resume", str(tmp_path / "empty"))
    assert code == 1 and "not a training checkpoint" in err
    assert "config.json, model.safetensors, tokenizer.json, optimizer.pt, rng_state.pt, trainer_state.json " \
           "missing" in err
    assert "download" not in err.lower() and "3B" not in err  # it asked to resume, not for weights
    half = Path(shutil.copytree(tiny_assets["model"], tmp_path / "half"))  # a model, not a training checkpoint
    code, err = run_train(tiny_assets, tmp_path, capsys, "--resume", str(half))
    assert code == 1 and "optimizer.pt, rng_state.pt, trainer_state.json missing" in err
    code, err = run_train(tiny_assets, tmp_path, capsys, "--resume", str(tmp_path / "nowhere"))
    assert code == 1 and "no such directory" in err


def test_a_damaged_trainer_state_is_one_line(tiny_assets, tmp_path, capsys):
    cfg = run_config(tiny_assets, tmp_path / "run", training={"max_steps": 1, "ckpt_save_interval": 1})
    trainer.train(config_from_dict(cfg))
    state = tmp_path / "run" / "ckpt" / "step_000001" / "trainer_state.json"
    state.write_text('{"step": ')
    code, err = run_train(tiny_assets, tmp_path, capsys, "--resume", "training.max_steps=2")
    assert code == 1 and "trainer_state.json: not a readable trainer state" in err


@pytest.mark.parametrize("text", ["- model\n- training\n", "[1, 2]\n", "just a string\n"])
def test_a_yaml_whose_top_level_is_not_a_mapping_is_one_line(tmp_path, capsys, text):
    cfg_file = tmp_path / "list.yaml"
    cfg_file.write_text(text)
    for overrides in ([], ["training.max_steps=3"]):  # with an override it raised AttributeError before
        assert train.main(["--config", str(cfg_file), *overrides]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "the top level must be a mapping of sections" in err, err


def test_a_boolean_flag_of_a_weighter_takes_true_or_false_only(capsys):
    with pytest.raises(SystemExit) as stop:
        train_mitigations.main(["--mitigation", "attribution", "--detach_hidden", "yes", "--print-config"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "argument --detach_hidden: expected true or false, got 'yes'" in err
    assert train_mitigations.main(["--mitigation", "attribution", "--detach-hidden", "False", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["attribution"]["detach_hidden"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_bench_rollout_on_cuda_without_cuda_is_one_line():
    out = subprocess.run([sys.executable, "bench/bench_rollout.py", "--device", "cuda", "--repeats", "1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "argument --device: 'cuda': CUDA is not available on this machine" in out.stderr
    assert out.stdout == ""
