"""Every term of the update, proven on the gradient.

One `update_policy` call with SGD (lr 1, no norm clipping) moves each parameter by minus the gradient of the
loss it optimizes. Here that loss is written out again from the formulas (per sequence, unpadded forwards,
plain Python loops for the aggregation), and the parameter change must equal minus its gradient, for every
policy loss, every token weighter, KL estimator and entropy bonus, in two aggregation modes and two
micro-batch sizes. Replacing the weights with ones, dropping a stop-gradient or flipping the KL sign each
changes the gradient, so each fails here.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import grpo
import grpo_mitigations as gm
import update
from conftest import random_model
from data_types import Episode, UpdateStats
from qwen2_model import Transformer

VOCAB = 23
ADVANTAGES = [1.3, -0.8, 0.5, -1.1]
AGG_MODES = ("token-mean", "seq-mean-token-sum")
MAX_LEN = 9
EPS_LOW, EPS_HIGH, CLIP_C = 0.2, 0.28, 3.0


def make_model(seed: int = 0) -> Transformer:
    return random_model(VOCAB, seed)


def per_sequence_forward(model: Transformer, e: Episode, **kw):
    """Unpadded forward of one prompt + completion; outputs at the positions predicting completion tokens."""
    seq = torch.tensor([e.prompt_token_ids + e.generated_token_ids])
    p, n = len(e.prompt_token_ids), len(e.generated_token_ids)
    out = model(seq, **kw)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    logp = torch.log_softmax(logits[0, p - 1: p - 1 + n].float(), -1)
    return logp.gather(-1, torch.tensor(e.generated_token_ids)[:, None]).squeeze(-1), logp, out


def make_episodes(model: Transformer) -> list[Episode]:
    """Four completions of different lengths; rollout log-probs off from the policy's (so ratios != 1, some
    beyond the clip range, one A < 0 episode beyond the dual-clip bound), answer tags in some."""
    gen = torch.Generator().manual_seed(3)
    # episodes 1 and 3 answer the same prompt, as a GRPO group does: the update runs it once (shared prompts)
    specs = [([1, 2, 3], [4, 5, 6, 7, 8, 9], 3), ([2, 7], [10, 11, 12], None), ([4, 4, 5, 6], [13, 3, 9, 14, 2], 2),
             ([2, 7], [15, 16, 17, 18, 19, 20, 21], 4)]
    episodes = []
    for k, (prompt, completion, answer_start) in enumerate(specs):
        e = Episode(prompt="", prompt_token_ids=prompt, generated_token_ids=completion, text="", reward=0.0,
                    reward_info={}, finished=True, group_idx=0, answer_start=answer_start)
        with torch.no_grad():
            lp, _, _ = per_sequence_forward(model, e)
        noise = 0.35 * torch.randn(len(completion), generator=gen)
        if k == 1:  # A = -0.8: rollout far less likely than now -> ratio > clip_ratio_c for dual-clip
            noise = noise - 1.6
        e.log_probs = (lp + noise).tolist()
        e.entropies = (0.2 + 2.0 * torch.rand(len(completion), generator=gen)).tolist()
        episodes.append(e)
    return episodes


# ------------------------------------------------------------------ the reference, from the formulas


def reference_weights(name: str, model: Transformer, episodes: list[Episode], lps: list[torch.Tensor],
                      weighter: gm.TokenWeighter, params: dict, reg_terms: list, advantages=ADVANTAGES
                      ) -> list[torch.Tensor]:
    out = []
    all_h = np.concatenate([e.entropies for e in episodes])
    threshold = np.percentile(all_h, params["mask_percentile"])
    for e, lp in zip(episodes, lps):
        n = len(e.generated_token_ids)
        h = torch.tensor(e.entropies)
        think = torch.tensor([e.answer_start is None or t < e.answer_start for t in range(n)])
        if name == "none":
            w = torch.ones(n)
        elif name == "outcome_conditional":
            w = torch.where(think, params["think_discount"], 1.0)
        elif name == "inverse_logprob":
            w = 1.0 / (lp.detach().abs() + params["logprob_offset"])
        elif name == "entropy_weighted":
            w = torch.softmax(h / params["entropy_temp"], 0) * n
        elif name == "entropy_masking":
            w = (h >= threshold).float()
        elif name == "attention_credit":
            w = reference_attention_credit(model, e, think, params["credit_scale"])
        elif name == "attribution":
            _, _, fwd = per_sequence_forward(model, e, output_hidden=True)
            p = len(e.prompt_token_ids)
            hidden = fwd.hidden[0, p - 1: p - 1 + n]
            if params.get("detach_hidden", True):  # the head learns alone
                hidden = hidden.detach()
            scores = hidden @ weighter.head.proj.weight[0]
            if params.get("objective") == "advantage_regression":  # detached weights; the head fits A
                a = advantages[len(out)]
                w = (torch.softmax(math.copysign(1.0, a) * scores, 0) * n).detach()
                reg_terms.append((scores.mean() - a) ** 2)
            else:
                w = torch.softmax(scores, 0) * n
        else:
            raise AssertionError(name)
        out.append(w)
    return out


def reference_attention_credit(model: Transformer, e: Episode, think: torch.Tensor, scale: float) -> torch.Tensor:
    n = len(e.generated_token_ids)
    if e.answer_start is None:
        return torch.ones(n)
    with torch.no_grad():
        _, _, fwd = per_sequence_forward(model, e, output_last_qk=True)
    q, k = fwd.last_q[0].float(), fwd.last_k[0].float()  # [H, L, d], [KV, L, d]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    p = len(e.prompt_token_ids)
    rows = []
    for t in range(e.answer_start, n):
        qi = p + t  # the answer token's own position: it attends to keys 0..qi
        scores = torch.einsum("hd,hjd->hj", q[:, qi], k[:, : qi + 1]) / math.sqrt(q.shape[-1])
        att = torch.softmax(scores, -1)  # [H, qi + 1]
        rows.append(torch.nn.functional.pad(att, (0, p + n - qi - 1)).mean(0))
    credit = torch.stack(rows).mean(0)[p: p + n]
    w = (credit / credit[think].mean()).clamp(1 / scale, scale)
    return torch.where(think, w, torch.ones(n))


def reference_token_loss(name: str, lp: torch.Tensor, old: torch.Tensor, aw: torch.Tensor) -> torch.Tensor:
    ratio = torch.exp(lp - old)
    if name == "pg":
        return -aw * lp
    if name in ("ppo", "dual_clip"):
        loss = torch.maximum(-aw * ratio, -aw * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
        if name == "dual_clip":
            loss = torch.where(aw < 0, torch.minimum(loss, -aw * CLIP_C), loss)
        return loss
    if name == "gspo":
        lo, hi = POLICY_EPS["gspo"]
        s = torch.exp((lp - old).mean())
        token_ratio = s.detach() * torch.exp(lp - lp.detach())
        return torch.maximum(-aw * token_ratio, -aw * token_ratio.clamp(1 - lo, 1 + hi))
    if name == "cispo":
        return -ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH).detach() * aw * lp
    raise AssertionError(name)


POLICY_EPS = {"gspo": (3e-4, 4e-4)}  # GSPO's small defaults come from the registry when none are set


def aggregate(rows: list[torch.Tensor], mode: str) -> torch.Tensor:
    if mode == "token-mean":
        return sum(r.sum() for r in rows) / sum(len(r) for r in rows)
    if mode == "seq-mean-token-mean":
        return sum(r.mean() for r in rows) / len(rows)
    if mode == "seq-mean-token-sum":
        return sum(r.sum() for r in rows) / len(rows)
    if mode == "seq-mean-token-sum-norm":  # Dr. GRPO: a constant normalizer, the batch x the generation budget
        return sum(r.sum() for r in rows) / (len(rows) * MAX_LEN)
    raise AssertionError(mode)


def reference_loss(model, episodes, loss_name, mode, old_mode, weighter_name="none", weighter=None, params=None,
                   ref_model=None, beta=0.0, kl="k3", entropy_coef=0.0, advantages=ADVANTAGES) -> torch.Tensor:
    lps, logps = [], []
    for e in episodes:
        lp, logp, _ = per_sequence_forward(model, e)
        lps.append(lp)
        logps.append(logp)
    reg_terms: list[torch.Tensor] = []
    weights = reference_weights(weighter_name, model, episodes, lps, weighter, params or {}, reg_terms, advantages)
    rows, terms = [], []
    for e, lp, logp, w, a in zip(episodes, lps, logps, weights, advantages):
        old = torch.tensor(e.log_probs) if old_mode == "rollout" else lp.detach()
        rows.append(reference_token_loss(loss_name, lp, old, torch.as_tensor(a, dtype=torch.float32) * w))
        term = torch.zeros_like(lp)
        if beta:
            with torch.no_grad():
                ref_lp, _, _ = per_sequence_forward(ref_model, e)
            d = ref_lp - lp
            term = term + beta * {"k1": -d, "k2": 0.5 * d ** 2, "k3": torch.exp(d) - d - 1}[kl]
        if entropy_coef:
            term = term - entropy_coef * -(logp.exp() * logp).sum(-1)
        terms.append(term)
    # GSPO forces seq-mean-token-mean on its own term; KL and entropy keep the configured mode (veRL's)
    loss = aggregate(rows, "seq-mean-token-mean" if loss_name == "gspo" else mode) + aggregate(terms, mode)
    return loss + (sum(reg_terms) / len(reg_terms) if reg_terms else 0.0)  # the regression head's own loss


# ------------------------------------------------------------------ the check


def on_device(model, weighter, ref_model, device: torch.device):
    """Copies of the policy, weighter and reference model on `device` for the update under test (the reference
    gradient is computed on CPU either way)."""
    if device.type == "cpu":
        return model, weighter, ref_model
    weighter = copy.deepcopy(weighter)
    if getattr(weighter, "head", None) is not None:
        weighter.head.to(device)
    return copy.deepcopy(model).to(device), weighter, ref_model and copy.deepcopy(ref_model).to(device)


def check_update(loss_name="pg", mode="token-mean", micro=4, old_mode="rollout", weighter_name="none",
                 head: dict | None = None, max_tokens=None, share_prompts=True, advantages=ADVANTAGES,
                 device: torch.device = torch.device("cpu"), **terms):
    params = {"think_discount": 0.3, "logprob_offset": 0.1, "credit_scale": 2.0, "entropy_temp": 0.7,
              "mask_percentile": 60.0, "attribution_entropy_coef": 0.0, "attribution_lr": None, **(head or {})}
    model, ref_model = make_model(0), make_model(1)
    episodes = make_episodes(model)
    weighter = gm.build_weighter(weighter_name, hidden_size=32, **params) if weighter_name != "none" else None
    if weighter_name == "attribution":  # a non-uniform head, so its weights matter
        with torch.no_grad():
            weighter.head.proj.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    extra = weighter.parameters() if weighter is not None else []
    all_params = list(model.parameters()) + list(extra)

    # expected: minus the gradient of the reference loss
    ref = reference_loss(model, episodes, loss_name, mode, old_mode, weighter_name, weighter, params,
                         ref_model=ref_model, advantages=advantages, **terms)
    grads = torch.autograd.grad(ref, all_params, allow_unused=True)
    expected = [-(g if g is not None else torch.zeros_like(p)) for p, g in zip(all_params, grads)]
    assert sum(float(g.abs().sum()) for g in expected) > 0

    model, weighter, ref_model = on_device(model, weighter, ref_model, device)
    extra = weighter.parameters() if weighter is not None else []
    all_params = list(model.parameters()) + list(extra)
    before = [p.detach().clone() for p in all_params]
    settings = update.UpdateSettings(micro_batch_size=micro, max_tokens_per_micro_batch=max_tokens, max_grad_norm=1e9,
                                     share_prompts=share_prompts, old_log_probs=old_mode)
    objective = grpo.objective(loss_name, mode, max_len=MAX_LEN, clip_ratio_c=CLIP_C, beta=terms.get("beta", 0.0),
                               kl_estimator=terms.get("kl", "k3"), entropy_coef=terms.get("entropy_coef", 0.0),
                               **({} if loss_name == "gspo" else {"epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH}))
    opt = torch.optim.SGD(all_params, lr=1.0)
    per_token = isinstance(advantages[0], list)  # one value per generated token, else one per episode
    stats = update.update_policy(model, opt, episodes, advantages if per_token else torch.tensor(advantages),
                                 settings, objective, weighter, ref_model if terms.get("beta") else None)
    assert not stats.skipped
    for p, b, e in zip(all_params, before, expected):
        assert p.device.type == device.type
        torch.testing.assert_close((p.detach() - b).cpu(), e, rtol=2e-4, atol=2e-6)
    return stats


@pytest.mark.parametrize("share", [True, False])
def test_shared_prompt_forward_runs_and_gives_the_formula_gradient(share, monkeypatch):
    """Episodes 1 and 3 share a prompt: with share_prompts the update (and the KL's reference forward) runs it
    once, and the parameter change is still minus the gradient of the per-sequence formula."""
    calls = []
    real = update._forward_continuations
    monkeypatch.setattr(update, "_forward_continuations", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    check_update("ppo", "token-mean", 4, share_prompts=share, beta=0.1, kl="k3")
    assert len(calls) == (2 if share else 0)  # the policy's forward and the reference model's


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_name", grpo.POLICY_LOSSES.names())
def test_policy_loss_gradient_equals_the_formula(loss_name, mode, micro, device):
    stats = check_update(loss_name, mode, micro, weighter_name="outcome_conditional", device=device)
    if loss_name in ("ppo", "dual_clip", "gspo", "cispo"):
        assert 0 < stats.metrics["clip_frac"] < 1  # both regimes are exercised
    if loss_name == "dual_clip":
        assert stats.metrics["clip_frac_lower"] > 0


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("weighter_name", sorted(gm.WEIGHTERS))
@pytest.mark.parametrize("loss_name", ["pg", "ppo"])
def test_token_weighter_gradient_equals_the_formula(weighter_name, loss_name, mode, micro, device):
    check_update(loss_name, mode, micro, weighter_name=weighter_name, device=device)


@pytest.mark.parametrize("kl", ["k1", "k2", "k3"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_term_gradient_equals_the_formula(kl, mode, device):
    stats = check_update("pg", mode, 2, beta=0.3, kl=kl, device=device)
    assert stats.metrics["kl"] != 0


@pytest.mark.parametrize("micro", [4, 1])
def test_entropy_bonus_gradient_equals_the_formula(micro, device):
    check_update("ppo", "seq-mean-token-sum", micro, entropy_coef=0.05, device=device)


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
def test_gspo_forces_its_mode_on_its_own_term_and_kl_and_entropy_keep_the_configured_one(mode, micro):
    """GSPO + beta > 0 + an entropy bonus: seq-mean-token-mean of the GSPO term plus `mode` of the KL and
    entropy terms (veRL's kl_loss and entropy_loss use the configured loss_agg_mode)."""
    stats = check_update("gspo", mode, micro, old_mode="recompute", beta=0.3, kl="k2", entropy_coef=0.05)
    assert stats.metrics["kl"] != 0


@pytest.mark.parametrize("loss_name", ["ppo", "dual_clip", "gspo", "cispo"])
def test_recompute_makes_the_first_ratio_exactly_one(loss_name):
    stats = check_update(loss_name, "token-mean", 2, old_mode="recompute")
    assert stats.metrics["clip_frac"] == 0.0
    assert stats.metrics["rollout_logprob_gap"] > 0.1  # the mismatch is still reported


def test_second_ppo_iteration_clips_and_the_first_does_not_with_recompute():
    model = make_model(0)
    episodes = make_episodes(model)
    opt = torch.optim.SGD(model.parameters(), lr=2.0)  # a big step so the second pass sees a moved policy
    settings = update.UpdateSettings(micro_batch_size=2, old_log_probs="recompute", num_iterations=2, max_grad_norm=1e9)
    objective = grpo.objective("ppo", epsilon_low=0.05, epsilon_high=0.05)
    stats = update.update_policy(model, opt, episodes, torch.tensor(ADVANTAGES), settings, objective)
    assert stats.metrics["clip_frac"] == 0.0
    assert stats.metrics["clip_frac/later_iterations"] > 0.0


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("head", [{"detach_hidden": False}, {"objective": "advantage_regression"},
                                  {"objective": "advantage_regression", "detach_hidden": False}])
def test_attribution_variants_gradient_equals_the_formula(head, micro):
    """detach_hidden false: the head's gradient reaches the policy (the seed's "through both"); the
    regression objective: the head fits the advantage and the policy sees constant weights."""
    check_update("pg", "token-mean", micro, weighter_name="attribution", head=head)


def test_detach_hidden_decides_whether_the_head_loss_reaches_the_model():
    def model_grad(detach: bool) -> float:
        model = make_model(0)
        episodes = make_episodes(model)
        weighter = gm.build_weighter("attribution", hidden_size=32, detach_hidden=detach,
                                     objective="advantage_regression")
        opt = torch.optim.SGD(list(model.parameters()) + weighter.parameters(), lr=0.0)
        grads = {}
        opt.step = lambda: grads.update(model=sum(float(p.grad.abs().sum()) for p in model.parameters()),
                                        head=float(weighter.head.proj.weight.grad.abs().sum()))
        # zero advantages: the policy term is 0, so any model gradient comes from the head's regression loss
        update.update_policy(model, opt, episodes, torch.zeros(4), update.UpdateSettings(max_grad_norm=1e9),
                             grpo.objective(), weighter)
        assert grads["head"] > 0
        return grads["model"]
    assert model_grad(detach=True) == 0.0
    assert model_grad(detach=False) > 0.0


def test_chunked_token_statistics_equal_the_full_ones_gradients_included():
    torch.manual_seed(4)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    full = update.token_statistics(hidden @ weight.t(), targets)
    chunked = update.chunked_token_statistics(hidden, weight, targets, chunk_tokens=6)  # chunks of 2 positions
    for a, b in zip(full, chunked):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    (g_full_h, g_full_w) = torch.autograd.grad((full[0] * torch.arange(11.0)).sum(), (hidden, weight))
    lp, ent, _ = update.chunked_token_statistics(hidden, weight, targets, chunk_tokens=6)
    (g_h, g_w) = torch.autograd.grad((lp * torch.arange(11.0)).sum(), (hidden, weight), retain_graph=True)
    torch.testing.assert_close(g_h, g_full_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_w, g_full_w, rtol=1e-5, atol=1e-6)
    # the entropy keeps its gradient (the entropy bonus needs it)
    logp = torch.log_softmax(hidden @ weight.t(), -1)
    (g_ent,) = torch.autograd.grad(-(logp.exp() * logp).sum(), hidden)
    (g_ent_chunked,) = torch.autograd.grad(ent.sum(), hidden)
    torch.testing.assert_close(g_ent_chunked, g_ent, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["pg", "ppo", "gspo"])
def test_update_with_many_logit_chunks_equals_the_formula(loss_name, monkeypatch):
    """Chunks of 3 tokens (several per micro-batch): the parameter change is still minus the reference gradient."""
    real = update.UpdateSettings.__init__

    def small_chunks(self, *args, **kwargs):
        real(self, *args, **{**kwargs, "logits_chunk_tokens": 3})
    monkeypatch.setattr(update.UpdateSettings, "__init__", small_chunks)
    check_update(loss_name, "seq-mean-token-sum", 2, weighter_name="entropy_weighted", entropy_coef=0.05)


def test_micro_batches_packed_by_a_token_budget():
    model = make_model(0)
    episodes = make_episodes(model)  # prompt + completion lengths 9, 5, 9, 8
    assert [list(r) for r in update.micro_batches(episodes, 8)] == [[0, 1, 2, 3]]
    assert [list(r) for r in update.micro_batches(episodes, 8, max_tokens=18)] == [[0, 1], [2, 3]]
    assert [list(r) for r in update.micro_batches(episodes, 8, max_tokens=4)] == [[0], [1], [2], [3]]  # alone if too long
    assert [list(r) for r in update.micro_batches(episodes, 3, max_tokens=100)] == [[0, 1, 2], [3]]


@pytest.mark.parametrize("max_tokens", [10, 18])
@pytest.mark.parametrize("loss_name", ["pg", "dual_clip"])
def test_token_budget_packing_gives_the_formula_gradient(loss_name, max_tokens):
    check_update(loss_name, "seq-mean-token-mean", 8, weighter_name="inverse_logprob", max_tokens=max_tokens)


# ------------------------------------------------------------------ episodes whose loss has zero gradient

FLAT = [1.3, 0.0, 0.5, 0.0]  # episodes 1 and 3 (one shared prompt) carry no advantage, as a flat GRPO group


def record_grad_mode(monkeypatch) -> list[bool]:
    """Whether autograd was on in each policy micro-batch's forward, in the order they ran."""
    modes: list[bool] = []
    real = update._micro_batch_loss
    monkeypatch.setattr(update, "_micro_batch_loss",
                        lambda *a, **kw: modes.append(torch.is_grad_enabled()) or real(*a, **kw))
    return modes


@pytest.mark.parametrize("loss_name", grpo.POLICY_LOSSES.names())
def test_every_policy_loss_has_exactly_zero_gradient_at_zero_advantage(loss_name):
    """The contract zero_gradient_episodes relies on: each registered loss is A x (something finite) per token,
    so a loss with a term of its own (an entropy term, say) fails here."""
    gen = torch.Generator().manual_seed(0)
    lp = (-3 * torch.rand(3, 5, generator=gen)).requires_grad_()
    old = lp.detach() + 0.5 * torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    objective = grpo.objective(loss_name)
    grads = []
    for adv in (torch.zeros(3, 5), torch.ones(3, 5)):
        token_loss, _ = objective.policy_loss(lp, old, adv, mask)
        grads.append(torch.autograd.grad(objective.aggregate(token_loss, mask), lp)[0])
    assert torch.equal(grads[0], torch.zeros_like(lp))
    assert grads[1].abs().sum() > 0


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("loss_name", grpo.POLICY_LOSSES.names())
def test_zero_advantage_episodes_skip_the_backward_and_the_update_is_the_formula(loss_name, micro, monkeypatch):
    modes = record_grad_mode(monkeypatch)
    old_mode = "recompute" if loss_name == "gspo" else "rollout"  # GSPO's tiny clip range clips every rollout ratio
    check_update(loss_name, "token-mean", micro, old_mode, weighter_name="outcome_conditional", advantages=FLAT)
    assert modes == [False] * (len(modes) - modes.count(True)) + [True] * modes.count(True)  # frozen ones first
    assert 0 < modes.count(False) < len(modes)


@pytest.mark.parametrize("terms", [{"beta": 0.3, "kl": "k3"}, {"entropy_coef": 0.05},
                                   {"weighter_name": "attribution"}])
def test_terms_that_do_not_scale_with_the_advantage_keep_every_backward(terms, monkeypatch):
    """KL, the entropy bonus and a learned weighter's own loss have a gradient at A = 0: nothing is skipped."""
    modes = record_grad_mode(monkeypatch)
    check_update("pg", "token-mean", 2, advantages=FLAT, **terms)
    assert modes and all(modes)


def run_update(skip: bool, advantages: list[float], optimizer: str = "sgd", before: list[float] | None = None
               ) -> tuple[UpdateStats, dict[str, torch.Tensor]]:
    model = make_model(0)
    episodes = make_episodes(model)
    opt = (torch.optim.SGD(model.parameters(), lr=1.0) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    weighter = gm.build_weighter("inverse_logprob", logprob_offset=0.1)
    settings = update.UpdateSettings(micro_batch_size=2, skip_zero_gradient=skip, max_grad_norm=1e9)
    objective = grpo.objective("ppo")
    if before is not None:  # an earlier update, so AdamW has momentum
        update.update_policy(model, opt, episodes, torch.tensor(before), settings, objective, weighter)
    stats = update.update_policy(model, opt, episodes, torch.tensor(advantages), settings, objective, weighter)
    return stats, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_skipping_the_zero_gradient_backward_changes_no_metric_token_array_or_weight():
    (on, w_on), (off, w_off) = run_update(True, FLAT), run_update(False, FLAT)
    assert on.metrics.keys() == off.metrics.keys()
    for k in on.metrics:
        assert on.metrics[k] == pytest.approx(off.metrics[k], rel=1e-5, abs=1e-6), k  # weight/std: sqrt of a difference
    for name in ("token_log_probs", "token_entropies", "token_weights", "token_logit_grad_norms"):
        for a, b in zip(getattr(on, name), getattr(off, name), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    for k in w_on:
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-5, atol=1e-6)


def test_a_batch_without_any_gradient_still_steps_adamw_exactly_as_the_full_backward():
    """Every episode flat: the last micro-batch still runs its backward, so each gradient exists (zeros) and
    AdamW's momentum and weight decay move the weights exactly as when every backward runs."""
    start = {k: v.clone() for k, v in make_model(0).state_dict().items()}
    (_, on), (_, off) = (run_update(skip, [0.0] * 4, "adamw", before=ADVANTAGES) for skip in (True, False))
    for k in on:
        assert torch.equal(on[k], off[k]), k
    assert any(not torch.equal(on[k], start[k]) for k in on)


# ------------------------------------------------------------------ per-token advantages (VinePPO's form)

LENGTHS = [6, 3, 5, 7]  # make_episodes' completion lengths


def updated_weights(advantages, loss_name: str = "ppo", weighter_name: str = "attribution", micro: int = 2
                    ) -> tuple[UpdateStats, dict[str, torch.Tensor]]:
    model = make_model(0)
    episodes = make_episodes(model)
    weighter = (gm.build_weighter(weighter_name, hidden_size=32, objective="advantage_regression")
                if weighter_name == "attribution" else gm.build_weighter(weighter_name, think_discount=0.3))
    params = list(model.parameters()) + weighter.parameters()
    opt = torch.optim.SGD(params, lr=1.0)
    settings = update.UpdateSettings(micro_batch_size=micro, max_grad_norm=1e9)
    stats = update.update_policy(model, opt, episodes, advantages, settings, grpo.objective(loss_name), weighter)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state.update({f"head.{i}": p.detach().clone() for i, p in enumerate(weighter.parameters())})
    return stats, state


@pytest.mark.parametrize("weighter_name", ["attribution", "outcome_conditional"])
@pytest.mark.parametrize("loss_name", ["pg", "ppo", "gspo", "cispo"])
def test_per_token_advantages_equal_to_the_scalar_give_bitwise_the_same_update(loss_name, weighter_name):
    """Each episode's scalar repeated on its every token: the same weights, metrics and token arrays, bit for
    bit, a weighter that reads the per-episode advantage (the regression head) included."""
    rows = [[a] * n for a, n in zip(ADVANTAGES, LENGTHS)]
    (s_scalar, w_scalar), (s_tokens, w_tokens) = (updated_weights(adv, loss_name, weighter_name)
                                                  for adv in (torch.tensor(ADVANTAGES), rows))
    for k in w_scalar:
        assert torch.equal(w_scalar[k], w_tokens[k]), k
    assert s_scalar.metrics == s_tokens.metrics
    assert s_scalar.token_weights == s_tokens.token_weights


@pytest.mark.parametrize("micro", [4, 1])
@pytest.mark.parametrize("loss_name", ["pg", "ppo", "cispo"])
def test_per_token_advantages_give_the_formula_gradient(loss_name, micro):
    """Advantages that vary along each completion: the parameter change is minus the gradient of the formula
    with A_t on token t."""
    gen = torch.Generator().manual_seed(9)
    rows = [torch.randn(n, generator=gen).tolist() for n in LENGTHS]
    check_update(loss_name, "seq-mean-token-mean", micro, weighter_name="outcome_conditional", advantages=rows)


def test_an_advantage_on_one_token_moves_only_that_tokens_log_prob():
    """pg, token-mean, A = a on token t of episode i alone: the gradient is -a / N_tokens x grad log pi(y_t),
    written out from one unpadded forward."""
    a, i, t = 0.7, 2, 3
    rows = [[0.0] * n for n in LENGTHS]
    rows[i][t] = a
    model = make_model(0)
    episodes = make_episodes(model)
    lp, _, _ = per_sequence_forward(model, episodes[i])
    expected = torch.autograd.grad(-a / sum(LENGTHS) * lp[t], list(model.parameters()))
    before = [p.detach().clone() for p in model.parameters()]
    settings = update.UpdateSettings(micro_batch_size=2, max_grad_norm=1e9)
    update.update_policy(model, torch.optim.SGD(model.parameters(), lr=1.0), episodes, rows, settings,
                         grpo.objective("pg", "token-mean"))
    for p, b, g in zip(model.parameters(), before, expected):
        torch.testing.assert_close(p.detach() - b, -g, rtol=2e-4, atol=2e-7)


def test_an_episode_is_skipped_only_when_every_token_advantage_is_zero(monkeypatch):
    rows = [[0.0] * n for n in LENGTHS]
    rows[2][4] = 0.5  # episode 2 carries gradient on its last token only
    frozen = update.zero_gradient_episodes(update.EpisodeAdvantages.of(rows, make_episodes(make_model(0)), "cpu"),
                                           update.UpdateSettings(), grpo.objective("ppo"))
    assert frozen.tolist() == [True, True, False, True]
    modes = record_grad_mode(monkeypatch)
    check_update("ppo", "token-mean", 1, advantages=rows)
    assert modes.count(True) == 1 and modes.count(False) == 3


def test_per_token_advantages_of_the_wrong_shape_are_one_clear_error():
    model = make_model(0)
    episodes = make_episodes(model)
    settings, objective = update.UpdateSettings(), grpo.objective()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for bad, match in (([[0.1] * n for n in LENGTHS[:3]], "one row per episode"),
                       ([[0.1] * n for n in [6, 3, 4, 7]], r"advantages\[2\]: 4 values for 5"),
                       (torch.zeros(3), "3 values for 4 episodes"), (torch.zeros(4, 7), "one row per episode")):
        with pytest.raises(ValueError, match=match):
            update.update_policy(model, opt, episodes, bad, settings, objective)
