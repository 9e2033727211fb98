"""Rollout throughput: our engine (rollout.py) vs the reference `generate` (transformers) on the same random
weights and prompts, side by side in one run, so the ratio is the number to read.

    python bench/bench_rollout.py --shape small [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
                                  [--cascade auto|on|off] [--compile auto|on|off] [--pack auto|on|off]

Two workloads, both sampling at temperature 1 with no early stop for either side (the end token is an id outside
the vocabulary, so both generate every token):
- distinct: 32 distinct prompts of 20-60 tokens, 96 new tokens each;
- grpo: GRPO's pattern, 16 questions x 8 answers; ours prefills each question once and its 8 rows read that
  prompt's cache once per question in decode (cascade attention; `--cascade off`: each row reads its own copy),
  the reference gets the 128 rows (each prompt repeated 8 times), as a user of `generate` would pass them.
`--rows N` sets the distinct workload's batch (e.g. 256 for the GPU decode target). Each side's peak memory
for one rollout of each workload is measured in a process of its own (harness.PeakMemory; `--no_memory`
skips it). On CUDA it also reports decode's achieved memory bandwidth (weight bytes x decode steps / time)
against the device's peak. Prints a table, then one JSON line with every figure. The ratio is given two
ways: best of each side's rounds (tokens/s), and the geometric mean of the per-round ratios (each round times
ours, then the reference) with its 95% t interval: a target is met only when that interval's low end clears it.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

import harness  # first: it puts the repository root on sys.path
from harness import PeakMemory, alternate, child_json, load_models, model_config, paired_ratio, sampling_keys, workloads
from rollout import RolloutEngine


def ours_run(model, prompts: list[list[int]], group: int, new_tokens: int, never: int, cascade: bool | None = None,
             compile: bool | None = None, pack: bool | None = None):
    engine = RolloutEngine(model, cascade=cascade, compile=compile, pack_weights=pack)
    keys = sampling_keys(len(prompts), group)

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


def runner(side: str, model, prompts: list[list[int]], group: int, args: argparse.Namespace, never: int,
           device: torch.device):
    choice = {"auto": None, "on": True, "off": False}
    if side == "ours":
        return ours_run(model, prompts, group, args.new_tokens, never, choice[args.cascade], choice[args.compile],
                        choice[args.pack])
    return reference_run(model, prompts, group, args.new_tokens, never, device)


def memory_child(args: argparse.Namespace) -> None:
    """One rollout of one side and workload, in this process alone: print its peak memory."""
    device, cfg = torch.device(args.device), model_config(args.shape, args.dtype)
    model = load_models(cfg, device, getattr(torch, args.dtype), (args.memory_of,))[args.memory_of]
    prompts, group = workloads(cfg.vocab_size, args.rows)[args.workload]
    go = runner(args.memory_of, model, prompts, group, args, cfg.vocab_size, device)
    with torch.no_grad(), PeakMemory(device) as memory:
        go()
    print(json.dumps({"peak_bytes": memory.bytes}))


def peak_memory(args: argparse.Namespace, side: str, workload: str) -> int:
    flags = [f"--{k}={getattr(args, k)}" for k in ("shape", "device", "dtype", "new_tokens", "cascade", "compile", "pack",
                                                   "rows")]
    return int(child_json([sys.executable, __file__, "--memory_of", side, "--workload", workload, *flags])["peak_bytes"])


def measure(args: argparse.Namespace, models: dict, name: str, prompts: list[list[int]], group: int, never: int,
            device: torch.device) -> dict:
    """One workload: both sides warmed up, then timed in alternating rounds; each side's peak in a child."""
    n_tokens = len(prompts) * group * args.new_tokens
    with torch.no_grad():
        go, ref_go = (runner(side, models[side], prompts, group, args, never, device) for side in ("ours", "reference"))
        go(), ref_go()  # warm-up for both (and the compile, when compiled) before anything is timed
        times = alternate({"ours": go, "reference": ref_go}, args.repeats, harness.synchronizer(device))
    ours_times, ref_times = times["ours"], times["reference"]
    t_ours, t_ref = min(ours_times), min(ref_times)
    paired = paired_ratio(ref_times, ours_times)
    r = {"ours_tokens_per_s": n_tokens / t_ours, "reference_tokens_per_s": n_tokens / t_ref,
         "ratio": t_ref / t_ours, "paired_ratio": paired[0], "paired_ratio_ci95": list(paired[1:]),
         "ours_s": ours_times, "reference_s": ref_times, "rows": len(prompts) * group}
    if not args.no_memory:
        r["ours_peak_bytes"], r["reference_peak_bytes"] = (peak_memory(args, side, name) for side in ("ours", "reference"))
    if device.type == "cuda":
        weight_bytes = sum(q.numel() * q.element_size() for q in models["ours"].parameters())
        r["decode_gbps"] = weight_bytes * args.new_tokens / t_ours / 1e9
        if args.peak_gbps:
            r["bandwidth_fraction"] = r["decode_gbps"] / args.peak_gbps
    return r


def main() -> None:
    p = harness.parser(__doc__)
    p.add_argument("--shape", default="small", choices=sorted(harness.SHAPES))
    harness.add_device_args(p)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=96)
    p.add_argument("--rows", type=int, default=32, help="the distinct workload's batch (distinct prompts)")
    p.add_argument("--cascade", default="auto", choices=["auto", "on", "off"],
                   help="shared-prompt (cascade) attention in our engine: auto = the engine's own choice")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                   help="our decode step via torch.compile (CUDA graphs on CUDA): auto = the engine's own choice")
    p.add_argument("--pack", default="auto", choices=["auto", "on", "off"],
                   help="our eager step's linear layers from oneDNN-packed weights (CPU fp32): auto = the engine's choice")
    p.add_argument("--peak_gbps", type=float, default=None, help="device memory bandwidth for the fraction (CUDA)")
    p.add_argument("--no_memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--memory_of", choices=["ours", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--workload", choices=["distinct", "grpo"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_of:
        memory_child(args)
        return
    import transformers

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = model_config(args.shape, args.dtype)
    models = load_models(cfg, device, dtype, ("ours", "reference"))
    never = cfg.vocab_size  # an end token outside the vocabulary: neither model can sample it
    results: dict[str, object] = {"shape": args.shape, "device": str(device), "dtype": args.dtype,
                                  "torch": torch.__version__, "transformers": transformers.__version__,
                                  "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
                                  "cascade": args.cascade, "compile": args.compile, "pack": args.pack}
    rows = []
    for name, (prompts, group) in workloads(never, args.rows).items():
        results[name] = measure(args, models, name, prompts, group, never, device)
        rows.append((name, results[name]))
    print(f"shape {args.shape} ({sum(q.numel() for q in models['ours'].parameters()) / 1e6:.1f}M params), {device}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, {args.new_tokens} new tokens, best of {args.repeats}, alternating")
    mib = 1024 ** 2
    print(harness.markdown_table(
        ["workload", "rows", "ours tokens/s", "reference tokens/s", "ours / reference (best of each)",
         "paired rounds: mean [95% interval]", "peak memory, ours / reference"],
        [[name, r["rows"], f"{r['ours_tokens_per_s']:,.0f}", f"{r['reference_tokens_per_s']:,.0f}", f"{r['ratio']:.2f}x",
          harness.ratio_text((r["paired_ratio"], *r["paired_ratio_ci95"])),
          "-" if args.no_memory else f"{r['ours_peak_bytes'] / mib:,.0f} / {r['reference_peak_bytes'] / mib:,.0f} MiB"]
         for name, r in rows]))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
