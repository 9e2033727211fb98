"""Per layer at the small shape: oneDNN packed linear vs MKL packed vs F.linear, warm and cold.
    python bench/probes/dnnl.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, statistics
torch.manual_seed(0)
big = torch.randn(16*1024*1024)
def bench(f, cold, k=30):
    ts = []
    for _ in range(3): f()
    for _ in range(k):
        if cold: big.add_(1)
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)
for M, N, K in ((32, 8192, 256), (32, 768, 256), (32, 256, 768), (128, 384, 128), (128, 8192, 256)):
    x = torch.randn(M, K); w = torch.randn(N, K)
    ref = torch.nn.functional.linear(x, w)
    out = {}
    try:
        pw = torch.ops.mkldnn._reorder_linear_weight(w, M)
        f = lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [None], "")
        err = (f() - ref).abs().max().item()
        out["dnnl"] = (bench(f, False), bench(f, True), err)
    except Exception as e:
        out["dnnl"] = repr(e)[:120]
    try:
        pm = torch.ops.mkl._mkl_reorder_linear_weight(w, M)
        f2 = lambda: torch.ops.mkl._mkl_linear(x, pm, w, None, M)
        out["mklpack"] = (bench(f2, False), bench(f2, True))
    except Exception as e:
        out["mklpack"] = repr(e)[:80]
    f0 = lambda: torch.nn.functional.linear(x, w)
    out["linear"] = (bench(f0, False), bench(f0, True))
    print(M, N, K, out)
