"""Where the time goes, by op: torch.profiler's table by self CPU time (the profiler's own overhead included).

    python bench/probe_ops.py step [--by_shape] [--set section.key=value ...]
    python bench/probe_ops.py rollout --workload distinct|grpo

step: the tiny default's whole GRPO step (config_tiny.yaml, or --config), steps 3-6 after two untimed ones; the
tiny model and its data are built first where missing (runs/tiny/, as the quick start does). `--by_shape`
splits each op by its input shapes (for a matmul's FLOP rate: 2 x m x k x n x calls / its time).
rollout: one rollout of bench_rollout.py's workload on a named shape (random weights) by the engine's default
settings (packed weights and cascade attention where they pay), after two untimed rollouts and three timed ones.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import harness  # first: it puts the repository root on sys.path
import trainer
from rollout import RolloutEngine


def profile_step(args: argparse.Namespace) -> torch.profiler.profile:
    run = harness.setup_run(args.config, Path(tempfile.mkdtemp(prefix="probe_ops_")), args.set)
    for step in (1, 2):
        trainer.train_step(run, step)
    with torch.profiler.profile(record_shapes=args.by_shape) as prof:
        for step in range(3, 7):
            trainer.train_step(run, step)
    return prof


def profile_rollout(args: argparse.Namespace) -> torch.profiler.profile:
    cfg = harness.model_config(args.shape, "float32")
    model = harness.load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
    prompts, group = harness.workloads(cfg.vocab_size, 32)[args.workload]
    keys = harness.sampling_keys(len(prompts), group)
    engine = RolloutEngine(model)

    def rollout():
        engine.generate(prompts, keys, group, args.new_tokens, [cfg.vocab_size], 1.0)

    with torch.no_grad():
        rollout(), rollout()
        times = harness.alternate({"rollout": rollout}, 3)["rollout"]
        print(f"{args.shape}, {args.workload}: rollout s {[round(t, 3) for t in times]}")
        with torch.profiler.profile() as prof:
            rollout()
    return prof


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["step", "rollout"])
    p.add_argument("--config", default=str(harness.REPO / "config_tiny.yaml"), help="step: the config")
    p.add_argument("--by_shape", action="store_true", help="step: one row per op and input shapes")
    p.add_argument("--shape", default="small", choices=sorted(harness.SHAPES), help="rollout: the model shape")
    p.add_argument("--workload", default="distinct", choices=["distinct", "grpo"], help="rollout: the workload")
    p.add_argument("--new_tokens", type=int, default=96, help="rollout: tokens per row")
    p.add_argument("--rows", type=int, default=45, help="rows of the table")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="step: config overrides")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    prof = profile_step(args) if args.what == "step" else profile_rollout(args)
    print(f"profiled in {time.perf_counter() - t0:.1f} s")
    table = prof.key_averages(group_by_input_shape=args.by_shape)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40,
                      **({"max_shapes_column_width": 70} if args.by_shape else {})))


if __name__ == "__main__":
    main()
