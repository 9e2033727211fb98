"""The rollout engine: keyed sampling follows softmax/T; prefix sharing, compaction, batch size and engine
reuse never change which tokens are sampled; cached log-probs equal a full recompute; greedy is the argmax."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen2_model
import rollout
import update
from conftest import random_model
from data_types import Episode
from qwen2_model import Transformer, can_pack
from rollout import RolloutEngine, keyed_uniform, row_keys, sample_keyed, sample_next, stream_key

VOCAB = 23
EOS = [5, 11]  # frequent enough on a random model that most rows finish early: compaction is exercised


def model(device: torch.device | str = "cpu") -> Transformer:
    return random_model(VOCAB).eval().to(device)


PROMPTS = [[3, 4, 6, 7, 8], [9, 2], [1, 2, 3, 10, 12, 13, 14], [16]]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_keyed_sampling_follows_softmax_over_temperature(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(200_000, 5)
    keys = row_keys(stream_key(7), range(200_000), [0] * 200_000)
    draws = sample_keyed(logits, keyed_uniform(keys, 3), temperature)
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    expected = torch.softmax(logits[0].double() / temperature, -1)
    assert (freq - expected).abs().max() < 0.005, (freq, expected)


def test_keyed_uniforms_are_uniform_and_independent_across_positions():
    keys = row_keys(stream_key(1, 2), range(100_000), [0] * 100_000)
    u0, u1 = keyed_uniform(keys, 0).numpy(), keyed_uniform(keys, 1).numpy()
    assert 0 < u0.min() and u0.max() < 1
    assert abs(u0.mean() - 0.5) < 0.005 and abs(u0.var() - 1 / 12) < 0.002
    assert abs(np.corrcoef(u0, u1)[0, 1]) < 0.01
    assert np.histogram(u0, bins=10, range=(0, 1))[0].min() > 9_500


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(100_000, 4)
    keys = row_keys(stream_key(2), range(100_000), [0] * 100_000)
    draws = sample_keyed(logits, keyed_uniform(keys, 0), 1.0, 0.7)
    freq = torch.bincount(draws, minlength=4).double() / len(draws)
    assert freq[2] == 0 and freq[3] == 0  # 0.5 + 0.3 >= 0.7: the tail is cut
    assert abs(freq[0] - 0.5 / 0.8) < 0.01
    assert sample_keyed(logits[:3], keyed_uniform(keys[:3], 0), 0.0).tolist() == [0, 0, 0]


def test_a_zero_probability_token_is_never_drawn_even_at_the_edge():
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]]).expand(4, 4)
    u = torch.tensor([1e-300, 0.5, 1 - 2**-53, 1.0], dtype=torch.float64)
    assert set(sample_keyed(logits, u, 1.0).tolist()) <= {0, 2}


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (1.3, 0.9), (0.0, 1.0)])
def test_sampling_into_a_workspace_gives_bitwise_the_same_results(temperature, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 50, generator=g) * 3
    u = keyed_uniform(row_keys(stream_key(4), range(6), [0] * 6), 0)
    before = logits.clone()
    fresh = sample_next(logits, u, temperature, top_p)
    workspace = torch.full((3, 9, 50), float("nan"))  # more rows than needed, garbage in them
    reused = sample_next(logits, u, temperature, top_p, workspace)
    for a, b in zip(fresh, reused):
        assert torch.equal(a, b)
    assert torch.equal(logits, before)  # the logits are never written


def test_an_eager_cpu_rollout_samples_every_step_into_one_workspace(monkeypatch):
    m = model()
    plain = RolloutEngine(m)
    monkeypatch.setattr(plain, "_workspace", lambda rows, logits: None)
    expected = run(plain, PROMPTS, group=3)
    seen = []

    def spy(logits, uniforms, temperature, top_p, workspace=None):
        seen.append(workspace)
        return sample_next(logits, uniforms, temperature, top_p, workspace)
    monkeypatch.setattr(rollout, "sample_next", spy)
    out = run(RolloutEngine(m), PROMPTS, group=3)
    assert len(seen) > 10 and seen[0] is not None and all(w is seen[0] for w in seen)
    assert seen[0].shape == (3, 12, VOCAB)
    assert (out.tokens, out.log_probs, out.entropies) == (expected.tokens, expected.log_probs, expected.entropies)


def run(engine, prompts, group, stream=11, max_new=24, temperature=1.0, qids=None):
    qids = qids or list(range(len(prompts)))
    keys = row_keys(stream, [q for q in qids for _ in range(group)], [j for _ in qids for j in range(group)])
    return engine.generate(prompts, keys, group, max_new, EOS, temperature)


PACKING = [False, pytest.param(True, marks=pytest.mark.skipif(not can_pack(torch.zeros(1)),
                                                               reason="no oneDNN in this torch build"))]


def cpu_only_packing(pack: bool, device: torch.device) -> None:
    if pack and device.type != "cpu":
        pytest.skip("weights are packed on CPU only")


@pytest.mark.parametrize("pack", PACKING)
def test_prefix_sharing_compaction_batching_and_reuse_never_change_the_tokens(pack, device):
    cpu_only_packing(pack, device)
    m = model(device)
    shared = run(RolloutEngine(m, compact_frac=0.25, sync_every=1, cascade=True, pack_weights=pack), PROMPTS, group=6)
    assert 0.3 < np.mean(shared.finished) < 1.0  # rows end at different times
    # no compaction at all; each row reading its own copy of the prompt's cache instead of the shared one
    plain = run(RolloutEngine(m, compact_frac=2.0, pack_weights=pack), PROMPTS, group=6)
    copied = run(RolloutEngine(m, compact_frac=0.25, sync_every=1, cascade=False, pack_weights=pack), PROMPTS, group=6)
    # no prefix sharing: each prompt repeated 6 times, group size 1, same row keys
    engine = RolloutEngine(m, pack_weights=pack)
    repeated = [p for p in PROMPTS for _ in range(6)]
    keys = row_keys(11, [q for q in range(4) for _ in range(6)], [j for _ in range(4) for j in range(6)])
    unshared = engine.generate(repeated, keys, 1, 24, EOS)
    # one question at a time, reusing the engine (and its larger cache) from the runs above
    single = [run(engine, [PROMPTS[q]], group=6, qids=[q]) for q in range(4)]
    single_tokens = [t for s in single for t in s.tokens]
    for other in (plain.tokens, copied.tokens, unshared.tokens, single_tokens):
        assert other == shared.tokens
    for other in (plain, copied, unshared):
        np.testing.assert_allclose(np.concatenate(other.log_probs), np.concatenate(shared.log_probs), atol=1e-5)
    # the samples of one question differ (keys are row identities, not content)
    assert len({tuple(t) for t in shared.tokens[:6]}) > 1


def test_an_engine_that_does_not_keep_its_cache_frees_it_after_each_call_and_samples_the_same():
    m = model()
    kept = RolloutEngine(m)
    expected = [run(kept, PROMPTS, group=6), run(kept, PROMPTS[:2], group=3, stream=5)]
    released = RolloutEngine(m, keep_cache=False)
    for (prompts, group, stream), want in zip(((PROMPTS, 6, 11), (PROMPTS[:2], 3, 5)), expected):
        out = run(released, prompts, group, stream=stream)
        assert all(layer.self_attn.kv_cache is None for layer in m.model.layers) and released.capacity == (0, 0)
        assert (out.tokens, out.log_probs) == (want.tokens, want.log_probs)
    assert released.largest_cache_bytes == kept.largest_cache_bytes > 0  # the same cache while it lived


@pytest.mark.parametrize("pack", PACKING)
def test_cached_log_probs_equal_a_full_recompute_after_sharing_and_compaction(pack, device):
    cpu_only_packing(pack, device)
    m = model(device)
    out = run(RolloutEngine(m, compact_frac=0.1, sync_every=1, cascade=True, pack_weights=pack), PROMPTS, group=5)
    prompts = [p for p in PROMPTS for _ in range(5)]
    episodes = [Episode(prompt="", prompt_token_ids=p, generated_token_ids=g, text="", reward=0.0, reward_info={},
                        finished=f, group_idx=0) for p, g, f in zip(prompts, out.tokens, out.finished)]
    with torch.no_grad():
        fwd = update.forward_completions(m, episodes, pad_token_id=0)
        lp, ent, _ = update.token_statistics(fwd.logits, fwd.targets)
    for i, g in enumerate(out.tokens):
        assert fwd.targets[i, : len(g)].tolist() == g
        np.testing.assert_allclose(out.log_probs[i], lp[i, : len(g)].cpu().numpy(), atol=1e-5)
        np.testing.assert_allclose(out.entropies[i], ent[i, : len(g)].cpu().numpy(), atol=1e-5)
        if out.finished[i]:
            assert g[-1] in EOS and not any(t in EOS for t in g[:-1])


@pytest.mark.parametrize("pack", PACKING)
def test_greedy_with_shared_prefixes_is_the_argmax_of_the_full_forward(pack, device):
    cpu_only_packing(pack, device)
    m = model(device)
    out = run(RolloutEngine(m, cascade=True, pack_weights=pack), PROMPTS, group=3, temperature=0.0, max_new=10)
    for r, tokens in enumerate(out.tokens):
        seq = list(PROMPTS[r // 3])
        for tok in tokens:
            with torch.no_grad():
                assert tok == int(m(torch.tensor([seq], device=device))[0, -1].argmax())
            seq.append(tok)
    assert out.tokens[0] == out.tokens[1] == out.tokens[2]


def test_copies_of_one_prompt_draw_independent_samples():
    m = model()
    n = 4000
    out = rollout.generate(m, [[1, 2, 3]] * n, max_new_tokens=1, eos_token_id=[99], seed=5)
    first = torch.tensor([t[0] for t in out.tokens])
    with torch.no_grad():
        p = torch.softmax(m(torch.tensor([[1, 2, 3]]))[0, -1].double(), -1)
    freq = torch.bincount(first, minlength=VOCAB).double() / n
    assert (freq - p).abs().max() < 0.03 and len(set(first.tolist())) > 10


def test_rollout_episodes_do_not_depend_on_the_batch_size():
    tok = CharTok()
    m_ = random_model(len(tok.alphabet) + 1)

    def reward(problem, text):
        return {"reward": float(len(text)), "reward_info": {}}

    kw = dict(num_answers_per_question=4, max_new_tokens=8, stream=3, question_ids=[10, 11, 12])
    a = rollout.rollout(m_, tok, ["a", "b", "c"], ["12", "345", "6"], reward, **kw)
    b = rollout.rollout(m_, tok, ["a", "b", "c"], ["12", "345", "6"], reward, batch_size=4, **kw)
    c = rollout.rollout(m_, tok, ["b"], ["345"], reward, num_answers_per_question=4, max_new_tokens=8, stream=3,
                     question_ids=[11])
    assert [e.generated_token_ids for e in a] == [e.generated_token_ids for e in b]
    assert [e.generated_token_ids for e in a[4:8]] == [e.generated_token_ids for e in c]


@pytest.mark.slow
@pytest.mark.parametrize("pack", PACKING)
@pytest.mark.parametrize("cascade", [False, True])
def test_compiled_decode_step_samples_the_same_tokens_as_eager(cascade, pack, device):
    """torch.compile'd decode (batch compacted to powers of two with finished rows as fillers), with and
    without cascade attention and packed weights, gives the eager engine's tokens and log-probs. On CUDA the
    compiled step replays as CUDA graphs."""
    cpu_only_packing(pack, device)
    torch._dynamo.reset()  # the step's compiled variants from the other cases count towards dynamo's recompile limit
    m = model(device)
    eager = run(RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=False, pack_weights=pack), PROMPTS, group=6)
    engine = RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=True, cascade=cascade, pack_weights=pack)
    compiled = run(engine, PROMPTS, group=6)
    assert engine._compiled is not None and engine._graphs == (device.type == "cuda")  # compiled, no fallback
    assert 0.3 < np.mean(eager.finished) < 1.0  # rows end at different times: the batch was compacted
    assert compiled.tokens == eager.tokens
    np.testing.assert_allclose(np.concatenate(compiled.log_probs), np.concatenate(eager.log_probs), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("cascade", [False, True])
def test_the_cuda_graph_steps_whole_cache_attention_masks_every_slot_not_yet_written(cascade, device):
    """On CUDA the compiled step attends over the whole cache (fixed shapes for the graphs); slots past the
    current token hold a previous rollout's keys (and, after a compaction, another row's, since only the
    written slots move). It must still sample the eager engine's tokens; on CPU with that mode forced."""
    torch._dynamo.reset()
    m = model(device)
    eager = run(RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=False), PROMPTS, group=6)
    engine = RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=True, cascade=cascade)
    assert engine._graphs == (device.type == "cuda")
    engine._graphs = True  # what a CUDA engine that keeps its cache sets
    run(engine, [[5] * 11, [7, 1, 7] * 4], group=12, stream=3, max_new=30)  # leaves keys in every slot
    capacity = engine.capacity
    graphs = run(engine, PROMPTS, group=6)
    assert engine._compiled is not None and engine.capacity == capacity  # the same cache, compiled, no fallback
    assert 0.3 < np.mean(eager.finished) < 1.0  # rows end at different times: the batch was compacted
    assert graphs.tokens == eager.tokens
    np.testing.assert_allclose(np.concatenate(graphs.log_probs), np.concatenate(eager.log_probs), atol=1e-5)


@pytest.mark.slow
def test_a_compiled_step_is_not_recompiled_for_a_cache_allocated_anew():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    m = model()
    eager = run(RolloutEngine(m, compile=False), PROMPTS, group=6)
    engine = RolloutEngine(m, compile=True, keep_cache=False)
    assert run(engine, PROMPTS, group=6).tokens == eager.tokens
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):  # each call allocates the cache again (new tensors, same shapes)
        assert run(engine, PROMPTS, group=6).tokens == eager.tokens
    assert engine._compiled is not None and counters["stats"]["unique_graphs"] == graphs > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_on_cuda_a_released_cache_is_compiled_without_cuda_graphs_and_samples_as_eager():
    torch._dynamo.reset()
    m = model().cuda()
    eager = run(RolloutEngine(m, compile=False), PROMPTS, group=6)
    engine = RolloutEngine(m, compile=True, keep_cache=False)
    assert not engine._graphs and RolloutEngine(m, compile=True)._graphs
    for _ in range(2):  # the second call allocates the cache anew, at other addresses
        out = run(engine, PROMPTS, group=6)
        assert engine._compiled is not None and out.tokens == eager.tokens


@pytest.mark.slow
@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="no oneDNN in this torch build")
def test_the_compiled_decode_step_runs_from_the_packed_copies(monkeypatch):
    """Copies packed from zeroed weights: if the compiled step reads them (and not the weights), the lm_head's
    logits are all zero and every sampled token has log-prob -log(V)."""
    def pack_zeros(self, rows):
        self.weight.__dict__[qwen2_model._PACKED] = (
            torch.ops.mkldnn._reorder_linear_weight(torch.zeros_like(self.weight), max(rows, 32)), self.weight._version)
        self.is_packed = True
    monkeypatch.setattr(qwen2_model.Linear, "pack", pack_zeros)
    torch._dynamo.reset()
    m = model()
    engine = RolloutEngine(m, compile=True, pack_weights=True)
    out = run(engine, PROMPTS, group=2, max_new=6)
    assert engine._compiled is not None
    np.testing.assert_allclose(np.concatenate(out.log_probs), -np.log(VOCAB), rtol=1e-5)


@pytest.mark.slow
def test_a_compiled_step_outlasts_a_runs_variety_of_rollouts():
    """Evaluation-like rollouts (a row per prompt) between GRPO groups (shared prompts, cascade), batch sizes
    shrinking by compaction, longer prompts growing the cache: the step is recompiled as needed (more
    variants than dynamo's default limit of 8) and never given up for eager."""
    torch._dynamo.reset()
    m = model()
    engine = RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=True, cascade=True)
    eager = RolloutEngine(m, compact_frac=0.25, sync_every=1, compile=False, cascade=True)
    longer = PROMPTS + [list(range(1, 20)) * 4]  # 76 tokens: the cache grows past its first 64 + 24 positions
    for prompts, group in [(PROMPTS, 1), (PROMPTS, 6), (PROMPTS[:3], 1), (longer, 4), (PROMPTS[1:], 6), (longer, 1)]:
        out = run(engine, prompts, group)
        assert engine._compiled is not None, (len(prompts), group)
        assert out.tokens == run(eager, prompts, group).tokens


def test_a_decode_step_that_fails_to_compile_falls_back_to_eager():
    m = model()
    eager = run(RolloutEngine(m, compile=False), PROMPTS, group=3)
    engine = RolloutEngine(m, compile=False)

    def broken(*args):
        raise RuntimeError("no C++ compiler")
    engine._compiled = broken
    with pytest.warns(UserWarning, match="no C.. compiler.*decoding eagerly"):
        out = run(engine, PROMPTS, group=3)
    assert engine._compiled is None and out.tokens == eager.tokens


@pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="no oneDNN in this torch build")
def test_packing_is_chosen_by_weight_size_and_dropped_after_each_rollout(monkeypatch):
    m = model()  # a few KB of weights: below PACK_MIN_BYTES
    packed_during: list[bool] = []
    head_forward = m.lm_head.forward
    monkeypatch.setattr(m.lm_head, "forward", lambda x: (packed_during.append(m.lm_head.is_packed),
                                                        head_forward(x))[1])
    run(RolloutEngine(m), PROMPTS, group=2, max_new=3)
    assert packed_during and not any(packed_during)
    packed_during.clear()
    monkeypatch.setattr(RolloutEngine, "PACK_MIN_BYTES", 1)
    run(RolloutEngine(m), PROMPTS, group=2, max_new=3)
    assert packed_during and all(packed_during)
    assert not any(getattr(mod, "is_packed", False) for mod in m.modules())  # dropped once the rollout ended


# ------------------------------------------------------------------ the entry points: generate, rollout


def test_generate_greedy_equals_argmax_of_full_forward_at_every_step():
    model = random_model().eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 10, 11, 12, 13]]
    outs = rollout.generate(model, prompts, max_new_tokens=8, eos_token_id=[22], temperature=0.0).tokens
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
    model = random_model().eval()
    prompts = [[3, 4, 5], [8, 9, 1, 2]]
    free = rollout.generate(model, prompts, max_new_tokens=6, eos_token_id=[99], temperature=0.0).tokens
    stop_at = free[0][2]
    outs = rollout.generate(model, prompts, max_new_tokens=6, eos_token_id=[stop_at], temperature=0.0).tokens
    first = free[0].index(stop_at)
    assert outs[0] == free[0][: first + 1]
    if stop_at in free[1]:
        assert outs[1] == free[1][: free[1].index(stop_at) + 1]
    else:
        assert outs[1] == free[1]


def test_cached_sampling_log_probs_equal_a_full_recompute():
    """Catches off-by-one prompt positions: the rollout's log-probs must be the training forward's."""
    model = random_model().eval()
    prompts = [[3, 4, 5, 6, 7], [8, 9], [1, 2, 3, 10, 11, 12, 13], [5]]
    out = rollout.generate(model, prompts, max_new_tokens=10, eos_token_id=[22], temperature=1.0, seed=3)
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
    model = random_model().eval()
    a = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=5).tokens
    b = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=5).tokens
    c = rollout.generate(model, [[1, 2, 3]] * 4, 12, [22], temperature=1.0, seed=6).tokens
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
    assert rollout.section_start(tok, ids, text, "<answer>") == text.index("<answer>")
    assert rollout.section_start(tok, ids, "no tag here", "<answer>") is None
    assert rollout.section_start(tok, ids, text, None) is None  # a task without an answer section


def test_rollout_groups_rewards_and_episode_fields():
    tok = CharTok()
    model = random_model(len(tok.alphabet) + 1).eval()
    problems = ["a", "b"]
    seen = []

    def reward_fn(problem, text):
        seen.append((problem, text))
        return {"reward": float(len(text) % 3), "reward_info": {"answer_reward": 0.0, "format_reward": 0.0}}

    eps = rollout.rollout(model, tok, problems, ["12", "345"], reward_fn, num_answers_per_question=3,
                       max_new_tokens=6, stream=0)
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
