"""One rollout of the tiny default (step 3 of a run) under torch.profiler, ops by self CPU time (needs
runs/tiny/model: run the quick start first):
    python bench/probes/tiny_rollout_ops.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02, night), kept as it was run."""
import sys, tempfile, torch
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
og = rollout.RolloutEngine.generate
prof = torch.profiler.profile()
def g(self, *a, **k):
    prof.start(); r = og(self, *a, **k); prof.stop(); return r
rollout.RolloutEngine.generate = g
trainer.train_step(run, 3)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=45))
