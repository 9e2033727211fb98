"""q/k/v and gate/up as one F.linear on concatenated weights vs separate: bitwise equality and time per call.
    python bench/probes/fuse.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, torch.nn.functional as F
torch.manual_seed(0)
def bench(f, k=200):
    for _ in range(10): f()
    ts = []
    for _ in range(k):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return round(ts[len(ts)//2] * 1e3, 4)
for M, H, I, KV in ((128, 128, 384, 64), (32, 256, 768, 128), (1, 128, 384, 64), (2000, 128, 384, 64), (7, 896, 4864, 128)):
    x = torch.randn(M, H)
    g, u = torch.randn(I, H), torch.randn(I, H)
    gu = torch.cat([g, u])
    a = torch.cat([F.linear(x, g), F.linear(x, u)], 1); b = F.linear(x, gu)
    q, k, v = torch.randn(H, H), torch.randn(KV, H), torch.randn(KV, H)
    bq, bk, bv = torch.randn(H), torch.randn(KV), torch.randn(KV)
    qkv, bqkv = torch.cat([q, k, v]), torch.cat([bq, bk, bv])
    c = torch.cat([F.linear(x, q, bq), F.linear(x, k, bk), F.linear(x, v, bv)], 1); d = F.linear(x, qkv, bqkv)
    print(M, H, "gate/up equal", torch.equal(a, b), "qkv equal", torch.equal(c, d),
          "sep", bench(lambda: (F.linear(x, g), F.linear(x, u))), "fused", bench(lambda: F.linear(x, gu).chunk(2, -1)),
          "qkv sep", bench(lambda: (F.linear(x, q, bq), F.linear(x, k, bk), F.linear(x, v, bv))), "fused", bench(lambda: F.linear(x, qkv, bqkv).split([H, KV, KV], -1)))
