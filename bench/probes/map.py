"""Where a rollout's time goes: perf_counter around each module of the decode step, whole rollouts.
    python bench/probes/map.py nopack distinct grpo    (or pack)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import sys, time, torch, collections
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads, ours_run
import rollout, qwen2_model
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
acc = collections.defaultdict(float)
def wrap_mod(mod, key):
    f = mod.forward
    def g(*a, **k):
        t = time.perf_counter(); y = f(*a, **k); acc[key] += time.perf_counter() - t; return y
    mod.forward = g
for l in m.model.layers:
    wrap_mod(l.input_layernorm, "norm"); wrap_mod(l.post_attention_layernorm, "norm"); wrap_mod(l.mlp, "mlp")
    wrap_mod(l.self_attn, "attn_total"); 
    for p in ("q_proj", "k_proj", "v_proj", "o_proj"): wrap_mod(getattr(l.self_attn, p), "attn_proj")
wrap_mod(m.lm_head, "lm_head"); wrap_mod(m.model.norm, "norm")
wrap_mod(m.rotary_emb, "rotary")
def wrap_fn(modname, obj, name, key):
    f = getattr(obj, name)
    def g(*a, **k):
        t = time.perf_counter(); y = f(*a, **k); acc[key] += time.perf_counter() - t; return y
    setattr(obj, name, g)
wrap_fn("q", qwen2_model, "apply_rotary", "rope")
wrap_fn("q", qwen2_model.F, "scaled_dot_product_attention", "sdpa")
wrap_fn("q", qwen2_model, "cascade_attention", "sdpa")
wrap_fn("r", rollout, "sample_next", "sample")
wrap_fn("r", qwen2_model.KVCache, "update", "cache_update")
orig_forward = m.forward
def fw(*a, **k):
    t = time.perf_counter(); y = orig_forward(*a, **k); acc["model_forward"] += time.perf_counter() - t; return y
m.forward = fw
for wl in sys.argv[2:]:
    prompts, group = workloads(cfg.vocab_size, 32)[wl]
    go = ours_run(m, prompts, group, 96, cfg.vocab_size, pack=sys.argv[1] == "pack")
    rows = []
    with torch.no_grad():
        go()
        for _ in range(4):
            acc.clear(); t = time.perf_counter(); go(); tot = time.perf_counter() - t
            rows.append((tot, dict(acc)))
    tot, a = sorted(rows, key=lambda r: r[0])[1]
    print(wl, "total", round(tot, 3), {k: round(v, 3) for k, v in sorted(a.items(), key=lambda kv: -kv[1])})
