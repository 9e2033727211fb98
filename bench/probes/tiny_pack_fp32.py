"""The tiny default's model in fp32 (as config_tiny.yaml trains it), whole rollouts of its GRPO step's shape
(16 prompts x 8 answers, 72 new tokens, no end token), unpacked vs packed, alternating, paired interval.
pack_ab.py's `tiny` case loaded the model with from_pretrained's default dtype, bfloat16, which never packs.
    python bench/probes/tiny_pack_fp32.py [rounds]      (needs runs/tiny/model: run the quick start first)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
from pathlib import Path
import statistics, sys, time, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from qwen2_model import Transformer
from rollout import RolloutEngine, row_keys, stream_key
from stats import ratio_interval
m = Transformer.from_pretrained(str(REPO / "runs/tiny/model"), dtype=torch.float32).eval()
assert next(m.parameters()).dtype == torch.float32
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(1, 100, (int(torch.randint(15, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(16)]
keys = row_keys(stream_key(0), [q for q in range(16) for _ in range(8)], [j for _ in range(16) for j in range(8)])
never = [10**6]
engines = {"off": RolloutEngine(m, pack_weights=False), "on": RolloutEngine(m, pack_weights=True)}
outs = {k: e.generate(prompts, keys, 8, 72, never, 1.0) for k, e in engines.items()}
print("rows with identical tokens", sum(a == b for a, b in zip(outs["off"].tokens, outs["on"].tokens)), "of 128")
res = {k: [] for k in engines}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 8):
    for k, e in engines.items():
        t = time.perf_counter(); e.generate(prompts, keys, 8, 72, never, 1.0); res[k].append(time.perf_counter() - t)
print({k: round(statistics.median(v), 3) for k, v in res.items()}, "off/on",
      [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["off"], res["on"])])])
