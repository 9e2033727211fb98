"""Token weighters and the attribution head against hand computations (loops, numpy, explicit formulas)."""
import math

import numpy as np
import pytest
import torch

import grpo_mitigations as gm
from data_types import TokenBatch


def make_batch(mask, answer_mask=None, **tensors) -> TokenBatch:
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if answer_mask is None:
        answer_mask = torch.zeros_like(mask)
    fields = dict(token_ids=torch.zeros(mask.shape, dtype=torch.long), mask=mask,
                  log_probs=torch.zeros(mask.shape), entropy=torch.zeros(mask.shape),
                  rollout_entropy=torch.zeros(mask.shape),
                  answer_mask=torch.as_tensor(answer_mask, dtype=torch.bool))
    fields.update(tensors)
    return TokenBatch(**fields)


def np_masked_softmax_times_count(scores: np.ndarray, mask: np.ndarray) -> np.ndarray:
    out = np.zeros_like(scores, dtype=np.float64)
    for r in range(scores.shape[0]):
        idx = np.flatnonzero(mask[r])
        if idx.size == 0:
            continue
        s = scores[r, idx].astype(np.float64)
        e = np.exp(s - s.max())
        out[r, idx] = e / e.sum() * idx.size
    return out


# ----------------------------------------------------------------------------- outcome_conditional


def test_outcome_conditional_think_answer_padding():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    answer = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    w = gm.outcome_conditional_weights(answer, mask, 0.3)
    expected = torch.tensor([[0.3, 0.3, 1.0, 1.0, 0.0], [0.3, 0.3, 0.3, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    w_cls = gm.build_weighter("outcome_conditional", think_discount=0.3).weights(make_batch(mask, answer))
    torch.testing.assert_close(w_cls, expected)


def test_none_weighter_is_mask_as_float():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    w = gm.build_weighter("none").weights(make_batch(mask))
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- inverse_logprob


def test_inverse_logprob_values_and_detached_gradient():
    eps = 0.1
    lp_vals = [[-0.01, -0.5, -3.0, -7.0], [-1.0, -0.2, 0.0, 0.0]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.5], [-0.7]])
    leaf = torch.tensor(lp_vals, requires_grad=True)
    log_probs = leaf * 1.0  # non-leaf, like the model's output
    w = gm.inverse_logprob_weights(log_probs, mask, eps)
    assert not w.requires_grad

    expected_w = [[1.0 / (abs(v) + eps) if m else 0.0 for v, m in zip(row, mrow)]
                  for row, mrow in zip(lp_vals, mask.tolist())]
    torch.testing.assert_close(w, torch.tensor(expected_w))

    (w * adv * log_probs).sum().backward()
    a = adv.expand(-1, 4).tolist()
    expected_grad = [[expected_w[r][t] * a[r][t] for t in range(4)] for r in range(2)]
    torch.testing.assert_close(leaf.grad, torch.tensor(expected_grad))

    # the seeds' non-detached rule: d/dlp [A lp / (|lp| + eps)] = A eps / (|lp| + eps)^2 -- not what we get
    seed_grad = [[a[r][t] * eps / (abs(lp_vals[r][t]) + eps) ** 2 if mask[r, t] else 0.0 for t in range(4)]
                 for r in range(2)]
    leaf2 = torch.tensor(lp_vals, requires_grad=True)
    (adv * leaf2 / (leaf2.abs() + eps) * mask).sum().backward()
    torch.testing.assert_close(leaf2.grad, torch.tensor(seed_grad))  # the hand formula is right
    assert not torch.allclose(leaf.grad, torch.tensor(seed_grad), rtol=1e-2, atol=1e-3)


def test_inverse_logprob_weighter_class():
    lp = torch.tensor([[-0.5, -2.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    w = gm.build_weighter("inverse_logprob", logprob_offset=0.5).weights(make_batch(mask, log_probs=lp))
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.4, 0.0]]))


# ----------------------------------------------------------------------------- entropy weighted


def test_entropy_weighted_matches_numpy():
    g = torch.Generator().manual_seed(3)
    ent = torch.rand(3, 6, generator=g) * 3
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for temp in (0.5, 1.0, 2.0):
        w = gm.entropy_weighted_weights(ent, mask, temp)
        ref = np_masked_softmax_times_count(ent.numpy() / temp, mask.numpy())
        np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(w.sum(-1).numpy(), [6.0, 4.0, 1.0], rtol=1e-5)
        assert (w[~mask] == 0).all()
    b = make_batch(mask, rollout_entropy=ent)
    torch.testing.assert_close(gm.build_weighter("entropy_weighted", entropy_temp=0.5).weights(b),
                               gm.entropy_weighted_weights(ent, mask, 0.5))


def test_entropy_weighted_lower_temperature_is_more_peaked():
    ent = torch.tensor([[0.1, 0.5, 2.0, 1.0]])
    mask = torch.ones_like(ent, dtype=torch.bool)
    w_cold = gm.entropy_weighted_weights(ent, mask, 0.25)
    w_hot = gm.entropy_weighted_weights(ent, mask, 4.0)
    assert w_cold.max() > w_hot.max() > 1.0
    assert w_cold.min() < w_hot.min() < 1.0
    assert int(w_cold.argmax()) == int(w_hot.argmax()) == 2  # the highest-entropy token gets the most weight


# ----------------------------------------------------------------------------- entropy masking


@pytest.mark.parametrize("pct", [0.0, 12.5, 37.0, 50.0, 80.0, 99.9])
def test_entropy_threshold_matches_numpy_percentile(pct):
    values = np.random.default_rng(7).gamma(2.0, 0.7, size=53)
    got = gm.entropy_threshold(torch.tensor(values), pct)
    assert got == pytest.approx(float(np.percentile(values, pct, method="linear")), rel=1e-12, abs=1e-12)


def test_entropy_threshold_empty_is_inf():
    assert gm.entropy_threshold(torch.zeros(0), 80.0) == float("inf")


def test_entropy_mask_keeps_exactly_tokens_at_or_above_threshold():
    ent = torch.tensor([[0.25, 1.5, 0.75, 2.0], [1.5, 0.5, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    w = gm.entropy_mask_weights(ent, mask, 1.5)
    expected = [[float(e >= 1.5 and m) for e, m in zip(er, mr)] for er, mr in zip(ent.tolist(), mask.tolist())]
    assert expected == [[0, 1, 0, 1], [1, 0, 1, 0]]
    torch.testing.assert_close(w, torch.tensor(expected))


def test_entropy_masking_threshold_is_over_whole_batch():
    rows = [[0.25, 0.5, 0.75], [5.0, 6.0, 7.0, 8.0]]
    weighter = gm.build_weighter("entropy_masking", mask_percentile=50.0)
    weighter.begin_batch(rows)
    flat = [h for r in rows for h in r]
    assert weighter.threshold == pytest.approx(float(np.percentile(flat, 50.0)))  # 5.0
    # a per-row threshold would have kept row 0's upper half; the batch threshold keeps none of it
    assert weighter.threshold > max(rows[0])

    ent = torch.tensor([r + [0.0] * (4 - len(r)) for r in rows])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    w = weighter.weights(make_batch(mask, rollout_entropy=ent))
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]))
    metrics = weighter.pop_metrics()
    assert metrics["entropy_mask/kept_frac"] == pytest.approx(4 / 7)
    assert weighter.pop_metrics() == {}


# ----------------------------------------------------------------------------- attention credit


def brute_force_answer_attention(q, k, prompt_lens, answer_mask, mask):
    """Full causal attention map per head, kv head h // (H / KV), averaged over heads and answer queries."""
    q, k = q.double().numpy(), k.double().numpy()
    b, n_heads, seq_len, d = q.shape
    group = n_heads // k.shape[1]
    out = np.zeros(mask.shape)
    for r in range(b):
        p0 = int(prompt_lens[r])
        answer_rows = [p0 + t for t in range(mask.shape[1]) if answer_mask[r, t]]
        if not answer_rows:
            continue
        maps = []
        for h in range(n_heads):
            kk = k[r, h // group]
            att = np.zeros((seq_len, seq_len))
            for i in range(seq_len):
                s = np.array([q[r, h, i] @ kk[j] / math.sqrt(d) for j in range(i + 1)])
                e = np.exp(s - s.max())
                att[i, : i + 1] = e / e.sum()
            maps.append(att)
        mean_map = np.mean(maps, axis=0)  # [L, L]
        read = mean_map[answer_rows].mean(axis=0)
        for t in range(int(mask[r].sum())):
            out[r, t] = read[p0 + t]
    return out


def test_answer_attention_matches_brute_force_gqa():
    g = torch.Generator().manual_seed(11)
    b, n_heads, n_kv, d = 3, 4, 2, 8
    prompt_lens = torch.tensor([3, 5, 2])
    gen_lens = [6, 4, 5]
    seq_len = max(int(p) + n for p, n in zip(prompt_lens, gen_lens))
    t_max = max(gen_lens)
    q = torch.randn(b, n_heads, seq_len, d, generator=g)
    k = torch.randn(b, n_kv, seq_len, d, generator=g)
    mask = torch.tensor([[t < n for t in range(t_max)] for n in gen_lens])
    answer = torch.zeros_like(mask)
    answer[0, 3:6] = True  # 3 answer tokens
    answer[2, 4] = True  # a single answer token
    answer &= mask  # row 1 has no answer
    got = gm.answer_attention(q, k, prompt_lens, answer, mask)
    ref = brute_force_answer_attention(q, k, prompt_lens, answer, mask)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)
    assert (got[1] == 0).all()
    assert (got[~mask] == 0).all()
    assert got[0].sum() > 0 and got[2].sum() > 0


def test_answer_attention_gqa_head_mapping_matters():
    # head h reads kv head h // (H / KV) (repeat_interleave), not h % KV (tiling)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 6, 4, generator=g)
    k = torch.randn(1, 2, 6, 4, generator=g)
    mask = torch.ones(1, 4, dtype=torch.bool)
    answer = torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)
    pl = torch.tensor([2])
    got = gm.answer_attention(q, k, pl, answer, mask)
    torch.testing.assert_close(got, gm.answer_attention(q, k[:, [0, 0, 1, 1]], pl, answer, mask))
    assert not torch.allclose(got, gm.answer_attention(q, k[:, [0, 1, 0, 1]], pl, answer, mask))


def test_attention_credit_weights_hand_example():
    credit = torch.tensor([
        [0.1, 0.2, 0.9, 0.5, 0.7],  # think 0..2 (mean 0.4), answer 3..4
        [0.3, 0.1, 0.2, 0.0, 0.0],  # no answer, 3 tokens
        [0.3, 0.3, 0.8, 0.0, 0.0],  # think 0..1, answer 2, padding
    ])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    answer = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=torch.bool)
    w = gm.attention_credit_weights(credit, answer, mask, credit_scale=2.0)
    # row 0: 0.1/0.4=0.25 -> 0.5 (clamped up), 0.2/0.4=0.5, 0.9/0.4=2.25 -> 2.0 (clamped down)
    expected = torch.tensor([[0.5, 0.5, 2.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected)
    # a wider scale leaves the normalized values unclamped: think mean is exactly 1
    w4 = gm.attention_credit_weights(credit, answer, mask, credit_scale=4.0)
    torch.testing.assert_close(w4[0], torch.tensor([0.25, 0.5, 2.25, 1.0, 1.0]))
    assert float(w4[0, :3].mean()) == pytest.approx(1.0)


def test_attention_credit_weighter_end_to_end():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 7, 4, generator=g)
    k = torch.randn(2, 2, 7, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    answer = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    pl = torch.tensor([2, 2])
    b = make_batch(mask, answer, last_q=q, last_k=k, prompt_lens=pl)
    w = gm.build_weighter("attention_credit", credit_scale=3.0).weights(b)
    credit = brute_force_answer_attention(q, k, pl, answer, mask)
    think = credit[0, :3] / credit[0, :3].mean()
    np.testing.assert_allclose(w[0, :3].numpy(), np.clip(think, 1 / 3, 3.0), rtol=1e-5)
    torch.testing.assert_close(w[0, 3:], torch.ones(2))
    torch.testing.assert_close(w[1], torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------- attribution head


def test_attribution_head_init():
    head = gm.AttributionHead(4000)
    w = head.proj.weight.detach()
    assert w.shape == (1, 4000)
    assert float(w.std()) == pytest.approx(0.01, rel=0.1)
    assert abs(float(w.mean())) < 0.002
    assert head.proj.bias is None  # a per-sequence softmax ignores a shared shift: no bias


def set_head(head: gm.AttributionHead, vec):
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([vec], dtype=torch.float32))


def test_attribution_weights_softmax_times_count():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(3, 5, 6, generator=g)
    mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [0] * 5], dtype=torch.bool)
    weighter = gm.build_weighter("attribution", hidden_size=6)
    vec = torch.randn(6, generator=g).tolist()
    set_head(weighter.head, vec)
    w = weighter.weights(make_batch(mask, hidden=hidden))
    scores = hidden.numpy() @ np.array(vec)
    ref = np_masked_softmax_times_count(scores, mask.numpy())
    np.testing.assert_allclose(w.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(w.detach().sum(-1).numpy(), [5.0, 3.0, 0.0], atol=1e-5)
    assert (w[~mask] == 0).all()


def test_attribution_gradient_reaches_head_not_hidden():
    g = torch.Generator().manual_seed(9)
    policy_h = torch.randn(2, 4, 3, generator=g, requires_grad=True)  # the policy's hidden states
    hidden = policy_h.detach()  # what update_policy passes
    assert not hidden.requires_grad
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    c = torch.randn(2, 4, generator=g)  # stands for A x log pi per token
    weighter = gm.build_weighter("attribution", hidden_size=3)
    vec = [0.4, -0.2, 0.7]
    set_head(weighter.head, vec)
    w = weighter.weights(make_batch(mask, hidden=hidden))
    assert w.requires_grad
    (w * c).sum().backward()
    assert policy_h.grad is None and hidden.grad is None

    # dL/ds_t = n p_t (c_t - sum_j p_j c_j);  dL/dW = sum_t dL/ds_t h_t. A bias would get sum_t dL/ds_t = 0.
    h, cc, m = hidden.double().numpy(), c.double().numpy(), mask.numpy()
    grad_w, grad_b = np.zeros(3), 0.0
    for r in range(2):
        idx = np.flatnonzero(m[r])
        s = h[r, idx] @ np.array(vec)
        p = np.exp(s - s.max())
        p /= p.sum()
        ds = idx.size * p * (cc[r, idx] - (p * cc[r, idx]).sum())
        grad_w += ds @ h[r, idx]
        grad_b += ds.sum()
    np.testing.assert_allclose(weighter.head.proj.weight.grad.numpy()[0], grad_w, rtol=1e-4, atol=1e-6)
    assert grad_b == pytest.approx(0.0, abs=1e-9)  # why the head has no bias
    assert np.abs(grad_w).max() > 1e-3
    assert [p for p in weighter.parameters()] == [weighter.head.proj.weight]


def test_attribution_empty_row_gives_finite_gradient():
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    weighter = gm.build_weighter("attribution", hidden_size=4, attribution_entropy_coef=0.1)
    b = make_batch(mask, hidden=hidden)
    w = weighter.weights(b)
    ((w * torch.randn(2, 3)).sum() + weighter.aux_loss(b, w)).backward()
    assert all(torch.isfinite(p.grad).all() for p in weighter.parameters())


def np_row_entropy(w: np.ndarray, m: np.ndarray) -> float:
    n = m.sum()
    p = w[m.astype(bool)] / n
    return float(-(p * np.log(p)).sum())


def test_attribution_aux_loss_is_minus_coef_mean_entropy():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 4, 5, generator=g) * 5
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = make_batch(mask, hidden=hidden)
    weighter = gm.build_weighter("attribution", hidden_size=5, attribution_entropy_coef=0.3)
    set_head(weighter.head, torch.randn(5, generator=g).tolist())
    w = weighter.weights(b)
    aux = weighter.aux_loss(b, w)
    wn, mn = w.detach().double().numpy(), mask.numpy()
    ents = [np_row_entropy(wn[r], mn[r]) for r in range(2)]  # the empty row is left out
    assert float(aux.detach()) == pytest.approx(-0.3 * np.mean(ents), rel=1e-5)
    assert aux.requires_grad
    assert gm.build_weighter("attribution", hidden_size=5).aux_loss(b, w) is None


def test_attribution_metrics_match_hand_values():
    weighter = gm.build_weighter("attribution", hidden_size=1)
    set_head(weighter.head, [1.0])  # score = hidden value
    h1 = np.array([[0.0, 1.0, 2.0], [0.5, -0.5, 0.0]])
    m1 = np.array([[1, 1, 1], [1, 1, 0]], dtype=bool)
    h2 = np.array([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    m2 = np.array([[1, 1, 0], [0, 0, 0]], dtype=bool)  # one empty row: not counted
    per_row = []  # (entropy, max, min, std) of each non-empty row
    for h, m in ((h1, m1), (h2, m2)):
        weighter.weights(make_batch(torch.tensor(m), hidden=torch.tensor(h, dtype=torch.float32)[..., None]))
        w = np_masked_softmax_times_count(h, m)
        for r in range(2):
            if not m[r].any():
                continue
            v = w[r, m[r]]
            per_row.append((np_row_entropy(w[r], m[r]), v.max(), v.min(), v.std()))
    assert len(per_row) == 3
    metrics = weighter.pop_metrics()
    expected = np.mean(per_row, axis=0)
    for key, value in zip(("entropy", "max", "min", "std"), expected):
        assert metrics[f"attribution/{key}"] == pytest.approx(value, rel=1e-5), key
    assert weighter.pop_metrics() == {}


def test_attribution_state_dict_round_trip():
    a = gm.build_weighter("attribution", hidden_size=7)
    torch.manual_seed(123)
    b = gm.build_weighter("attribution", hidden_size=7)
    hidden = torch.randn(2, 3, 7)
    batch = make_batch(torch.ones(2, 3, dtype=torch.bool), hidden=hidden)
    assert not torch.allclose(a.weights(batch), b.weights(batch))
    state = a.state_dict()
    assert set(state) == {"proj.weight"}
    assert all(not v.requires_grad and v.device.type == "cpu" for v in state.values())
    b.load_state_dict(state)
    torch.testing.assert_close(b.weights(batch), a.weights(batch))
    # a head saved before the bias was removed still loads (the bias never changed a weight)
    b.load_state_dict({**state, "proj.bias": torch.tensor([0.25])})
    torch.testing.assert_close(b.weights(batch), a.weights(batch))


def test_stateless_weighter_rejects_state():
    w = gm.build_weighter("none")
    assert w.state_dict() == {}
    w.load_state_dict({})
    with pytest.raises(ValueError, match="no state"):
        w.load_state_dict({"proj.weight": torch.zeros(1)})


# ----------------------------------------------------------------------------- registry


EXPECTED_NAMES = {"none", "outcome_conditional", "inverse_logprob", "attention_credit",
                  "entropy_weighted", "entropy_masking", "attribution"}


def test_every_registered_name_builds():
    assert set(gm.WEIGHTERS) == EXPECTED_NAMES
    for name in gm.WEIGHTERS:
        w = gm.build_weighter(name, hidden_size=8, think_discount=0.5, logprob_offset=0.1, credit_scale=2.0,
                              entropy_temp=1.0, mask_percentile=80.0, attribution_entropy_coef=0.0)
        assert isinstance(w, gm.WEIGHTERS.get(name)) and w.name == name
    assert gm.build_weighter("attribution", hidden_size=8).needs_hidden
    assert gm.build_weighter("attention_credit").needs_last_qk


def test_unknown_weighter_lists_valid_names():
    with pytest.raises(ValueError) as err:
        gm.build_weighter("entropy_weigted")
    for name in EXPECTED_NAMES:
        assert name in str(err.value)


@pytest.mark.parametrize("name, params", [
    ("outcome_conditional", {"think_discount": 1.5}),
    ("outcome_conditional", {"think_discount": -0.1}),
    ("inverse_logprob", {"logprob_offset": 0.0}),
    ("attention_credit", {"credit_scale": 0.5}),
    ("entropy_weighted", {"entropy_temp": 0.0}),
    ("entropy_masking", {"mask_percentile": 100.0}),
    ("entropy_masking", {"mask_percentile": -1.0}),
    ("attribution", {"hidden_size": 0}),
    ("attribution", {"hidden_size": 4, "attribution_entropy_coef": -0.1}),
])
def test_out_of_range_params_raise(name, params):
    with pytest.raises(ValueError):
        gm.build_weighter(name, **params)


@pytest.mark.parametrize("name, params", [
    ("outcome_conditional", {"think_discount": 0.0}),
    ("outcome_conditional", {"think_discount": 1.0}),
    ("attention_credit", {"credit_scale": 1.0}),
    ("entropy_masking", {"mask_percentile": 0.0}),
])
def test_boundary_params_accepted(name, params):
    gm.build_weighter(name, **params)


def test_advantage_regression_objective():
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.5, -0.5, 0.0])
    weighter = gm.build_weighter("attribution", hidden_size=5, objective="advantage_regression")
    vec = torch.randn(5, generator=g).tolist()
    set_head(weighter.head, vec)
    b = make_batch(mask, hidden=hidden, advantages=adv)
    w = weighter.weights(b)
    scores = hidden.numpy() @ np.array(vec)
    ref = np_masked_softmax_times_count(scores * np.sign(adv.numpy())[:, None], mask.numpy())
    np.testing.assert_allclose(w.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert not w.requires_grad  # the policy loss cannot move the head
    np.testing.assert_allclose(w[2, :2].numpy(), [1.0, 1.0], rtol=1e-6)  # A = 0: uniform
    aux = weighter.aux_loss(b, w)
    pred = [scores[r, mask[r].numpy()].mean() for r in range(3)]
    assert float(aux.detach()) == pytest.approx(np.mean([(p - a) ** 2 for p, a in zip(pred, adv.tolist())]), rel=1e-5)
    aux.backward()
    assert weighter.head.proj.weight.grad.abs().max() > 0


def test_attribution_correlation_metrics():
    weighter = gm.build_weighter("attribution", hidden_size=1)
    set_head(weighter.head, [1.0])
    h = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # scores rise with position, so weights do too
    lp = torch.tensor([[-0.1, -0.2, -0.3, -0.4]])
    weighter.weights(make_batch(torch.ones(1, 4, dtype=torch.bool), hidden=h[..., None], log_probs=lp,
                                entropy=torch.tensor([[1.0, 0.5, 1.0, 0.5]])))
    m = weighter.pop_metrics()
    w = np_masked_softmax_times_count(h.numpy(), np.ones((1, 4), dtype=bool))[0]
    assert m["attribution/corr_rel_position"] == pytest.approx(np.corrcoef(w, np.arange(4) / 4)[0, 1], rel=1e-6)
    assert m["attribution/corr_log_prob"] == pytest.approx(np.corrcoef(w, lp[0].numpy())[0, 1], rel=1e-5)
    assert m["attribution/corr_log_prob"] < -0.9 and m["attribution/corr_rel_position"] > 0.9
