"""Run by tests/test_distributed.py under torchrun (gloo, CPU): one GRPO update per case on one fixed batch,
with the policy wrapped by DDP or FSDP2; rank 0 saves the updated weights. The test runs the same cases in
a single process (`run_case(case, Dist())`) and compares.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT.pt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import distributed  # noqa: E402
import grpo  # noqa: E402
import grpo_mitigations as gm  # noqa: E402
import update  # noqa: E402
from conftest import random_model  # noqa: E402
from data_types import Episode  # noqa: E402
from distributed import Dist  # noqa: E402
from qwen2_model import Transformer  # noqa: E402

# (strategy, policy loss, aggregation, iterations, micro-batch size, extras): 9 episodes in micro-batches of 2
# are 5 micro-batches, 3 on rank 0 and 2 on rank 1, which runs an empty one to stay in step. extras: the
# attribution head (parameters outside the wrapped model, its batch metrics) and teacher-forcing micro-batches
CASES = [(s, loss, agg, it, mb, extras) for s in ("ddp", "fsdp") for loss, agg, it, mb, extras in (
    ("pg", "token-mean", 1, 2, False), ("pg", "seq-mean-token-mean", 1, 2, False), ("ppo", "token-mean", 2, 3, False),
    ("pg", "token-mean", 1, 2, True))]


def make_model() -> Transformer:
    return random_model(31, tie_word_embeddings=False)


def make_batch() -> tuple[list[Episode], torch.Tensor]:
    """Nine episodes, three groups of three answering one prompt each (the update runs each prompt once), of
    different prompt and completion lengths, rollout log-probs off the policy's; the middle group is flat."""
    gen = torch.Generator().manual_seed(5)
    episodes = []
    for k in range(9):
        if k % 3 == 0:
            prompt = torch.randint(1, 31, (2 + k % 4,), generator=gen).tolist()
        completion = torch.randint(1, 31, (3 + (5 * k) % 7,), generator=gen).tolist()
        episodes.append(Episode(prompt="", prompt_token_ids=prompt, generated_token_ids=completion, text="",
                                reward=0.0, reward_info={}, finished=True, group_idx=k // 3,
                                log_probs=(-2.0 - torch.rand(len(completion), generator=gen)).tolist(),
                                entropies=torch.rand(len(completion), generator=gen).tolist()))
    advantages = torch.randn(9, generator=gen)
    advantages[3:6] = 0.0  # a flat group: without KL or a learned head its micro-batches skip the backward
    return episodes, advantages


def run_case(case: tuple, d: Dist) -> dict[str, torch.Tensor]:
    """The weights after one update (SGD, lr 1: the change is minus the gradient), gathered whole."""
    strategy, loss, agg, iterations, mb, extras = case
    d = Dist(d.rank, d.world_size, d.local_rank, strategy)
    model = make_model()
    model.gradient_checkpointing = extras  # checkpointed layers over shared prompts, under DDP and FSDP2 too
    weighter = gm.build_weighter("attribution", hidden_size=32) if extras else None
    wrapped = distributed.wrap(model, d)
    head = weighter.parameters() if weighter is not None else []
    optimizer = torch.optim.SGD(list(model.parameters()) + head, lr=1.0)
    episodes, advantages = make_batch()
    settings = update.UpdateSettings(micro_batch_size=mb, num_iterations=iterations, old_log_probs="rollout",
                                     max_grad_norm=1e9, logits_chunk_tokens=8)
    objective = grpo.objective(loss, agg, teacher_forcing_coef=0.5 if extras else 0.0)
    stats = update.update_policy(wrapped, optimizer, episodes, advantages, settings, objective, weighter,
                                 teacher_episodes=episodes[:3] if extras else (), dist=d)
    out = {k: distributed.full_tensor(v).detach().clone() for k, v in model.state_dict().items()}
    out.update({f"_head.{i}": p.detach().clone() for i, p in enumerate(head)})
    out.update({f"_metric.{k}": torch.tensor(v) for k, v in stats.metrics.items()})
    return {**out, "_token_log_probs": torch.tensor([x for row in stats.token_log_probs for x in row])}


def main(out: str) -> None:
    d = distributed.init(torch.device("cpu"))
    results = {case: run_case(case, d) for case in CASES}
    if d.is_main:
        torch.save(results, out)
    distributed.shutdown(d)


if __name__ == "__main__":
    main(sys.argv[1])
