"""A small-shape MLP at 32 rows, warm vs after a 64 MB buffer write (cache flush) vs after Python spins/sleeps.
    python bench/probes/cold.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, torch.nn.functional as F, statistics
torch.manual_seed(0)
x = torch.randn(32, 256)
g, u, d = torch.randn(768, 256), torch.randn(768, 256), torch.randn(256, 768)
mlp = lambda: F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)
big = torch.randn(16 * 1024 * 1024)  # 64 MB
def bench(between, k=100):
    ts = []
    for _ in range(k):
        between()
        t = time.perf_counter(); mlp(); ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)
def spin(sec):
    t = time.perf_counter()
    while time.perf_counter() - t < sec: pass
print("hot", bench(lambda: None))
print("flush 64MB", bench(lambda: big.add_(1.0)))
print("python spin 50us", bench(lambda: spin(50e-6)))
print("python spin 200us", bench(lambda: spin(200e-6)))
print("python spin 1ms", bench(lambda: spin(1e-3)))
print("sleep 1ms", bench(lambda: time.sleep(1e-3)))
