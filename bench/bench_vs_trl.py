"""A whole GRPO step, ours vs TRL's GRPOTrainer, on the same job, interleaved in one run.

    pip install trl==1.16.0        # a bench dependency only, never a runtime one
    python bench/bench_vs_trl.py [--config config_tiny.yaml] [--rounds 3] [--steps 4] [section.key=value ...]

The job is the tiny default's step: the same model weights (the built-in tiny model, built first if missing),
16 Countdown questions x 8 answers, 72 new tokens, temperature 1, lr 1e-4 constant, no KL, token-mean loss
(TRL's "dapo"), gradient-norm clip 1, the update in 2 micro-batches of 64, on the CPU; ours with credit
logging on, as in the README's main command. Rounds alternate: `--steps` of ours, then `--steps` of TRL; the
first step of each block is a warm-up and not counted. Prints a table, then one JSON line; with 2+ rounds
also a 95% interval of the ratio from the per-round ratios (t on their logs: each round pairs a block of ours
with the TRL block right after it, so a slow spell of the machine hits both).

The reward is the same function on both sides. TRL hands reward functions completions decoded with
special tokens skipped: the tiny model's `<answer>` tags are special tokens, so that text has no tags and
scores 0. The reward here decodes TRL's `completion_ids` itself, keeping them, as ours does.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import harness  # first: it puts the repository root on sys.path
import trainer
from harness import REPO
from stats import ratio_interval
from tokenizer import Tokenizer


def time_ours(run: trainer.Run, first_step: int, steps: int) -> tuple[list[float], list[float]]:
    """Per-step wall time and rollout time of `steps` GRPO steps (train_step: rollout, update, credit log)."""
    totals, rollouts = [], []
    for step in range(first_step, first_step + steps):
        t0 = time.perf_counter()
        metrics = trainer.train_step(run, step)
        totals.append(time.perf_counter() - t0)
        rollouts.append(metrics["duration/rollout"])
    return totals, rollouts


def trl_trainer(run: trainer.Run, model, out: Path, steps: int, seed: int):
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    task, ours_tok = run.task, Tokenizer(run.config.model.path)
    problems = run.train_set[:2000]
    data = Dataset.from_list([{"prompt": task.prompt(p), "idx": i} for i, p in enumerate(problems)])

    def reward(prompts, completions, completion_ids, idx, **_):
        # decode the ids ourselves, special tokens kept (TRL's `completions` lost the <answer> tags)
        texts = [ours_tok.decode([t for t in ids if t not in ours_tok.end_token_ids]) for ids in completion_ids]
        return [float(task.reward(problems[i], text)["reward"]) for i, text in zip(idx, texts)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    t = run.config.training
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.num_questions_per_batch * t.num_answers_per_question // t.micro_batch_size,
        num_generations=t.num_answers_per_question, max_completion_length=t.max_new_tokens,
        temperature=t.temperature, learning_rate=t.learning_rate, lr_scheduler_type="constant", beta=0.0,
        loss_type="dapo", max_grad_norm=t.max_grad_norm, max_steps=steps, save_strategy="no", report_to=[],
        logging_steps=10**6, use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0, bf16=False,
        generation_kwargs={"eos_token_id": ours_tok.end_token_ids})  # stop where ours stops
    timer = StepTimer()
    # not AutoTokenizer: transformers 5 maps a qwen2 config to Qwen2Tokenizer and rebuilds its byte-level
    # pre-tokenizer, which drops the character tokenizer's spaces and newlines
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(run.config.model.path) / "tokenizer.json"),
                                  eos_token=ours_tok.eos_token, pad_token=ours_tok.pad_token)
    return GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok,
                       callbacks=[timer]), timer


def alternate_blocks(run: trainer.Run, ref_model, tmp: Path, rounds: int, steps: int
                     ) -> tuple[list[float], list[float], list[float], list[float]]:
    """`rounds` rounds of a block of our steps, then a block of TRL's: our step and rollout times, TRL's step
    times (each block's first step left out) and each round's TRL / ours ratio of medians."""
    ours, ours_rollout, theirs, round_ratios = [], [], [], []
    step = 1
    for r in range(rounds):
        totals, rollouts = time_ours(run, step, steps)
        step += steps
        ours += totals[1:]
        ours_rollout += rollouts[1:]
        trl_run, timer = trl_trainer(run, ref_model, tmp / f"trl{r}", steps, seed=r)
        trl_run.train()
        theirs += timer.times[1:]
        round_ratios.append(statistics.median(timer.times[1:]) / statistics.median(totals[1:]))
        print(f"round {r + 1}: ours {statistics.median(totals[1:]):.3f} s/step, "
              f"TRL {statistics.median(timer.times[1:]):.3f} s/step", flush=True)
    return ours, ours_rollout, theirs, round_ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "config_tiny.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="steps per block (the first one is a warm-up)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("overrides", nargs="*", help="config overrides for our side, e.g. model.compile_decode=true")
    args = p.parse_args(argv)
    try:
        import trl
        from transformers import AutoModelForCausalLM
    except ImportError:
        print("bench_vs_trl needs TRL: pip install trl==1.16.0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # builds the tiny model if missing
        run = harness.setup_run(args.config, Path(tmp) / "ours", [f"training.num_threads={args.threads}", *args.overrides])
        ref_model = AutoModelForCausalLM.from_pretrained(run.config.model.path, dtype=torch.float32)
        ours, ours_rollout, theirs, round_ratios = alternate_blocks(run, ref_model, Path(tmp), args.rounds, args.steps)
    result = {
        "bench": "grpo_step_vs_trl", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "trl": trl.__version__,
        "ours_s_per_step": statistics.median(ours), "ours_rollout_s": statistics.median(ours_rollout),
        "trl_s_per_step": statistics.median(theirs), "steps_counted_each": len(ours), "overrides": args.overrides,
    }
    result["trl_over_ours"] = result["trl_s_per_step"] / result["ours_s_per_step"]
    result["round_ratios"] = round_ratios
    _, low, high = ratio_interval(round_ratios)
    interval = ""
    if len(round_ratios) >= 2:
        result["ratio_ci95"] = [low, high]
        interval = f" (95% interval over rounds {low:.2f}-{high:.2f}x)"
    print(f"\n{'':12}{'s/step (median)':>18}\nours{result['ours_s_per_step']:>26.3f}  (rollout "
          f"{result['ours_rollout_s']:.3f})\nTRL {result['trl_s_per_step']:>26.3f}\n"
          f"TRL takes {result['trl_over_ours']:.2f}x our time per step{interval}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
