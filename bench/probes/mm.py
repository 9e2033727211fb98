"""The lm_head shape at 32 and 128 rows: F.linear(x, W), x @ W.t(), x @ a contiguous W.t(), chunked, alone.
    python bench/probes/mm.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time
torch.manual_seed(0)
def bench(f, n=30):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
for M in (32, 128):
    x = torch.randn(M, 256)
    W = torch.randn(8192, 256)
    Wt = W.t().contiguous()
    out = torch.empty(M, 8192)
    print(M, "linear(x,W)", bench(lambda: torch.nn.functional.linear(x, W)))
    print(M, "x@W.t()", bench(lambda: x @ W.t()))
    print(M, "x@Wt contig", bench(lambda: x @ Wt))
    print(M, "mm out", bench(lambda: torch.mm(x, Wt, out=out)))
    print(M, "linear out-chunks 4", bench(lambda: torch.cat([torch.nn.functional.linear(x, w) for w in W.chunk(4)], 1)))
    W2 = torch.randn(768, 256)
    print(M, "mlp linear", bench(lambda: torch.nn.functional.linear(x, W2)))
