"""The tiny model (fp32) in whole rollouts of its GRPO step's shape: decode attention by the CPU flash kernel vs
two matmuls and a softmax (qwen2_model's F swapped for a shim), alternating, paired interval.
    python bench/probes/tiny_attn_ab.py        (needs runs/tiny/model: run the quick start first)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run (paths as on that machine)."""
import sys, statistics, time, types, torch
import torch.nn.functional as F
sys.path.insert(0, "/work/main")
import qwen2_model
from qwen2_model import Transformer
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
real = F.scaled_dot_product_attention
def manual_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
    B, H, T, hd = q.shape
    if T != 1 or attn_mask is None or is_causal:
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)
    KV = k.shape[1]; g = H // KV
    s = torch.matmul(q.view(B, KV, g, hd), k.transpose(-1, -2)).mul_(hd ** -0.5).add_(attn_mask)
    return torch.matmul(torch.softmax(s, -1), v).view(B, H, 1, hd)
shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith("__")})
shim.scaled_dot_product_attention = manual_sdpa
m = Transformer.from_pretrained("/work/main/runs/tiny/model", dtype=torch.float32).eval()
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(1, 100, (int(torch.randint(15, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
keys = row_keys(stream_key(0), [q for q in range(16) for _ in range(8)], [j for _ in range(16) for j in range(8)])
eng = RolloutEngine(m)
def go(): return eng.generate(prompts, keys, 8, 72, [10**6], 1.0)
a = go(); qwen2_model.F = shim; b = go(); qwen2_model.F = F
print("identical rows", sum(x == y for x, y in zip(a.tokens, b.tokens)))
res = {"flash": [], "manual": []}
for _ in range(8):
    for name, mod in (("flash", F), ("manual", shim)):
        qwen2_model.F = mod
        t = time.perf_counter(); go(); res[name].append(time.perf_counter() - t)
qwen2_model.F = F
print({k: round(statistics.median(v), 3) for k, v in res.items()}, "flash/manual", [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["flash"], res["manual"])])])
