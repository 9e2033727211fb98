"""The rollout engine: batched prefill, one prefill per question shared by its G completions (whose decode
attention reads the shared prompt once per question: cascade attention), a decode loop over a static KV cache
reused across rollouts with no host sync per token (the step, sampling included, optionally compiled: CUDA
graphs on CUDA), and compaction of finished rows.

Sampling noise is keyed, never drawn from a stateful generator: the token at (row key, position) is chosen
by inverse-CDF sampling with one uniform u = hash(key, position), where a row's key is a hash of (seed,
stream, question, sample). So which tokens are sampled depends only on those numbers, not on the batch
layout: compaction, prefix sharing, micro-batching or sharding questions over ranks never change a rollout.
A plain `generate` call keys each row by its index, so 4,000 copies of one prompt draw 4,000 independent
samples.

The entry points: `generate` (completions of token prompts), `rollout` (a GRPO batch: G scored completions per
question, as Episodes).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from data_types import Episode
from qwen2_model import SharedPrefix, left_pad

MASK64 = (1 << 64) - 1


# ============================================================================ keyed noise


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int: a bijective, well-mixed 64-bit hash."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def stream_key(*parts: int) -> int:
    """One 63-bit key from integers (seed, step, round, ...): hashed in order, so (1, 2) != (2, 1)."""
    key = 0x9E3779B97F4A7C15
    for p in parts:
        key = _mix64(key ^ _mix64(int(p) & MASK64))
    return key >> 1  # fits a signed int64 tensor


def row_keys(stream: int, questions: Sequence[int], samples: Sequence[int], device: torch.device | str = "cpu"
             ) -> torch.Tensor:
    """Keys [N] of rows (question q, sample j) within a stream: the identity of a row, not its content."""
    return torch.tensor([stream_key(stream, q, j) for q, j in zip(questions, samples)], dtype=torch.int64,
                        device=device)


def _mix64_tensor(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on an int64 tensor (wrapping multiplies; logical shifts by masking)."""
    def shr(v: torch.Tensor, n: int) -> torch.Tensor:
        return (v >> n) & ((1 << (64 - n)) - 1)
    x = (x ^ shr(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    x = (x ^ shr(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB as int64
    return x ^ shr(x, 31)


def keyed_uniforms(keys: torch.Tensor, positions: int) -> torch.Tensor:
    """u in (0, 1) per row and position 0..positions-1, a function of (row key, position) only: float64
    [N, positions]. One vectorized pass for a whole rollout instead of ~25 small ops per decode step."""
    signed = [p - (1 << 64) if p >= 1 << 63 else p for p in (_mix64(i + 0x632BE59BD9B4E019) for i in range(positions))]
    x = _mix64_tensor(_mix64_tensor(keys[:, None] ^ torch.tensor(signed, dtype=torch.int64, device=keys.device)))
    return (((x >> 11) & ((1 << 53) - 1)).double() + 0.5) / float(1 << 53)


def keyed_uniform(keys: torch.Tensor, position: int) -> torch.Tensor:
    """u in (0, 1) per row at one position: float64 [N] (= keyed_uniforms(keys, position + 1)[:, position])."""
    return keyed_uniforms(keys, position + 1)[:, position]


def sample_keyed(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0
                 ) -> torch.Tensor:
    """One token per row from softmax(logits / temperature) (nucleus-truncated when top_p < 1), by inverse
    CDF with the row's uniform: exact categorical sampling, one uniform per row, no host sync.
    temperature 0 = greedy. The engine's own sampler (sample_next) without the log-prob and entropy."""
    return sample_next(logits, uniforms, temperature, top_p)[0]


def sample_from_probs(probs: torch.Tensor, uniforms: torch.Tensor, top_p: float = 1.0, overwrite: bool = False
                      ) -> torch.Tensor:
    """`overwrite`: `probs` may be overwritten by its CDF (no [n, V] allocation for it)."""
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(dim=-1) - probs
        probs, overwrite = probs.masked_fill(before >= top_p, 0.0), True  # the top token always survives
    # nondecreasing; a zero-probability entry repeats its predecessor's value
    cdf = probs.cumsum_(dim=-1) if overwrite else probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # the first entry whose CDF exceeds u x total; kept strictly below the total so that entry has mass
    target = torch.minimum(uniforms.to(cdf.dtype).unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    idx = torch.searchsorted(cdf, target, right=True)
    return idx.squeeze(-1) if order is None else order.gather(-1, idx).squeeze(-1)


# ============================================================================ the engine


@dataclass
class RolloutOutput:
    tokens: list[list[int]]  # new tokens per row, up to and including the first end token
    log_probs: list[list[float]]  # log pi(token) of the distribution sampled from, softmax(logits / T)
    entropies: list[list[float]]  # that distribution's entropy at each sampled position
    finished: list[bool]


@dataclass
class _Rows:
    """The decode loop's live rows: their original index, sampling noise and padding; shrinks on compaction."""

    ids: torch.Tensor  # [n] original row index
    uniforms: torch.Tensor  # [n, max_new_tokens] each row's sampling noise (keyed_uniforms)
    pad_lens: torch.Tensor  # [n]
    done: torch.Tensor  # [n] bool


class RolloutEngine:
    """Owns a static KV cache for one model, reused across rollouts (reallocated only when a rollout needs
    more rows or positions). `compact_frac`: compact the live batch once this fraction of it has finished.
    `cascade`: the G rows of a question read its prompt's keys and values once, from the question's cache
    row (qwen2_model.cascade_attention), instead of each row reading its own copy. None = where it was
    measured to pay: on CPU, when it spares each row at least CASCADE_MIN_BYTES of prompt keys per layer
    (it halves decode attention time on bench_rollout's GRPO pattern, and costs more ops than it saves on the
    tiny default's ~20-token prompts). Not measured on a GPU, so off there unless asked for.
    `compile`: the decode step through torch.compile, live rows compacted to powers of two (few shapes). On
    CUDA as CUDA graphs (mode "reduce-overhead"), whose fixed shapes attend over the whole cache; elsewhere
    over the slots written so far. None = on CUDA only, where per-kernel launch cost dominates a decode step
    (on CPU it is opt-in: from packed weights it was 1.1-1.2x faster than the eager step from packed weights
    on bench_rollout's small shape, after a compile of 6-16 s per process and more for each new batch size).
    Any failure to compile or run it falls back to the eager step, with a warning.
    `keep_cache`: the KV cache lives from one rollout to the next (the fastest: allocated once). False frees it
    at the end of every generate call, so the update can use that memory (at the Qwen2.5-3B shape, 256 rows of
    1,280 positions hold 11.25 GiB of bf16 keys and values) and the next call allocates it again. CUDA graphs
    replay at fixed addresses, so with False a compiled step on CUDA is compiled without them.
    `pack_weights`: a rollout runs the model's linear layers from oneDNN-packed copies of their weights
    (Transformer.packed_linears: CPU fp32 only, one more copy of those weights in memory during the rollout;
    the compiled step reaches them through qwen2_model.packed_linear). None = when the model's weights take
    at least PACK_MIN_BYTES: packing made bench_rollout's small shape (21 MB of weights) a quarter to a third
    faster and the tiny default's model (3 MB, which the CPU's caches keep close) ~10% slower."""

    CASCADE_MIN_BYTES = 8192  # the break-even measured on a 2-core CPU: ~40-token prompts at 2 x 32 kv dims
    PACK_MIN_BYTES = 8 << 20
    RECOMPILE_LIMIT = 32  # a training run with evaluations compiled 9 variants of the decode step (CPU)

    def __init__(self, model: torch.nn.Module, compact_frac: float = 0.25, sync_every: int = 4,
                 cascade: bool | None = None, compile: bool | None = None, pack_weights: bool | None = None,
                 keep_cache: bool = True):
        self.model, self.compact_frac, self.sync_every = model, compact_frac, sync_every
        self.cascade, self.pack_weights, self.keep_cache = cascade, pack_weights, keep_cache
        self.capacity = (0, 0)
        self.largest_cache_bytes = 0  # of keys and values, over this engine's life (released or not)
        self._slots = torch.arange(0)  # cache slot indices on the device, for the decode steps' positions
        device = next(model.parameters()).device
        self._compiled = None
        self._graphs = device.type == "cuda" and keep_cache  # CUDA graphs, if the step is compiled
        if compile if compile is not None else device.type == "cuda":
            mode = "reduce-overhead" if self._graphs else "default"
            self._compiled = torch.compile(_decode_step, mode=mode, fullgraph=True)

    def _decode(self, token: torch.Tensor, slot: int, rows: _Rows, prefix: SharedPrefix | None, t: int,
                temperature: float, top_p: float, workspace: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live rows' last tokens [n] through the model (written at cache `slot`), then position t sampled:
        (token, log-prob, entropy) [n] each. `workspace`: the eager step's sampling buffers (sample_next)."""
        pos = self._slots[slot:slot + 1]  # a view: no host-to-device copy per token
        sampling = (rows.uniforms[:, t], temperature, top_p)
        if self._compiled is not None:
            # CUDA graphs replay fixed shapes: attend over the whole cache there; elsewhere up to this slot
            kv_len = self.capacity[1] if self._graphs else slot + 1
            try:
                return self._compiled(self.model, token, pos, rows.pad_lens, kv_len, prefix, *sampling)
            except Exception as err:  # a backend or device that cannot compile this step: eager from here on
                warnings.warn(f"compiled decode step failed ({type(err).__name__}: {err}); decoding eagerly")
                self._compiled = None
        # the slot is known here, so the model need not read it back from the device (a host sync)
        return _decode_step(self.model, token, pos, rows.pad_lens, slot + 1, prefix, *sampling, workspace)

    def _share_prompts(self, pad_lens: torch.Tensor, width: int, group_size: int, expand: torch.Tensor
                       ) -> SharedPrefix | None:
        """Each question was prefilled once, in cache row q: its G rows read it there (cascade), or each row
        gets its own copy of it, cache row `expand[r]` copied to row r (None)."""
        if group_size == 1:
            return None
        cache = self._caches()[0]
        slot_bytes = cache.k_cache.shape[1] * cache.k_cache.shape[3] * cache.k_cache.element_size()
        pays = pad_lens.device.type == "cpu" and width * slot_bytes * (1 - 1 / group_size) >= self.CASCADE_MIN_BYTES
        if self.cascade if self.cascade is not None else pays:
            return SharedPrefix.for_prompts(pad_lens, width, group_size)
        self._gather_rows(expand, 0, width)
        return None

    def _caches(self) -> list:
        return [layer.self_attn.kv_cache for layer in self.model.model.layers]

    def _ensure_cache(self, rows: int, length: int) -> None:
        if self._caches()[0] is None or rows > self.capacity[0] or length > self.capacity[1]:
            # grown in steps of 8 rows and 64 positions: a batch whose prompts run a few tokens longer than the
            # last one's reuses the cache, and a compiled step is not recompiled for each new cache shape
            self.capacity = (max(-(-rows // 8) * 8, self.capacity[0]), max(-(-length // 64) * 64, self.capacity[1]))
            self.model.setup_caches(max_batch_size=self.capacity[0], max_seq_len=self.capacity[1])
            self._slots = torch.arange(self.capacity[1], device=self._caches()[0].k_cache.device)
            size = sum(c.k_cache.nbytes + c.v_cache.nbytes for c in self._caches())
            self.largest_cache_bytes = max(self.largest_cache_bytes, size)

    def release(self) -> None:
        """Free the cache (e.g. before a memory-hungry update on a GPU)."""
        self.model.clear_caches()
        self.capacity = (0, 0)

    def _gather_rows(self, index: torch.Tensor, start: int, end: int) -> None:
        """Cache rows [0, len(index)) <- rows `index`, slots [start, end) (compaction: the shared prompts in
        slots before `start` stay where they are, and slots from `end` on are not written yet)."""
        n = index.numel()
        for cache in self._caches():
            cache.k_cache[:n, :, start:end] = cache.k_cache[index, :, start:end]
            cache.v_cache[:n, :, start:end] = cache.v_cache[index, :, start:end]

    def _prefill(self, prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Left-padded batched prefill of the distinct prompts: (last-position logits [Q, V], pad_lens [Q], P)."""
        tokens, pad_lens = left_pad(prompts, 0, device)
        width = tokens.shape[1]
        last = torch.full((len(prompts), 1), width - 1, device=device)
        logits = self.model(tokens, input_pos=torch.arange(width, device=device), pad_lens=pad_lens,
                            logits_positions=last)[:, -1]
        return logits, pad_lens, width

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], keys: torch.Tensor, group_size: int, max_new_tokens: int,
                 eos_token_ids: Sequence[int], temperature: float = 1.0, top_p: float = 1.0, pad_token_id: int = 0
                 ) -> RolloutOutput:
        """Completions for `group_size` rows per distinct prompt (row q * group_size + j), keyed by `keys`."""
        if not prompts:
            return RolloutOutput([], [], [], [])
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        n = len(prompts) * group_size
        if keys.numel() != n:
            raise ValueError(f"need one key per row ({n}), got {keys.numel()}")
        self._ensure_cache(n, max(len(p) for p in prompts) + max_new_tokens)
        # a run's rollouts and evaluations need more variants of a compiled step than dynamo's default 8 (shared
        # prompts or not, first shapes static, then dynamic): past it, fullgraph would fail and decode eagerly
        try:
            with self._packed(n), _recompile_limit(self.RECOMPILE_LIMIT):
                return self._generate(prompts, keys, group_size, max_new_tokens, eos_token_ids, temperature, top_p,
                                      pad_token_id)
        finally:
            if not self.keep_cache:
                self.release()

    def _packed(self, rows: int) -> contextlib.AbstractContextManager:
        """The model's linear layers from packed weights for this rollout, where asked for (pack_weights)."""
        if not hasattr(self.model, "packed_linears"):
            return contextlib.nullcontext()
        pack = self.pack_weights
        if pack is None:
            pack = sum(p.numel() * p.element_size() for p in self.model.parameters()) >= self.PACK_MIN_BYTES
        return self.model.packed_linears(rows) if pack else contextlib.nullcontext()

    def _generate(self, prompts: Sequence[Sequence[int]], keys: torch.Tensor, group_size: int, max_new_tokens: int,
                  eos_token_ids: Sequence[int], temperature: float, top_p: float, pad_token_id: int) -> RolloutOutput:
        """generate's body, inside the packing context and the raised recompile limit."""
        device = next(self.model.parameters()).device
        n = len(prompts) * group_size
        logits, pad_lens, width = self._prefill(prompts, device)
        expand = torch.arange(len(prompts), device=device).repeat_interleave(group_size)
        rows = _Rows(torch.arange(n, device=device), keyed_uniforms(keys.to(device), max_new_tokens), pad_lens[expand],
                     torch.zeros(n, dtype=torch.bool, device=device))
        prefix = self._share_prompts(pad_lens, width, group_size, expand)
        out = _Outputs(n, max_new_tokens, pad_token_id, device)
        eos = torch.tensor(list(eos_token_ids), device=device)
        workspace = self._workspace(n, logits)
        sampled = sample_next(logits[expand], rows.uniforms[:, 0], temperature, top_p, workspace)
        for t in range(max_new_tokens):
            token = sampled[0]
            out.record(rows, t, *sampled, eos)
            if t + 1 == max_new_tokens:
                break
            if (t + 1) % self.sync_every == 0:  # a host sync every few tokens, not every token
                live = self._compact(rows, 0 if prefix is None else width, width + t)
                if live.ids.numel() == 0:
                    break
                if live is not rows:
                    rows, token = live, out.tokens[live.ids, t]  # the live rows' last tokens, in their new order
                    prefix = None if prefix is None else replace(prefix, rows=rows.ids)
            sampled = self._decode(token, width + t, rows, prefix, t + 1, temperature, top_p, workspace)
        return out.result()

    def _workspace(self, rows: int, logits: torch.Tensor) -> torch.Tensor | None:
        """Buffers for an eager CPU rollout's sampling, kept for the rollout: fresh [rows, V] tensors at every
        step churned glibc's heap, whose top was trimmed and faulted in again (up to 390k page faults, a
        quarter of the GRPO pattern's rollout time on bench_rollout's small shape). GPU allocators cache."""
        if logits.device.type != "cpu" or self._compiled is not None:
            return None
        return torch.empty((3, rows, logits.shape[-1]), dtype=torch.float32)

    def _compact(self, rows: _Rows, start: int, end: int) -> _Rows:
        """Drop finished rows from the live batch (and their cache slots [start, end), those written so far)
        once enough of them have finished."""
        n, n_done = rows.ids.numel(), int(rows.done.sum())
        if n_done == 0 or n_done < self.compact_frac * n and n_done < n:
            return rows
        keep = (~rows.done).nonzero().squeeze(-1)
        if self._compiled is not None and keep.numel():  # batch sizes in powers of two: few shapes to capture
            size = 1 << (keep.numel() - 1).bit_length()
            if size >= n:
                return rows
            keep = torch.cat([keep, rows.done.nonzero().squeeze(-1)[: size - keep.numel()]])  # finished fillers
        if keep.numel():
            self._gather_rows(keep, start, end)
        return _Rows(rows.ids[keep], rows.uniforms[keep], rows.pad_lens[keep], rows.done[keep])


def _recompile_limit(n: int) -> contextlib.AbstractContextManager:
    """Dynamo's per-function recompile limit raised to n inside (named cache_size_limit before torch 2.7)."""
    config = torch._dynamo.config
    return config.patch(**{"recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit": n})


def sample_next(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float,
                workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, log-prob, entropy) [n] from next-token logits [n, V]: the token by keyed inverse-CDF sampling
    from softmax(logits / T) (argmax at T = 0), and the log-prob and entropy of that same distribution, the one
    the policy is optimized as (PPO ratios, the rollout/train gap, entropy weights), as veRL and TRL compute
    them. T = 0 (greedy) keeps logits / 1. top_p truncation is not in the log-prob (nor in veRL's or TRL's).
    `workspace`: fp32 [3, >= n, V] to compute in instead of fresh [n, V] tensors (bitwise the same result)."""
    n = logits.shape[0]
    logits = logits.float()
    s = [None] * 3 if workspace is None else [w[:n] for w in workspace]
    scaled = logits if temperature in (0.0, 1.0) else _into(torch.div, s[2], logits, temperature)
    logp = _into(torch.log_softmax, s[0], scaled, -1)
    p = _into(torch.exp, s[1], logp)  # softmax(logits / T): what is sampled from
    entropy = -_into(torch.mul, s[2], p, logp).sum(-1)  # `scaled` is no longer needed in s[2]
    if temperature == 0:
        token = logits.argmax(dim=-1)
    else:
        token = sample_from_probs(p, uniforms, top_p, overwrite=True)  # p is ours alone by now
    return token, logp.gather(-1, token[:, None]).squeeze(-1), entropy


def _into(op: Callable[..., torch.Tensor], out: torch.Tensor | None, *args: Any) -> torch.Tensor:
    """op(*args), written into `out` when given."""
    return op(*args) if out is None else op(*args, out=out)


def _decode_step(model: torch.nn.Module, token: torch.Tensor, pos: torch.Tensor, pad_lens: torch.Tensor,
                 kv_len: int, prefix: SharedPrefix | None, uniforms: torch.Tensor, temperature: float, top_p: float,
                 workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step and the next token's sampling, no host sync: the eager step, and the one RolloutEngine
    compiles (so sampling fuses into the same graph)."""
    logits = model(token[:, None], input_pos=pos, pad_lens=pad_lens, kv_len=kv_len, prefix=prefix)[:, -1]
    return sample_next(logits, uniforms, temperature, top_p, workspace)


class _Outputs:
    """Per original row, preallocated: tokens, log-probs, entropies, lengths, finished."""

    def __init__(self, n: int, max_new_tokens: int, pad_token_id: int, device: torch.device):
        self.tokens = torch.full((n, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.log_probs = torch.zeros(n, max_new_tokens, device=device)
        self.entropies = torch.zeros(n, max_new_tokens, device=device)
        self.lengths = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)
        self.finished = torch.zeros(n, dtype=torch.bool, device=device)

    def record(self, rows: _Rows, t: int, token: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor,
               eos: torch.Tensor) -> None:
        """Position t of the live rows; rows that sampled an end token are marked done (and finished). Selects
        with `where`, not boolean indexing, which would read a count back from the device every token."""
        live = ~rows.done  # rows that finished earlier but are not compacted away yet write nothing
        for buffer, value in ((self.tokens, token), (self.log_probs, logp), (self.entropies, entropy)):
            buffer[rows.ids, t] = torch.where(live, value.to(buffer.dtype), buffer[rows.ids, t])
        ended = live & torch.isin(token, eos)
        self.lengths[rows.ids] = torch.where(ended, t + 1, self.lengths[rows.ids])
        self.finished[rows.ids] |= ended
        rows.done |= ended

    def result(self) -> RolloutOutput:
        lengths = self.lengths.tolist()
        toks, lps, ents = self.tokens.tolist(), self.log_probs.tolist(), self.entropies.tolist()
        return RolloutOutput([r[:k] for r, k in zip(toks, lengths)], [r[:k] for r, k in zip(lps, lengths)],
                             [r[:k] for r, k in zip(ents, lengths)], self.finished.tolist())


# ============================================================================ entry points


def generate(
    model: torch.nn.Module,
    prompt_token_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_token_id: int = 0,
) -> RolloutOutput:
    """Completions of prompts of different lengths (new tokens up to and including the first end token), with
    log-probs and entropies. Each row is keyed by (seed, its index): identical prompts still draw independent
    samples, and the same call always draws the same ones."""
    n = len(prompt_token_ids)
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    engine = RolloutEngine(model)
    try:
        keys = row_keys(stream_key(seed), range(n), [0] * n)
        return engine.generate(prompt_token_ids, keys, 1, max_new_tokens, eos, temperature, top_p, pad_token_id)
    finally:
        engine.release()


def section_start(tokenizer: Any, token_ids: Sequence[int], text: str, tag: str | None) -> int | None:
    """Index of the first token whose text overlaps `tag`'s first occurrence in the decoded completion (None:
    no tag in the text, or no tag at all).

    Works whether the tag is one token (a char-level vocabulary) or split over several (Qwen's BPE);
    binary search over prefix decodes keeps it O(n log n).
    """
    char_start = -1 if tag is None else text.find(tag)
    if char_start < 0:
        return None
    lo, hi = 0, len(token_ids) - 1
    while lo < hi:  # smallest k with len(decode(ids[:k+1])) > char_start
        mid = (lo + hi) // 2
        if len(tokenizer.decode(list(token_ids[: mid + 1]))) > char_start:
            hi = mid
        else:
            lo = mid + 1
    return lo


def rollout(
    model: torch.nn.Module,
    tokenizer: Any,
    problems: Sequence[Any],
    prompts: Sequence[str],
    reward_fn: Callable[[Any, str], dict],
    num_answers_per_question: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
    *,
    stream: int = 0,
    question_ids: Sequence[int] | None = None,
    engine: RolloutEngine | None = None,
    answer_tag: str | None = "<answer>",
) -> list[Episode]:
    """Sample `num_answers_per_question` completions per question and score them.

    Episodes come back group-major: episodes[q * group_size + j] is answer j to question q. Row (q, j) is
    keyed by (stream, question_ids[q], j), so the same call always samples the same tokens however it is
    batched. `batch_size` caps the rows per engine call. `reward_fn(problem, completion_text)` returns
    {"reward": float, "reward_info": {...}}; `answer_tag` marks where each completion's answer section starts
    (the task's, Episode.answer_start).
    """
    g = num_answers_per_question
    qids = list(range(len(prompts))) if question_ids is None else list(question_ids)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    engine = engine or RolloutEngine(model)
    per_call = max(1, (batch_size or len(prompts) * g) // g)
    outputs = []
    for start in range(0, len(prompts), per_call):
        chunk = range(start, min(len(prompts), start + per_call))
        keys = row_keys(stream, [qids[q] for q in chunk for _ in range(g)], [j for _ in chunk for j in range(g)])
        outputs.append(engine.generate([prompt_ids[q] for q in chunk], keys, g, max_new_tokens,
                                       tokenizer.end_token_ids, temperature, top_p, tokenizer.pad_token_id))
    rows = [(t, lp, h, f) for o in outputs for t, lp, h, f in zip(o.tokens, o.log_probs, o.entropies, o.finished)]
    episodes = []
    for i, (gen, log_probs, entropies, finished) in enumerate(rows):
        q = i // g
        body = gen[:-1] if finished else gen  # the end token is not part of the answer text
        text = tokenizer.decode(body)
        scored = reward_fn(problems[q], text)
        episodes.append(Episode(
            prompt=prompts[q], prompt_token_ids=prompt_ids[q], generated_token_ids=gen, text=text,
            reward=float(scored["reward"]), reward_info=dict(scored["reward_info"]), finished=finished,
            group_idx=q, problem=problems[q], log_probs=log_probs, entropies=entropies,
            answer_start=section_start(tokenizer, body, text, answer_tag) if body else None,
        ))
    return episodes


def reference_episode(tokenizer: Any, problem: Any, prompt: str, text: str, scored: dict, group_idx: int,
                      answer_tag: str | None = "<answer>") -> Episode:
    """A given completion `text` (a task's reference solution) as a finished episode, scored by `scored`; it
    has no rollout log-probs (the update recomputes them)."""
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    return Episode(prompt=prompt, prompt_token_ids=tokenizer.encode(prompt), generated_token_ids=ids, text=text,
                   reward=float(scored["reward"]), reward_info=dict(scored["reward_info"]), finished=True,
                   group_idx=group_idx, problem=problem,
                   answer_start=section_start(tokenizer, ids[:-1], text, answer_tag))
