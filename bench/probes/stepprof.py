"""The tiny default's GRPO step under cProfile (`cprof`), torch.profiler (`prof`) or per-step durations (`time`):
    python bench/probes/stepprof.py cprof   (needs the tiny model at runs/tiny/model: run the quick start first)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02), kept as it was run."""
import sys, tempfile, torch
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import trainer
from config import load_config
out = Path(tempfile.mkdtemp())
ov = [f"training.log_dir={out/'logs'}", f"training.ckpt_dir={out/'ckpt'}", f"credit.dir={out/'credit'}",
      "training.max_steps=1000000", "training.eval_interval=1000000", "training.ckpt_save_interval=1000000"] + sys.argv[2:]
run = trainer.setup(load_config(str(REPO / "config_tiny.yaml"), ov), resume=None)
mode = sys.argv[1]
for s in range(1, 3): trainer.train_step(run, s)
if mode == "prof":
    with torch.profiler.profile(record_shapes=True) as p:
        for s in range(3, 7): trainer.train_step(run, s)
    print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=25, max_shapes_column_width=70))
elif mode == "cprof":
    import cProfile, pstats
    pr = cProfile.Profile(); pr.enable()
    for s in range(3, 9): trainer.train_step(run, s)
    pr.disable(); pstats.Stats(pr).sort_stats("cumulative").print_stats(45)
else:
    for s in range(3, 13):
        m = trainer.train_step(run, s)
        print({k: round(v, 3) for k, v in m.items() if k.startswith("duration")})
