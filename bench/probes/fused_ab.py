"""Packed weights with q/k/v and gate/up fused vs separate, whole rollouts, paired interval.
    python bench/probes/fused_ab.py distinct
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import sys, time, torch, statistics, types
import torch.nn.functional as F
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
wl = sys.argv[1]
prompts, group = workloads(cfg.vocab_size, 32)[wl]
never = [cfg.vocab_size]
keys = row_keys(stream_key(0), [q for q in range(len(prompts)) for _ in range(group)], [j for _ in prompts for j in range(group)])
e = RolloutEngine(m, pack_weights=True)
def op(x, p, b):
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), p, b, "none", [None], "")
    return y.view(*x.shape[:-1], y.shape[-1])
FUSED = {"on": False}
for layer in m.model.layers:
    a, mlp = layer.self_attn, layer.mlp
    wqkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]).detach()
    bqkv = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]).detach()
    a._pqkv = (torch.ops.mkldnn._reorder_linear_weight(wqkv, 32), bqkv)
    mlp._pgu = torch.ops.mkldnn._reorder_linear_weight(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), 32)
    def mlp_fwd(self, x, orig=mlp.forward):
        if not FUSED["on"]: return orig(x)
        g, u = op(x, self._pgu, None).chunk(2, -1)
        return self.down_proj(F.silu(g) * u)
    mlp.forward = types.MethodType(mlp_fwd, mlp)
    sizes = [a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.n_kv_heads * a.head_dim]
    def proj(self, which, sizes=sizes):
        return None
    # patch q/k/v: compute fused once per call via a cache keyed by input id
    cache = {}
    def mk(idx, a=a, sizes=sizes, cache=cache):
        orig = [a.q_proj, a.k_proj, a.v_proj][idx].forward
        def f(x):
            if not FUSED["on"]: return orig(x)
            if idx == 0:
                cache["out"] = op(x, *a._pqkv).split(sizes, -1)
            return cache["out"][idx]
        return f
    a.q_proj.forward, a.k_proj.forward, a.v_proj.forward = mk(0), mk(1), mk(2)
res = {False: [], True: []}
outs = {}
for flag in (False, True):
    FUSED["on"] = flag; outs[flag] = e.generate(prompts, keys, group, 96, never, 1.0)
print("same tokens rows", sum(a == b for a, b in zip(outs[False].tokens, outs[True].tokens)), len(outs[True].tokens))
for _ in range(8):
    for flag in (False, True):
        FUSED["on"] = flag
        t = time.perf_counter(); e.generate(prompts, keys, group, 96, never, 1.0); res[flag].append(time.perf_counter() - t)
print(wl, {k: round(statistics.median(v), 3) for k, v in res.items()}, "sep/fused", [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res[False], res[True])])])
