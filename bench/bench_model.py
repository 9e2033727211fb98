"""Ours vs transformers on the same random weights: forward, forward+backward, and greedy generation.

    python bench/bench_model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--hidden 512 --layers 8]

Both models are timed side by side in one process (alternating, best of N), so the ratios are robust to
a noisy machine; absolute numbers are only comparable on the same machine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import grpo  # noqa: E402
from qwen2_model import ModelConfig, Transformer  # noqa: E402


def best_time(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--gen_batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    cfg = ModelConfig(model_type="qwen2", vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                      num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                      head_dim=64, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, torch_dtype=args.dtype)
    with tempfile.TemporaryDirectory() as d:
        Transformer.from_config(cfg, dtype=torch.float32).save_pretrained(d)
        ours = Transformer.from_pretrained(d, device=device, dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    n_params = sum(p.numel() for p in ours.parameters())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    rows = []
    with torch.no_grad():
        diff = (ours(tokens).float() - ref(tokens).logits.float()).abs().max().item()
        t_ours = best_time(lambda: ours(tokens), args.repeats, sync)
        t_ref = best_time(lambda: ref(tokens).logits, args.repeats, sync)
    rows.append(("forward", args.batch * args.seq / t_ours, args.batch * args.seq / t_ref, "tokens/s"))

    def train_step(model, hf):
        out = model(tokens).logits if hf else model(tokens)
        out.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    ours.train(), ref.train()
    t_ours = best_time(lambda: train_step(ours, False), args.repeats, sync)
    t_ref = best_time(lambda: train_step(ref, True), args.repeats, sync)
    rows.append(("forward+backward", args.batch * args.seq / t_ours, args.batch * args.seq / t_ref, "tokens/s"))
    ours.eval(), ref.eval()

    prompts = [torch.randint(0, args.vocab, (24 + 4 * i,)).tolist() for i in range(args.gen_batch)]
    never = args.vocab + 7  # an end token that never comes: every row generates all new tokens
    ours_out: list = []
    t_ours = best_time(lambda: ours_out.append(grpo.generate(ours, prompts, args.new_tokens, [never], temperature=0)),
                       args.repeats, sync)
    width = max(len(q) for q in prompts)
    ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts], device=device)
    ref_out: list = []

    def hf_generate():
        with torch.no_grad():
            ref_out.append(ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None))
    t_ref = best_time(hf_generate, args.repeats, sync)
    n_new = args.gen_batch * args.new_tokens
    rows.append(("greedy generation (KV cache)", n_new / t_ours, n_new / t_ref, "new tokens/s"))
    agree = sum(a == b for o, r in zip(ours_out[-1], ref_out[-1][:, width:].tolist()) for a, b in zip(o, r)) / n_new

    print(f"device {device}, {args.dtype}, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"max |logit diff| {diff:.2e}; greedy tokens identical to transformers: {agree:.1%}\n")
    print("| benchmark | ours | transformers | ours / transformers |")
    print("|---|---|---|---|")
    for name, a, b, unit in rows:
        print(f"| {name} | {a:,.0f} {unit} | {b:,.0f} {unit} | {a / b:.2f}x |")


if __name__ == "__main__":
    main()
