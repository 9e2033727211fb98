"""The built-in tiny default end to end on a small budget: warm-up builds an HF-format model that both our
loader and the reference load, it has learned the format, sampling log-probs match a full recompute, and
GRPO steps run on it through train.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import countdown_task as task
import rollout
import train
import trainer
import update
from data_types import Episode
from parts import load_config
from tasks import build_task
from qwen2_model import Transformer

SMALL = ["tiny.warmup_steps=150", "tiny.num_train_problems=1500", "data.generate_if_missing=1600",
         "data.test_size=64", "eval.num_problems=32", "eval.batch_size=32", "training.eval_interval=2",
         "training.ckpt_save_interval=2"]


def overrides(root):
    return SMALL + [f"model.path={root}/model", f"data.path={root}/data", f"training.log_dir={root}/logs",
                    f"training.ckpt_dir={root}/ckpt", f"credit.dir={root}/credit"]


@pytest.mark.slow
def test_tiny_default_warmup_then_grpo(tmp_path):
    transformers = pytest.importorskip("transformers")
    assert train.main(["--config", "config_tiny.yaml", "training.max_steps=3", *overrides(tmp_path)]) == 0
    model_dir = tmp_path / "model"
    info = json.loads((model_dir / "warmup.json").read_text())
    assert 0.5e6 < info["params"] < 1.5e6 and info["steps"] == 150

    # the same directory loads in the reference implementation with the same logits
    ours = Transformer.from_pretrained(model_dir, dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = load_config("config_tiny.yaml", overrides(tmp_path))
    countdown = build_task(cfg)
    train_set, test_set = countdown.load()
    _, tokenizer = trainer.load_policy(cfg, torch.device("cpu"), countdown, train_set)
    prompts = [task.build_prompt(p, "compact") for p in test_set[:16]]
    ids = torch.tensor([tokenizer.encode(prompts[0])])
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max() < 1e-4

    # greedy completions are well-formed: the warm-up taught the format
    outs = rollout.generate(ours, [tokenizer.encode(p) for p in prompts], 72, tokenizer.end_token_ids, temperature=0).tokens
    texts = [tokenizer.decode(o[:-1] if o and o[-1] in tokenizer.end_token_ids else o) for o in outs]
    formats = [task.format_reward_function("<think>" + t) for t in texts]
    assert np.mean([f == 1.0 for f in formats]) >= 0.8, texts

    # log-probs seen while sampling (KV cache, left padding) equal a full recompute on prompt + completion
    sampled = rollout.generate(ours, [tokenizer.encode(p) for p in prompts], 72, tokenizer.end_token_ids, seed=0)
    episodes = [Episode(prompt=p, prompt_token_ids=tokenizer.encode(p), generated_token_ids=g, text="", reward=0.0,
                        reward_info={}, finished=True, group_idx=0) for p, g in zip(prompts, sampled.tokens)]
    with torch.no_grad():
        fwd = update.forward_completions(ours, episodes, tokenizer.pad_token_id)
        lp, _, _ = update.token_statistics(fwd.logits, fwd.targets)
    for i, g in enumerate(sampled.tokens):
        np.testing.assert_allclose(sampled.log_probs[i], lp[i, : len(g)].numpy(), atol=1e-4)

    rows = [json.loads(x) for x in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert (tmp_path / "ckpt" / "step_000003" / "model.safetensors").is_file()
    assert (tmp_path / "credit" / "credit_logs_final.pkl").is_file()


@pytest.mark.slow
def test_tiny_warmup_is_deterministic(tmp_path):
    def build(root):
        cfg = load_config("config_tiny.yaml", overrides(root) + ["tiny.warmup_steps=20"])
        task = build_task(cfg)
        task.build_model(root / "model", task.load()[0])
        return Transformer.from_pretrained(root / "model", dtype=torch.float32).state_dict()
    a, b = build(tmp_path / "a"), build(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
