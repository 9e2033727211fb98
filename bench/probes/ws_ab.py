"""Whole rollouts, sampling into the per-rollout workspace vs fresh [rows, V] tensors per step (the engine's
_workspace patched to None), alternating in one process, with the rollout's minor page faults.
    python bench/probes/ws_ab.py small grpo | small distinct   [rounds, default 8]
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import resource, statistics, sys, time, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
shape, workload = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 8
cfg = model_config(shape, "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
prompts, group = workloads(cfg.vocab_size, 32)[workload]
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
with_ws, without = RolloutEngine(m), RolloutEngine(m)
without._workspace = lambda rows, logits: None
times, faults = {"workspace": [], "fresh": []}, {"workspace": [], "fresh": []}
for r in range(rounds + 1):
    for name, eng in (("fresh", without), ("workspace", with_ws)):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        eng.generate(prompts, keys, group, 96, [cfg.vocab_size], 1.0)
        if r:  # round 0 warms up
            times[name].append(time.perf_counter() - t0)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
mean, lo, hi = ratio_interval([a / b for a, b in zip(times["fresh"], times["workspace"])])
print(f"{shape} {workload}: fresh / workspace time {mean:.3f}x [{lo:.3f}, {hi:.3f}] over {rounds} rounds; "
      f"median s fresh {statistics.median(times['fresh']):.3f}, workspace {statistics.median(times['workspace']):.3f}; "
      f"page faults per rollout fresh {statistics.median(faults['fresh']):.0f} (max {max(faults['fresh'])}), "
      f"workspace {statistics.median(faults['workspace']):.0f} (max {max(faults['workspace'])})")
