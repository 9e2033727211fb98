"""Training checkpoints: an HF-format model directory plus everything needed to resume exactly.

Layout of `ckpt_dir/step_000123/`:
    config.json, model.safetensors          the policy, loadable by transformers and by qwen2_model
    tokenizer.json, tokenizer_config.json   copied from the model directory, so the folder is a usable model
    optimizer.pt                            optimizer state (also the CPU-offloaded AdamW's)
    attribution_head.safetensors            the learned attribution head, when used
    trainer_state.json                      step, data order position, credit logger position, ...
    rng_state.pt                            every RNG state (torch CPU/CUDA, numpy, random)

A checkpoint is built under a temporary name (`.step_000123.*.tmp`), every file fsynced, and renamed into
place, so a crash mid-write never leaves a broken `step_*` directory; only complete ones carry that name. What
a crash (SIGKILL, power loss) does leave, the hidden temporary directory, is removed the next time the
checkpoint directory is resolved (`latest_checkpoint`: every start-up) and whenever old checkpoints are pruned.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fileio import atomic_write, atomic_write_dir, ensure_free_space
from qwen2_model import CheckpointError

CKPT_DIR = re.compile(r"^step_(\d+)$")
# what a killed save leaves: atomic_write_dir's temporary directory, or the replaced checkpoint moved aside
LEFTOVER = re.compile(r"^\.step_\d+\.(.+\.tmp|old)$")
# what resuming reads, besides the weights (model.safetensors or its sharded index)
RESUME_FILES = ("config.json", "tokenizer.json", "optimizer.pt", "rng_state.pt", "trainer_state.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


@dataclass
class ResumeState:
    step: int
    trainer_state: dict[str, Any]
    path: Path


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := CKPT_DIR.match(p.name))]
    return sorted(found)


def remove_leftovers(ckpt_dir: str | Path) -> list[Path]:
    """Delete the hidden directories that a save killed mid-write left in `ckpt_dir` (a 3B checkpoint's is ~40
    GB), restoring a checkpoint moved aside whose replacement never landed; returns what it found. Only a save in progress in this directory holds one legitimately, and none runs while
    the directory is resolved at start-up or pruned after a save."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if LEFTOVER.match(p.name) and p.is_dir()]
    for p in found:
        whole = p.with_name(p.name[1:].removesuffix(".old"))
        if p.name.endswith(".old") and not whole.exists():  # killed between its two renames: the only copy
            with contextlib.suppress(OSError):  # another rank may have restored it first
                p.rename(whole)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return found


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in `ckpt_dir` (None: none); a killed save's leftovers are removed first."""
    remove_leftovers(ckpt_dir)
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def check_checkpoint(path: str | Path) -> Path:
    """`path` when it holds a whole training checkpoint, else FileNotFoundError naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path}: no such directory")
    missing = [name for name in RESUME_FILES if not (path / name).is_file()]
    if not any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")):
        missing.insert(1, "model.safetensors")
    if missing:
        raise FileNotFoundError(
            f"--resume {path}: not a training checkpoint, {', '.join(missing)} missing (train.py writes each "
            f"checkpoint as a step_NNNNNN directory in training.ckpt_dir; --resume alone takes the newest there)")
    return path


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _model_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def save_checkpoint(
    ckpt_dir: str | Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    tokenizer_dir: str | Path | None = None,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    keep_last_n: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write step_{step:06d} atomically, then prune to the newest `keep_last_n`. `model_state` /
    `optimizer_state`: already gathered whole state dicts (FSDP2), instead of the model's and optimizer's own."""
    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir / f"step_{step:06d}"
    # weights + Adam's two moments (fp32) + slack
    ensure_free_space(ckpt_dir, _model_bytes(model) + 2 * 4 * sum(p.numel() for p in model.parameters()), "a checkpoint")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state=model_state)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.is_file():
                    atomic_write(tmp / name, lambda f, src=src: shutil.copy2(src, f), "a checkpoint")
        # each file fsynced (atomic_write), as the model's: a power loss after the rename finds them whole
        opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
        atomic_write(tmp / "optimizer.pt", lambda f: torch.save(opt, f), "a checkpoint")
        for name, tensors in (extra_tensors or {}).items():
            if tensors:
                cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                atomic_write(tmp / f"{name}.safetensors", lambda f, t=cpu: save_file(t, str(f)), "a checkpoint")
        atomic_write(tmp / "rng_state.pt", lambda f: torch.save(rng_state(), f), "a checkpoint")
        state = json.dumps({"step": step, **trainer_state}, indent=2)
        atomic_write(tmp / "trainer_state.json", lambda f: f.write_text(state), "a checkpoint")

    atomic_write_dir(target, write, "a checkpoint")
    if keep_last_n:
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
    remove_leftovers(ckpt_dir)
    return target


def read_checkpoint(path: str | Path) -> ResumeState:
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: {state_file.name} is missing")
    try:
        state = json.loads(state_file.read_text())
        step = int(state["step"])
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{state_file}: not a readable trainer state ({type(e).__name__}: {e})") from e
    return ResumeState(step=step, trainer_state=state, path=path)


def load_training_state(
    path: Path, optimizer: torch.optim.Optimizer,
    load_optimizer: Callable[[torch.optim.Optimizer, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Restore optimizer and RNG states in place; return the extra tensor files (e.g. the attribution head).
    `load_optimizer(optimizer, state_dict)` replaces `optimizer.load_state_dict` (FSDP2 shards the moments)."""
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
    if load_optimizer is None:
        optimizer.load_state_dict(state)
    else:
        load_optimizer(optimizer, state)
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    return {p.name[: -len(".safetensors")]: load_file(str(p)) for p in path.glob("*.safetensors")
            if not p.name.startswith("model")}
