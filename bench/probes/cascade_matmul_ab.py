"""Cascade decode attention through plain fp32 matmuls (attention_with_lse(fused=False)) vs the CPU flash kernel,
inside whole eager rollouts of bench_rollout's small shape, alternating:
    python bench/probes/cascade_matmul_ab.py grpo 6
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02, night), kept as it was run."""
import sys, torch, time
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import bench_rollout as B, qwen2_model as Q
from stats import ratio_interval
cfg = B.model_config("small", "float32")
m = B.load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
prompts, group = B.workloads(cfg.vocab_size, 32)[sys.argv[1]]
go = B.ours_run(m, prompts, group, 96, cfg.vocab_size)
orig = Q.attention_with_lse
def manual(q, k, v, mask=None, fused=None): return orig(q, k, v, mask, fused=False)
go(); go()
ta, tb = [], []
for r in range(int(sys.argv[2])):
    for fn, out in ((orig, ta), (manual, tb)):
        Q.attention_with_lse = fn
        t0 = time.perf_counter(); go(); out.append(time.perf_counter() - t0)
print("flash", [round(x, 3) for x in ta]); print("manual", [round(x, 3) for x in tb])
print("flash/manual", ratio_interval([a/b for a, b in zip(ta, tb)]))
