"""The tiny default's rollouts, decode step by decode step: how many live rows each step ran and its time
(steps 3-8 of a run, after two warm-ups; needs runs/tiny/model: run the quick start first):
    python bench/probes/tiny_decode_steps.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02, night), kept as it was run."""
import sys, tempfile, time, collections
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import trainer, rollout
from config import load_config
out = Path(tempfile.mkdtemp())
ov = [f"training.log_dir={out/'logs'}", f"training.ckpt_dir={out/'ckpt'}", f"credit.dir={out/'credit'}",
      "training.max_steps=1000000", "training.eval_interval=1000000", "training.ckpt_save_interval=1000000"]
run = trainer.setup(load_config(str(REPO / "config_tiny.yaml"), ov), resume=None)
for s in range(1, 3): trainer.train_step(run, s)
orig = rollout.RolloutEngine._decode
rec = []
def dec(self, token, slot, rows, *a):
    t0 = time.perf_counter(); r = orig(self, token, slot, rows, *a); rec.append((rows.ids.numel(), time.perf_counter() - t0)); return r
rollout.RolloutEngine._decode = dec
og = rollout.RolloutEngine.generate
gen = []
def g(self, *a, **k):
    t0 = time.perf_counter(); r = og(self, *a, **k); gen.append(time.perf_counter() - t0); return r
rollout.RolloutEngine.generate = g
for s in range(3, 9): trainer.train_step(run, s)
print("rollouts", [round(x, 3) for x in gen], "decode total", round(sum(t for _, t in rec), 3), "steps", len(rec))
b = collections.defaultdict(list)
for n, t in rec: b[(n + 15) // 16 * 16].append(t)
for k in sorted(b): print(f"rows<={k}: {len(b[k])} steps, mean {1e3*sum(b[k])/len(b[k]):.2f} ms, total {sum(b[k]):.3f}")
