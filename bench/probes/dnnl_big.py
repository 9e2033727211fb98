"""Qwen2.5-0.5B's lm_head [151936, 896] at 8 and 32 rows: F.linear vs the oneDNN packed linear.
    python bench/probes/dnnl_big.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, statistics
torch.manual_seed(0)
w = torch.randn(151936, 896)
for M in (8, 32):
    x = torch.randn(M, 896)
    p = torch.ops.mkldnn._reorder_linear_weight(w, M)
    f1 = lambda: torch.nn.functional.linear(x, w)
    f2 = lambda: torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "")
    for f in (f1, f2): f()
    r = {"linear": [], "dnnl": []}
    for _ in range(8):
        for k, f in (("linear", f1), ("dnnl", f2)):
            t = time.perf_counter(); f(); r[k].append(time.perf_counter() - t)
    print(M, {k: round(statistics.median(v) * 1e3, 1) for k, v in r.items()}, "GB/s linear", round(w.numel() * 4 / statistics.median(r["linear"]) / 1e9, 1))
