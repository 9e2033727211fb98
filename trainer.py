"""The one training loop: rollout -> rewards -> advantages -> token weights -> loss -> step, with logging
(TensorBoard, metrics.jsonl, the credit logger), evaluation, checkpoints and resume.

Front ends (`train.py`, `train_mitigations.py`) only build a `Config` and call `train(config)`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import countdown_task as task
import grpo
from checkpoint import latest_checkpoint, load_training_state, read_checkpoint, save_checkpoint
from config import Config
from credit_logger import CreditLogger, step_files
from data_types import Episode
from fileio import atomic_write_text
from grpo_mitigations import TokenWeighter, build_weighter, weighter_params
from optimizer import build_optimizer
from qwen2_model import Transformer
from tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a NaN/Inf loss or gradient."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={name!r} but CUDA is not available; use model.device=cpu (or auto)")
    return device


# ============================================================================ data


class QuestionSampler:
    """Deterministic question order: a fresh seeded permutation of the training set each epoch.
    Its whole state is (epoch, position), so a resumed run draws exactly the questions it would have."""

    def __init__(self, num_items: int, seed: int):
        self.num_items, self.seed, self.epoch, self.pos = num_items, seed, 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_items)

    def next(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.num_items:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(k - len(out), self.num_items - self.pos)
            out.extend(int(i) for i in self._order[self.pos: self.pos + take])
            self.pos += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


def prepare_data(config: Config) -> tuple[list[task.CountdownProblem], list[task.CountdownProblem]]:
    """Load the Countdown dataset (generating it first when configured and missing) and split it."""
    d = config.data
    path = Path(d.path)
    if not path.exists() and d.generate_if_missing > 0:
        print(f"[data] {path} is missing: generating {d.generate_if_missing} solvable Countdown problems there")
        problems = task.generate_problems(d.generate_if_missing, num_numbers=tuple(d.generate_num_numbers),
                                          seed=d.generate_seed)
        task.write_countdown_dataset(problems, path)
    problems = task.load_countdown_dataset(path)
    test_size = int(d.test_size) if d.test_size >= 1 else d.test_size
    return task.split_dataset(problems, test_size)


def load_policy(config: Config, device: torch.device, train_set: Sequence[task.CountdownProblem],
                checkpoint_dir: Path | None = None) -> tuple[Transformer, Tokenizer]:
    """The policy and its tokenizer: from a training checkpoint when resuming, else from `model.path`
    (building the built-in tiny model there first if asked and missing)."""
    path = Path(config.model.path) if checkpoint_dir is None else checkpoint_dir
    if checkpoint_dir is None and config.model.build_tiny and not (path / "config.json").is_file():
        import tiny_model  # only needed for the built-in default

        tiny_model.build_tiny_model(config, path, list(train_set))
    model = Transformer.from_pretrained(path, device=device, dtype=DTYPES[config.model.dtype])
    model.gradient_checkpointing = config.model.gradient_checkpointing
    return model, Tokenizer(path)


def reward_for(problem: task.CountdownProblem, text: str) -> dict:
    return task.reward_function(text, problem.numbers, problem.target)


def teacher_episodes(problems: Sequence[task.CountdownProblem], prompts: Sequence[str], tokenizer: Tokenizer,
                     cache: dict) -> list[Episode]:
    """Solver traces as completions (teacher forcing + RL): one per question that has a solution."""
    out = []
    for q, (problem, prompt) in enumerate(zip(problems, prompts)):
        if problem not in cache:
            solution = task.solve(problem.numbers, problem.target)
            cache[problem] = None if solution is None else task.format_trace(solution)
        if cache[problem] is None:
            continue
        ids = tokenizer.encode(cache[problem]) + [tokenizer.eos_token_id]
        out.append(Episode(prompt=prompt, prompt_token_ids=tokenizer.encode(prompt), generated_token_ids=ids,
                           text=cache[problem], reward=1.1, reward_info={}, finished=True, group_idx=q))
    return out


# ============================================================================ evaluation


@torch.no_grad()
def evaluate(model: Transformer, tokenizer: Tokenizer, problems: Sequence[task.CountdownProblem],
             config: Config, device: torch.device, name: str = "eval") -> dict[str, float]:
    """Success rate on a fixed problem set, one sample per problem, with the same sampling noise every time.
    Keys are `success_rate/{name}`, `format_reward/{name}`, ... and `success_rate/{name}_{k}num` per size."""
    e, t = config.eval, config.training
    temperature = t.temperature if e.temperature is None else e.temperature
    generator = torch.Generator(device=device).manual_seed(e.seed)
    prompts = [task.build_prompt(p, config.data.prompt_style) for p in problems]
    episodes = []
    model.eval()
    for start in range(0, len(problems), e.batch_size):
        episodes += grpo.rollout(model, tokenizer, problems[start: start + e.batch_size],
                                 prompts[start: start + e.batch_size], reward_for, 1, t.max_new_tokens,
                                 temperature, t.top_p, generator)
    solved = np.array([ep.reward_info["answer_reward"] == 1.0 for ep in episodes], dtype=float)
    sizes = np.array([len(p.numbers) for p in problems])
    out = {
        f"success_rate/{name}": float(solved.mean()),
        f"format_reward/{name}": float(np.mean([ep.reward_info["format_reward"] for ep in episodes])),
        f"response_length/{name}": float(np.mean([len(ep.generated_token_ids) for ep in episodes])),
    }
    for k in sorted(set(sizes.tolist())):  # 3- and 4-number problems separately
        out[f"success_rate/{name}_{k}num"] = float(solved[sizes == k].mean())
    return out


def evaluate_all(model: Transformer, tokenizer: Tokenizer, eval_sets: dict[str, Sequence[task.CountdownProblem]],
                 config: Config, device: torch.device) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, problems in eval_sets.items():
        out.update(evaluate(model, tokenizer, problems, config, device, name))
    return out


# ============================================================================ logging


class MetricsLog:
    """metrics.jsonl (one JSON object per step, rewritten atomically) and TensorBoard scalars/text."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = log_dir / "metrics.jsonl"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():  # drop steps the resumed run will redo
                try:
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        self.lines.append(line)
                except json.JSONDecodeError:
                    pass
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self.lines.append(json.dumps({"step": step, **clean}))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n", "metrics.jsonl")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


@contextmanager
def stop_on_signals() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and exits. A second SIGINT aborts."""
    flag = {"stop": False}
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        if flag["stop"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["stop"] = True
        print(f"\n[signal] {signal.Signals(signum).name} received: finishing this step, then saving a checkpoint")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: no handlers, the loop still runs
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ============================================================================ the loop


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    stopped_by_signal: bool = False


def zero_variance(rewards: torch.Tensor) -> torch.Tensor:
    """[num_groups] bool: groups whose answers all scored the same (no group-relative signal)."""
    return rewards.double().std(-1, unbiased=False) < 1e-12


def shape_rewards(episodes: Sequence[Episode], config: Config) -> None:
    """DAPO's overlong penalty, added to each episode's reward (reward_info keeps the penalty)."""
    a, t = config.algorithm, config.training
    if a.overlong_buffer_len <= 0:
        return
    lengths = torch.tensor([len(e.generated_token_ids) for e in episodes])
    penalty = grpo.overlong_penalty(lengths, t.max_new_tokens, a.overlong_buffer_len, a.overlong_penalty)
    for e, p in zip(episodes, penalty.tolist()):
        e.reward += p
        e.reward_info["overlong_penalty"] = p


def collect_groups(model: Transformer, tokenizer: Tokenizer, train_set: Sequence, sampler: QuestionSampler,
                   config: Config, generator: torch.Generator) -> tuple[list[Episode], torch.Tensor, dict[str, float]]:
    """Roll out one batch of groups: (episodes group-major, rewards [groups, G], sampling metrics).

    With `algorithm.dynamic_sampling` (DAPO) zero-variance groups are dropped and more questions are rolled
    out until `num_questions_per_batch` informative groups are held or `max_sampling_rounds` is reached.
    """
    t, a = config.training, config.algorithm
    g, want = t.num_answers_per_question, t.num_questions_per_batch
    episodes: list[Episode] = []
    rounds, drawn, zero_var = 0, 0, 0
    while True:
        rounds += 1
        problems = [train_set[i] for i in sampler.next(want)]
        prompts = [task.build_prompt(p, config.data.prompt_style) for p in problems]
        new = grpo.rollout(model, tokenizer, problems, prompts, reward_for, g, t.max_new_tokens,
                           t.temperature, t.top_p, generator, progress=True)
        shape_rewards(new, config)
        rewards = torch.tensor([e.reward for e in new], dtype=torch.float64).view(-1, g)
        flat = zero_variance(rewards)
        drawn, zero_var = drawn + len(problems), zero_var + int(flat.sum())
        if not a.dynamic_sampling:
            episodes = new
            break
        episodes += [e for q in range(len(problems)) if not flat[q] for e in new[q * g:(q + 1) * g]]
        if len(episodes) >= want * g or rounds >= a.max_sampling_rounds:
            break
    episodes = episodes[: want * g]
    metrics = {"groups/zero_variance_frac": zero_var / drawn}
    if a.dynamic_sampling:
        metrics.update({"sampling/rounds": float(rounds), "sampling/informative_groups": len(episodes) / g})
        if len(episodes) < want * g:
            print(f"[dynamic sampling] only {len(episodes) // g}/{want} informative groups after {rounds} rounds "
                  f"(algorithm.max_sampling_rounds); training on those")
    rewards = torch.tensor([e.reward for e in episodes], dtype=torch.float64).view(-1, g)
    return episodes, rewards, metrics


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def _step_metrics(episodes: Sequence[Episode], kept: Sequence[Episode], advantages: torch.Tensor) -> dict[str, float]:
    rewards = [e.reward for e in episodes]
    m = {
        "reward/mean": _mean(rewards),
        "reward/std": float(np.std(rewards)) if rewards else 0.0,
        "success_rate/train": _mean([e.reward_info["answer_reward"] == 1.0 for e in episodes]),
        "format_reward/train": _mean([e.reward_info["format_reward"] for e in episodes]),
        "response_length": _mean([len(e.generated_token_ids) for e in episodes]),
        "finished_frac": _mean([e.finished for e in episodes]),
        "groups_kept": float(len(kept) / max(len(episodes), 1)),
    }
    if advantages.numel():
        m.update(grpo.advantage_stats(advantages))
    return m


def train(config: Config, resume: str | bool | None = None) -> TrainResult:
    """Run GRPO as configured. `resume`: True = the newest checkpoint in training.ckpt_dir, a path = that one."""
    t, a, m = config.training, config.algorithm, config.mitigation
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)

    resume_path = None
    if resume:
        resume_path = latest_checkpoint(t.ckpt_dir) if resume is True else Path(resume)
        if resume_path is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {t.ckpt_dir}")
        if not resume_path.is_dir():
            raise FileNotFoundError(f"--resume: {resume_path} is not a checkpoint directory")
    elif latest_checkpoint(t.ckpt_dir) is not None or (config.credit.enabled and step_files(config.credit.dir)):
        # a fresh run would interleave its checkpoints and credit logs with the old run's
        raise FileExistsError(
            f"{t.ckpt_dir} or {config.credit.dir} already holds a run. Continue it with --resume, or start a new "
            f"one elsewhere (training.ckpt_dir=..., training.log_dir=..., credit.dir=...) or after removing them.")

    device = resolve_device(config.model.device)
    train_set, test_set = prepare_data(config)
    model, tokenizer = load_policy(config, device, train_set, resume_path)
    model_dir = Path(config.model.path)
    ref_model = None
    if a.beta > 0:  # the frozen initial policy
        ref_model = Transformer.from_pretrained(model_dir, device=device, dtype=DTYPES[config.model.dtype])
        ref_model.requires_grad_(False).eval()
    weighter: TokenWeighter = build_weighter(
        m.name, hidden_size=model.config.hidden_size, device=device,
        **{k: getattr(m, k) for k in weighter_params()})
    param_groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if weighter.parameters():
        param_groups.append({"params": weighter.parameters(), "lr": m.attribution_lr or t.learning_rate})
    optimizer = build_optimizer(param_groups, t.optimizer, lr=t.learning_rate, betas=tuple(t.betas),
                                eps=t.adam_eps, weight_decay=t.weight_decay)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    generator = torch.Generator(device=device).manual_seed(t.seed)
    sampler = QuestionSampler(len(train_set), t.seed)
    credit = CreditLogger(config.credit.dir, config.credit.credit_save_interval, m.name) if config.credit.enabled else None

    start_step = 0
    if resume_path is not None:
        state = read_checkpoint(resume_path)
        extras = load_training_state(resume_path, optimizer, generator)
        if "attribution_head" in extras:
            weighter.load_state_dict(extras["attribution_head"])
        sampler.load_state_dict(state.trainer_state["sampler"])
        if credit is not None and "credit" in state.trainer_state:
            credit.load_state_dict(state.trainer_state["credit"], state.step)
        start_step = state.step
        print(f"[resume] continuing from {resume_path} at step {start_step}")

    log_dir = Path(t.log_dir)
    metrics_log = MetricsLog(log_dir, start_step if resume_path is not None else None)
    (log_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    update_cfg = grpo.UpdateConfig(
        micro_batch_size=t.micro_batch_size, loss_agg_mode=a.loss_agg_mode, max_len=t.max_new_tokens,
        max_grad_norm=t.max_grad_norm, policy_loss=a.policy_loss, old_log_probs=a.old_log_probs,
        num_iterations=a.num_iterations, epsilon_low=a.epsilon_low, epsilon_high=a.epsilon_high,
        clip_ratio_c=a.clip_ratio_c, beta=a.beta, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
        teacher_forcing_coef=a.teacher_forcing_coef, pad_token_id=tokenizer.pad_token_id, progress=True)
    eval_sets = {"eval": test_set[: config.eval.num_problems]}
    if config.eval.transfer_num_numbers:
        eval_sets["transfer"] = task.generate_problems(config.eval.transfer_problems, seed=config.eval.seed,
                                                       num_numbers=tuple(config.eval.transfer_num_numbers))
    trace_cache: dict = {}
    nonfinite_in_a_row = 0
    last_ckpt: Path | None = None
    metrics: dict[str, float] = {}

    def checkpoint(step: int) -> Path:
        if credit is not None:
            credit.flush(step)
        trainer_state = {"sampler": sampler.state_dict(), "tau": grpo.tau_at_step(
            step, t.max_steps, a.tau_schedule, a.tau, a.tau_start, a.tau_end)}
        if credit is not None:
            trainer_state["credit"] = credit.state_dict()
        return save_checkpoint(t.ckpt_dir, step, model, optimizer, trainer_state, generator,
                               tokenizer_dir=resume_path or model_dir, extra_tensors={"attribution_head": weighter.state_dict()},
                               keep_last_n=t.keep_last_n)

    if start_step == 0:
        metrics = evaluate_all(model, tokenizer, eval_sets, config, device)
        metrics_log.log(0, metrics)
        print(f"[eval] step 0: success {metrics['success_rate/eval']:.3f}"
              + (f", transfer {metrics['success_rate/transfer']:.3f}" if "transfer" in eval_sets else ""))

    step = start_step
    with stop_on_signals() as stop:
        while step < t.max_steps and not stop["stop"]:
            step += 1
            t0 = time.perf_counter()
            model.eval()
            episodes, rewards, metrics = collect_groups(model, tokenizer, train_set, sampler, config, generator)
            t_rollout = time.perf_counter() - t0
            g = t.num_answers_per_question
            top_k = a.rollout_filter_value if a.rollout_filter == "top_k" else None
            keep = grpo.select_groups(rewards, top_k, drop_zero_std=a.zero_variance_groups == "drop")
            tau = grpo.tau_at_step(step, t.max_steps, a.tau_schedule, a.tau, a.tau_start, a.tau_end)
            advantages = torch.zeros(0, g)
            kept: list[Episode] = []
            if len(keep):
                advantages = grpo.compute_advantages(rewards[keep], a.adv_estimator, eps=a.adv_eps, tau=tau,
                                                     soft_reweight=a.soft_reweight, reweight_eps=a.soft_reweight_eps)
                kept = [episodes[int(q) * g + j] for q in keep for j in range(g)]
            flat_adv = advantages.reshape(-1)
            if t.skip_unfinished_episodes:
                use = [i for i, e in enumerate(kept) if e.finished]
                kept, flat_adv = [kept[i] for i in use], flat_adv[use]
            metrics.update(_step_metrics(episodes, kept, advantages))
            metrics["tau"] = tau
            problems = [episodes[q * g].problem for q in range(len(episodes) // g)]
            prompts = [episodes[q * g].prompt for q in range(len(episodes) // g)]

            warm = min(1.0, step / t.lr_warmup_steps) if t.lr_warmup_steps else 1.0
            for group, base in zip(optimizer.param_groups, base_lrs):  # a function of the step: resumes exactly
                group["lr"] = base * warm
            metrics["lr"] = t.learning_rate * warm
            if kept:
                teachers = (teacher_episodes(problems, prompts, tokenizer, trace_cache)
                            if a.teacher_forcing_coef > 0 else [])
                stats = grpo.update_policy(model, optimizer, kept, flat_adv, update_cfg, weighter, ref_model,
                                           weighter.parameters(), teachers)
                metrics.update(stats.metrics)
                if stats.skipped:
                    nonfinite_in_a_row += 1
                    print(f"[warn] step {step}: non-finite loss/gradient (loss={stats.metrics.get('loss')}, "
                          f"grad_norm={stats.metrics.get('grad_norm')}); update skipped "
                          f"({nonfinite_in_a_row}/{t.max_nonfinite_steps} in a row)")
                    metrics["nonfinite_skipped"] = 1.0
                    if nonfinite_in_a_row >= t.max_nonfinite_steps:
                        metrics_log.log(step, metrics)
                        metrics_log.close()
                        where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                        raise NonFiniteError(
                            f"{nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient "
                            f"(step {step}){where}. Lower training.learning_rate, check the mitigation's weights, "
                            f"or raise training.max_nonfinite_steps.")
                else:
                    nonfinite_in_a_row = 0
                    if credit is not None:
                        credit.log_step(step, kept, flat_adv.tolist(), stats)
            else:
                metrics["update_skipped_no_groups"] = 1.0

            duration = time.perf_counter() - t0
            n_tokens = sum(len(e.generated_token_ids) for e in episodes)
            metrics.update({"duration/step": duration, "duration/rollout": t_rollout,
                            "tokens_per_s": n_tokens / max(t_rollout, 1e-9)})
            if step % t.eval_interval == 0 or step == t.max_steps:
                metrics.update(evaluate_all(model, tokenizer, eval_sets, config, device))
            metrics_log.log(step, metrics)
            for k, e in enumerate(episodes[: t.log_samples]):
                metrics_log.text(f"sample/{k}", f"reward {e.reward:.2f}\n\n{e.prompt}{e.text}", step)
            line = (f"step {step}/{t.max_steps} | reward {metrics['reward/mean']:.3f} | "
                    f"success {metrics['success_rate/train']:.3f} | loss {metrics.get('loss', float('nan')):.4f} | "
                    f"grad {metrics.get('grad_norm', float('nan')):.3f} | len {metrics['response_length']:.1f} | "
                    f"{duration:.1f}s")
            if "success_rate/eval" in metrics:
                line += f" | eval {metrics['success_rate/eval']:.3f}"
            if "success_rate/transfer" in metrics:
                line += f" | transfer {metrics['success_rate/transfer']:.3f}"
            print(line, flush=True)
            if step % t.ckpt_save_interval == 0 or step == t.max_steps or stop["stop"]:
                last_ckpt = checkpoint(step)

    if credit is not None and not stop["stop"]:
        credit.finalize()
    metrics_log.close()
    if stop["stop"]:
        print(f"[signal] stopped after step {step}; checkpoint {last_ckpt}. "
              f"Resume with: python train.py --config <your config> --resume")
    return TrainResult(step=step, metrics=metrics, checkpoint=last_ckpt, stopped_by_signal=stop["stop"])
