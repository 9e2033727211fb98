"""torchrun on CPU (gloo, 2 processes): the same update, the same episodes and checkpoints that move between
any number of ranks. Each multi-process case is a real `python -m torch.distributed.run` launch."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

import distributed
import trainer
from config import ConfigError
from conftest import run_config
from distributed import Dist
from parts import config_from_dict
from qwen2_model import Transformer

REPO = Path(__file__).resolve().parents[1]


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("n, world", [(10, 2), (9, 2), (1, 2), (0, 3), (7, 3), (128, 4)])
def test_shards_are_contiguous_balanced_and_in_rank_order(n, world):
    parts = [distributed.shard(n, Dist(rank=r, world_size=world)) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    part, count = distributed.split_work(n, Dist(rank=world - 1, world_size=world))
    assert count == max(map(len, parts)) and part == parts[-1]


def test_one_process_gets_a_no_op_dist():
    d = distributed.init(torch.device("cpu"))
    assert (d.rank, d.world_size, d.enabled) == (0, 1, False)
    assert distributed.gather([1, 2], d) == [1, 2] and distributed.all_sum(2.5, d) == 2.5


def test_more_ranks_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(distributed.DistributedError, match="sees 2 GPU"):
        distributed.init(torch.device("cuda"))


def test_unknown_strategy_is_a_config_error(tiny_assets, tmp_path):
    with pytest.raises(ConfigError, match="strategy"):
        config_from_dict(run_config(tiny_assets, tmp_path, distributed={"strategy": "zero3"}))


@pytest.mark.slow
def test_two_ranks_update_equals_one_process(tmp_path):
    """DDP and FSDP2, token-mean and seq-mean-token-mean, PPO with two iterations, uneven micro-batch counts,
    groups sharing prompts, the attribution head, teacher forcing and activation checkpointing: after one update the weights (the head's too), the gathered
    per-token log-probs equal a single process's within 1e-6 and every metric within 1e-5 (SGD, lr 1: the
    change is the gradient)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import dist_worker

    out = tmp_path / "two_ranks.pt"
    torchrun("tests/dist_worker.py", str(out))
    two = torch.load(out, weights_only=False)
    initial = dist_worker.make_model().state_dict()
    for case in dist_worker.CASES:
        one = dist_worker.run_case(case, Dist())
        assert one.keys() == two[case].keys(), case
        for name, value in one.items():  # metrics are sums over ranks in another order: 1e-5
            tol = 1e-5 if name.startswith("_metric.") else 1e-6
            assert torch.allclose(two[case][name], value, atol=tol, rtol=0), (case, name, two[case][name] - value)
        moved = max(float((one[k] - initial[k]).abs().max()) for k in initial)
        assert moved > 1e-3, case  # the update did something


def _config(tiny_assets, out: Path, **training) -> dict:
    cfg = run_config(tiny_assets, out, training={"max_steps": 3, "ckpt_save_interval": 1, **training})
    cfg["training"]["micro_batch_size"] = 4
    return cfg


def _write(cfg: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "ckpt" / f"step_{step:06d}" / "model.safetensors"))


def _close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=tol, rtol=0) for k in a)


def _tokens(run_dir: Path) -> pd.DataFrame:
    return trainer_credit(run_dir)[["step", "episode_idx", "position", "token_id", "advantage"]]


def trainer_credit(run_dir: Path) -> pd.DataFrame:
    files = sorted((run_dir / "credit").glob("credit_logs_step_*.pkl"))
    frame = pd.concat([pd.read_pickle(f) for f in files], ignore_index=True)
    return frame.drop_duplicates(["step", "episode_idx", "position"]).reset_index(drop=True)


@pytest.mark.slow
def test_torchrun_two_ranks_train_like_one_process_and_checkpoints_move_between_them(tiny_assets, tmp_path):
    """`torchrun --nproc_per_node 2 train.py` (DDP, then FSDP2): the step-1 (and step-2) episodes equal one
    process's, rank 0 alone writes one metrics row per step and full HF checkpoints, and checkpoints
    resume across world sizes both ways (2 ranks -> 1 process, 1 process -> 2 ranks)."""
    one = tmp_path / "one"
    trainer.train(config_from_dict(_config(tiny_assets, one)))

    ddp = tmp_path / "ddp"
    proc = torchrun("train.py", "--config", _write(_config(tiny_assets, ddp, max_steps=2), tmp_path / "ddp.yaml"))
    assert proc.stdout.count("done: step 2") == 1 and proc.stdout.count("step 1/2 |") == 1  # rank 0 reports
    step1 = _tokens(one).query("step == 1")
    assert len(step1) > 0 and step1.equals(_tokens(ddp).query("step == 1"))
    assert _tokens(one).query("step <= 2").equals(_tokens(ddp))
    rows = [yaml.safe_load(line)["step"] for line in (ddp / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]
    assert _close(_weights(one, 2), _weights(ddp, 2))
    Transformer.from_pretrained(ddp / "ckpt" / "step_000002")  # a full model directory

    fsdp = tmp_path / "fsdp"  # 2 ranks (FSDP2) for two steps, then resumed by one process
    cfg = _config(tiny_assets, fsdp, max_steps=2)
    cfg["distributed"] = {"strategy": "fsdp"}
    torchrun("train.py", "--config", _write(cfg, tmp_path / "fsdp.yaml"))
    assert _close(_weights(one, 2), _weights(fsdp, 2))
    cfg["training"]["max_steps"] = 3
    trainer.train(config_from_dict(cfg), resume=True)
    assert _close(_weights(one, 3), _weights(fsdp, 3))

    back = tmp_path / "back"  # one process's step-2 checkpoint resumed by 2 ranks (FSDP2)
    shutil.copytree(one, back)
    shutil.rmtree(back / "ckpt" / "step_000003")
    cfg = _config(tiny_assets, back)
    cfg["distributed"] = {"strategy": "fsdp"}
    torchrun("train.py", "--config", _write(cfg, tmp_path / "back.yaml"), "--resume")
    assert _close(_weights(one, 3), _weights(back, 3))
    assert _tokens(one).equals(_tokens(back))


@pytest.mark.slow
def test_fsdp_with_bf16_weights_keeps_fp32_master_weights_and_resumes_on_one_process(tiny_assets, tmp_path):
    """FSDP2 shards AdamW's fp32 moments and master weights like the bf16 weights; the checkpoint holds them
    whole (the single-process layout), and one process resumes from it."""
    out = tmp_path / "bf16"
    cfg = _config(tiny_assets, out, max_steps=2)
    cfg["model"]["dtype"] = "bfloat16"
    cfg["distributed"] = {"strategy": "fsdp"}
    torchrun("train.py", "--config", _write(cfg, tmp_path / "bf16.yaml"))
    state = torch.load(out / "ckpt" / "step_000002" / "optimizer.pt", weights_only=False)["state"]
    weights = _weights(out, 2)
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    embed = state[0]  # the first parameter: the embedding table, whole
    assert embed["master"].dtype == torch.float32 and embed["master"].shape == weights["model.embed_tokens.weight"].shape
    assert torch.equal(embed["master"].to(torch.bfloat16), weights["model.embed_tokens.weight"])
    cfg["training"]["max_steps"] = 3
    result = trainer.train(config_from_dict(cfg), resume=True)
    assert result.step == 3 and (out / "ckpt" / "step_000003" / "model.safetensors").is_file()


def _signal_masks(pid: int) -> dict[str, int]:
    """The blocked / ignored / caught signal masks of a process (from /proc/PID/status)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v, 16) for k, v in (line.split(":\t") for line in lines if line.startswith(("SigBlk", "SigIgn", "SigCgt")))}


def _worker_of_rank(agent_pid: int, rank: int) -> int | None:
    """pid of the torchrun worker with this RANK among the children of the torchrun agent `agent_pid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tiny_assets, tmp_path):
    out = tmp_path / "sig"
    cfg = _config(tiny_assets, out, max_steps=500, ckpt_save_interval=1000)
    path = _write(cfg, tmp_path / "sig.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "train.py", "--config", path], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.is_file() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.5)
    worker = _worker_of_rank(proc.pid, rank=1)
    assert worker is not None
    masks = _signal_masks(worker)
    if masks["SigBlk"] & (1 << (signal.SIGTERM - 1)):  # inherited from whatever started the tests
        proc.kill()
        proc.communicate()
        pytest.skip(f"SIGTERM is blocked for processes started here ({masks}): it could never arrive")
    assert masks["SigCgt"] & (1 << (signal.SIGTERM - 1)), masks  # train.py's handler is in place
    os.kill(worker, signal.SIGTERM)  # one rank only, as a node-local preemption would
    output, _ = proc.communicate(timeout=300)
    said = [line for line in output.splitlines() if "[signal]" in line or line.startswith("done:")]
    if "SIGTERM received" not in output and proc.returncode == 0:
        # the handler never ran: the signal did not reach the process (seen once under heavy load); what this
        # test is about, every rank stopping at the same step once a rank has it, was not exercised
        pytest.skip(f"SIGTERM never reached train.py's handler (masks before: {masks}; {said})")
    assert proc.returncode == 0, output[-3000:]
    assert output.count("[signal] stopped after step") == 1, said  # rank 0 reports
    ckpts = sorted((out / "ckpt").glob("step_*"))
    last = max(yaml.safe_load(line)["step"] for line in metrics.read_text().splitlines())
    assert len(ckpts) == 1 and ckpts[0].name == f"step_{last:06d}" and 3 <= last < 500
    cfg["training"]["max_steps"] = last + 1  # and one process carries on from it
    assert trainer.train(config_from_dict(cfg), resume=True).step == last + 1

