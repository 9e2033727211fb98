"""One GRPO update's peak memory and time: log-probs over the whole [B, T, vocab] logits at once vs in chunks
recomputed in the backward (`UpdateSettings.logits_chunk_tokens`), on the same weights and episodes.

    python bench/bench_train.py [--vocab 151936 --hidden 256 --layers 2 --rows 16 --new_tokens 256]
    python bench/bench_train.py --shape qwen2.5-3b --device cuda --dtype bfloat16 --peak_tflops 989

Each variant runs in its own process (peak memory is a per-process high-water mark): on CPU the resident-set
peak (VmHWM) minus the resident set after the model, episodes and optimizer state are built; on CUDA
torch.cuda.max_memory_allocated minus the allocation before the update. The parameter change of both variants
is compared (max abs difference). The body is small and the vocabulary Qwen's, so the logits dominate, as they
do per micro-batch at any model size; `--shape` takes a named shape of harness.SHAPES instead (Qwen2.5-0.5B,
1.5B, 3B, Qwen3-0.6B, small; random weights). Each variant also reports its model FLOP rate (6 x parameters x
the tokens it runs, per second) and, with `--peak_tflops` (the device's dense peak), the model FLOP utilization.
On CUDA one untimed update at learning rate 0 runs first (`--warmup`), so the time is a warm update's.

`--group G` makes the rows GRPO groups: rows / G prompts (of `--prompt_tokens`), G completions each; a third
variant then runs each prompt once (`UpdateSettings.share_prompts`, the default in training; the other two run
every prompt + completion as one row, as with `training.share_prompts: false`).
Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch

import harness  # first: it puts the repository root on sys.path
import grpo
import update
from data_types import Episode
from harness import PeakMemory, body_config, model_config
from qwen2_model import Transformer


def child(args: argparse.Namespace) -> None:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    if args.shape:
        cfg = model_config(args.shape, args.dtype)
        args.vocab = cfg.vocab_size
    else:
        cfg = body_config(args.hidden, args.layers, args.vocab, 1, args.dtype)
    model = Transformer.from_config(cfg, device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, args.vocab, (args.prompt_tokens,), generator=g).tolist()
               for _ in range(-(-args.rows // args.group))]
    episodes = [Episode(prompt="", prompt_token_ids=prompts[i // args.group],
                        generated_token_ids=torch.randint(0, args.vocab, (args.new_tokens,), generator=g).tolist(),
                        text="", reward=0.0, reward_info={}, finished=True, group_idx=i // args.group)
                for i in range(args.rows)]
    advantages = torch.randn(args.rows, generator=g)
    settings = update.UpdateSettings(micro_batch_size=args.rows, max_grad_norm=1e9, share_prompts=bool(args.share),
                                     logits_chunk_tokens=args.chunk if args.chunk > 0 else None)
    objective = grpo.objective()  # the plain policy gradient, token-mean
    for _ in range(args.warmup):  # first-call costs (CUDA context, cuBLAS, kernel choice) out of the timing; lr 0
        update.update_policy(model, torch.optim.SGD(model.parameters(), lr=0.0), episodes, advantages, settings,
                             objective)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with PeakMemory(device) as memory:
        t0 = time.perf_counter()
        update.update_policy(model, opt, episodes, advantages, settings, objective)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    peak = memory.bytes
    delta = torch.cat([(p.detach() - b).float().flatten().cpu() for p, b in zip(model.parameters(), before)])
    torch.save(delta, args.out)
    tokens = update.padded_tokens(episodes, bool(args.share))  # the tokens this variant runs (no padding here)
    flops = 6 * model.num_parameters() * tokens  # forward + backward over every token, prompts included
    print(json.dumps({"peak_bytes_above_model": peak, "seconds": seconds, "model_tflops": flops / seconds / 1e12}))


def run_variants(args: argparse.Namespace, keys: tuple[str, ...], variants: dict[str, tuple[int, int]]
                 ) -> tuple[dict[str, dict], float, float]:
    """Each variant (name -> (chunk, share)) in a child process of its own; their results, and the largest
    difference of a variant's parameter change from the full-logits one's beside the largest change."""
    runs = {}
    with tempfile.TemporaryDirectory() as d:
        for name, (chunk, share) in variants.items():
            out = f"{d}/{name}.pt"
            cmd = [sys.executable, __file__, "--child", "--out", out, "--chunk", str(chunk), "--share", str(share)] + [
                f"--{k}={getattr(args, k)}" for k in keys]
            runs[name] = harness.child_json(cmd)
            runs[name]["delta"] = torch.load(out)
    diff = max(float((runs["full_logits"]["delta"] - runs[name]["delta"]).abs().max()) for name in variants)
    return runs, diff, float(runs["full_logits"]["delta"].abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_body_args(p, hidden=256, layers=2, vocab=151936)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--group", type=int, default=1, help="rows per prompt (GRPO's group size); >1 adds the shared variant")
    p.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=512, help="the chunked variant's logits_chunk_tokens")
    p.add_argument("--shape", default="", help="a named shape of harness.SHAPES (overrides --vocab/--hidden/--layers)")
    p.add_argument("--peak_tflops", type=float, default=None, help="device dense peak, for MFU")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed updates (lr 0) before the timed one; default 1 on CUDA, 0 on CPU, where the peak "
                        "is the process's resident high-water mark, which a warm-up would set")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.warmup is None:
        args.warmup = int(torch.device(args.device).type == "cuda")
    if args.child:
        child(args)
        return
    if args.shape:  # the shape decides the body: report it
        cfg = model_config(args.shape, args.dtype)
        args.vocab, args.hidden, args.layers = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    keys = ("vocab", "hidden", "layers", "rows", "new_tokens", "prompt_tokens", "group", "device", "dtype", "shape",
            "warmup")
    results = {k: getattr(args, k) for k in (*keys, "chunk")}
    variants = {"full_logits": (0, 0), "chunked": (args.chunk, 0)}
    if args.group > 1:
        variants["chunked_shared_prompts"] = (args.chunk, 1)
    runs, diff, scale = run_variants(args, keys, variants)
    gib = 1024 ** 3
    print(f"update of {args.rows} x ({args.prompt_tokens} prompt + {args.new_tokens} generated) tokens, groups of "
          f"{args.group}, {args.shape or 'custom body'}, vocab {args.vocab}, {args.device}, {args.dtype}")
    table = []
    for name, r in runs.items():
        mfu = r["model_tflops"] / args.peak_tflops if args.peak_tflops else None
        results[name] = {"peak_gib_above_model": r["peak_bytes_above_model"] / gib, "seconds": r["seconds"],
                         "model_tflops": r["model_tflops"], "mfu": mfu}
        table.append([name, f"{r['peak_bytes_above_model'] / gib:.2f} GiB", f"{r['seconds']:.1f} s",
                      f"{r['model_tflops']:.3f}", "-" if mfu is None else f"{mfu:.1%}"])
    print(harness.markdown_table(["variant", "peak above model", "time", "model TFLOP/s", "MFU"], table))
    print(f"max |parameter change difference| = {diff:.2e} (largest change {scale:.2e})")
    results["max_abs_param_change_diff"], results["max_abs_param_change"] = diff, scale
    print(json.dumps(results))


if __name__ == "__main__":
    main()
