"""Eager+packed vs compiled vs compiled+packed decode, whole rollouts in one process.
    python bench/probes/cp_ab.py distinct
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import sys, time, torch, statistics, warnings
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads
from rollout import RolloutEngine, row_keys, stream_key
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
wl = sys.argv[1]
prompts, group = workloads(cfg.vocab_size, 32)[wl]
never = [cfg.vocab_size]
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
engines = {"eager+pack": RolloutEngine(m, pack_weights=True), "compiled": RolloutEngine(m, compile=True, pack_weights=False),
           "compiled+pack": RolloutEngine(m, compile=True, pack_weights=True)}
outs = {}
for k, e in engines.items():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter(); outs[k] = e.generate(prompts, keys, group, 96, never, 1.0); print(k, "first call", round(time.perf_counter() - t, 1), [str(x.message)[:150] for x in w])
    print(k, "compiled still on:", e._compiled is not None)
res = {k: [] for k in engines}
for _ in range(5):
    for k, e in engines.items():
        t = time.perf_counter(); e.generate(prompts, keys, group, 96, never, 1.0); res[k].append(time.perf_counter() - t)
print(wl, {k: round(statistics.median(v), 3) for k, v in res.items()})
