"""Training checkpoints: an HF-format model directory plus everything needed to resume exactly.

Layout of `ckpt_dir/step_000123/`:
    config.json, model.safetensors          the policy, loadable by transformers and by qwen2_model
    tokenizer.json, tokenizer_config.json   copied from the model directory, so the folder is a usable model
    optimizer.pt                            optimizer state (also the CPU-offloaded AdamW's)
    attribution_head.safetensors            the learned attribution head, when used
    trainer_state.json                      step, data order position, credit logger position, ...
    rng_state.pt                            every RNG state (torch CPU/CUDA, numpy, random)

A checkpoint is built under a temporary name and renamed into place, so a crash mid-write never leaves
a broken `step_*` directory; only complete ones carry that name.
"""

from __future__ import annotations

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

from fileio import atomic_write_dir, ensure_free_space

CKPT_DIR = re.compile(r"^step_(\d+)$")
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


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


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
                    shutil.copy2(src, tmp / name)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
        for name, tensors in (extra_tensors or {}).items():
            if tensors:
                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        torch.save(rng_state(), tmp / "rng_state.pt")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=2))

    atomic_write_dir(target, write, "a checkpoint")
    if keep_last_n:
        for _, old in list_checkpoints(ckpt_dir)[:-keep_last_n]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def read_checkpoint(path: str | Path) -> ResumeState:
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a training checkpoint: {state_file.name} is missing")
    state = json.loads(state_file.read_text())
    return ResumeState(step=int(state["step"]), trainer_state=state, path=path)


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
