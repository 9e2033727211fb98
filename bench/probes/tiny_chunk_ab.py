"""The tiny default's update with log-probs over chunks of 512 tokens (recomputed in the backward) vs over the
whole (tiny-vocabulary) logits, alternating steps of one run (needs runs/tiny/model: run the quick start first):
    python bench/probes/tiny_chunk_ab.py
A one-off probe behind a figure in BENCHMARKS.md (2026-12-02, night), kept as it was run."""
import sys, tempfile, dataclasses, statistics as st
from pathlib import Path
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import trainer
from config import load_config
out = Path(tempfile.mkdtemp())
ov = [f"training.log_dir={out/'logs'}", f"training.ckpt_dir={out/'ckpt'}", f"credit.dir={out/'credit'}",
      "training.max_steps=1000000", "training.eval_interval=1000000", "training.ckpt_save_interval=1000000"]
run = trainer.setup(load_config(str(REPO / "config_tiny.yaml"), ov), resume=None)
for s in range(1, 3): trainer.train_step(run, s)
base = run.update_cfg
res = {512: [], None: []}
for s in range(3, 43):
    c = 512 if s % 2 else None
    run.update_cfg = dataclasses.replace(base, logits_chunk_tokens=c)
    m = trainer.train_step(run, s)
    res[c].append(m["duration/step"] - m["duration/rollout"])
for c, v in res.items(): print(c, "update median", round(st.median(v), 4), "mean", round(st.mean(v), 4))
