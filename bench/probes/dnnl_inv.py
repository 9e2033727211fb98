"""The packed linear's error vs F.linear, and whether a row's result depends on the rows sharing the call.
    python bench/probes/dnnl_inv.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import torch
torch.manual_seed(0)
for N, K in ((8192, 256), (384, 128), (104, 128), (4864, 896), (256, 768)):
    w = torch.randn(N, K); b = torch.randn(N)
    x = torch.randn(300, K)
    outs = {}
    for hint in (1, 32, 128):
        p = torch.ops.mkldnn._reorder_linear_weight(w, hint)
        full = torch.ops.mkldnn._linear_pointwise(x, p, b, "none", [None], "")
        same_rows = all(torch.equal(torch.ops.mkldnn._linear_pointwise(x[:M], p, b, "none", [None], ""), full[:M]) for M in (1, 2, 3, 7, 16, 31, 32, 33, 64, 100, 128, 200))
        outs[hint] = full
        print(N, K, "hint", hint, "rows independent of M:", same_rows, "max err vs linear", (full - torch.nn.functional.linear(x, w, b)).abs().max().item())
    print("  hint-independent:", all(torch.equal(outs[1], o) for o in outs.values()))
    lin_same = all(torch.equal(torch.nn.functional.linear(x[:M], w, b), torch.nn.functional.linear(x, w, b)[:M]) for M in (1, 2, 3, 7, 16, 31, 32, 33, 64, 100, 128, 200))
    print("  F.linear rows independent of M:", lin_same)
