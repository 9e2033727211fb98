"""The update's machinery on a tiny random model: per-token statistics, forwards over shared prompts, packing
into micro-batches, one step in the direction of the advantage, non-finite losses, PPO passes, KL and teacher
forcing (test_update_gradients.py proves every term on the gradient)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo
import update
from conftest import random_model
from data_types import Episode


def tiny_model() -> torch.nn.Module:
    return random_model().eval()


def test_token_statistics():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 11)
    targets = torch.randint(0, 11, (2, 3))
    lp, ent, gnorm = update.token_statistics(logits, targets)
    p = torch.softmax(logits, -1)
    onehot = torch.nn.functional.one_hot(targets, 11).float()
    torch.testing.assert_close(lp, torch.log(p.gather(-1, targets[..., None]).squeeze(-1)))
    torch.testing.assert_close(ent, -(p * p.log()).sum(-1))
    torch.testing.assert_close(gnorm, (onehot - p).norm(dim=-1))
    # and that norm is exactly the gradient size of log p(y) w.r.t. the logits
    lg = logits.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(torch.log_softmax(lg, -1)[0, 1, targets[0, 1]], lg)
    assert g[0, 1].norm().item() == pytest.approx(gnorm[0, 1].item(), rel=1e-5)


# ------------------------------------------------------------------ the update


def _episode(prompt, completion, log_probs=None):
    return Episode(prompt="", prompt_token_ids=prompt, generated_token_ids=completion, text="", reward=0.0,
                   reward_info={}, finished=True, group_idx=0, log_probs=log_probs or [0.0] * len(completion),
                   entropies=[1.0] * len(completion))


def _seq_log_prob(model, ep):
    with torch.no_grad():
        fwd = update.forward_completions(model, [ep], 0)
        lp, _, _ = update.token_statistics(fwd.logits, fwd.targets)
    return float((lp * fwd.mask).sum())


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_one_step_moves_log_probs_in_the_direction_of_the_advantage(mode):
    model = tiny_model()
    good, bad = _episode([1, 2, 3], [4, 5, 6, 7]), _episode([1, 2, 3], [8, 9, 10])
    before = _seq_log_prob(model, good), _seq_log_prob(model, bad)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = update.update_policy(model, opt, [good, bad], torch.tensor([1.0, -1.0]),
                                 update.UpdateSettings(micro_batch_size=1), grpo.objective("pg", mode, max_len=8))
    after = _seq_log_prob(model, good), _seq_log_prob(model, bad)
    assert not stats.skipped
    assert after[0] > before[0] and after[1] < before[1]
    assert len(stats.token_log_probs) == 2 and len(stats.token_log_probs[0]) == 4
    np.testing.assert_allclose(stats.token_weights[1], [1.0, 1.0, 1.0])


@pytest.mark.parametrize("micro_batch", [1, 2, 4])
def test_per_token_arrays_come_back_in_episode_order(micro_batch):
    """The update packs episodes by length (here the reverse of their order); the credit logger's arrays must
    still be row i = episode i: each row equals that episode's own log-probs before the step."""
    model = tiny_model()
    eps = [_episode([1, 2, 3], [4, 5, 6, 7, 8, 9]), _episode([1, 2], [8, 9, 10, 11]), _episode([4], [11, 12, 13]),
           _episode([5], [6])]
    expected = []
    with torch.no_grad():
        for e in eps:
            fwd = update.forward_completions(model, [e], 0)
            expected.append(update.token_statistics(fwd.logits, fwd.targets)[0][0].tolist())
    stats = update.update_policy(model, torch.optim.SGD(model.parameters(), lr=0.1), eps,
                                 torch.tensor([1.0, -1.0, 0.5, 2.0]), update.UpdateSettings(micro_batch_size=micro_batch),
                                 grpo.objective())
    for got, want in zip(stats.token_log_probs, expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [len(r) for r in stats.token_entropies] == [6, 4, 3, 1]


@pytest.mark.parametrize("chunk_tokens", [None, 3])
def test_forward_completions_over_shared_prompts_equals_the_padded_forward(chunk_tokens):
    """Two groups answering two prompts (of different lengths): every per-token output and the gradients are
    the same whether each prompt runs once or once per episode."""
    model = tiny_model().train()
    eps = [_episode([1, 2, 3], [4, 5, 6, 7]), _episode([8, 9], [10, 11]), _episode([1, 2, 3], [12]),
           _episode([8, 9], [13, 14, 15, 16, 17]), _episode([1, 2, 3], [18, 19])]
    outs, grads = [], []
    for share in (False, True):
        model.zero_grad()
        fwd = update.forward_completions(model, eps, 0, need_hidden=True, chunk_tokens=chunk_tokens, share_prompts=share)
        ((fwd.log_probs + 0.3 * fwd.entropy) * fwd.mask).sum().backward()
        outs.append(fwd)
        grads.append([p.grad.clone() for p in model.parameters()])
    plain, shared = outs
    assert torch.equal(plain.mask, shared.mask) and torch.equal(plain.targets, shared.targets)
    assert torch.equal(plain.prompt_lens, shared.prompt_lens)
    m = plain.mask
    for name in ("log_probs", "entropy", "logit_grad_norm"):
        torch.testing.assert_close(getattr(shared, name)[m], getattr(plain, name)[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.hidden[m], plain.hidden[m], atol=1e-5, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_padded_tokens_counts_each_shared_prompt_once():
    eps = [_episode([1, 2, 3], [4, 5]), _episode([1, 2, 3], [6, 7, 8, 9]), _episode([5, 6], [1])]
    assert update.padded_tokens(eps, share_prompts=False) == 3 * 7
    assert update.padded_tokens(eps, share_prompts=True) == 2 * 3 + 3 * 4
    assert update.padded_tokens(eps[1:], share_prompts=True) == 2 * 7  # no prompt repeats: the plain forward


@pytest.mark.parametrize("size", [1, 2, 3, 4, 8])
def test_pack_episodes_partitions_the_batch_and_keeps_groups_when_that_runs_fewer_tokens(size):
    # two groups of 4 with one long prompt each; lengths interleave, so packing by length mixes the groups
    eps = [_episode([q] * 20, [1] * (2 + q + 3 * j)) for j in range(4) for q in (1, 2)]
    for share in (False, True):
        packed = update.pack_episodes(eps, size, None, share)
        assert sorted(i for mb in packed for i in mb) == list(range(len(eps)))
        assert all(len(mb) <= size for mb in packed)
    by_length = update.pack_episodes(eps, size, None, False)
    cost = {share: sum(update.padded_tokens([eps[i] for i in mb], True) for mb in update.pack_episodes(eps, size, None, share))
            for share in (False, True)}
    assert cost[True] <= sum(update.padded_tokens([eps[i] for i in mb], True) for mb in by_length)
    if size in (2, 4):  # micro-batches of one group each run its prompt once
        assert all(len({eps[i].prompt_token_ids[0] for i in mb}) == 1 for mb in update.pack_episodes(eps, size, None, True))
        assert cost[True] < cost[False]


@pytest.mark.parametrize("with_teachers", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("flat", [(), (0, 1, 2, 3), (4, 5, 6, 7, 8, 9, 10, 11), tuple(range(12))])
def test_work_units_skip_the_backward_at_the_same_positions_on_every_rank(world, flat, with_teachers):
    """Zero-gradient micro-batches: every episode runs exactly once over the ranks, frozen micro-batches hold
    only flat episodes and come first, ranks agree on which positions run a backward (FSDP2 gathers weights
    in each), and the last position always runs one."""
    from distributed import Dist

    eps = [_episode([q] * 5, [1] * (2 + j)) for q in range(3) for j in range(4)]
    teachers = eps[:3] if with_teachers else []
    settings = update.UpdateSettings(micro_batch_size=2)
    frozen = [i in flat for i in range(len(eps))]
    per_rank = [update._work_units(eps, teachers, settings, Dist(r, world), True, frozen) for r in range(world)]
    assert len({len(units) for units in per_rank}) == 1
    flags = [[backward for _, backward in units] for units in per_rank]
    assert all(f == flags[0] for f in flags) and flags[0][-1]
    policy = sorted(j for units in per_rank for u, _ in units if u is not None and u.kind == "policy" for j in u.index)
    assert policy == list(range(len(eps)))
    for units in per_rank:
        for k, (u, backward) in enumerate(units):
            if u is not None and u.kind == "policy":
                assert all(frozen[j] == u.frozen for j in u.index)
                assert backward == (not u.frozen or k == len(units) - 1)
    # flat episodes fill ceil(n / 2) micro-batches, spread over the ranks, then the live ones and the teachers'
    last_is_frozen = len(flat) == len(eps) and not with_teachers
    assert sum(not b for b in flags[0]) == math.ceil(math.ceil(len(flat) / 2) / world) - last_is_frozen


def test_micro_batching_gives_the_full_batch_gradient():
    eps = [_episode([1, 2, 3], [4, 5, 6, 7]), _episode([1, 2], [8, 9, 10]), _episode([4], [11, 12])]
    adv = torch.tensor([0.7, -1.2, 0.4])
    grads = []
    for mb in (3, 1):
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        captured = {}

        def keep(opt=opt, captured=captured, model=model):
            captured["g"] = torch.cat([p.grad.flatten() for p in model.parameters()])

        opt.step = keep  # capture the accumulated gradient instead of stepping
        update.update_policy(model, opt, eps, adv, update.UpdateSettings(micro_batch_size=mb, max_grad_norm=1e9),
                             grpo.objective("pg", "seq-mean-token-mean"))
        grads.append(captured["g"])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = update.update_policy(model, opt, [_episode([1, 2], [3, 4])], torch.tensor([float("nan")]),
                                 update.UpdateSettings(), grpo.objective())
    assert stats.skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_ppo_iterations_and_kl_to_a_reference():
    model, ref = tiny_model(), tiny_model()
    ep = _episode([1, 2, 3], [4, 5, 6])
    ep.log_probs = [-8.0, -8.0, -8.0]  # a sampler far less sure (current ~ -3): ratio ~ e^5 > 1 + eps, clipped
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    settings = update.UpdateSettings(num_iterations=2, old_log_probs="rollout")
    objective = grpo.objective("ppo", epsilon_low=0.2, epsilon_high=0.2, beta=0.1)
    stats = update.update_policy(model, opt, [ep], torch.tensor([1.0]), settings, objective, ref_model=ref)
    assert stats.metrics["clip_frac"] == 1.0
    assert stats.metrics["rollout_logprob_gap"] > 3.0
    assert 0.0 <= stats.metrics["clip_frac/later_iterations"] <= 1.0
    assert stats.metrics["kl"] >= 0 and math.isfinite(stats.metrics["kl"])


def test_teacher_forcing_pulls_toward_the_reference_completion():
    model = tiny_model()
    teacher = _episode([1, 2, 3], [7, 7, 7, 7])
    before = _seq_log_prob(model, teacher)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # zero advantages: the policy-gradient term is 0, so only the supervised term can move the weights
    stats = update.update_policy(model, opt, [_episode([1, 2, 3], [4, 5])], torch.tensor([0.0]),
                                 update.UpdateSettings(), grpo.objective(teacher_forcing_coef=1.0),
                                 teacher_episodes=[teacher])
    assert _seq_log_prob(model, teacher) > before
    assert stats.metrics["teacher_nll"] == pytest.approx(-before / 4, rel=1e-4)
