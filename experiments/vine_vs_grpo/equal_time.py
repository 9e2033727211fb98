"""vine vs grpo at equal wall time, from the runs' metrics.jsonl (the runner's summary compares equal steps).

The budget of seed s is grpo's (`baseline`) summed training-step time over its whole run (duration/step;
evaluations excluded, for both arms alike). vine's eval success at that budget is read off its eval curve, linear
in cumulative step time between its evaluations. Paired over seeds with stats.paired_test.

    python experiments/vine_vs_grpo/equal_time.py experiments/vine_vs_grpo/runs
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stats import paired_test  # noqa: E402


def eval_curve(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(step, cumulative step seconds at that step, eval success) at each evaluation of one run."""
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    elapsed, points = 0.0, []
    for r in sorted(rows, key=lambda r: r["step"]):
        elapsed += r.get("duration/step", 0.0)  # the step's own time; step 0's eval comes before any update
        if "success_rate/eval" in r:
            points.append((r["step"], elapsed, r["success_rate/eval"]))
    steps, seconds, success = (np.array(x, dtype=float) for x in zip(*points))
    return steps, seconds, success


def mean_metric(run: Path, key: str) -> float:
    """The mean of one logged metric over a run's steps."""
    rows = [json.loads(line) for line in (run / "logs" / "metrics.jsonl").read_text().splitlines() if line]
    return float(np.mean([r[key] for r in rows if key in r]))


def main(runs: Path, baseline: str = "baseline", treatment: str = "vine") -> None:
    seeds = sorted(int(p.name[4:]) for p in (runs / treatment).glob("seed*") if (p / "done.json").is_file()
                   and (runs / baseline / p.name / "done.json").is_file())
    grpo, vine_at_budget, vine_final, lines = [], [], [], []
    for s in seeds:
        b_steps, b_sec, b_ok = eval_curve(runs / baseline / f"seed{s}")
        v_steps, v_sec, v_ok = eval_curve(runs / treatment / f"seed{s}")
        budget = b_sec[-1]
        reached = float(np.interp(budget, v_sec, v_steps))
        grpo.append(b_ok[-1])
        vine_at_budget.append(float(np.interp(budget, v_sec, v_ok)))
        vine_final.append(v_ok[-1])
        lines.append(f"| {s} | {budget:.0f} | {v_sec[-1]:.0f} | {v_sec[-1] / budget:.2f} | {reached:.0f} | "
                     f"{100 * b_ok[-1]:.1f} | {100 * vine_at_budget[-1]:.1f} | {100 * v_ok[-1]:.1f} |")
    print("| seed | grpo s (150 steps) | vine s (150 steps) | time ratio | vine step at grpo's time | grpo final % | "
          "vine % at grpo's time | vine final % |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    extra = np.mean([mean_metric(runs / treatment / f"seed{s}", "vine/tokens") for s in seeds])
    print(f"\nvine's Monte-Carlo continuations: {extra:.0f} generated tokens per step on average (K and states "
          f"as configured), beside the rollout's {np.mean([mean_metric(runs / baseline / f'seed{s}', 'response_length') for s in seeds]):.1f} tokens x 128 answers (16 questions x 8)")
    for name, values in (("equal wall time", vine_at_budget), ("equal steps", vine_final)):
        c = paired_test(values, grpo)
        print(f"\n{name}: vine - grpo = {100 * c.diff.mean:+.1f} points [{100 * (c.diff.mean - c.diff.half_width):+.1f}, "
              f"{100 * (c.diff.mean + c.diff.half_width):+.1f}] over {c.n} seeds, t-test p = {c.p_value:.3f}, "
              f"sign p = {c.p_sign:.3f}, Wilcoxon p = {c.p_wilcoxon:.3f}, MDD (80%) {100 * c.mdd80:.1f} points")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs")
