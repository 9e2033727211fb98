"""The cost of `algorithm.adv_estimator: vine` per training step, side by side with `grpo`: every variant is a
run of its own (set up as train.py would, from the same config and seed), and the runs take their steps in
turn (step 1 of each, then step 2 of each, ...), so a busy machine slows them alike. Evaluation and the credit
logger are off; a step is rollout, (the values,) the update.

    python bench/bench_vine.py --config config_tiny.yaml --steps 5 --threads 1 [section.key=value ...]
        [--variants grpo,vine_step_k4,vine_step_k8,vine_token_k4,vine_token_k8]

A variant is `grpo` or `vine_<unit>_k<K>`. Prints a table (seconds per step, the values' share, generated
tokens per step of the rollout and of the values), then one JSON line with every step's figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import trainer  # noqa: E402
from parts import load_config  # noqa: E402

VARIANT = re.compile(r"^vine_(step|token)_k(\d+)$")


def overrides_of(variant: str) -> list[str]:
    if variant == "grpo":
        return ["algorithm.adv_estimator=grpo"]
    m = VARIANT.match(variant)
    if m is None:
        raise SystemExit(f"--variants: {variant!r} is not grpo or vine_<step|token>_k<K>")
    return ["algorithm.adv_estimator=vine", f"algorithm.vine_unit={m.group(1)}", f"algorithm.vine_k={m.group(2)}"]


def setup_runs(args: argparse.Namespace, root: Path) -> dict[str, trainer.Run]:
    runs = {}
    for v in args.variants:
        out = root / v
        config = load_config(args.config, [*args.overrides, *overrides_of(v), f"training.log_dir={out / 'logs'}",
                                           f"training.ckpt_dir={out / 'ckpt'}", "credit.enabled=false",
                                           "training.max_steps=100000", "training.eval_interval=100000",
                                           f"training.num_threads={args.threads}"])
        runs[v] = trainer.setup(config, None)
    return runs


def step_figures(m: dict[str, float], episodes: int) -> dict[str, float]:
    return {"seconds": m["duration/step"], "rollout_seconds": m["duration/rollout"],
            "vine_seconds": m.get("duration/vine", 0.0),
            "rollout_tokens": m["response_length"] * episodes, "vine_tokens": m.get("vine/tokens", 0.0),
            "vine_states": m.get("vine/states", 0.0)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="config_tiny.yaml")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", type=lambda text: text.split(","),
                   default=["grpo", "vine_step_k4", "vine_step_k8", "vine_token_k4", "vine_token_k8"],
                   help="comma-separated")
    p.add_argument("overrides", nargs="*", help="section.key=value, applied to every variant")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_vine_") as tmp:
        runs = setup_runs(args, Path(tmp))
        figures: dict[str, list[dict]] = {v: [] for v in runs}
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            for v, run in runs.items():
                t = run.config.training
                m = trainer.train_step(run, step)
                figures[v].append(step_figures(m, t.num_questions_per_batch * t.num_answers_per_question))
        for run in runs.values():
            run.metrics_log.close()
    print_table(figures)
    result = {"steps": args.steps, "threads": args.threads, "config": args.config, "overrides": args.overrides,
              "wall_seconds": time.perf_counter() - start, "variants": figures}
    print(json.dumps(result))
    return result


def print_table(figures: dict[str, list[dict]]) -> None:
    base = np.mean([f["seconds"] for f in figures["grpo"]]) if "grpo" in figures else None
    print("| variant | s/step (mean, min-max) | x grpo | rollout s/step | values s/step | rollout tokens/step "
          "| values tokens/step | states/step |")
    print("|---|---|---|---|---|---|---|---|")
    for v, rows in figures.items():
        s = [r["seconds"] for r in rows]
        mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
        ratio = f"{np.mean(s) / base:.1f}" if base else "-"
        print(f"| {v} | {np.mean(s):.2f} ({min(s):.2f}-{max(s):.2f}) | {ratio} | {mean('rollout_seconds'):.2f} | "
              f"{mean('vine_seconds'):.2f} | "
              f"{mean('rollout_tokens'):.0f} | {mean('vine_tokens'):.0f} | {mean('vine_states'):.0f} |")


if __name__ == "__main__":
    main()
