"""qwen2_model.py against transformers (the oracle) on tiny random-weight Qwen2/Qwen3 models.

No downloads: every checkpoint is built here with random weights and saved to tmp_path.
"""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qwen2_model import (CheckpointError, ModelConfig, ModelOutput, SharedPrefix, SharedPrompts, Transformer,
                         attention_with_lse)
from qwen2_model import left_pad as model_left_pad

transformers = pytest.importorskip("transformers")

VOCAB = 101
TOL = 1e-4


def hf_config(model_type: str, heads: int = 4, kv: int = 2, tied: bool = False, **extra):
    cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.Qwen3Config
    kwargs = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
        max_position_embeddings=128, rms_norm_eps=1e-5,
    )
    kwargs.update(extra)
    return cls(**kwargs)


@torch.no_grad()
def randomize(model: torch.nn.Module) -> None:
    """Random weights everywhere, incl. norms and biases, so a dropped bias or norm changes the logits."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        else:
            p.copy_(0.2 * torch.randn_like(p))


def make_hf(tmp_path, model_type: str, **kw):
    """A random HF model saved with HF save_pretrained; returns (checkpoint dir, eager HF model)."""
    cls = transformers.Qwen2ForCausalLM if model_type == "qwen2" else transformers.Qwen3ForCausalLM
    hf = cls(hf_config(model_type, **kw)).eval()
    randomize(hf)
    path = tmp_path / "hf"
    hf.save_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    return path, hf


def make_ours(model_type: str = "qwen3", **kw) -> Transformer:
    cfg = dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32",
    )
    cfg.update(kw)
    model = Transformer.from_config(ModelConfig(**cfg), dtype=torch.float32).eval()
    randomize(model)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------------------------
# logit parity with transformers

PARITY_CASES = {
    "qwen2-gqa2-tied-bias": ("qwen2", dict(heads=4, kv=2, tied=True)),
    "qwen2-mqa-untied-bias": ("qwen2", dict(heads=4, kv=1, tied=False, rope_parameters={"rope_theta": 1e6, "rope_type": "default"})),
    "qwen3-mha-untied-headdim24": ("qwen3", dict(heads=4, kv=4, tied=False, head_dim=24)),
    "qwen3-gqa2-tied-headdim16-bias": ("qwen3", dict(heads=4, kv=2, tied=True, head_dim=16, attention_bias=True)),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_logits_match_transformers(tmp_path, case, device):
    model_type, kw = PARITY_CASES[case]
    path, hf = make_hf(tmp_path, model_type, **kw)
    hf = hf.to(device)
    ours = Transformer.from_pretrained(path, device=device, dtype=torch.float32)

    with safe_open(path / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
    assert set(ours.checkpoint_state_dict()) == stored
    assert ("lm_head.weight" in stored) == (not kw["tied"])
    if kw["tied"]:
        assert ours.lm_head.weight is ours.model.embed_tokens.weight

    tokens = torch.randint(0, VOCAB, (2, 11), device=device)
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, 11, VOCAB)
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("model_type,tied", [("qwen2", True), ("qwen3", False)])
def test_save_pretrained_loads_in_transformers(tmp_path, model_type, tied):
    ours = make_ours(model_type, tie_word_embeddings=tied, head_dim=16 if model_type == "qwen3" else None)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[model_type]
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert max_diff(hf(tokens).logits, ours(tokens)) <= TOL
        reloaded = Transformer.from_pretrained(tmp_path, dtype=torch.float32)
        assert torch.equal(reloaded(tokens), ours(tokens))
    assert ModelConfig.from_json(tmp_path / "config.json") == ours.config


def test_sharded_checkpoint_loads(tmp_path):
    path, hf = make_hf(tmp_path, "qwen3", tied=False)
    tensors = load_file(path / "model.safetensors")
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: tensors[k] for k in part}, path / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in halves.items() for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "model.safetensors").unlink()

    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    tokens = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert max_diff(ours(tokens), hf(tokens).logits) <= TOL

    # our own sharded save (tiny shard limit) round-trips too, and replaces the single file
    out = tmp_path / "ours"
    ours.save_pretrained(out, max_shard_size=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (out / "model.safetensors").exists()
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(out, dtype=torch.float32)(tokens), ours(tokens))


# --------------------------------------------------------------------------------------------
# left padding and the KV cache

PROMPT_LENS = [5, 3, 7]


def left_pad(seqs: list[torch.Tensor], pad_id: int = 0, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    pad_lens = torch.tensor([width - len(s) for s in seqs])
    padded = torch.stack([torch.cat([torch.full((width - len(s),), pad_id), s.cpu()]) for s in seqs])
    return padded.to(device), pad_lens.to(device)


def test_left_pad_is_the_layout_of_pad_lens():
    tokens, pad_lens = model_left_pad([[5, 6, 7], [8], []], pad_id=9)
    assert tokens.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert pad_lens.tolist() == [0, 2, 3]


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_pad_lens_forward_equals_unpadded(model_type):
    model = make_ours(model_type)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in PROMPT_LENS]
    padded, pad_lens = left_pad(prompts)
    with torch.no_grad():
        out = model(padded, pad_lens=pad_lens, output_last_qk=True)
        assert torch.isfinite(out.logits).all()  # padding rows may be garbage, never NaN
        for b, prompt in enumerate(prompts):
            alone = model(prompt[None], output_last_qk=True)
            assert max_diff(out.logits[b, pad_lens[b]:], alone.logits[0]) <= TOL
            # RoPE scores only see relative offsets, so check absolute positions on the rotated q/k
            assert max_diff(out.last_q[b, :, pad_lens[b]:], alone.last_q[0]) <= TOL
            assert max_diff(out.last_k[b, :, pad_lens[b]:], alone.last_k[0]) <= TOL


@pytest.mark.parametrize("model_type,static", [("qwen2", False), ("qwen3", False), ("qwen3", True)])
def test_kv_cache_decode_matches_full_forward(model_type, static, device):
    """static: every decode step attends over the whole cache (a fixed kv_len, as a compiled / CUDA-graph step
    does), so the slots not yet written, filled with garbage here, must be masked."""
    model = make_ours(model_type, num_key_value_heads=1 if model_type == "qwen2" else 2).to(device)
    prompts = [torch.randint(1, VOCAB, (n,), device=device) for n in PROMPT_LENS]
    padded, pad_lens = left_pad(prompts, device=device)
    width, steps = padded.shape[1], 8
    model.setup_caches(max_batch_size=4, max_seq_len=width + steps + 10)
    for layer in model.model.layers:  # any read of a slot never written would turn logits into NaN
        cfg = model.config
        assert layer.self_attn.kv_cache.k_cache.shape == (4, cfg.num_key_value_heads, width + steps + 10, cfg.head_dim)
        layer.self_attn.kv_cache.k_cache.fill_(1e4 if static else float("nan"))
        layer.self_attn.kv_cache.v_cache.fill_(1e4 if static else float("nan"))

    chosen = torch.randint(1, VOCAB, (3, steps), device=device)
    with torch.no_grad():
        logits = model(padded, input_pos=torch.arange(width, device=device), pad_lens=pad_lens)
        assert torch.isfinite(logits).all()
        for b, prompt in enumerate(prompts):
            assert max_diff(logits[b, pad_lens[b]:], model(prompt[None])[0]) <= TOL
        for t in range(steps):
            step_logits = model(chosen[:, t:t + 1], input_pos=torch.tensor([width + t], device=device), pad_lens=pad_lens,
                                kv_len=width + steps + 10 if static else None)
            assert step_logits.shape == (3, 1, VOCAB)
            for b, prompt in enumerate(prompts):
                full = model(torch.cat([prompt, chosen[b, :t + 1]])[None])[0, -1]
                assert max_diff(step_logits[b, 0], full) <= TOL

    model.clear_caches()
    assert all(layer.self_attn.kv_cache is None for layer in model.model.layers)
    assert not any("cache" in k for k in model.state_dict())
    with pytest.raises(RuntimeError, match="setup_caches"):
        model(padded, input_pos=torch.arange(width, device=device))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_lse_is_softmax_attention_and_its_log_normalizer(fused):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    mask = torch.zeros(3, 1, 1, 7)
    mask[1, ..., :4] = float("-inf")
    out, lse = attention_with_lse(q, k, v, mask, fused=fused)
    scores = q.double() @ k.double().transpose(-1, -2) / 8 ** 0.5 + mask.double()
    assert max_diff(lse, torch.logsumexp(scores, -1)) < 1e-5
    assert max_diff(out, torch.softmax(scores, -1) @ v.double()) < 1e-5


@pytest.mark.parametrize("model_type,kv,static", [("qwen2", 1, False), ("qwen3", 2, False), ("qwen3", 2, True)])
def test_shared_prompt_decode_matches_full_forward_through_compaction(model_type, kv, static, device):
    """Cascade attention: G rows per question read the prompt from the question's cache row; after rows are
    dropped and reordered (slots past the prompt gathered, as the engine compacts), logits still equal a
    full forward of prompt + that row's tokens. static: attention over the whole cache (kv_len fixed, as a
    compiled step does), so slots not yet written must be masked."""
    model = make_ours(model_type, num_key_value_heads=kv).to(device)
    prompts = [torch.randint(1, VOCAB, (n,), device=device) for n in PROMPT_LENS]
    padded, pad_lens = left_pad(prompts, device=device)
    group, width, steps = 3, padded.shape[1], 6
    n = len(prompts) * group
    model.setup_caches(max_batch_size=n, max_seq_len=width + steps)
    caches = [layer.self_attn.kv_cache for layer in model.model.layers]
    for cache in caches:  # a read of any slot never written (e.g. rows >= 3 below the prompt width) gives NaN;
        # with a static length the unwritten slots are read by design (masked): large garbage, not NaN (0 x NaN)
        cache.k_cache.fill_(1e4 if static else float("nan"))
        cache.v_cache.fill_(1e4 if static else float("nan"))
    chosen = torch.randint(1, VOCAB, (n, steps), device=device)
    rows = torch.arange(n, device=device)
    with torch.no_grad():
        model(padded, input_pos=torch.arange(width, device=device), pad_lens=pad_lens)
        for t in range(steps):
            if t == 3:  # drop question 1 entirely and row 0, reorder the rest
                keep = torch.tensor([8, 1, 6, 2, 7], device=device)
                for cache in caches:
                    cache.k_cache[:len(keep), :, width:] = cache.k_cache[keep, :, width:].clone()
                    cache.v_cache[:len(keep), :, width:] = cache.v_cache[keep, :, width:].clone()
                rows = rows[keep]
            # rows None: every row live and in order (the engine's state before its first compaction)
            prefix = SharedPrefix.for_prompts(pad_lens, width, group, rows if len(rows) < n else None)
            step = model(chosen[rows, t:t + 1], input_pos=torch.tensor([width + t], device=device),
                         pad_lens=pad_lens[rows // group],
                         prefix=prefix, kv_len=width + steps if static else None)
            for i, r in enumerate(rows.tolist()):
                full = model(torch.cat([prompts[r // group], chosen[r, :t + 1]])[None])[0, -1]
                assert max_diff(step[i, 0], full) <= TOL
        with pytest.raises(ValueError, match="one decode step"):
            model(chosen[rows, :2], input_pos=torch.tensor([width, width + 1], device=device), prefix=prefix)


# --------------------------------------------------------------------------------------------
# hidden states and last-layer q/k for the attribution head and credit weighter


@pytest.mark.parametrize("model_type,kw", [
    ("qwen3", dict(heads=4, kv=2, head_dim=24, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})),
    ("qwen2", dict(heads=4, kv=1)),
])
def test_last_qk_reproduce_transformers_attention(tmp_path, model_type, kw):
    path, hf = make_hf(tmp_path, model_type, **kw)
    ours = Transformer.from_pretrained(path, dtype=torch.float32)
    cfg = ours.config
    batch, seq = 2, 10
    tokens = torch.randint(0, VOCAB, (batch, seq))
    with torch.no_grad():
        out = ours(tokens, output_hidden=True, output_last_qk=True)
        ref = hf(tokens, output_attentions=True)
    assert isinstance(out, ModelOutput)
    assert out.hidden.shape == (batch, seq, cfg.hidden_size)
    assert out.last_q.shape == (batch, cfg.num_attention_heads, seq, cfg.head_dim)
    assert out.last_k.shape == (batch, cfg.num_key_value_heads, seq, cfg.head_dim)
    assert max_diff(out.logits, ref.logits) <= TOL
    assert max_diff(out.hidden @ ours.lm_head.weight.T, out.logits) <= TOL

    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    keys = out.last_k.repeat_interleave(groups, dim=1)
    hf_probs = ref.attentions[-1]  # [B, H, T, T]
    for row in (3, seq - 1):
        scores = torch.einsum("bhd,bhtd->bht", out.last_q[:, :, row], keys[:, :, : row + 1]) * cfg.head_dim**-0.5
        assert max_diff(scores.softmax(-1), hf_probs[:, :, row, : row + 1]) <= 1e-5
        assert hf_probs[:, :, row, row + 1:].abs().sum() == 0  # causal: nothing after the row

    only_hidden = ours(tokens, output_hidden=True)
    assert only_hidden.last_q is None and only_hidden.last_k is None
    assert isinstance(ours(tokens), torch.Tensor)


def test_gradient_checkpointing_gives_same_gradients():
    model = make_ours("qwen2").train()
    tokens = torch.randint(0, VOCAB, (2, 8))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(tokens).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# --------------------------------------------------------------------------------------------
# the training forward over shared prompts

SHARED = dict(prompts=[[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]], rows=[0, 0, 1, 1, 1, 2],
              completions=[[20, 21, 22], [23, 24], [25], [26, 27, 28, 29, 30], [31, 32, 33], [34, 35]])


def _shared_batch(prompts, rows, completions, device: torch.device | str = "cpu"):
    padded, pad_lens = left_pad([torch.tensor(p) for p in prompts], device=device)
    width = max(len(c) for c in completions)
    conts = torch.tensor([c + [0] * (width - len(c)) for c in completions], device=device)
    return conts, SharedPrompts(padded, pad_lens, torch.tensor(rows, device=device))


@pytest.mark.parametrize("model_type,kw", [("qwen2", {}), ("qwen3", dict(attention_bias=True))])
def test_shared_prompts_forward_matches_transformers_on_whole_sequences(tmp_path, model_type, kw, device):
    """Each distinct prompt runs once and each row continues it: the logits that predict each completion token
    equal transformers' on the row's own prompt + completion (the oracle), left padding of the prompts included."""
    path, hf = make_hf(tmp_path, model_type, **kw)
    hf = hf.to(device)
    ours = Transformer.from_pretrained(path, device=device, dtype=torch.float32).eval()
    conts, shared = _shared_batch(**SHARED, device=device)
    with torch.no_grad():
        out = ours(conts, prompts=shared)
        assert out.shape == (len(SHARED["rows"]), conts.shape[1], VOCAB)
        for b, (r, c) in enumerate(zip(SHARED["rows"], SHARED["completions"])):
            p = SHARED["prompts"][r]
            ref = hf(torch.tensor([p + c], device=device)).logits[0, len(p) - 1: len(p) - 1 + len(c)]
            assert max_diff(out[b, : len(c)], ref) <= TOL


@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prompts_forward_gives_the_whole_sequences_gradients(checkpointing, device):
    model = make_ours("qwen3").to(device).train()
    model.gradient_checkpointing = checkpointing
    conts, shared = _shared_batch(**SHARED, device=device)
    weights = torch.randn(conts.shape, device=device)  # a different weight per token, so every row's gradient counts
    for b, c in enumerate(SHARED["completions"]):
        weights[b, len(c):] = 0.0  # past a row's end: padding
    model(conts, prompts=shared).logsumexp(-1).mul(weights).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0.0
    for b, (r, c) in enumerate(zip(SHARED["rows"], SHARED["completions"])):
        p = SHARED["prompts"][r]
        logits = model(torch.tensor([p + c], device=device))[0, len(p) - 1: len(p) - 1 + len(c)]
        total = total + (logits.logsumexp(-1) * weights[b, : len(c)]).sum()
    total.backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(shared_grads, model.parameters()))


def test_shared_prompts_gradients_are_bitwise_reproducible():
    """Many rows per prompt: the gradients summed over a group come out bit for bit the same every time
    (a parallel scatter-add in the backward made runs of the same seed part in the last bits)."""
    model = make_ours("qwen2", hidden_size=64, intermediate_size=64).train()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, VOCAB, (12,), generator=gen).tolist() for _ in range(4)]
    rows = [i % 4 for i in range(128)]
    completions = [torch.randint(1, VOCAB, (24,), generator=gen).tolist() for _ in rows]
    conts, shared = _shared_batch(prompts, rows, completions)
    seen = set()
    for _ in range(6):
        model.zero_grad()
        model(conts, prompts=shared).logsumexp(-1).sum().backward()
        seen.add(b"".join(p.grad.numpy().tobytes() for p in model.parameters()))
    assert len(seen) == 1


def test_shared_prompts_forward_with_one_token_completions_is_the_prompts_last_logits():
    model = make_ours("qwen2")
    conts, shared = _shared_batch([[5, 6, 7], [8, 9]], [1, 0, 1], [[3], [4], [5]])
    with torch.no_grad():
        out = model(conts, prompts=shared)
        assert max_diff(out[0, 0], model(torch.tensor([[8, 9]]))[0, -1]) <= TOL
        assert max_diff(out[1, 0], model(torch.tensor([[5, 6, 7]]))[0, -1]) <= TOL


def _gradients(model, conts, shared, weights):
    model.zero_grad()
    (model(conts, prompts=shared).logsumexp(-1) * weights).sum().backward()
    plain = model(torch.cat([shared.tokens[shared.rows], conts], 1)).logsumexp(-1).sum()
    plain.backward()  # the whole-sequence path as well, into the same gradients
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_update_gives_the_eager_gradients_and_leaves_no_grad_forwards_eager(checkpointing, device):
    torch._dynamo.reset()
    model = make_ours("qwen3").to(device).train()
    model.gradient_checkpointing = checkpointing
    conts, shared = _shared_batch(**SHARED, device=device)
    weights = torch.randn(conts.shape, device=device)
    eager = _gradients(model, conts, shared, weights)
    model.compile_update()
    calls = []
    compiled = model.model.layers[0].compiled_block
    for layer in model.model.layers:
        layer.compiled_block = lambda *a, _c=compiled: calls.append(1) or _c(*a)
    with torch.no_grad():
        model(conts, prompts=shared)
    assert not calls  # rollouts and evaluation stay eager
    for a, b in zip(_gradients(model, conts, shared, weights), eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert calls and all(layer.compiled_block is not None for layer in model.model.layers)


def test_a_compiled_layer_that_fails_falls_back_to_eager_with_a_warning():
    model = make_ours("qwen2").train()
    conts, shared = _shared_batch(**SHARED)
    weights = torch.randn(conts.shape)
    eager = _gradients(model, conts, shared, weights)

    def broken(*_):
        raise RuntimeError("no C++ compiler")

    for layer in model.model.layers:
        layer.compiled_block = broken
    with pytest.warns(UserWarning, match="compiled decoder layer failed"):
        grads = _gradients(model, conts, shared, weights)
    assert all(layer.compiled_block is None for layer in model.model.layers)
    for a, b in zip(grads, eager):
        torch.testing.assert_close(a, b)


def test_shared_prompts_refuse_options_that_index_the_whole_sequence():
    model = make_ours("qwen2")
    conts, shared = _shared_batch(**SHARED)
    with pytest.raises(ValueError, match="prompts"):
        model(conts, prompts=shared, output_last_qk=True)
    with pytest.raises(ValueError, match="prompts"):
        model(conts, prompts=shared, logits_positions=torch.zeros(len(conts), 1, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# config parsing and initialisation

# trimmed from the real Qwen/Qwen2.5-3B-Instruct and Qwen/Qwen3-4B config.json (transformers 4 layout)
QWEN25_3B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 11008, "max_position_embeddings": 32768,
    "max_window_layers": 70, "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "attention_bias": False, "head_dim": 128,
    "hidden_size": 2560, "intermediate_size": 9728, "max_position_embeddings": 40960, "num_attention_heads": 32,
    "num_hidden_layers": 36, "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "vocab_size": 151936,
    "eos_token_id": 151645,
}


def test_config_parses_real_and_transformers5_layouts():
    c2 = ModelConfig.from_dict(QWEN25_3B)
    assert (c2.attention_bias, c2.use_qk_norm, c2.head_dim, c2.rope_theta) == (True, False, 128, 1e6)
    c3 = ModelConfig.from_dict(QWEN3_4B)
    assert (c3.attention_bias, c3.use_qk_norm, c3.head_dim, c3.num_key_value_heads) == (False, True, 128, 8)
    v5 = {k: v for k, v in QWEN3_4B.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    v5.update(rope_parameters={"rope_theta": 1000000.0, "rope_type": "default"}, dtype="bfloat16")
    assert ModelConfig.from_dict(v5) == c3
    assert ModelConfig.from_dict(c3.to_dict()) == c3
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**QWEN25_3B, "rope_scaling": {"type": "yarn", "factor": 4.0}})


def test_from_config_uses_hf_init():
    model = Transformer.from_config(ModelConfig.from_dict({**QWEN25_3B, "hidden_size": 64, "intermediate_size": 96,
                                                          "num_hidden_layers": 1, "num_attention_heads": 4,
                                                          "vocab_size": 500}), dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.rotary_emb.inv_freq.dtype == torch.float32
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias.abs().max() == 0 and attn.o_proj.bias is None
    assert torch.all(model.model.norm.weight == 1)
    assert 0.015 < model.model.embed_tokens.weight.float().std().item() < 0.025


# --------------------------------------------------------------------------------------------
# bad checkpoints give errors that name the file and key


def test_missing_directory_says_how_to_get_weights(tmp_path):
    with pytest.raises(CheckpointError, match="git clone|huggingface") as err:
        Transformer.from_pretrained(tmp_path / "Qwen2.5-3B-Instruct")
    assert "Qwen2.5-3B-Instruct" in str(err.value)


def test_missing_config_and_weights(tmp_path):
    tmp_path.joinpath("ckpt").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Transformer.from_pretrained(tmp_path / "ckpt")
    path, _ = make_hf(tmp_path, "qwen2")
    (path / "model.safetensors").rename(path / "elsewhere.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        Transformer.from_pretrained(path)
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        Transformer.from_pretrained(path)


def test_unsupported_model_type(tmp_path):
    path, _ = make_hf(tmp_path, "qwen2")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type") as err:
        Transformer.from_pretrained(path)
    assert all(s in str(err.value) for s in ("config.json", "llama", "qwen2", "qwen3"))


def test_shape_mismatch_names_key(tmp_path):
    path, _ = make_hf(tmp_path, "qwen3", tied=True)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vocab_size": 120}))
    with pytest.raises(CheckpointError, match=r"model\.embed_tokens\.weight") as err:
        Transformer.from_pretrained(path)
    assert "[101, 32]" in str(err.value) and "[120, 32]" in str(err.value)


def test_missing_and_unexpected_tensors(tmp_path):
    path, hf = make_hf(tmp_path, "qwen2")
    tensors = load_file(path / "model.safetensors")
    file = path / "model.safetensors"

    save_file({k: v for k, v in tensors.items() if k != "model.norm.weight"}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.norm\.weight'"):
        Transformer.from_pretrained(path)

    save_file({**tensors, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        Transformer.from_pretrained(path)

    # stale rotary buffers from old checkpoints are ignored
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}, file,
              metadata={"format": "pt"})
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert max_diff(Transformer.from_pretrained(path, dtype=torch.float32)(tokens), hf(tokens).logits) <= TOL


def test_bf16_load_is_close_to_fp32(tmp_path, device):
    path, _ = make_hf(tmp_path, "qwen3", tied=True)
    fp32 = Transformer.from_pretrained(path, device=device, dtype=torch.float32)
    bf16 = Transformer.from_pretrained(path, device=device, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert bf16.rotary_emb.inv_freq.dtype == torch.float32
    tokens = torch.randint(0, VOCAB, (2, 8), device=device)
    with torch.no_grad():
        ref, got = fp32(tokens), bf16(tokens)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert max_diff(got, ref) <= 0.05 * ref.abs().max().item() + 0.05


def test_logits_positions_select_rows_of_the_full_logits():
    model = make_ours("qwen2")
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    positions = torch.tensor([[0, 4, 8], [3, 3, 7]])
    with torch.no_grad():
        full = model(tokens, output_hidden=True)
        part = model(tokens, output_hidden=True, logits_positions=positions)
    expected = full.logits.gather(1, positions[..., None].expand(-1, -1, full.logits.shape[-1]))
    assert part.logits.shape == (2, 3, model.config.vocab_size)
    assert max_diff(part.logits, expected) < 1e-5
    assert max_diff(part.hidden, full.hidden.gather(1, positions[..., None].expand(-1, -1, full.hidden.shape[-1]))) < 1e-6
