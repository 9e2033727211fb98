"""Qwen2.5-0.5B's layer weights (24 copies each, so out of cache) at 8/32/128 rows: F.linear vs packed.
    python bench/probes/dnnl_big2.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, statistics
torch.manual_seed(0)
for N, K in ((4864, 896), (896, 4864), (896, 896), (128, 896)):
    w = torch.randn(N, K); ws = [torch.randn(N, K) for _ in range(24)]  # 24 layers' worth: out of cache like a real step
    for M in (8, 32, 128):
        x = torch.randn(M, K)
        ps = [torch.ops.mkldnn._reorder_linear_weight(v, M) for v in ws]
        f1 = lambda: [torch.nn.functional.linear(x, v) for v in ws]
        f2 = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [None], "") for p in ps]
        for f in (f1, f2): f()
        r = {"linear": [], "dnnl": []}
        for _ in range(6):
            for k, f in (("linear", f1), ("dnnl", f2)):
                t = time.perf_counter(); f(); r[k].append(time.perf_counter() - t)
        print(N, K, M, {k: round(statistics.median(v) * 1e3 / 24, 3) for k, v in r.items()})
