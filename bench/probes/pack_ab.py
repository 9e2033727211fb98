"""Whole rollouts, one engine unpacked and one packed (pack_weights=False/True), alternating, paired interval.
    python bench/probes/pack_ab.py small distinct | small grpo | tiny   (tiny needs runs/tiny/model)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import sys, time, torch, statistics
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
from qwen2_model import Transformer
which = sys.argv[1]
if which == "tiny":
    m = Transformer.from_pretrained(str(REPO / "runs/tiny/model")).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 100, (int(torch.randint(15, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
    group, new, never = 8, 72, [0]
else:
    cfg = model_config(which, "float32")
    m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
    wl = sys.argv[2]
    prompts, group = workloads(cfg.vocab_size, 32)[wl]
    new, never = int(sys.argv[3]) if len(sys.argv) > 3 else 96, [cfg.vocab_size]
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
engines = {"off": RolloutEngine(m, pack_weights=False), "on": RolloutEngine(m, pack_weights=True)}
res = {k: [] for k in engines}; outs = {}
for k, e in engines.items(): outs[k] = e.generate(prompts, keys, group, new, never, 1.0)
same = sum(a == b for a, b in zip(outs["off"].tokens, outs["on"].tokens))
print("rows with identical tokens", same, "of", len(outs["on"].tokens))
reps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
for _ in range(reps):
    for k, e in engines.items():
        t = time.perf_counter(); e.generate(prompts, keys, group, new, never, 1.0); res[k].append(time.perf_counter() - t)
print(sys.argv[1:], {k: round(statistics.median(v), 3) for k, v in res.items()}, "off/on", [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["off"], res["on"])])])
