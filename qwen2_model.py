"""A hand-written Qwen2 / Qwen3 decoder in plain PyTorch that loads Hugging Face checkpoints.

Layout follows nanoGPT / gpt-fast: config, then the modules in the order data flows through them
(RMSNorm, rotary embedding, KV cache, attention, MLP, decoder layer, Transformer), then loading and
saving. Numerics follow transformers' Qwen2/Qwen3 modeling code so logits match it (fp32: ~1e-6):
RMSNorm in fp32, RoPE with the rotate_half convention and fp32 cos/sin, attention through
`F.scaled_dot_product_attention`.

State-dict keys equal the keys in the Hugging Face safetensors files, so checkpoints load and save
without renaming. Qwen2 vs Qwen3 differ only in: Qwen2 has q/k/v biases (never an o_proj bias);
Qwen3 has a per-head RMSNorm on q and k (`q_norm`, `k_norm`) and an explicit `head_dim`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from fileio import atomic_write

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GET_WEIGHTS_HINT = (
    "Download the weights first, e.g. `hf download Qwen/Qwen2.5-3B-Instruct --local-dir Qwen2.5-3B-Instruct` "
    "(pip install -U huggingface_hub)."
)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
# Keys some older checkpoints carry that hold nothing we need (RoPE frequencies are recomputed).
IGNORED_KEY_PATTERN = re.compile(r".*rotary_emb\.inv_freq$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # config.model.dtype


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, unreadable, or does not match its config.json."""


# ------------------------------------------------------------------------------------------------
# Config


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    attention_bias: bool | None = None  # None -> True for qwen2 (q/k/v bias), False for qwen3
    use_qk_norm: bool | None = None  # None -> True for qwen3
    tie_word_embeddings: bool = True
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type={self.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"
        if self.use_qk_norm is None:
            self.use_qk_norm = self.model_type == "qwen3"
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention)"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "ModelConfig":
        """Parse an HF config.json dict (transformers 4 or 5 layout). `source` names the file in errors, which
        are CheckpointErrors (a ValueError)."""
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: key 'model_type' = {model_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers <= 4 writes rope_theta (+ rope_scaling) at top level; 5 nests both in rope_parameters.
        rope = d.get("rope_parameters") or {}
        for key in ("rope_scaling", "rope_parameters"):
            scaling = d.get(key) or {}
            rope_type = scaling.get("rope_type", scaling.get("type", "default"))
            if rope_type != "default":
                raise CheckpointError(
                    f"{source}: key '{key}' has rope type {rope_type!r}; only default RoPE is implemented"
                )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        for key in (*required, "num_key_value_heads", "head_dim"):
            value = d.get(key)
            if value is None and key in required:
                raise CheckpointError(f"{source}: required key {key!r} is missing")
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CheckpointError(f"{source}: key {key!r} must be a positive integer, got {value!r}")
        if d.get("use_sliding_window", False):
            raise CheckpointError(f"{source}: key 'use_sliding_window' = true; sliding-window attention is not implemented")
        try:
            dtype = d.get("torch_dtype", d.get("dtype")) or "bfloat16"
            return cls(
                model_type=model_type,
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=d["num_hidden_layers"],
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d.get("num_key_value_heads", d["num_attention_heads"]),
                head_dim=d.get("head_dim"),
                max_position_embeddings=d.get("max_position_embeddings", 32768),
                rope_theta=float(d.get("rope_theta", rope.get("rope_theta", 10000.0))),
                rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                attention_bias=d.get("attention_bias"),
                use_qk_norm=d.get("use_qk_norm"),
                tie_word_embeddings=d.get("tie_word_embeddings", False),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                torch_dtype=str(dtype).removeprefix("torch."),
            )
        except (TypeError, ValueError) as e:  # a value of the wrong type, or a shape __post_init__ rejects
            raise CheckpointError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        return cls.from_dict(_read_json(Path(path)), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """An HF config.json dict that `transformers.AutoModelForCausalLM` loads to the same model."""
        return {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            # both layouts, so transformers 4 (top level) and 5 (rope_parameters) read the same theta
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "use_qk_norm": self.use_qk_norm,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_sliding_window": False,
            "sliding_window": None,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": self.torch_dtype,
            "dtype": self.torch_dtype,
        }


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when forward(compute_logits=False)
    hidden: torch.Tensor | None = None  # [B, T, hidden] after the final norm
    last_q: torch.Tensor | None = None  # [B, H, T, head_dim] last layer, post q_norm, post RoPE
    last_k: torch.Tensor | None = None  # [B, KV, T, head_dim] last layer, post k_norm, post RoPE
    head_output: Any = None  # what forward(head_fn=...) returned


# ------------------------------------------------------------------------------------------------
# Modules, in data-flow order


class Linear(nn.Linear):
    """nn.Linear that can run inference from a copy of its weight reordered for oneDNN (pack()). On CPU that
    copy ran 1.3-4x faster than F.linear at decode batch sizes with the weight out of cache (BENCHMARKS.md;
    most at a large vocabulary's lm_head); results agree with F.linear to float rounding, and a row's result
    does not depend on how many rows share the call (tested). The copy is used only with gradient off
    and only while the weight is unchanged since pack() (its in-place version counter), so a forgotten copy
    can never run stale weights: Transformer.packed_linears packs for a rollout and drops the copies after.
    The copy hangs on the weight, out of torch.compile's sight (it cannot trace oneDNN's packed layout): a
    compiled step calls packed_linear, an op opaque to it that finds the copy there."""

    is_packed: bool = False  # pack() called, unpack() not yet: a plain flag that torch.compile guards on

    def pack(self, rows: int) -> None:
        """Reorder the weight for calls of about `rows` rows (oneDNN's hint; any row count works)."""
        reordered = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), max(rows, 32))
        self.weight.__dict__[_PACKED] = (reordered, self.weight._version)
        self.is_packed = True

    def unpack(self) -> None:
        self.weight.__dict__.pop(_PACKED, None)
        self.is_packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_packed or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        # eager calls the op's body directly: the dispatcher's cost per call is a decode step's few percent
        op = packed_linear if torch.compiler.is_compiling() else _packed_linear
        y = op(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


_PACKED = "_onednn_packed"  # weight.__dict__ key: (packed copy, the weight's version when packed)


def _packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x [N, in], weight, bias) from the weight's packed copy, if it has one and is unchanged since."""
    packed = weight.__dict__.get(_PACKED)
    if packed is None or packed[1] != weight._version:
        return F.linear(x, weight, bias)
    bias = None if bias is None else bias.detach()
    return torch.ops.mkldnn._linear_pointwise(x, packed[0], bias, "none", [None], "")


packed_linear = torch.library.custom_op("qwen2_model::packed_linear", _packed_linear, mutates_args=())


@packed_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def can_pack(weight: torch.Tensor) -> bool:
    """oneDNN packing applies: a plain (not sharded) fp32 CPU weight, in a torch build with oneDNN."""
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (bf16 squares overflow/lose precision), cast back, then scale: as HF does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021, RoFormer) with the rotate_half layout used by HF Llama/Qwen checkpoints."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        # Computed on CPU in fp32 exactly as HF does, so angles agree bit for bit.
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # model.to(bfloat16) would round inv_freq and shift the angles at long positions; recompute in fp32.
        super()._apply(fn, recurse)
        if self.inv_freq.device.type != "meta":
            self.inv_freq = self._inv_freq().to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B or 1, T] -> cos, sin [B or 1, 1, T, head_dim] in `dtype` (broadcast over heads)."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static per-layer k/v buffers (gpt-fast): allocated once, written at the slots in `input_pos`."""

    def __init__(
        self, max_batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device | str | None,
    ) -> None:
        super().__init__()
        shape = (max_batch_size, n_kv_heads, max_seq_len, head_dim)
        # non-persistent: caches never enter state_dict / checkpoints
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, KV, T, hd] at slots input_pos [T]; return slots [0, kv_len) of the B rows."""
        batch = k.shape[0]
        # index_copy_ along the slot axis: no host sync, and far cheaper than advanced-index assignment
        self.k_cache[:batch].index_copy_(2, input_pos, k.to(self.k_cache.dtype))
        self.v_cache[:batch].index_copy_(2, input_pos, v.to(self.v_cache.dtype))
        return self.k_cache[:batch, :, :kv_len], self.v_cache[:batch, :, :kv_len]


def additive_mask(blocked: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores: 0 where allowed, -inf where `blocked`."""
    return torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))


@dataclass
class SharedPrefix:
    """Decode over prompts shared by groups of rows (cascade attention): the `group` rows of question q read
    that prompt's keys and values once for the group, from cache row q, slots [0, length), and their own
    generated ones from their own cache row, slots [length, ...). Rows stay in the cache rows [0, n) of the
    live batch; `rows[i]` = q * group + j is live row i's identity (so compaction may reorder or drop rows),
    None while all questions x group rows are live and in that order."""

    length: int  # prompt slots (the prefill's width)
    group: int  # rows per question
    questions: int
    rows: torch.Tensor | None  # [n] identity q * group + j of each live row; None = all, in order
    mask: torch.Tensor  # [questions, 1, 1, length] additive: -inf on each prompt's left padding

    @classmethod
    def for_prompts(cls, pad_lens: torch.Tensor, length: int, group: int, rows: torch.Tensor | None = None
                    ) -> "SharedPrefix":
        """Prompts left-padded by pad_lens [questions] to `length` slots, in cache rows [0, questions)."""
        padding = torch.arange(length, device=pad_lens.device) < pad_lens[:, None]
        return cls(length, group, len(pad_lens), rows, additive_mask(padding, torch.float32)[:, None, None])


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (tokens [N, width] left-padded with pad_id, pad_lens [N]): the layout of forward(pad_lens=)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
    return tokens.to(device), torch.tensor([width - len(s) for s in seqs], device=device)


@dataclass
class SharedPrompts:
    """A training forward over completions whose prompts repeat (GRPO's groups): each distinct prompt goes
    through the model once, and every row's attention reads its prompt's keys and values ahead of its own.
    Same outputs as the rows' whole sequences, without the G - 1 redundant prompt passes (forward and backward)."""

    tokens: torch.Tensor  # [Q, P] the distinct prompts, left-padded
    pad_lens: torch.Tensor  # [Q] left padding of each
    rows: torch.Tensor  # [B] the prompt each row continues


@dataclass(frozen=True)
class _PromptStream:
    """The shared prompts' hidden states on their way through the layers, beside the rows' stream."""

    x: torch.Tensor  # [Q, P, hidden]
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor  # [Q, 1, P, P] causal over each prompt, its padding blocked
    rows: torch.Tensor  # [B]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                       fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(hd) + mask) v and its fp32 log-normalizer: q [B, h, M, hd], k/v [B, h, L, hd],
    mask additive [B or 1, 1, M or 1, L] -> ([B, h, M, hd], [B, h, M]). `fused`: the CPU flash kernel
    (default on CPU), else plain matmuls in fp32 (any device)."""
    if fused if fused is not None else q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
        return out, lse
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)
    return (torch.exp(scores - lse[..., None]) @ v.float()).to(q.dtype), lse


def cascade_attention(q: torch.Tensor, cache: KVCache, kv_len: int, prefix: SharedPrefix,
                      generated_mask: torch.Tensor) -> torch.Tensor:
    """One decode query per live row, q [n, H, 1, hd], over its question's prompt (read once per question) and
    its own generated slots [prefix.length, kv_len) (additive generated_mask [1, 1, 1, kv_len - length]: -inf
    past the row's own slot); the two softmax partials merged by their log-normalizers."""
    n, heads, _, hd = q.shape
    kv_heads = cache.k_cache.shape[1]
    per_kv = heads // kv_heads
    nq, g = prefix.questions, prefix.group
    # the prompt part: all queries of a question (and of one kv head) attend together, as one block of rows
    every_row = prefix.rows is None  # no scatter or gather
    grouped = q[:, :, 0] if every_row else q.new_zeros(nq * g, heads, hd).index_copy_(0, prefix.rows, q[:, :, 0])
    grouped = grouped.view(nq, g, kv_heads, per_kv, hd).transpose(1, 2).reshape(nq, kv_heads, g * per_kv, hd)
    o1, l1 = attention_with_lse(grouped, cache.k_cache[:nq, :, :prefix.length], cache.v_cache[:nq, :, :prefix.length],
                                prefix.mask)
    o1 = o1.reshape(nq, kv_heads, g, per_kv, hd).transpose(1, 2).reshape(nq * g, heads, hd)
    l1 = l1.reshape(nq, kv_heads, g, per_kv).transpose(1, 2).reshape(nq * g, heads)
    if not every_row:
        o1, l1 = o1[prefix.rows], l1[prefix.rows]
    # the generated part: each row's own slots, no padding inside them
    o2, l2 = attention_with_lse(q.view(n, kv_heads, per_kv, hd), cache.k_cache[:n, :, prefix.length:kv_len],
                                cache.v_cache[:n, :, prefix.length:kv_len], generated_mask)
    # softmax over both parts = o1 * e^l1 / (e^l1 + e^l2) + o2 * e^l2 / (e^l1 + e^l2)
    prompt_share = torch.sigmoid(l1 - l2.reshape(n, heads))[..., None]
    return torch.lerp(o2.reshape(n, heads, hd).float(), o1.float(), prompt_share).to(q.dtype)[:, :, None]


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): num_key_value_heads k/v heads serve all q heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=bias)
        # Qwen2 never has an o_proj bias; Qwen3's attention_bias covers all four projections.
        o_bias = bias and config.model_type != "qwen2"
        self.o_proj = Linear(self.n_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        input_pos: torch.Tensor | None, kv_len: int, prefix: SharedPrefix | None = None,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output [B, T, hidden], q [B, H, T, hd], k, v [B, KV, T, hd]); q/k post-norm, post-RoPE.
        past: keys and values [B, KV, P, hd] that precede this input (a shared prompt's; `mask` covers them)."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        keys, values = k, v
        if past is not None:
            keys, values = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        elif input_pos is not None and self.kv_cache is not None:
            keys, values = self.kv_cache.update(input_pos, k, v, kv_len)

        groups = self.n_heads // self.n_kv_heads
        if prefix is not None:
            y = cascade_attention(q, self.kv_cache, kv_len, prefix, mask)
        elif mask is None:
            # causal fast path: flash attention handles GQA natively
            y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=groups > 1)
        elif q.device.type == "cpu":
            # on CPU the GQA-aware kernel takes the mask too; copying k/v cost a fifth of decode time
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=groups > 1)
        else:
            # With an explicit mask, enable_gqa would push CUDA to the math kernel; repeating k/v keeps
            # the memory-efficient kernel eligible and costs only [B, H, L, hd] extra.
            if groups > 1:
                keys = keys.repeat_interleave(groups, dim=1)
                values = values.repeat_interleave(groups, dim=1)
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        y = y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim)
        return self.o_proj(y), q, k, v


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        # Transformer.compile_update: _block through torch.compile, as (layer, *args) -> _block's result
        self.compiled_block: Callable | None = None
        self.compiled_ran = False

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
        input_pos: torch.Tensor | None, kv_len: int, prefix: SharedPrefix | None = None,
        prompts: _PromptStream | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _PromptStream | None]:
        """Returns (x, last q, last k, the prompts' stream after this layer). With `prompts`, the distinct
        prompts go through the layer first, and each row attends to its prompt's keys/values, then its own."""
        past = None
        if prompts is not None:
            xp, _, kp, vp = self._run(prompts.x, prompts.cos, prompts.sin, prompts.mask, None, 0, None, None)
            # gathered per row; index_select's backward sums a group's gradients in a fixed order (advanced
            # indexing's accumulates in parallel on CPU, and the update would differ in the last bits run to run)
            past = (kp.index_select(0, prompts.rows), vp.index_select(0, prompts.rows))
            prompts = _PromptStream(xp, prompts.cos, prompts.sin, prompts.mask, prompts.rows)
        x, q, k, _ = self._run(x, cos, sin, mask, input_pos, kv_len, prefix, past)
        return x, q, k, prompts

    def _run(self, *args: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """_block, compiled in training forwards (gradient enabled) once compile_update was called; rollouts,
        evaluation and the reference model stay eager. If its first call fails (e.g. no C++ compiler), eager from
        then on, with a warning."""
        if self.compiled_block is None or not torch.is_grad_enabled():
            return self._block(*args)
        if self.compiled_ran:  # past the first call, errors propagate (checkpointing stops its recompute by one)
            return self.compiled_block(self, *args)
        try:
            out = self.compiled_block(self, *args)
        except Exception as err:  # no C++ compiler, an unsupported backend, ...
            warnings.warn(f"compiled decoder layer failed ({type(err).__name__}: {err}); training it eagerly")
            self.compiled_block = None
            return self._block(*args)
        self.compiled_ran = True
        return out

    def _block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
               input_pos: torch.Tensor | None, kv_len: int, prefix: SharedPrefix | None,
               past: tuple[torch.Tensor, torch.Tensor] | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        h, q, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, kv_len, prefix, past)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, q, k, v


class Transformer(nn.Module):
    """Qwen2/Qwen3 causal LM. Submodule names mirror HF (`model.*`, `lm_head`) so keys load 1:1."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        self.gradient_checkpointing: bool = False
        self.tie_weights()
        self.init_weights()

    # -- construction ----------------------------------------------------------------------------

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """HF initialisation: normal(0, 0.02) for linear/embedding weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @classmethod
    def _empty(cls, config: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> "Transformer":
        # Build on the meta device and allocate once on the target: no CPU init pass for billions of params.
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()  # to_empty replaces parameters one by one, which unties them
        return model

    @classmethod
    def from_config(
        cls, config: ModelConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "Transformer":
        model = cls._empty(config, device or "cpu", dtype or torch.get_default_dtype())
        model.init_weights()
        return model

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied weight once
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def compile_update(self) -> None:
        """Run the decoder layers of training forwards through torch.compile (dynamic shapes; one compiled block
        shared by all layers, so it compiles once): it fuses the norms, RoPE and SwiGLU around the matmuls.
        Forwards without gradient (rollouts, evaluation, the reference model) stay eager."""
        compiled = torch.compile(DecoderLayer._block, dynamic=True)
        for layer in self.model.layers:
            layer.compiled_block = compiled

    # -- KV cache --------------------------------------------------------------------------------

    def setup_caches(
        self, max_batch_size: int, max_seq_len: int,
        dtype: torch.dtype | None = None, device: torch.device | str | None = None,
    ) -> None:
        weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(
                max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim,
                dtype or weight.dtype, device or weight.device,
            )

    def clear_caches(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @contextlib.contextmanager
    def packed_linears(self, rows: int) -> Iterator[int]:
        """Inference (gradient off) inside runs every linear layer from a oneDNN-packed copy of its weight
        (Linear.pack), for batches of about `rows` rows; yields how many were packed (0 where can_pack says
        no: off the CPU, not fp32, sharded weights). The copies cost one more set of the linear weights in
        memory while inside, and are dropped on exit. Weights changed inside fall back to F.linear."""
        linears = [m for m in self.modules() if isinstance(m, Linear) and can_pack(m.weight)]
        try:
            for m in linears:
                m.pack(rows)
            yield len(linears)
        finally:
            for m in linears:
                m.unpack()

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        input_pos: torch.Tensor | None = None,
        pad_lens: torch.Tensor | None = None,
        output_hidden: bool = False,
        output_last_qk: bool = False,
        logits_positions: torch.Tensor | None = None,
        compute_logits: bool = True,
        head_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None = None,
        prefix: SharedPrefix | None = None,
        kv_len: int | None = None,
        prompts: SharedPrompts | None = None,
    ) -> torch.Tensor | ModelOutput:
        """tokens [B, T] -> logits [B, T, V] (or ModelOutput when output_hidden / output_last_qk).

        logits_positions [B, K]: compute logits (and return hidden states) only at these positions,
        giving [B, K, V]. With a 150k vocabulary the full [B, T, V] logits of a long prompt cost far
        more memory than the model; sampling needs the last position and training the completion's.

        pad_lens [B]: row b is left-padded by pad_lens[b] tokens; they are never attended to as keys
        and column j gets RoPE position j - pad_lens[b], so real tokens see exactly the unpadded
        sequence. input_pos [T]: KV-cache slots of the T new tokens (needs setup_caches); queries attend
        to slots in [pad_lens[b], own slot], and only slots up to input_pos.max() are read.

        head_fn(hidden, lm_head.weight), with compute_logits=False: applied inside forward in place of the
        full lm_head (e.g. log-probs over chunks, update.chunked_token_statistics); its result is
        ModelOutput.head_output. Inside forward, so FSDP2 / DDP see every use of the weights.

        kv_len: with input_pos, attend over cache slots [0, kv_len) (default input_pos.max() + 1, a host sync);
        a compiled decode step passes a fixed length, so the step has static shapes and no sync.

        prefix: a decode step (T = 1, with input_pos) whose rows share prompts in the cache (SharedPrefix):
        attention reads each prompt once per question instead of once per row (the rollout engine's GRPO
        groups). pad_lens still gives each row's RoPE position.

        prompts: a training forward of continuations tokens [B, C] of shared prompts (SharedPrompts): each
        distinct prompt runs once. Output position t is the one that predicts tokens[:, t] (the prompt's last
        for t = 0), so the result is [B, C, ...] and the rows' last token is never run.
        """
        if prompts is not None:
            if input_pos is not None or pad_lens is not None or prefix is not None or logits_positions is not None \
                    or output_last_qk:
                raise ValueError("forward(prompts=...) takes no input_pos, pad_lens, prefix, logits_positions or "
                                 "output_last_qk: the rows' positions and attention follow from their prompts")
            return self._head(self._continue_prompts(tokens, prompts), None, None, output_hidden, False,
                              compute_logits, head_fn)
        batch, seq = tokens.shape
        cached = input_pos is not None
        if cached:
            kv_len = self._cache_length(batch, input_pos, kv_len)
            query_slots = input_pos
        else:
            kv_len = seq
            query_slots = torch.arange(seq, device=tokens.device)

        positions = query_slots[None]  # [1, T]
        if pad_lens is not None:
            positions = (positions - pad_lens[:, None]).clamp(min=0)  # [B, T]

        if prefix is not None and not (cached and seq == 1):
            raise ValueError("forward(prefix=...) is for one decode step: tokens [n, 1] and input_pos")
        # None -> the causal fast path (a plain full-sequence forward)
        mask = self._attention_mask(query_slots, kv_len, pad_lens, prefix) if cached or pad_lens is not None else None

        x = self.model.embed_tokens(tokens)
        cos, sin = self.rotary_emb(positions, x.dtype)
        x, q, k, _ = self._layers(x, cos, sin, mask, input_pos, kv_len, prefix, None)
        hidden = self.model.norm(x)
        if logits_positions is not None:
            hidden = hidden.gather(1, logits_positions[..., None].expand(-1, -1, hidden.shape[-1]))
        return self._head(hidden, q, k, output_hidden, output_last_qk, compute_logits, head_fn)

    def _cache_length(self, batch: int, input_pos: torch.Tensor, kv_len: int | None) -> int:
        """The cache slots a cached forward attends over, checked against the caches set up."""
        cache = self.model.layers[0].self_attn.kv_cache
        if cache is None:
            raise RuntimeError("forward(input_pos=...) needs the KV cache: call setup_caches() first")
        if kv_len is None:  # one host sync per step buys attention over kv_len, not max_seq_len
            kv_len = int(input_pos.max()) + 1
        max_batch, _, max_len, _ = cache.k_cache.shape
        if batch > max_batch or kv_len > max_len:
            raise ValueError(f"batch {batch} / slot {kv_len - 1} exceeds the caches set up for "
                             f"max_batch_size={max_batch}, max_seq_len={max_len}")
        return kv_len

    def _layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None, kv_len: int, prefix: SharedPrefix | None,
                prompts: _PromptStream | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, _PromptStream | None]:
        q = k = None
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, q, k, prompts = checkpoint(layer, x, cos, sin, mask, input_pos, kv_len, prefix, prompts,
                                              use_reentrant=False)
            else:
                x, q, k, prompts = layer(x, cos, sin, mask, input_pos, kv_len, prefix, prompts)
        return x, q, k, prompts

    def _continue_prompts(self, tokens: torch.Tensor, prompts: SharedPrompts) -> torch.Tensor:
        """forward(prompts=...)'s hidden states [B, C, hidden], after the final norm."""
        device, plen = tokens.device, prompts.tokens.shape[1]
        slots = torch.arange(plen, device=device)
        xp = self.model.embed_tokens(prompts.tokens)
        cos_p, sin_p = self.rotary_emb((slots - prompts.pad_lens[:, None]).clamp(min=0), xp.dtype)
        stream = _PromptStream(xp, cos_p, sin_p, self._attention_mask(slots, plen, prompts.pad_lens, None),
                               prompts.rows)
        inputs = tokens[:, :-1]  # a row's last token predicts nothing here
        width, pad = inputs.shape[1], prompts.pad_lens[prompts.rows]
        own = torch.arange(width, device=device)
        cos, sin = self.rotary_emb((plen - pad)[:, None] + own, xp.dtype)
        # query t of row b: its prompt's real slots, then its own tokens up to t
        real = (slots >= pad[:, None])[:, None].expand(-1, width, -1)
        causal = (own[None, :] <= own[:, None]).expand(len(pad), -1, -1)
        mask = additive_mask(~torch.cat((real, causal), dim=-1), xp.dtype)[:, None]
        x, _, _, stream = self._layers(self.model.embed_tokens(inputs), cos, sin, mask, None, width, None, stream)
        last = self.model.norm(stream.x[:, -1:])  # left-padded: each prompt's last token is in the last slot
        return torch.cat((last.index_select(0, prompts.rows), self.model.norm(x)), dim=1)

    def _head(self, hidden: torch.Tensor, q: torch.Tensor | None, k: torch.Tensor | None, output_hidden: bool,
              output_last_qk: bool, compute_logits: bool, head_fn: Callable[[torch.Tensor, torch.Tensor], Any] | None
              ) -> torch.Tensor | ModelOutput:
        # compute_logits=False: the caller applies lm_head itself, in chunks (update.chunked_token_statistics)
        logits = self.lm_head(hidden) if compute_logits else None
        head_output = head_fn(hidden, self.lm_head.weight) if head_fn is not None else None
        if not (output_hidden or output_last_qk or head_fn is not None):
            return logits
        return ModelOutput(
            logits=logits,
            hidden=hidden if output_hidden else None,
            last_q=q if output_last_qk else None,
            last_k=k if output_last_qk else None,
            head_output=head_output,
        )

    def _attention_mask(self, query_slots: torch.Tensor, kv_len: int, pad_lens: torch.Tensor | None,
                        prefix: SharedPrefix | None) -> torch.Tensor:
        """Additive mask [B or 1, 1, T, kv_len] in the model's dtype, built once per forward (SDPA would convert a
        boolean one again in every layer). Under `prefix`, the cascade's mask over the generated slots only."""
        dtype, device = self.model.embed_tokens.weight.dtype, query_slots.device
        if prefix is not None:  # no generated slot past the new token's own
            later = torch.arange(prefix.length, kv_len, device=device) > query_slots
            return additive_mask(later, dtype).view(1, 1, 1, -1)
        key_slots = torch.arange(kv_len, device=device)
        own = query_slots[:, None]  # [T, 1]
        allowed = key_slots <= own  # [T, L]
        if pad_lens is not None:
            allowed = allowed & (key_slots >= pad_lens[:, None, None])  # [B, T, L]
            # a padding query has no valid key; letting it see itself keeps softmax (and then V) NaN-free
            allowed = allowed | (key_slots == own)
        return additive_mask(~allowed, dtype).view(-1, 1, len(query_slots), kv_len)

    # -- checkpoints -----------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """state_dict as stored in HF safetensors: a tied lm_head.weight is not stored."""
        sd = self.state_dict()
        if self.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16
    ) -> "Transformer":
        """Load an HF Qwen2/Qwen3 checkpoint directory (config.json + single or sharded safetensors)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: checkpoint directory not found. {GET_WEIGHTS_HINT}")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: missing config.json in the checkpoint directory. {GET_WEIGHTS_HINT}")
        config = ModelConfig.from_json(config_file)
        key_files, listing = _tensor_files(path)

        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in cls(config).checkpoint_state_dict().items()}

        # Validate names and shapes from the headers before allocating anything.
        for file in sorted(set(key_files.values())):
            with _open_tensors(file) as f:
                stored = set(f.keys())
                for key in sorted(k for k, v in key_files.items() if v == file):
                    if key not in stored:
                        raise CheckpointError(f"{file}: tensor '{key}' listed in {listing} is not in the file")
                    if IGNORED_KEY_PATTERN.match(key) or (key == "lm_head.weight" and config.tie_word_embeddings):
                        continue
                    if key not in expected:
                        raise CheckpointError(
                            f"{file}: unexpected tensor '{key}' for {config.model_type} as configured by "
                            f"{config_file} (check model_type / attention_bias / tie_word_embeddings)"
                        )
                    got = tuple(f.get_slice(key).get_shape())
                    if got != expected[key]:
                        raise CheckpointError(
                            f"{file}: tensor '{key}' has shape {list(got)}, but {config_file} implies "
                            f"{list(expected[key])}"
                        )
        missing = sorted(set(expected) - set(key_files))
        if missing:
            raise CheckpointError(
                f"{listing}: missing tensor '{missing[0]}' ({len(missing)} missing in all) required by {config_file}"
            )

        model = cls._empty(config, device, dtype)
        params = model.state_dict()
        device_str = str(torch.device(device))
        with torch.no_grad():
            for file in sorted(set(key_files.values())):
                with _open_tensors(file, device_str) as f:
                    for key in f.keys():
                        if key in expected and key_files.get(key) == file:
                            params[key].copy_(f.get_tensor(key))  # casts to the model dtype in place
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int = 4 * 1024**3,
                        state: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + model.safetensors (sharded with an index above max_shard_size bytes).
        `state`: the tensors to write instead of this model's own (e.g. gathered from FSDP2 shards).

        Every file goes to a temporary name first and is renamed with os.replace, so an interrupted
        save never leaves a truncated file under a final name.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        source = self.checkpoint_state_dict() if state is None else state
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in source.items()}
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes

        if len(shards) == 1:
            atomic_write(path / SAFETENSORS_FILE, lambda tmp: save_file(shards[0], str(tmp), metadata={"format": "pt"}))
            stale = [path / SAFETENSORS_INDEX_FILE]
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                atomic_write(path / name, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(path / SAFETENSORS_INDEX_FILE, lambda tmp: _write_json(index, tmp))
            stale = [path / SAFETENSORS_FILE]
        for file in stale:  # a leftover from an earlier save in the other layout would shadow this one
            file.unlink(missing_ok=True)

        config = self.config.to_dict()
        config["torch_dtype"] = config["dtype"] = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        atomic_write(path / "config.json", lambda tmp: _write_json(config, tmp))


# ------------------------------------------------------------------------------------------------
# File helpers


def _read_json(file: Path) -> Any:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e}); the file is damaged, download or copy it again") from e


@contextlib.contextmanager
def _open_tensors(file: Path, device: str = "cpu") -> Iterator[Any]:
    """safe_open, a damaged file (a truncated download, a bad header) reported as a CheckpointError."""
    try:
        with safe_open(file, framework="pt", device=device) as f:
            yield f
    except SafetensorError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the file is damaged, download or "
                              f"copy it again") from e


def _tensor_files(path: Path) -> tuple[dict[str, Path], Path]:
    """Map each tensor key to the safetensors file holding it; also return the file that lists them."""
    single, index_file = path / SAFETENSORS_FILE, path / SAFETENSORS_INDEX_FILE
    if single.is_file():
        with _open_tensors(single) as f:
            return dict.fromkeys(f.keys(), single), single
    if index_file.is_file():
        index = _read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index_file}: key 'weight_map' is missing or not a dict")
        key_files = {key: path / name for key, name in weight_map.items()}
        for key, file in key_files.items():
            if not file.is_file():
                raise CheckpointError(f"{index_file}: shard {file.name} (holding '{key}') not found in {path}")
        return key_files, index_file
    raise CheckpointError(
        f"{path}: no weights found (expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX_FILE}; "
        f".bin checkpoints are not supported). {GET_WEIGHTS_HINT}"
    )


def _write_json(obj: Any, file: str) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
