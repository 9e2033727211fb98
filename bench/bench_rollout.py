"""Rollout throughput: our engine (rollout.py) vs the reference `generate` (transformers) on the same random
weights and prompts, side by side in one run, so the ratio is the number to read.

    python bench/bench_rollout.py --shape small [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
                                  [--cascade auto|on|off] [--compile auto|on|off]

Two workloads, both sampling at temperature 1 with no early stop for either side (the end token is an id outside
the vocabulary, so both generate every token):
- distinct: 32 distinct prompts of 20-60 tokens, 96 new tokens each;
- grpo: GRPO's pattern, 16 questions x 8 answers; ours prefills each question once and its 8 rows read that
  prompt's cache once per question in decode (cascade attention; `--cascade off`: each row reads its own copy),
  the reference gets the 128 rows (each prompt repeated 8 times), as a user of `generate` would pass them.
On CUDA it also reports decode's achieved memory bandwidth (weight bytes x decode steps / time) against the
device's peak. Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qwen2_model import ModelConfig, Transformer  # noqa: E402
from rollout import RolloutEngine, row_keys, stream_key  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied, qwen3)
SHAPES = {
    "small": (256, 4, 4, 2, 64, 768, 8192, True, False),
    "qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864, 151936, True, False),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 128, 8960, 151936, True, False),
    "qwen2.5-3b": (2048, 36, 16, 2, 128, 11008, 151936, True, False),
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936, True, True),
}


def model_config(shape: str, dtype: str) -> ModelConfig:
    h, layers, heads, kv, hd, inter, vocab, tied, qwen3 = SHAPES[shape]
    return ModelConfig(model_type="qwen3" if qwen3 else "qwen2", vocab_size=vocab, hidden_size=h,
                       intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=hd, max_position_embeddings=4096, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=not qwen3, use_qk_norm=qwen3,
                       torch_dtype=dtype)


def timed_pair(fa, fb, repeats: int, sync) -> tuple[float, float]:
    """Best-of-`repeats` seconds of fa and fb, run alternately (a, b, a, b, ...) so that a slow spell of a
    shared machine hits both sides alike."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for i, fn in enumerate((fa, fb)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def ours_run(model, prompts: list[list[int]], group: int, new_tokens: int, never: int, cascade: bool | None = None,
             compile: bool | None = None):
    engine = RolloutEngine(model, cascade=cascade, compile=compile)
    keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)],
                    [j for _ in prompts for j in range(group)])

    def go():
        out = engine.generate(prompts, keys, group, new_tokens, [never], 1.0)
        assert all(len(t) == new_tokens for t in out.tokens)
    return go


def reference_run(ref, prompts: list[list[int]], group: int, new_tokens: int, never: int, device):
    rows = [p for p in prompts for _ in range(group)]
    width = max(len(p) for p in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, p in enumerate(rows):  # left padding, as generate needs for decoder-only models
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def go():
        out = ref.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=never,
                           pad_token_id=0)
        assert out.shape[1] == width + new_tokens
    return go


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=96)
    p.add_argument("--cascade", default="auto", choices=["auto", "on", "off"],
                   help="shared-prompt (cascade) attention in our engine: auto = the engine's own choice")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="our decode step via torch.compile (CUDA graphs on CUDA): auto = the engine's own choice")
    p.add_argument("--peak_gbps", type=float, default=None, help="device memory bandwidth for the fraction (CUDA)")
    args = p.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = model_config(args.shape, args.dtype)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        Transformer.from_config(cfg, dtype=torch.float32).save_pretrained(d)
        ours = Transformer.from_pretrained(d, device=device, dtype=dtype).eval()
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    never = cfg.vocab_size  # an end token outside the vocabulary: neither model can sample it
    g = torch.Generator().manual_seed(1)
    distinct = [torch.randint(1, never, (int(torch.randint(20, 61, (1,), generator=g)),), generator=g).tolist()
                for _ in range(32)]
    questions = distinct[:16]
    results: dict[str, object] = {"shape": args.shape, "device": str(device), "dtype": args.dtype,
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                                  "cascade": args.cascade, "compile": args.compile}
    rows = []
    for name, prompts, group in (("distinct", distinct, 1), ("grpo", questions, 8)):
        n_tokens = len(prompts) * group * args.new_tokens
        with torch.no_grad():
            choice = {"auto": None, "on": True, "off": False}
            go = ours_run(ours, prompts, group, args.new_tokens, never, choice[args.cascade], choice[args.compile])
            ref_go = reference_run(ref, prompts, group, args.new_tokens, never, device)
            go(), ref_go()  # warm-up for both (and the compile, when compiled) before anything is timed
            t_ours, t_ref = timed_pair(go, ref_go, args.repeats, sync)
        results[name] = {"ours_tokens_per_s": n_tokens / t_ours, "reference_tokens_per_s": n_tokens / t_ref,
                         "ratio": t_ref / t_ours, "rows": len(prompts) * group}
        rows.append((name, len(prompts) * group, n_tokens / t_ours, n_tokens / t_ref, t_ref / t_ours))
        if device.type == "cuda":
            weight_bytes = sum(q.numel() * q.element_size() for q in ours.parameters())
            gbps = weight_bytes * args.new_tokens / t_ours / 1e9
            results[name]["decode_gbps"] = gbps
            if args.peak_gbps:
                results[name]["bandwidth_fraction"] = gbps / args.peak_gbps
    print(f"shape {args.shape} ({sum(q.numel() for q in ours.parameters()) / 1e6:.1f}M params), {device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, best of {args.repeats}, alternating")
    print("| workload | rows | ours tokens/s | reference tokens/s | ours / reference |")
    print("|---|---|---|---|---|")
    for name, n, a, b, r in rows:
        print(f"| {name} | {n} | {a:,.0f} | {b:,.0f} | {r:.2f}x |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
