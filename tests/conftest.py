"""Shared test set-up: a fixed RNG state, the small random test model of every file, and a tiny random model
directory + dataset for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import countdown_task as task
from qwen2_model import ModelConfig, Transformer
from tiny_model import ALPHABET, EOS_TOKEN, SPECIAL_TOKENS
from tokenizer import build_char_tokenizer, save_char_tokenizer


# The device a device-parametrized test runs on: CPU always; CUDA where there is a GPU (skipped here), so the same
# checks (reference logits, cache masking, CUDA-graph decode, gradients) run on a GPU machine as they are.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def random_model(vocab_size: int = 23, seed: int = 0, **shape) -> Transformer:
    """A small random-weight Qwen2 in fp32 (2 layers, hidden 32, 4 heads over 2 KV heads, tied embeddings),
    its weights drawn from `seed`; `shape` overrides ModelConfig fields."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                                tie_word_embeddings=True, torch_dtype="float32"), **shape})
    return Transformer.from_config(cfg, dtype=torch.float32)


def make_random_model_dir(path: Path, seed: int = 0) -> Path:
    """`random_model` with the tiny model's character tokenizer, in HF layout."""
    save_char_tokenizer(build_char_tokenizer(ALPHABET, SPECIAL_TOKENS), path, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    vocab = len(SPECIAL_TOKENS) + 1 + len(ALPHABET)
    random_model(vocab, seed, max_position_embeddings=256).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """A random model directory and a small generated Countdown dataset, built once per session."""
    root = tmp_path_factory.mktemp("assets")
    model_dir = make_random_model_dir(root / "model")
    data_dir = root / "data"
    task.write_countdown_dataset(task.generate_problems(80, num_numbers=(3,), seed=1), data_dir)
    return {"model": model_dir, "data": data_dir}


def run_config(assets: dict[str, Path], out: Path, **sections) -> dict:
    """A small CPU config dict for end-to-end tests; `sections` update it (e.g. training={...})."""
    base = {
        "model": {"path": str(assets["model"]), "device": "cpu", "dtype": "float32"},
        "data": {"path": str(assets["data"]), "test_size": 16, "prompt_style": "compact"},
        "training": {"seed": 7, "max_steps": 4, "num_questions_per_batch": 3, "num_answers_per_question": 4,
                     "micro_batch_size": 5, "max_new_tokens": 12, "learning_rate": 1e-3,
                     "log_dir": str(out / "logs"), "ckpt_dir": str(out / "ckpt"), "ckpt_save_interval": 2,
                     "eval_interval": 2, "keep_last_n": 5},
        "eval": {"num_problems": 6, "batch_size": 6},
        "credit": {"enabled": True, "dir": str(out / "credit"), "credit_save_interval": 2},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return base
