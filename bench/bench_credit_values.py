"""The cost of Monte-Carlo values (credit_values.py): the values at every token of N tiny-default completions
from K continuations per state, in generated tokens per second, side by side with a plain GRPO rollout of
about as many tokens (the same engine, model and process, alternating rounds), so the ratio is the number
to read: above 1, a generated token of the values costs less than one of a rollout.

    python bench/bench_credit_values.py --model runs/tiny/model [--config config_tiny.yaml] [--episodes 64]
        [--k 8] [--rounds 3] [--threads 1] [--max_rows 2048] [section.key=value ...]

The completions are fresh samples of training problems at the config's settings (credit_truth.sample_episodes);
the values' tokens are those kept (within each state's budget), the rollout's its completions' tokens. Both
sides include their reward calls (the values score every continuation). The rollout runs in calls of as many
rows as the values' calls (--max_rows). Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import harness  # first: it puts the repository root on sys.path
import credit_truth as ct
import credit_values as cv
from harness import alternate, markdown_table, ratio_text
from parts import load_config
from rollout import RolloutEngine, rollout, stream_key
from stats import ratio_interval
from tasks import build_task


def workloads(args: argparse.Namespace) -> dict:
    """The values' queries and the rollout's questions, on one model and engine."""
    config = load_config(args.config, args.overrides)
    task = build_task(config)
    train, _ = task.load()
    model, tokenizer = ct.load_checkpoint(Path(args.model))
    engine = RolloutEngine(model)
    g = config.training.num_answers_per_question
    episodes = ct.sample_episodes(model, tokenizer, task, train, args.episodes // g, config, 0, engine)
    queries = [cv.ValueQuery(e.prompt_token_ids, e.generated_token_ids, ct.task_reward_fn(task, tokenizer, e.problem))
               for e in episodes]
    return {"config": config, "task": task, "train": train, "model": model, "tokenizer": tokenizer, "engine": engine,
            "queries": queries, "episodes": episodes}


def values_fn(w: dict, args: argparse.Namespace):
    t = w["config"].training

    def go() -> cv.ValueCost:
        return cv.estimate_values(w["model"], w["queries"], k=args.k, max_new_tokens=t.max_new_tokens,
                                  eos_token_id=w["tokenizer"].end_token_ids, temperature=t.temperature, seed=1,
                                  engine=w["engine"], max_rows=args.max_rows,
                                  pad_token_id=w["tokenizer"].pad_token_id)[1]
    return go


def rollout_fn(w: dict, args: argparse.Namespace, n_questions: int):
    """A plain GRPO rollout of `n_questions` training problems (after those the values' episodes came from)."""
    t, task = w["config"].training, w["task"]
    problems = [w["train"][i % len(w["train"])] for i in range(1000, 1000 + n_questions)]
    prompts = [task.prompt(p) for p in problems]

    def go() -> int:
        episodes = rollout(w["model"], w["tokenizer"], problems, prompts, task.reward, t.num_answers_per_question,
                           t.max_new_tokens, t.temperature, t.top_p, batch_size=args.max_rows,
                           stream=stream_key(2), engine=w["engine"])
        return sum(len(e.generated_token_ids) for e in episodes)
    return go


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the tiny default's model directory (or a checkpoint)")
    p.add_argument("--config", default="config_tiny.yaml")
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--max_rows", type=int, default=2048, help="rows per engine call, both sides")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w = workloads(args)
    plan = cv.plan_states(w["queries"], w["config"].training.max_new_tokens, w["tokenizer"].end_token_ids)
    values, start = values_fn(w, args), time.perf_counter()
    cost = values()  # untimed: the values' token count, and a warm cache
    first = time.perf_counter() - start
    probe = rollout_fn(w, args, 64)()  # the rollout's tokens per question, to match the values' tokens
    n_questions = max(1, math.ceil(64 * cost.kept_tokens / probe))
    plain = rollout_fn(w, args, n_questions)
    plain_tokens = plain()
    times = alternate({"values": values, "rollout": plain}, args.rounds)
    rates = {"values": [cost.kept_tokens / s for s in times["values"]],
             "rollout": [plain_tokens / s for s in times["rollout"]]}
    ratio = ratio_interval([a / b for a, b in zip(rates["values"], rates["rollout"])])
    result = {"episodes": args.episodes, "k": args.k, "threads": torch.get_num_threads(), "max_rows": args.max_rows,
              "states": cost.states, "continuations": cost.continuations, "values_tokens": cost.kept_tokens,
              "values_sampled_tokens": cost.sampled_tokens, "prefill_tokens": sum(len(s.tokens) for s in plan.states),
              "rollout_questions": n_questions, "rollout_tokens": plain_tokens, "first_values_seconds": first,
              "seconds": times, "tokens_per_second": rates, "ratio": ratio}
    rows = [[name, f"{tok:,}", " ".join(f"{s:.1f}" for s in times[name]), f"{max(rates[name]):,.0f}"]
            for name, tok in (("values", cost.kept_tokens), ("rollout", plain_tokens))]
    print(markdown_table(["side", "generated tokens", "seconds per round", "best tokens/s"], rows))
    print(f"values / rollout tokens per second: {ratio_text(ratio)} (geometric mean of {args.rounds} rounds, 95% t)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
