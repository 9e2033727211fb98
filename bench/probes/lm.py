"""The small shape's lm_head as F.linear(x, W) vs x @ W.t().contiguous(), timed inside whole distinct rollouts.
    python bench/probes/lm.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import sys, time, torch, statistics
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO)); sys.path.insert(0, str(REPO / "bench"))
from bench_rollout import model_config, load_models, workloads, ours_run
cfg = model_config("small", "float32")
m = load_models(cfg, torch.device("cpu"), torch.float32, ("ours",))["ours"]
acc = [0.0]
class Timed(torch.nn.Module):
    def __init__(self, f, w): super().__init__(); self.f = f; self.weight = w
    def forward(self, x):
        t = time.perf_counter(); y = self.f(x); acc[0] += time.perf_counter() - t; return y
W = m.lm_head.weight
Wt = W.detach().t().contiguous()
variants = {"linear": Timed(lambda x: torch.nn.functional.linear(x, W), W), "tcontig": Timed(lambda x: x @ Wt, W)}
prompts, group = workloads(cfg.vocab_size, 32)["distinct"]
go = ours_run(m, prompts, group, 96, cfg.vocab_size)
res = {k: ([], []) for k in variants}
with torch.no_grad():
    m.lm_head = variants["linear"]; go()
    for _ in range(6):
        for k, v in variants.items():
            m.lm_head = v; acc[0] = 0.0
            t = time.perf_counter(); go(); res[k][0].append(time.perf_counter() - t); res[k][1].append(acc[0])
for k, (tot, lm) in res.items():
    print(k, "total median", round(statistics.median(tot), 3), "lm median", round(statistics.median(lm), 3))
