"""The built-in tiny default: a ~1M-parameter, character-level Qwen2 warmed up on a task's solutions on CPU.

No Hugging Face download is needed: `build_tiny_model` makes a character tokenizer (the tags `<think>`,
`</think>`, `<answer>`, `</answer>` and Qwen's special tokens are single tokens), a small Qwen2 config,
and warms the model up with teacher forcing on (prompt, completion) examples that the task draws (the
Countdown task's solver traces, such as `55-46=9, 9+13=22</think>\n<answer>(55-46)+13</answer>`), then writes
an ordinary HF model directory (config.json, model.safetensors, tokenizer.json). From there on it goes
through exactly the code paths of a real checkpoint.

The warm-up is deliberately short (`tiny.warmup_steps`): the model learns the format and the easy cases,
but solves well under half of the held-out problems, which leaves GRPO something to learn.
Deterministic for a given `tiny.seed` on a given machine and thread count.
"""

from __future__ import annotations

import json
import math
import random
import string
import time
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import tokenizers
import torch
from tqdm import tqdm

from fileio import atomic_write_dir
from qwen2_model import ModelConfig, Transformer
from config import TinySettings
from tokenizer import Tokenizer, build_char_tokenizer, save_char_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<answer>", "</answer>"]
ALPHABET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # printable ASCII + space + newline
EOS_TOKEN = "<|endoftext|>"


def tiny_config(s: TinySettings, vocab_size: int) -> ModelConfig:
    return ModelConfig(
        model_type="qwen2", vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.hidden_size // s.num_attention_heads,
        max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-6, attention_bias=True,
        use_qk_norm=False, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, torch_dtype="float32",
    )


def sft_loss(model: Transformer, batch: list[tuple[list[int], int]], pad_id: int) -> torch.Tensor:
    """Mean next-token NLL over the completion tokens only (teacher forcing)."""
    width = max(len(ids) for ids, _ in batch)
    tokens = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, (ids, prompt_len) in enumerate(batch):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, prompt_len: len(ids)] = True
    logits = model(tokens[:, :-1])
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), tokens[:, 1:], reduction="none")
    return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


# An example for the warm-up: (prompt text, completion text without the end token), drawn with the given rng
DrawExample = Callable[[random.Random], tuple[str, str]]


def build_tiny_model(s: TinySettings, out_dir: str | Path, draw_example: DrawExample, num_problems: int,
                     backend: tokenizers.Tokenizer | None = None, record: Mapping[str, Any] | None = None) -> Path:
    """Make the tokenizer and model, run the supervised warm-up on examples from `draw_example` (a task draws
    them from its training split, so the eval problems stay unseen; `num_problems` is recorded), and write
    the model directory atomically. `backend`: the tokenizer (default: the character tokenizer; the words
    testbed passes its BPE); `record`: more fields for warmup.json."""
    out_dir = Path(out_dir)
    print(f"[tiny] {out_dir} not found: building the built-in tiny model there (one-time, cached; "
          f"{s.warmup_steps} warm-up steps on solver traces)")
    t_start = time.perf_counter()
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)

    backend = build_char_tokenizer(ALPHABET, SPECIAL_TOKENS) if backend is None else backend
    staging = out_dir.with_name(out_dir.name + ".tokenizer")
    save_char_tokenizer(backend, staging, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    tokenizer = Tokenizer(staging)
    model = Transformer.from_config(tiny_config(s, tokenizer.vocab_size), dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=s.warmup_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, s.warmup_steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warm:
            return s.warmup_lr * (step + 1) / warm
        frac = (step - warm) / max(1, s.warmup_steps - warm)
        return s.warmup_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    def example() -> tuple[list[int], int]:  # (prompt + completion + end token ids, prompt length)
        prompt, completion = draw_example(rng)
        ids = tokenizer.encode(prompt)
        return ids + tokenizer.encode(completion) + [tokenizer.eos_token_id], len(ids)

    model.train()
    losses = []
    bar = tqdm(range(s.warmup_steps), desc=f"[tiny] warm-up ({n_params / 1e6:.2f}M params)")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = [example() for _ in range(s.warmup_batch_size)]
        loss = sft_loss(model, batch, tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp / name).write_bytes((staging / name).read_bytes())
        (tmp / "warmup.json").write_text(json.dumps({
            "params": n_params, "steps": s.warmup_steps, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
            "seconds": time.perf_counter() - t_start, "problems": num_problems, "seed": s.seed, **(record or {}),
        }, indent=2))

    atomic_write_dir(out_dir, write, "the tiny model")
    for f in staging.iterdir():
        f.unlink()
    staging.rmdir()
    print(f"[tiny] wrote {out_dir} ({n_params / 1e6:.2f}M params, final loss {sum(losses[-50:]) / 50:.3f}, "
          f"{time.perf_counter() - t_start:.0f}s)")
    return out_dir
