"""The tiny default's whole GRPO step (steps 3-6 after two warm-ups) by op, torch.profiler self CPU time, not
split by input shape (stepprof.py's `prof` mode splits by shape):
    python bench/probes/tiny_step_ops.py [config overrides]   (needs runs/tiny/model: run the quick start first)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-03), kept as it was run."""
import sys, tempfile, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import trainer
from config import load_config
out = Path(tempfile.mkdtemp())
ov = [f"training.log_dir={out/'logs'}", f"training.ckpt_dir={out/'ckpt'}", f"credit.dir={out/'credit'}",
      "training.max_steps=1000000", "training.eval_interval=1000000", "training.ckpt_save_interval=1000000"] + sys.argv[1:]
run = trainer.setup(load_config(str(REPO / "config_tiny.yaml"), ov), resume=None)
for s in range(1, 3): trainer.train_step(run, s)
with torch.profiler.profile() as p:
    for s in range(3, 7): trainer.train_step(run, s)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=40))
