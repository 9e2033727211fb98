"""Where one rollout of bench_rollout.py's small shape goes, by op (torch.profiler, self CPU time), after two
warm-ups and three timed rollouts; the eager default engine (packed weights, cascade where it pays):
    python bench/probes/small_rollout_ops.py distinct|grpo
A one-off probe behind a figure in BENCHMARKS.md (2026-12-03), kept as it was run."""
import sys, time, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import bench_rollout as br
from qwen2_model import Transformer
from rollout import RolloutEngine, row_keys, stream_key
torch.manual_seed(0)
cfg = br.model_config("small", "float32")
m = Transformer(cfg).eval()
wl = br.workloads(cfg.vocab_size, 32)
name = sys.argv[1]
prompts, group = wl[name]
n = len(prompts) * group
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
e = RolloutEngine(m)
go = lambda: e.generate(prompts, keys, group, 96, [10**6], 1.0)
go(); go()
ts = []
for _ in range(3):
    t = time.perf_counter(); go(); ts.append(time.perf_counter() - t)
print("rollout s", [round(x, 3) for x in ts])
with torch.profiler.profile() as p:
    go()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40))
