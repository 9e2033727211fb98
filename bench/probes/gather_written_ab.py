"""Compaction copying every cache slot (before) vs only the slots written so far (after): whole rollouts of the
tiny default's GRPO step shape (its step 3: 16 Countdown prompts x 8 answers, 72 new tokens), alternating in one
process, and the cache-gather ops' time under torch.profiler.
    python bench/probes/gather_written_ab.py [rounds]     (needs runs/tiny/model: run the quick start first)
A one-off probe behind a figure in BENCHMARKS.md (2026-12-03), kept as it was run."""
from pathlib import Path
import statistics, sys, time, torch
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import tempfile
import trainer, rollout
from rollout import RolloutEngine
from config import load_config
from stats import ratio_interval

# one real rollout's arguments: the tiny default's step 3 (Countdown prompts, its end tokens)
out = Path(tempfile.mkdtemp())
ov = [f"training.log_dir={out/'logs'}", f"training.ckpt_dir={out/'ckpt'}", f"credit.dir={out/'credit'}",
      "training.max_steps=1000000", "training.eval_interval=1000000", "training.ckpt_save_interval=1000000"]
run = trainer.setup(load_config(str(REPO / "config_tiny.yaml"), ov), resume=None)
calls, orig = [], rollout.RolloutEngine.generate
rollout.RolloutEngine.generate = lambda self, *a, **k: calls.append((a, k)) or orig(self, *a, **k)
for s in range(1, 4): trainer.train_step(run, s)
rollout.RolloutEngine.generate = orig
args, kwargs = calls[-1]
m = run.model.eval()


class Before(RolloutEngine):
    def _gather_rows(self, index, start, end=None):  # the old copy: every slot from `start` to the cache's end
        super()._gather_rows(index, start, None)


engines = {"before": Before(m), "after": RolloutEngine(m)}
outs = {k: e.generate(*args, **kwargs) for k, e in engines.items()}
print("rows with identical tokens", sum(a == b for a, b in zip(outs["before"].tokens, outs["after"].tokens)), "of", len(outs["after"].tokens),
      "| mean length", statistics.mean(len(t) for t in outs["after"].tokens))
for k, e in engines.items():
    with torch.profiler.profile() as p:
        for _ in range(3):
            e.generate(*args, **kwargs)
    ms = sum(a.self_cpu_time_total for a in p.key_averages() if a.key in ("aten::index", "aten::copy_")) / 3e3
    print(k, f"index + copy_ per rollout {ms:.2f} ms")
res = {k: [] for k in engines}
for _ in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
    for k, e in engines.items():
        t = time.perf_counter(); e.generate(*args, **kwargs); res[k].append(time.perf_counter() - t)
print({k: round(statistics.median(v), 4) for k, v in res.items()}, "before/after",
      [round(x, 3) for x in ratio_interval([a / b for a, b in zip(res["before"], res["after"])])])
