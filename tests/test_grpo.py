"""GRPO math against hand computation, and sampling/update behaviour on a tiny random model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import grpo
import rollout
import update
from data_types import Episode
from qwen2_model import ModelConfig, Transformer

REWARDS = [[1.1, 0.1, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0], [1.1, 1.1, 0.1, 0.0]]


def tiny_model(vocab: int = 23, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, torch_dtype="float32")
    return Transformer.from_config(cfg, dtype=torch.float32).eval()


# ------------------------------------------------------------------ advantages


def test_grpo_advantages_match_hand_computation():
    r = np.array(REWARDS)
    expected = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-4)  # numpy std: population
    got = grpo.compute_advantages(torch.tensor(REWARDS), "grpo", eps=1e-4)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(got[1] == 0)  # a zero-variance group carries no signal


def test_dr_grpo_rloo_softmax_advantages():
    r = np.array(REWARDS)
    g = r.shape[1]
    np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo").numpy(),
                               r - r.mean(1, keepdims=True), atol=1e-6)
    loo = np.array([[r[i, j] - (r[i].sum() - r[i, j]) / (g - 1) for j in range(g)] for i in range(len(r))])
    np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "rloo").numpy(), loo, atol=1e-6)
    for tau in (0.25, 0.5, 1.0):
        e = np.exp(r / tau)
        soft = e / e.sum(1, keepdims=True) * g
        np.testing.assert_allclose(grpo.compute_advantages(torch.tensor(REWARDS), "softmax", tau=tau).numpy(),
                                   soft, rtol=1e-5)
        np.testing.assert_allclose(
            grpo.compute_advantages(torch.tensor(REWARDS), "softmax_centered", tau=tau).numpy(), soft - 1, atol=1e-5)
        assert np.allclose(soft.sum(1), g)


def test_softmax_weight_on_the_single_correct_answer():
    # one correct (1.1) and seven wrong (0 or 0.1): softmax at tau=0.5 weighs the correct one e^(1.1/0.5) vs e^0
    r = torch.tensor([[1.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.1]])
    w = grpo.compute_advantages(r, "softmax", tau=0.5)[0]
    e = np.exp(r[0].numpy() / 0.5)
    assert w[0].item() == pytest.approx(8 * e[0] / e.sum(), rel=1e-5)
    assert w[0] > w[1:].max()


def test_soft_reweight_scales_each_group_by_its_std_over_the_max():
    r = np.array(REWARDS)
    std = r.std(1)
    factor = std / (std.max() + 1e-6)
    base = grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo")
    got = grpo.compute_advantages(torch.tensor(REWARDS), "dr_grpo", soft_reweight=True, reweight_eps=1e-6)
    np.testing.assert_allclose(got.numpy(), base.numpy() * factor[:, None], rtol=1e-5, atol=1e-7)
    # the highest-variance group keeps (almost) its full advantage
    top = int(std.argmax())
    np.testing.assert_allclose(got[top].numpy(), base[top].numpy(), rtol=1e-4)


def test_unknown_method_and_bad_params_are_clear_errors():
    with pytest.raises(ValueError, match="valid: dr_grpo, grpo, rloo, softmax, softmax_centered"):
        grpo.compute_advantages(torch.tensor(REWARDS), "ppo")
    with pytest.raises(ValueError, match="tau"):
        grpo.compute_advantages(torch.tensor(REWARDS), "softmax", tau=0.0)
    with pytest.raises(ValueError, match="group_size"):
        grpo.compute_advantages(torch.tensor([1.0, 0.0]), "grpo")


def test_tau_schedule():
    assert grpo.tau_at_step(7, 100, "constant", 0.5, 0.75, 0.25) == 0.5
    assert grpo.tau_at_step(1, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.75)
    assert grpo.tau_at_step(51, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.5)
    assert grpo.tau_at_step(101, 101, "linear", 0.5, 0.75, 0.25) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        grpo.tau_at_step(1, 10, "cosine", 0.5, 0.75, 0.25)


def test_select_groups_top_k_and_zero_std():
    r = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.5], [1.0, 0.0], [0.2, 0.2]])  # stds .5 0 .25 .5 0
    assert grpo.select_groups(r).tolist() == [0, 1, 2, 3, 4]
    assert grpo.select_groups(r, top_k=2).tolist() == [0, 3]  # the two with std .5, in original order
    assert grpo.select_groups(r, top_k=3).tolist() == [0, 2, 3]
    assert grpo.select_groups(r, top_k=0.5).tolist() == [0, 2, 3]  # ceil(0.5 * 5) = 3
    assert grpo.select_groups(r, drop_zero_std=True).tolist() == [0, 2, 3]
    assert grpo.select_groups(r, top_k=4, drop_zero_std=True).tolist() == [0, 2, 3]


def test_advantage_stats_effective_sample_size():
    adv = torch.tensor([[1.0, 1.0, 1.0, 1.0], [3.0, -1.0, -1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    s = grpo.advantage_stats(adv)
    ess = [16 / 4, (6 ** 2) / 12]  # (sum|a|)^2 / sum a^2; the all-zero group is excluded
    assert s["advantage/ess"] == pytest.approx(np.mean(ess))
    assert s["advantage/max"] == 3.0 and s["advantage/min"] == -1.0


# ------------------------------------------------------------------ losses


def _loss_batch():
    torch.manual_seed(1)
    loss = torch.randn(5, 7)
    lens = [7, 3, 5, 1, 4]
    mask = torch.zeros(5, 7, dtype=torch.bool)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    return loss, mask, lens


def test_aggregate_loss_modes_match_hand_computation():
    loss, mask, lens = _loss_batch()
    rows = [loss[i, :n].tolist() for i, n in enumerate(lens)]
    flat = [x for r in rows for x in r]
    assert grpo.aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(sum(flat) / len(flat), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(
        np.mean([np.mean(r) for r in rows]), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(
        np.mean([np.sum(r) for r in rows]), rel=1e-5)
    assert grpo.aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(
        sum(flat) / (5 * 10), rel=1e-5)
    with pytest.raises(ValueError, match="token-mean"):
        grpo.aggregate_loss(loss, mask, "sum")


@pytest.mark.parametrize("mode", grpo.LOSS_AGG_MODES)
def test_gradient_accumulation_equals_full_batch(mode):
    loss, mask, _ = _loss_batch()
    full = grpo.aggregate_loss(loss, mask, mode, max_len=9)
    total_tokens, total_seqs = int(mask.sum()), loss.shape[0]
    parts = [grpo.aggregate_loss(loss[s:s + 2], mask[s:s + 2], mode, max_len=9,
                                 total_tokens=total_tokens, total_seqs=total_seqs) for s in range(0, 5, 2)]
    assert sum(parts).item() == pytest.approx(full.item(), rel=1e-6)


class _Eps:
    epsilon_low, epsilon_high, clip_ratio_c = 0.2, 0.28, 3.0


def test_ppo_with_ratio_one_is_the_plain_policy_gradient():
    torch.manual_seed(2)
    logits = torch.randn(3, 6, requires_grad=True)
    adv = torch.tensor([[1.5], [-0.7], [0.3]]).expand(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    lp = torch.log_softmax(logits, -1)
    plain, _ = grpo.POLICY_LOSSES["pg"].fn(lp, lp.detach(), adv, mask, _Eps)
    (g_plain,) = torch.autograd.grad(plain.sum(), logits)
    for name in ("ppo", "dual_clip", "cispo"):
        lp = torch.log_softmax(logits, -1)
        loss, metrics = grpo.POLICY_LOSSES[name].fn(lp, lp.detach(), adv, mask, _Eps)
        (g,) = torch.autograd.grad(loss.sum(), logits)
        torch.testing.assert_close(g, g_plain)
        assert metrics["clip_frac"] == 0.0


def test_clipping_stops_the_gradient_outside_the_trust_region():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    old = torch.log(torch.tensor([0.5, 2.0, 0.5, 2.0]))  # ratios 2, 0.5, 2, 0.5
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, metrics = grpo.POLICY_LOSSES["ppo"].fn(lp, old, adv, torch.ones(4, dtype=torch.bool), _Eps)
    loss.sum().backward()
    # A > 0 and ratio above 1 + eps_high: clipped, no gradient; A > 0 and ratio low: still pushed up
    # A < 0 and ratio high: pushed down; A < 0 and ratio below 1 - eps_low: clipped
    assert metrics["clip_frac"] == 0.5
    assert lp.grad.tolist() == pytest.approx([0.0, -0.5, 2.0, 0.0])
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 2.0, 0.8])


def test_kl_estimators():
    lp = torch.log(torch.tensor([0.2, 0.5, 0.9]))
    ref = torch.log(torch.tensor([0.4, 0.5, 0.3]))
    d = (ref - lp).numpy()
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k3").numpy(), np.exp(d) - d - 1, rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k1").numpy(), -d, rtol=1e-6)
    np.testing.assert_allclose(grpo.kl_penalty(lp, ref, "k2").numpy(), 0.5 * d ** 2, rtol=1e-6)
    assert grpo.kl_k3(lp, lp).abs().max() == 0
    # an infinite log-prob on either side: large and finite, never NaN (log-ratio clamped at +-20)
    inf = torch.tensor([float("-inf"), 0.0])
    k3 = grpo.kl_k3(inf, torch.tensor([0.0, float("-inf")]))
    assert torch.isfinite(k3).all() and k3[0] == pytest.approx(math.exp(20) - 21, rel=1e-5)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        grpo.kl_penalty(lp, ref, "k4")


def test_overlong_penalty_is_dapo_linear_ramp():
    lengths = torch.tensor([10, 80, 81, 90, 100])
    got = grpo.overlong_penalty(lengths, max_len=100, buffer_len=20, penalty=1.0)
    assert got.tolist() == pytest.approx([0.0, 0.0, -0.05, -0.5, -1.0])
    assert grpo.overlong_penalty(lengths, 100, 0, 1.0).abs().sum() == 0


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


# ------------------------------------------------------------------ sampling


def test_generate_greedy_equals_argmax_of_full_forward_at_every_step():
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 10, 11, 12, 13]]
    outs = rollout.generate(model, prompts, max_new_tokens=8, eos_token_id=[22], temperature=0.0)
    for prompt, out in zip(prompts, outs):
        seq = list(prompt)
        for tok in out:
            with torch.no_grad():
                nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            assert tok == nxt
            seq.append(tok)
            if tok == 22:
                break
        assert len(out) == 8 or out[-1] == 22


def test_generate_stops_at_the_first_end_token():
    model = tiny_model()
    prompts = [[3, 4, 5], [8, 9, 1, 2]]
    free = rollout.generate(model, prompts, max_new_tokens=6, eos_token_id=[99], temperature=0.0)
    stop_at = free[0][2]
    outs = rollout.generate(model, prompts, max_new_tokens=6, eos_token_id=[stop_at], temperature=0.0)
    first = free[0].index(stop_at)
    assert outs[0] == free[0][: first + 1]
    if stop_at in free[1]:
        assert outs[1] == free[1][: free[1].index(stop_at) + 1]
    else:
        assert outs[1] == free[1]


def test_cached_sampling_log_probs_equal_a_full_recompute():
    """Catches off-by-one prompt positions: the rollout's log-probs must be the training forward's."""
    model = tiny_model()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 10, 11, 12, 13], [5]]
    out = rollout.sample(model, prompts, max_new_tokens=10, eos_token_id=[22], temperature=1.0, seed=3)
    episodes = [Episode(prompt="", prompt_token_ids=p, generated_token_ids=g, text="", reward=0.0,
                        reward_info={}, finished=False, group_idx=0) for p, g in zip(prompts, out.tokens)]
    with torch.no_grad():
        fwd = update.forward_completions(model, episodes, pad_token_id=0)
        lp, ent, _ = update.token_statistics(fwd.logits, fwd.targets)
        targets, mask = fwd.targets, fwd.mask
    for i, g in enumerate(out.tokens):
        n = len(g)
        assert mask[i].sum() == n
        assert targets[i, :n].tolist() == g
        np.testing.assert_allclose(out.log_probs[i], lp[i, :n].numpy(), atol=1e-5)
        np.testing.assert_allclose(out.entropies[i], ent[i, :n].numpy(), atol=1e-5)


def test_sampling_is_reproducible_with_a_seed():
    model = tiny_model()
    a = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=5)
    b = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=5)
    c = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=6)
    assert a == b and a != c


class CharTok:
    """A minimal tokenizer for rollout tests: one id per character of a fixed alphabet."""

    alphabet = "0123456789+-*/()=, \n<>/abcdefghijklmnopqrstuvwxyz"
    end_token_ids = [len(alphabet)]
    eos_token_id = len(alphabet)
    pad_token_id = len(alphabet)

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] if i < len(self.alphabet) else "" for i in ids)


def test_section_start_finds_the_first_token_of_the_answer_tag():
    tok = CharTok()
    text = "1+2=3</think>\n<answer>1+2</answer>"
    ids = tok.encode(text)
    assert rollout.section_start(tok, ids, text) == text.index("<answer>")
    assert rollout.section_start(tok, ids, "no tag here") is None


def test_rollout_groups_rewards_and_episode_fields():
    tok = CharTok()
    model = tiny_model(vocab=len(tok.alphabet) + 1)
    problems = ["a", "b"]
    seen = []

    def reward_fn(problem, text):
        seen.append((problem, text))
        return {"reward": float(len(text) % 3), "reward_info": {"answer_reward": 0.0, "format_reward": 0.0}}

    eps = rollout.rollout(model, tok, problems, ["12", "345"], reward_fn, num_answers_per_question=3,
                       max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert len(eps) == 6
    assert [e.group_idx for e in eps] == [0, 0, 0, 1, 1, 1]
    assert [e.problem for e in eps] == ["a"] * 3 + ["b"] * 3
    for e in eps:
        assert e.prompt_token_ids == tok.encode(e.prompt)
        assert len(e.log_probs) == len(e.entropies) == len(e.generated_token_ids)
        assert e.reward == float(len(e.text) % 3)
        if e.finished:
            assert e.generated_token_ids[-1] == tok.eos_token_id
            assert e.text == tok.decode(e.generated_token_ids[:-1])


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
                               update.UpdateConfig(micro_batch_size=1, loss_agg_mode=mode, max_len=8))
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
    stats = update.update_policy(model, torch.optim.SGD(model.parameters(), lr=0.1), eps, torch.tensor([1.0, -1.0, 0.5, 2.0]),
                               update.UpdateConfig(micro_batch_size=micro_batch))
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
    cfg = update.UpdateConfig(micro_batch_size=2, teacher_forcing_coef=0.5)
    frozen = [i in flat for i in range(len(eps))]
    per_rank = [update._work_units(eps, teachers, cfg, Dist(r, world), True, frozen) for r in range(world)]
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
        update.update_policy(model, opt, eps, adv, update.UpdateConfig(micro_batch_size=mb, max_grad_norm=1e9,
                                                                    loss_agg_mode="seq-mean-token-mean"))
        grads.append(captured["g"])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_non_finite_loss_skips_the_update():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stats = update.update_policy(model, opt, [_episode([1, 2], [3, 4])], torch.tensor([float("nan")]),
                               update.UpdateConfig())
    assert stats.skipped
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_ppo_iterations_and_kl_to_a_reference():
    model, ref = tiny_model(), tiny_model()
    ep = _episode([1, 2, 3], [4, 5, 6])
    ep.log_probs = [-8.0, -8.0, -8.0]  # a sampler far less sure (current ~ -3): ratio ~ e^5 > 1 + eps, clipped
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = update.UpdateConfig(num_iterations=2, policy_loss="ppo", old_log_probs="rollout", epsilon_low=0.2,
                            epsilon_high=0.2, beta=0.1)
    stats = update.update_policy(model, opt, [ep], torch.tensor([1.0]), cfg, ref_model=ref)
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
                               update.UpdateConfig(teacher_forcing_coef=1.0), teacher_episodes=[teacher])
    assert _seq_log_prob(model, teacher) > before
    assert stats.metrics["teacher_nll"] == pytest.approx(-before / 4, rel=1e-4)
