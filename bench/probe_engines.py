"""Rollout engine settings against each other: whole rollouts in one process, the engines taking turns round
by round (a slow spell of the machine hits each alike). Prints each engine's first call (the compile, where
compiled), how many rows sample the first engine's tokens, the median seconds per rollout, and each engine's
time over the last engine's: the geometric mean of the per-round ratios with its 95% interval.

    python bench/probe_engines.py --workload distinct --engines eager+pack,compiled,compiled+pack
    python bench/probe_engines.py --workload grpo --engines eager,eager+pack
    python bench/probe_engines.py --model runs/tiny/model --workload tiny --engines eager,eager+pack

--model: a named shape of harness.SHAPES (random weights, seed 0) or a model directory; fp32 either way (as
config_tiny.yaml trains the tiny model; bf16 weights are never packed). Workloads, no row stopping early:
distinct (32 prompts of 20-60 tokens) and grpo (16 questions x 8 answers) as in bench_rollout.py, 96 new tokens;
tiny, the tiny default's step (16 prompts of 15-29 tokens x 8 answers, 72 new tokens).
An engine is `eager` or `compiled` (torch.compile'd decode step), then optionally `+pack` / `+nopack`
(oneDNN-packed linear weights; `eager` alone is unpacked, `compiled` alone too) and `+cascade` / `+nocascade`
(cascade attention over shared prompts; otherwise the engine's own choice).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import harness  # first: it puts the repository root on sys.path
from qwen2_model import Transformer
from rollout import RolloutEngine


def build_engine(model: torch.nn.Module, spec: str) -> RolloutEngine:
    """An engine from a spec such as 'compiled+pack' or 'eager+nocascade'."""
    step, *flags = spec.split("+")
    known = {"pack", "nopack", "cascade", "nocascade"}
    if step not in ("eager", "compiled") or not set(flags) <= known:
        raise SystemExit(f"--engines: {spec!r} is not eager|compiled[+pack|+nopack][+cascade|+nocascade]")
    cascade = True if "cascade" in flags else False if "nocascade" in flags else None
    return RolloutEngine(model, compile=step == "compiled", pack_weights="pack" in flags, cascade=cascade)


def workload(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], int, int]:
    """(prompts, answers per prompt, new tokens) of the named workload."""
    if args.workload == "tiny":
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(1, min(100, vocab), (int(torch.randint(15, 30, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(16)]
        return prompts, 8, args.new_tokens or 72
    prompts, group = harness.workloads(vocab, 32)[args.workload]
    return prompts, group, args.new_tokens or 96


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="a shape of harness.SHAPES or a model directory")
    p.add_argument("--workload", default="distinct", choices=["distinct", "grpo", "tiny"])
    p.add_argument("--engines", default="eager,eager+pack", help="comma-separated engine specs (see above)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--new_tokens", type=int, default=0, help="0: the workload's own")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in harness.SHAPES:
        cfg = harness.model_config(args.model, "float32")
        model = harness.load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
    else:
        model = Transformer.from_pretrained(args.model, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    prompts, group, new_tokens = workload(args, vocab)
    keys = harness.sampling_keys(len(prompts), group)
    engines = {spec: build_engine(model, spec) for spec in args.engines.split(",")}

    def rollout(engine: RolloutEngine):
        return engine.generate(prompts, keys, group, new_tokens, [vocab], 1.0)  # end token outside the vocabulary

    first = {}
    with torch.no_grad():
        for spec, engine in engines.items():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                first[spec] = rollout(engine).tokens
            print(f"{spec}: first call {time.perf_counter() - t0:.1f} s",
                  *[str(w.message)[:200] for w in caught if "decoding eagerly" in str(w.message)])  # a fallback
        times = harness.alternate({spec: (lambda e=engine: rollout(e)) for spec, engine in engines.items()},
                                  args.rounds)
    reference = next(iter(first.values()))
    print("rows with the first engine's tokens:", {s: sum(a == b for a, b in zip(reference, t)) for s, t in first.items()},
          "of", len(reference))
    print(f"{args.model}, {args.workload}, {len(reference)} rows x {new_tokens} tokens, {args.rounds} rounds, median s:",
          {s: round(statistics.median(t), 3) for s, t in times.items()})
    last = list(engines)[-1]
    for spec in list(engines)[:-1]:
        print(f"{spec} / {last}: {harness.ratio_text(harness.paired_ratio(times[spec], times[last]))}")


if __name__ == "__main__":
    main()
