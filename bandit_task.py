"""The sparse-reward bandit: the seeds' fallback experiment and the smoke test of every ablation.

K arms, exactly one pays 1, the rest 0 (chance 1/K). A "question" is a context token; each context has its
own paying arm (with the default single context it is the classic multi-armed bandit). The completion is a
single token, an arm. The policy is a small Qwen2 with random weights over a vocabulary of just the arms,
the contexts and an end token, so it starts near uniform and GRPO has to find the arm. It trains on CPU in
seconds, through exactly the code paths of a real checkpoint. `BanditTask` (``data.task=bandit``) declares its
keys `data.num_arms` and `data.num_contexts`; the paying arms are drawn from `data.generate_seed`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Param
from qwen2_model import ModelConfig, Transformer
from tasks import TASKS, Task
from tokenizer import build_char_tokenizer, save_char_tokenizer

ARM_SYMBOLS = string.ascii_letters  # arm k is the k-th letter: up to 52 arms
CONTEXT_SYMBOLS = string.digits  # context c is the c-th digit: up to 10 contexts
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class BanditProblem:
    context: int
    paying_arm: int


def paying_arms(num_arms: int, num_contexts: int, seed: int) -> list[int]:
    """The paying arm of each context, drawn once from the seed."""
    rng = random.Random(seed)
    return [rng.randrange(num_arms) for _ in range(num_contexts)]


def make_problems(num_arms: int, num_contexts: int, n: int, seed: int) -> list[BanditProblem]:
    """`n` problems cycling over the contexts (their order shuffled by the seed)."""
    if not 2 <= num_arms <= len(ARM_SYMBOLS):
        raise ValueError(f"bandit num_arms must be in [2, {len(ARM_SYMBOLS)}], got {num_arms}")
    if not 1 <= num_contexts <= len(CONTEXT_SYMBOLS):
        raise ValueError(f"bandit num_contexts must be in [1, {len(CONTEXT_SYMBOLS)}], got {num_contexts}")
    arms = paying_arms(num_arms, num_contexts, seed)
    problems = [BanditProblem(c % num_contexts, arms[c % num_contexts]) for c in range(n)]
    random.Random(seed + 1).shuffle(problems)
    return problems


def build_prompt(problem: BanditProblem) -> str:
    return CONTEXT_SYMBOLS[problem.context]


def reward_function(problem: BanditProblem, response: str, num_arms: int) -> dict:
    """1 if the first token of the response is the paying arm, else 0. format_reward: it is an arm at all."""
    first = response[:1]
    is_arm = first != "" and first in ARM_SYMBOLS[:num_arms]
    paid = float(first == ARM_SYMBOLS[problem.paying_arm])
    return {"reward": paid, "reward_info": {"format_reward": float(is_arm), "answer_reward": paid}}


def reference_completion(problem: BanditProblem) -> str:
    return ARM_SYMBOLS[problem.paying_arm]


def build_bandit_model(out_dir: str | Path, num_arms: int, num_contexts: int, hidden_size: int = 32,
                       num_layers: int = 1, seed: int = 0) -> Path:
    """A random-weight Qwen2 and its character tokenizer (arms, contexts, end token) in HF layout."""
    out_dir = Path(out_dir)
    backend = build_char_tokenizer(ARM_SYMBOLS[:num_arms] + CONTEXT_SYMBOLS[:num_contexts], [EOS_TOKEN])
    save_char_tokenizer(backend, out_dir, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=backend.get_vocab_size(), hidden_size=hidden_size,
                      intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=hidden_size // 2, max_position_embeddings=16,
                      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32")
    Transformer.from_config(cfg, dtype=torch.float32).save_pretrained(out_dir)
    return out_dir


@TASKS.register("bandit", params={
    "num_arms": Param(16, "bandit: K arms, one pays", f"in [2, {len(ARM_SYMBOLS)}]",
                      lambda v: 2 <= v <= len(ARM_SYMBOLS), int),
    "num_contexts": Param(1, "bandit: contexts, each with its own paying arm", f"in [1, {len(CONTEXT_SYMBOLS)}]",
                          lambda v: 1 <= v <= len(CONTEXT_SYMBOLS), int),
})
class BanditTask(Task):
    answer_tag = None  # one token, no answer section

    def load(self) -> tuple[list[BanditProblem], list[BanditProblem]]:
        d = self.config.data
        n_test = int(d.test_size) if d.test_size >= 1 else max(1, int(d.test_size * 1000))
        problems = make_problems(d.num_arms, d.num_contexts, 1000 + n_test, d.generate_seed)
        return problems[:1000], problems[1000:]

    def prompt(self, problem: BanditProblem) -> str:
        return build_prompt(problem)

    def reward(self, problem: BanditProblem, completion: str) -> dict:
        return reward_function(problem, completion, self.config.data.num_arms)

    def reference_completion(self, problem: BanditProblem) -> str:
        return reference_completion(problem)

    def build_model(self, path: Path, train_set: Sequence[BanditProblem]) -> None:
        d, s = self.config.data, self.config.tiny
        print(f"[bandit] {path} not found: building a random-weight policy there ({d.num_arms} arms)")
        build_bandit_model(path, d.num_arms, d.num_contexts, hidden_size=s.hidden_size,
                           num_layers=s.num_hidden_layers, seed=s.seed)
