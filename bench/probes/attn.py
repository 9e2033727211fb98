"""Decode attention variants at decode shapes: SDPA with enable_gqa, grouped query rows, batched matmuls.
    python bench/probes/attn.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch, time, torch.nn.functional as F
def bench(f, k=200):
    for _ in range(10): f()
    ts = []
    for _ in range(k):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    ts.sort(); return round(ts[len(ts)//2] * 1e3, 4)
for B, L, HD in ((128, 30, 32), (128, 60, 32), (128, 90, 32), (32, 101, 64), (128, 60, 64)):
    q = torch.randn(B, 4, 1, HD); k = torch.randn(B, 2, L, HD); v = torch.randn(B, 2, L, HD)
    mask = torch.zeros(B, 1, 1, L); mask[:, :, :, :5] = float("-inf")
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    qg = q.view(B, 2, 2, HD)
    b = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask).view(B, 4, 1, HD)
    def manual():
        s = torch.baddbmm(mask.view(B, 1, L).repeat_interleave(2, 0) if False else mask.view(B,1,1,L).expand(B,2,2,L).reshape(B*2, 2, L), qg.reshape(B*2, 2, HD), k.reshape(B*2, L, HD).transpose(1, 2), alpha=0.125)
        return torch.bmm(torch.softmax(s, -1), v.reshape(B*2, L, HD)).view(B, 4, 1, HD)
    def manual2():
        s = (qg @ k.transpose(-1, -2)) * 0.125 + mask
        return (torch.softmax(s, -1) @ v).view(B, 4, 1, HD)
    c = manual(); d = manual2()
    print(B, L, "gqa", bench(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
          "grouped-q", bench(lambda: F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)),
          "manual", bench(manual), "manual2", bench(manual2),
          "err", (a-b).abs().max().item(), (a-c).abs().max().item(), (a-d).abs().max().item())
