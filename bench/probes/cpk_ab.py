"""Whole rollouts of the small shape: the eager step from packed weights (the CPU default) vs the compiled
step from packed weights (qwen2_model.packed_linear, opaque to torch.compile) vs the compiled step unpacked,
alternating in one process, with a paired interval of eager / compiled+packed.
    python bench/probes/cpk_ab.py distinct|grpo [rounds]
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import statistics, sys, time, warnings, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
wl = sys.argv[1]
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
prompts, group = workloads(cfg.vocab_size, 32)[wl]
n, never = len(prompts) * group, [cfg.vocab_size]
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
engines = {"eager+pack": RolloutEngine(m), "compiled": RolloutEngine(m, compile=True, pack_weights=False),
           "compiled+pack": RolloutEngine(m, compile=True, pack_weights=True)}
outs = {}
for k, e in engines.items():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t = time.perf_counter(); outs[k] = e.generate(prompts, keys, group, 96, never, 1.0)
        print(k, "first call", round(time.perf_counter() - t, 1), "s; compiled step alive:", e._compiled is not None,
              [str(x.message)[:200] for x in w if "compiled" in str(x.message)])
print("rows with the eager step's tokens:", {k: sum(a == b for a, b in zip(outs["eager+pack"].tokens, o.tokens)) for k, o in outs.items()}, "of", n)
res = {k: [] for k in engines}
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 6):
    for k, e in engines.items():
        t = time.perf_counter(); e.generate(prompts, keys, group, 96, never, 1.0); res[k].append(time.perf_counter() - t)
print(wl, "median s", {k: round(statistics.median(v), 3) for k, v in res.items()})
print("eager+pack / compiled+pack", [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["eager+pack"], res["compiled+pack"])])],
      "compiled / compiled+pack", [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["compiled"], res["compiled+pack"])])])
