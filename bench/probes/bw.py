"""Memory bandwidth (copy, sum) and a cold 8 MB lm_head linear vs a cold 8 MB sum, 1 and 2 threads.
    python bench/probes/bw.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, statistics
for threads in (1, 2):
    torch.set_num_threads(threads)
    a = torch.randn(32 * 1024 * 1024); b = torch.empty_like(a)
    ts = []
    for _ in range(10):
        t = time.perf_counter(); b.copy_(a); ts.append(time.perf_counter() - t)
    print(threads, "copy GB/s (read+write)", round(2 * a.numel() * 4 / min(ts) / 1e9, 2))
    ts = []
    for _ in range(10):
        t = time.perf_counter(); a.sum(); ts.append(time.perf_counter() - t)
    print(threads, "sum read GB/s", round(a.numel() * 4 / min(ts) / 1e9, 2))
    w = torch.randn(8192, 256); x = torch.randn(32, 256); big = torch.randn(16*1024*1024)
    ts = []
    for _ in range(20):
        big.add_(1); t = time.perf_counter(); torch.nn.functional.linear(x, w); ts.append(time.perf_counter() - t)
    print(threads, "cold lm_head 8MB GB/s", round(w.numel() * 4 / statistics.median(ts) / 1e9, 2))
    ts = []
    for _ in range(20):
        big.add_(1); t = time.perf_counter(); w.sum(); ts.append(time.perf_counter() - t)
    print(threads, "cold w.sum 8MB GB/s", round(w.numel() * 4 / statistics.median(ts) / 1e9, 2))
