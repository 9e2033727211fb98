"""MKL's packed-weight linear (torch.ops.mkl._mkl_linear) vs F.linear, per call.
    python bench/probes/mkl.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time
torch.manual_seed(0)
def bench(f, n=50):
    for _ in range(5): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return round(ts[len(ts)//2]*1e3, 3)
for M in (32, 128):
    for N, K in ((8192, 256), (768, 256), (256, 768), (512, 256)):
        x = torch.randn(M, K); W = torch.randn(N, K)
        try:
            pw = torch.ops.mkl._mkl_reorder_linear_weight(W, M)
            y1 = torch.ops.mkl._mkl_linear(x, pw, W, None, M)
            err = (y1 - torch.nn.functional.linear(x, W)).abs().max().item()
            t_mkl = bench(lambda: torch.ops.mkl._mkl_linear(x, pw, W, None, M))
        except Exception as e:
            err, t_mkl = repr(e)[:80], None
        print(M, N, K, "linear", bench(lambda: torch.nn.functional.linear(x, W)), "mkl", t_mkl, "err", err)
