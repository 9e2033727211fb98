"""Ours vs transformers on the same random weights: forward, forward+backward, and greedy generation.

    python bench/bench_model.py [--device cpu|cuda] [--dtype float32|bfloat16] [--hidden 512 --layers 8]

Both models are timed side by side in one process (alternating, best of N), so the ratios are robust to
a noisy machine; absolute numbers are only comparable on the same machine. Prints a markdown table, then one
JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

import harness  # first: it puts the repository root on sys.path
import rollout
from harness import alternate, body_config, load_models


def best_of_alternating(ours, reference, repeats: int, sync) -> tuple[float, float]:
    """The best time of each side over `repeats` rounds that run ours, then the reference."""
    times = alternate({"ours": ours, "reference": reference}, repeats, sync)
    return min(times["ours"]), min(times["reference"])


def forward_rows(ours, ref, tokens: torch.Tensor, repeats: int, sync) -> tuple[list[tuple], float]:
    """Forward and forward+backward throughput of both sides, and the largest logit difference."""
    n = tokens.numel()
    with torch.no_grad():
        diff = (ours(tokens).float() - ref(tokens).logits.float()).abs().max().item()
        t_ours, t_ref = best_of_alternating(lambda: ours(tokens), lambda: ref(tokens).logits, repeats, sync)
    rows = [("forward", n / t_ours, n / t_ref, "tokens/s")]

    def train_step(model, hf):
        out = model(tokens).logits if hf else model(tokens)
        out.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    ours.train(), ref.train()
    t_ours, t_ref = best_of_alternating(lambda: train_step(ours, False), lambda: train_step(ref, True), repeats, sync)
    ours.eval(), ref.eval()
    return rows + [("forward+backward", n / t_ours, n / t_ref, "tokens/s")], diff


def generation_row(ours, ref, args: argparse.Namespace, device: torch.device, sync) -> tuple[tuple, float]:
    """Greedy generation throughput of both sides (every row runs all new tokens) and the share of tokens alike."""
    prompts = [torch.randint(0, args.vocab, (24 + 4 * i,)).tolist() for i in range(args.gen_batch)]
    never = args.vocab + 7  # an end token that never comes: every row generates all new tokens
    width = max(len(q) for q in prompts)
    ids = torch.tensor([[0] * (width - len(q)) + q for q in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts], device=device)
    ours_out: list = []
    ref_out: list = []

    def hf_generate():
        with torch.no_grad():
            ref_out.append(ref.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens,
                                        min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None))
    t_ours, t_ref = best_of_alternating(
        lambda: ours_out.append(rollout.generate(ours, prompts, args.new_tokens, [never], temperature=0).tokens),
        hf_generate,
        args.repeats, sync)
    n_new = args.gen_batch * args.new_tokens
    agree = sum(a == b for o, r in zip(ours_out[-1], ref_out[-1][:, width:].tolist()) for a, b in zip(o, r)) / n_new
    return ("greedy generation (KV cache)", n_new / t_ours, n_new / t_ref, "new tokens/s"), agree


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_body_args(p, hidden=512, layers=8, vocab=32000)
    p.add_argument("--batch", type=int, default=4, help="rows of the forward and forward+backward")
    p.add_argument("--seq", type=int, default=256, help="tokens per row of the forward and forward+backward")
    p.add_argument("--gen_batch", type=int, default=8, help="prompts (of 24, 28, ... tokens) generated from")
    p.add_argument("--new_tokens", type=int, default=64, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=3, help="rounds, each timing ours then transformers")
    args = p.parse_args()
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    sync = harness.synchronizer(device)
    cfg = body_config(args.hidden, args.layers, args.vocab, max(1, args.hidden // 256), args.dtype)
    models = load_models(cfg, device, dtype, ("ours", "reference"))
    ours, ref = models["ours"], models["reference"]
    n_params = sum(p.numel() for p in ours.parameters())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    rows, diff = forward_rows(ours, ref, tokens, args.repeats, sync)
    generation, agree = generation_row(ours, ref, args, device, sync)
    rows.append(generation)

    print(f"device {device}, {args.dtype}, {n_params / 1e6:.1f}M params (hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}), torch {torch.__version__}, transformers {transformers.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"max |logit diff| {diff:.2e}; greedy tokens identical to transformers: {agree:.1%}\n")
    print(harness.markdown_table(["benchmark", "ours", "transformers", "ours / transformers"],
                                 [[name, f"{a:,.0f} {unit}", f"{b:,.0f} {unit}", f"{a / b:.2f}x"]
                                  for name, a, b, unit in rows]))
    print(json.dumps({"params": n_params, "device": str(device), "dtype": args.dtype, "max_abs_logit_diff": diff,
                      "greedy_tokens_identical": agree, "threads": torch.get_num_threads(),
                      **{name: {"ours": a, "transformers": b, "unit": unit} for name, a, b, unit in rows}}))


if __name__ == "__main__":
    main()
