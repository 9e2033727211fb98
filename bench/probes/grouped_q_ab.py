"""Decode attention with a kv head's query heads as one block of query rows (q viewed [B, KV, H/KV, hd], no
enable_gqa) vs SDPA's enable_gqa, inside whole eager rollouts of bench_rollout's small shape, alternating:
    python bench/probes/grouped_q_ab.py distinct 8
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02, night), kept as it was run."""
import sys, time, types, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
import torch.nn.functional as F
import bench_rollout as B, qwen2_model as Q
from stats import ratio_interval
state = {"grouped": False}
def sdpa(q, k, v, attn_mask=None, enable_gqa=False, **kw):
    if state["grouped"] and enable_gqa and q.shape[2] == 1 and not kw:
        b, h, _, d = q.shape
        return F.scaled_dot_product_attention(q.reshape(b, k.shape[1], h // k.shape[1], d), k, v,
                                              attn_mask=attn_mask).view(b, h, 1, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)
Q.F = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
Q.F.scaled_dot_product_attention = sdpa
cfg = B.model_config("small", "float32")
m = B.load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
prompts, group = B.workloads(cfg.vocab_size, 32)[sys.argv[1]]
go = B.ours_run(m, prompts, group, 96, cfg.vocab_size)
go(); go()
ta, tb = [], []
for r in range(int(sys.argv[2])):
    for flag, out in ((False, ta), (True, tb)):
        state["grouped"] = flag
        t0 = time.perf_counter(); go(); out.append(time.perf_counter() - t0)
print("gqa", [round(x, 3) for x in ta]); print("grouped", [round(x, 3) for x in tb])
print("gqa / grouped time:", ratio_interval([a / b for a, b in zip(ta, tb)]))
