"""The one training loop: rollout -> rewards -> advantages -> token weights -> loss -> step, with logging
(TensorBoard, metrics.jsonl, the credit logger), evaluation, checkpoints and resume.

Front ends (`train.py`, `train_mitigations.py`, `run_experiment.py`) only build a `Config` (parts.load_config)
and call `train(config)`. `setup` builds a `Run`; each step then calls into one room at a time, handing it what
it needs: the rollout (`collect_groups`, rollout.py), the task (`inject_references`), under
`adv_estimator: vine` the Monte-Carlo values (`vine.token_advantages`), the algorithm
(`select_and_advantage`, grpo.py), the update (`apply_update`, update.py), then evaluation and the logs.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import credit_values as cv
import distributed
import grpo
import rollout
import update
import vine
from checkpoint import latest_checkpoint, load_training_state, read_checkpoint, save_checkpoint
from config import Config, TrainingSettings
from credit_logger import CreditLogger, step_files
from data_types import Episode
from distributed import Dist
from grpo_mitigations import WEIGHTERS, TokenWeighter, build_weighter
from metrics_log import MetricsLog, NullLog
from optimizer import build_optimizer
from qwen2_model import DTYPES, Transformer
from rollout import RolloutEngine, stream_key
from tasks import Task, build_task
from tokenizer import Tokenizer


class NonFiniteError(RuntimeError):
    """Too many consecutive updates with a NaN/Inf loss or gradient."""


class DeviceError(RuntimeError):
    """The config asks for a device this machine does not have."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"model.device={name!r} but CUDA is not available; use model.device=cpu (or auto)")
    return device


# ============================================================================ data and model


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


def load_policy(config: Config, device: torch.device, task: Task, train_set: Sequence[Any],
                checkpoint_dir: Path | None = None) -> tuple[Transformer, Tokenizer]:
    """The policy and its tokenizer: from a training checkpoint when resuming, else from `model.path`
    (the task's built-in model is built there first if asked and missing)."""
    path = task.model_path(train_set) if checkpoint_dir is None else checkpoint_dir
    model = Transformer.from_pretrained(path, device=device, dtype=DTYPES[config.model.dtype])
    model.gradient_checkpointing = config.model.gradient_checkpointing
    if config.model.compile_update:
        model.compile_update()
    return model, Tokenizer(path)


# ============================================================================ the run


@dataclass
class Run:
    """Everything one training run carries from step to step (`setup` builds it)."""

    config: Config
    task: Task
    device: torch.device  # this rank's
    train_set: list[Any]
    eval_sets: dict[str, list[Any]]  # by name: "eval" (the held-out split) and the task's extra sets
    model: Transformer
    tokenizer: Tokenizer
    engine: RolloutEngine  # the rollout engine, its KV cache reused across rollouts
    sampler: QuestionSampler
    optimizer: torch.optim.Optimizer
    weighter: TokenWeighter
    update_settings: update.UpdateSettings
    objective: update.Objective
    metrics_log: MetricsLog
    tokenizer_dir: Path  # copied into every checkpoint
    train_model: torch.nn.Module  # what the update calls: the model, or DDP / FSDP2 around it
    ref_model: Transformer | None = None  # the frozen initial policy, for the KL term
    credit: CreditLogger | None = None
    dist: Dist = field(default_factory=Dist)  # this process's rank under torchrun (world size 1 otherwise)
    base_lrs: list[float] = field(default_factory=list)  # each parameter group's learning rate before warm-up
    start_step: int = 0
    reference_cache: dict = field(default_factory=dict)  # the task's reference completion of each problem
    nonfinite_in_a_row: int = 0
    last_ckpt: Path | None = None


def resolve_resume(config: Config, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run (which must not overwrite an existing one)."""
    t = config.training
    if resume:
        path = latest_checkpoint(t.ckpt_dir) if resume is True else Path(resume)
        if path is None:
            raise FileNotFoundError(f"--resume: no checkpoint found in {t.ckpt_dir}")
        if not path.is_dir():
            raise FileNotFoundError(f"--resume: {path} is not a checkpoint directory")
        return path
    if latest_checkpoint(t.ckpt_dir) is not None or (config.credit.enabled and step_files(config.credit.dir)):
        # a fresh run would interleave its checkpoints and credit logs with the old run's
        raise FileExistsError(
            f"{t.ckpt_dir} or {config.credit.dir} already holds a run. Continue it with --resume, or start a new "
            f"one elsewhere (training.ckpt_dir=..., training.log_dir=..., credit.dir=...) or after removing them.")
    return None


def _seed_everything(t: TrainingSettings) -> None:
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)
    np.random.seed(t.seed % 2**32)


def _optimizer(model: Transformer, weighter: TokenWeighter, t: TrainingSettings) -> torch.optim.Optimizer:
    """AdamW over the policy and, in a group of its own, a learned weighter's parameters."""
    groups: list[dict] = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if weighter.parameters():
        groups.append({"params": weighter.parameters(), "lr": weighter.learning_rate or t.learning_rate})
    return build_optimizer(groups, t.optimizer, lr=t.learning_rate, betas=tuple(t.betas), eps=t.adam_eps,
                           weight_decay=t.weight_decay)


def setup(config: Config, resume: str | bool | None) -> Run:
    """Data, model, weighter, optimizer, logging; restored from a checkpoint when resuming."""
    t = config.training
    vine.check_vine(config)
    _seed_everything(t)
    device = resolve_device(config.model.device)
    dist = distributed.init(device, config.distributed.strategy)
    device = distributed.local_device(device, dist)
    resume_path = resolve_resume(config, resume)
    task = build_task(config)
    with distributed.main_first(dist):  # rank 0 generates data / builds the tiny model, the others load them
        train_set, test_set = task.load()
        # under FSDP2 the whole model goes to the CPU first; fully_shard then moves each layer's shard to this
        # rank's GPU, so a model that does not fit one GPU never has to
        model, tokenizer = load_policy(config, torch.device("cpu") if dist.fsdp else device, task, train_set,
                                       resume_path)
    train_model = distributed.wrap(model, dist, device)  # FSDP2 shards in place: build the optimizer after
    ref_model = None
    if config.algorithm.beta > 0:  # the frozen initial policy
        ref_model = Transformer.from_pretrained(config.model.path, device=device, dtype=DTYPES[config.model.dtype])
        ref_model.requires_grad_(False).eval()
    weighter = build_weighter(config.mitigation.name, hidden_size=model.config.hidden_size, device=device,
                              **WEIGHTERS.values(config.mitigation.name, config))
    optimizer = _optimizer(model, weighter, t)
    run = Run(
        config=config, task=task, device=device, train_set=train_set,
        eval_sets={"eval": test_set[: config.eval.num_problems], **task.extra_eval_sets()},
        model=model, tokenizer=tokenizer,
        engine=RolloutEngine(model, compile=config.model.compile_decode,
                             keep_cache=not config.model.release_rollout_cache),
        sampler=QuestionSampler(len(train_set), t.seed), optimizer=optimizer, weighter=weighter,
        update_settings=update.UpdateSettings.from_config(config, tokenizer.pad_token_id),
        objective=grpo.configured_objective(config), metrics_log=NullLog(),
        tokenizer_dir=resume_path or Path(config.model.path), train_model=train_model, ref_model=ref_model,
        credit=(CreditLogger(config.credit.dir, config.credit.credit_save_interval, config.mitigation.name)
                if config.credit.enabled and dist.is_main else None),  # rank 0 logs the gathered tokens
        dist=dist, base_lrs=[g["lr"] for g in optimizer.param_groups])
    if resume_path is not None:
        _restore(run, resume_path)
    if dist.is_main:  # rank 0 writes TensorBoard and metrics.jsonl
        run.metrics_log = MetricsLog(Path(t.log_dir), run.start_step if resume_path is not None else None)
        (Path(t.log_dir) / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return run


def _restore(run: Run, path: Path) -> None:
    state = read_checkpoint(path)
    files = load_training_state(path, run.optimizer,
                                distributed.load_full_optimizer_state if run.dist.fsdp else None)
    run.weighter.load_checkpoint_state(files)
    run.sampler.load_state_dict(state.trainer_state["sampler"])
    if run.credit is not None and "credit" in state.trainer_state:
        run.credit.load_state_dict(state.trainer_state["credit"], state.step)
    run.start_step = state.step
    if run.dist.is_main:
        print(f"[resume] continuing from {path} at step {run.start_step}")


def save(run: Run, step: int) -> Path:
    """Rank 0 writes the checkpoint; under FSDP2 every rank first helps gather the full weights and optimizer
    state, so the checkpoint is the single-process layout and resumes on any number of ranks."""
    t = run.config.training
    model_state = optimizer_state = None
    if run.dist.fsdp:
        model_state = distributed.full_model_state(run.model, run.dist)
        optimizer_state = distributed.full_optimizer_state(run.optimizer, run.dist)
    run.last_ckpt = Path(t.ckpt_dir) / f"step_{step:06d}"
    if run.dist.is_main:
        _write_checkpoint(run, step, model_state, optimizer_state)
    distributed.barrier(run.dist)
    return run.last_ckpt


def _write_checkpoint(run: Run, step: int, model_state: dict | None, optimizer_state: dict | None) -> None:
    t, a = run.config.training, run.config.algorithm
    if run.credit is not None:
        run.credit.flush(step)
    trainer_state = {"sampler": run.sampler.state_dict(),
                     "tau": grpo.tau_at_step(step, t.max_steps, a.tau_schedule, a.tau, a.tau_start, a.tau_end)}
    if run.credit is not None:
        trainer_state["credit"] = run.credit.state_dict()
    run.last_ckpt = save_checkpoint(t.ckpt_dir, step, run.model, run.optimizer, trainer_state,
                                    tokenizer_dir=run.tokenizer_dir, extra_tensors=run.weighter.checkpoint_state(),
                                    keep_last_n=t.keep_last_n, model_state=model_state,
                                    optimizer_state=optimizer_state)
    # the next save copies the tokenizer from here: a resumed run's source checkpoint may since be pruned
    run.tokenizer_dir = run.last_ckpt


# ============================================================================ rollouts and evaluation


def sharded_rollout(model: Transformer, dist: Dist, problems: Sequence[Any], prompts: Sequence[str],
                    question_ids: Sequence[int], **kwargs: Any) -> list[Episode]:
    """`rollout.rollout` of this rank's contiguous shard of the questions, gathered in rank order: every rank
    gets exactly what one process would have sampled (the noise is keyed by question id, not batch position)."""
    part = distributed.shard(len(problems), dist)
    with distributed.full_weights(model, dist):
        mine = rollout.rollout(model, problems=[problems[i] for i in part], prompts=[prompts[i] for i in part],
                               question_ids=[question_ids[i] for i in part], **kwargs)
    return distributed.gather(mine, dist)


@torch.no_grad()
def evaluate(run: Run, name: str, problems: Sequence[Any]) -> dict[str, float]:
    """Success rate on a fixed problem set, one sample per problem, with the same sampling noise every time.
    Keys are `success_rate/{name}`, `format_reward/{name}`, ... and `success_rate/{name}_{group}` per the
    task's eval groups (e.g. 3- and 4-number Countdown problems)."""
    e, t, task = run.config.eval, run.config.training, run.task
    temperature = t.temperature if e.temperature is None else e.temperature
    run.model.eval()  # the same noise at every evaluation: keyed by (eval seed, set name, problem index)
    episodes = sharded_rollout(run.model, run.dist, problems, [task.prompt(p) for p in problems], range(len(problems)),
                               tokenizer=run.tokenizer, reward_fn=task.reward, num_answers_per_question=1,
                               max_new_tokens=t.max_new_tokens, temperature=temperature, top_p=t.top_p,
                               batch_size=e.batch_size, stream=stream_key(e.seed, *name.encode()),
                               engine=run.engine, answer_tag=task.answer_tag)
    solved = np.array([ep.solved for ep in episodes], dtype=float)
    out = {
        f"success_rate/{name}": float(solved.mean()),
        f"format_reward/{name}": float(np.mean([ep.format_reward for ep in episodes])),
        f"response_length/{name}": float(np.mean([len(ep.generated_token_ids) for ep in episodes])),
    }
    groups = np.array([task.eval_group(p) or "" for p in problems])
    for label in sorted(set(groups.tolist()) - {""}):
        out[f"success_rate/{name}_{label}"] = float(solved[groups == label].mean())
    return out


def evaluate_all(run: Run) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, problems in run.eval_sets.items():
        out.update(evaluate(run, name, problems))
    return out


# ============================================================================ one step, room by room


def group_rewards(episodes: Sequence[Episode], g: int) -> torch.Tensor:
    return torch.tensor([e.reward for e in episodes], dtype=torch.float64).view(-1, g)


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


def collect_groups(run: Run, step: int) -> tuple[list[Episode], dict[str, float]]:
    """Roll out one batch of groups (episodes group-major) and the sampling metrics.

    With `algorithm.dynamic_sampling` (DAPO) zero-variance groups are dropped and more questions are rolled
    out until `num_questions_per_batch` informative groups are held or `max_sampling_rounds` is reached.
    """
    t, a = run.config.training, run.config.algorithm
    g, want = t.num_answers_per_question, t.num_questions_per_batch
    episodes: list[Episode] = []
    rounds = drawn = zero_var = 0
    while True:
        rounds += 1
        idx = run.sampler.next(want)
        problems = [run.train_set[i] for i in idx]
        # noise keyed by (seed, step, round, question, sample): independent of batching and sharding
        new = sharded_rollout(run.model, run.dist, problems, [run.task.prompt(p) for p in problems], idx,
                              tokenizer=run.tokenizer, reward_fn=run.task.reward, num_answers_per_question=g,
                              max_new_tokens=t.max_new_tokens, temperature=t.temperature, top_p=t.top_p,
                              batch_size=t.rollout_batch_size, stream=stream_key(t.seed, step, rounds),
                              engine=run.engine, answer_tag=run.task.answer_tag)
        shape_rewards(new, run.config)
        flat = grpo.zero_variance(group_rewards(new, g))
        drawn, zero_var = drawn + len(problems), zero_var + int(flat.sum())
        if not a.dynamic_sampling:
            episodes = new
            break
        episodes += [e for q in range(len(problems)) if not flat[q] for e in new[q * g:(q + 1) * g]]
        if len(episodes) >= want * g or rounds >= a.max_sampling_rounds:
            break
    episodes = episodes[: want * g]
    for i, e in enumerate(episodes):
        e.group_idx = i // g
    metrics = {"groups/zero_variance_frac": zero_var / drawn}
    if a.dynamic_sampling:
        metrics.update({"sampling/rounds": float(rounds), "sampling/informative_groups": len(episodes) / g})
        if len(episodes) < want * g and run.dist.is_main:
            print(f"[dynamic sampling] only {len(episodes) // g}/{want} informative groups after {rounds} rounds "
                  f"(algorithm.max_sampling_rounds); training on those")
    return episodes, metrics


def reference_episode(task: Task, tokenizer: Tokenizer, problem: Any, prompt: str, group_idx: int,
                      cache: dict) -> Episode | None:
    """The task's reference completion as an episode scored by the task's reward; None when the task has no
    solution for it. Solver results are cached per problem."""
    if problem not in cache:
        cache[problem] = task.reference_completion(problem)
    text = cache[problem]
    if text is None:
        return None
    return rollout.reference_episode(tokenizer, problem, prompt, text, task.reward(problem, text), group_idx,
                                     task.answer_tag)


def inject_references(task: Task, tokenizer: Tokenizer, episodes: list[Episode], group_size: int,
                      cache: dict) -> dict[str, float]:
    """Teacher forcing into groups: the last sample of each group becomes the task's reference completion
    (scored by the task), so no group is all-wrong. Logs how often it was the group's only correct answer."""
    g = group_size
    injected = only = 0
    for q in range(len(episodes) // g):
        last = episodes[(q + 1) * g - 1]
        ref = reference_episode(task, tokenizer, last.problem, last.prompt, q, cache)
        if ref is None:
            continue
        episodes[(q + 1) * g - 1] = ref
        injected += 1
        only += int(ref.solved and not any(e.solved for e in episodes[q * g:(q + 1) * g - 1]))
    return {"injection/groups": float(injected), "injection/only_correct_frac": only / max(injected, 1)}


# ============================================================================ filtering and advantages


def select_and_advantage(config: Config, episodes: list[Episode], step: int,
                         token_advantages: Sequence[np.ndarray] | None = None
                         ) -> tuple[list[Episode], update.Advantages, torch.Tensor, float]:
    """Group filtering, then advantages: (kept episodes, their advantages, [groups, G] advantages, tau).

    `token_advantages` (vine): every episode's per-token advantages. The filters read their spread instead of
    the rewards' (vine.token_advantage_spread); the kept groups' advantages, whitened over their tokens when
    `algorithm.vine_whiten` (credit_values.whiten), are the kept episodes' (a list of per-token tensors), and
    the [groups, G] matrix holds each episode's mean token advantage."""
    t, a = config.training, config.algorithm
    g = t.num_answers_per_question
    rewards = group_rewards(episodes, g)
    top_k = a.rollout_filter_value if a.rollout_filter == "top_k" else None
    drop = a.zero_variance_groups == "drop"
    if token_advantages is None:
        keep = grpo.select_groups(rewards, top_k, drop_zero_std=drop)
    else:
        keep = vine.select_by_spread(vine.token_advantage_spread(token_advantages, g), top_k, drop)
    index = [int(q) * g + j for q in keep for j in range(g)]
    kept = [episodes[i] for i in index]
    tau = grpo.tau_at_step(step, t.max_steps, a.tau_schedule, a.tau, a.tau_start, a.tau_end)
    if token_advantages is not None:
        kept_adv = [token_advantages[i] for i in index]
        kept_adv = cv.whiten(kept_adv) if a.vine_whiten else kept_adv
        per_token = [torch.tensor(r, dtype=torch.float32) for r in kept_adv]
        advantages = torch.tensor([episode_mean(r) for r in per_token], dtype=torch.float32).view(-1, g)
    elif len(keep):
        advantages, tau = grpo.step_advantages(rewards[keep], config, step)
    else:
        advantages = torch.zeros(0, g)
    use = [i for i, e in enumerate(kept) if e.finished or not t.skip_unfinished_episodes]
    kept = [kept[i] for i in use]
    flat = [per_token[i] for i in use] if token_advantages is not None else advantages.reshape(-1)[use]
    return kept, flat, advantages, tau


def episode_mean(advantages: torch.Tensor | Sequence[float]) -> float:
    """One episode's advantage: its scalar, or the mean of its token advantages (what a weighter and the credit
    logger see under vine)."""
    row = torch.as_tensor(advantages, dtype=torch.float64)
    return float(row.mean()) if row.numel() else 0.0


def apply_update(run: Run, step: int, episodes: list[Episode], kept: list[Episode], flat_adv: update.Advantages
                 ) -> dict[str, float]:
    """The policy update with the step's learning rate; non-finite updates are skipped, then abort the run."""
    t, a = run.config.training, run.config.algorithm
    warm = min(1.0, step / t.lr_warmup_steps) if t.lr_warmup_steps else 1.0
    for group, base in zip(run.optimizer.param_groups, run.base_lrs):  # a function of the step: resumes exactly
        group["lr"] = base * warm
    metrics = {"lr": t.learning_rate * warm}
    if not kept:
        return {**metrics, "update_skipped_no_groups": 1.0}
    g = t.num_answers_per_question
    teachers = []
    if a.teacher_forcing_coef > 0:
        heads = [episodes[q * g] for q in range(len(episodes) // g)]
        teachers = [r for q, e in enumerate(heads)
                    if (r := reference_episode(run.task, run.tokenizer, e.problem, e.prompt, q, run.reference_cache))]
    stats = update.update_policy(run.train_model, run.optimizer, kept, flat_adv, run.update_settings, run.objective,
                                 run.weighter, run.ref_model, teachers, run.dist)
    metrics.update(stats.metrics)
    if not stats.skipped:
        run.nonfinite_in_a_row = 0
        if run.credit is not None:
            run.credit.log_step(step, kept, per_episode(flat_adv), stats)
        return metrics
    run.nonfinite_in_a_row += 1
    if run.dist.is_main:
        print(f"[warn] step {step}: non-finite loss/gradient (loss={stats.metrics.get('loss')}, "
              f"grad_norm={stats.metrics.get('grad_norm')}); update skipped "
              f"({run.nonfinite_in_a_row}/{t.max_nonfinite_steps} in a row)")
    metrics["nonfinite_skipped"] = 1.0
    if run.nonfinite_in_a_row >= t.max_nonfinite_steps:
        run.metrics_log.log(step, metrics)
        run.metrics_log.close()
        where = f"; the last good checkpoint is {run.last_ckpt}" if run.last_ckpt else ""
        raise NonFiniteError(
            f"{run.nonfinite_in_a_row} consecutive updates had a non-finite loss or gradient (step {step}){where}. "
            f"Lower training.learning_rate, check the mitigation's weights, or raise training.max_nonfinite_steps.")
    return metrics


def per_episode(advantages: update.Advantages) -> list[float]:
    """One advantage per episode: the scalars, or each episode's mean token advantage."""
    if isinstance(advantages, torch.Tensor):
        return advantages.tolist()
    return [episode_mean(row) for row in advantages]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else 0.0


def step_metrics(episodes: Sequence[Episode], kept: Sequence[Episode], advantages: torch.Tensor) -> dict[str, float]:
    rewards = [e.reward for e in episodes]
    m = {
        "reward/mean": _mean(rewards),
        "reward/std": float(np.std(rewards)) if rewards else 0.0,
        "success_rate/train": _mean([e.solved for e in episodes]),
        "format_reward/train": _mean([e.format_reward for e in episodes]),
        "response_length": _mean([len(e.generated_token_ids) for e in episodes]),
        "finished_frac": _mean([e.finished for e in episodes]),
        "groups_kept": float(len(kept) / max(len(episodes), 1)),
    }
    if advantages.numel():
        m.update(grpo.advantage_stats(advantages))
    return m


def progress_line(step: int, max_steps: int, m: dict[str, float], duration: float) -> str:
    line = (f"step {step}/{max_steps} | reward {m['reward/mean']:.3f} | success {m['success_rate/train']:.3f} | "
            f"loss {m.get('loss', float('nan')):.4f} | grad {m.get('grad_norm', float('nan')):.3f} | "
            f"len {m['response_length']:.1f} | {duration:.1f}s")
    for name in ("eval", "transfer"):
        if f"success_rate/{name}" in m:
            line += f" | {name} {m[f'success_rate/{name}']:.3f}"
    return line


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


def train_step(run: Run, step: int) -> dict[str, float]:
    """One GRPO step: rollout -> (injection) -> filtering and advantages -> update -> metrics."""
    t0 = time.perf_counter()
    run.model.eval()
    episodes, metrics = collect_groups(run, step)
    t_rollout = time.perf_counter() - t0
    t = run.config.training
    if run.config.algorithm.ground_truth_injection:
        metrics.update(inject_references(run.task, run.tokenizer, episodes, t.num_answers_per_question,
                                         run.reference_cache))
    token_adv = None
    if run.config.algorithm.adv_estimator == "vine":
        token_adv, vine_metrics = vine.token_advantages(run.config, run.task, run.tokenizer, run.model, run.engine,
                                                        run.dist, episodes, step)
        metrics.update(vine_metrics)
    kept, flat_adv, advantages, tau = select_and_advantage(run.config, episodes, step, token_adv)
    metrics.update(step_metrics(episodes, kept, advantages))
    metrics["tau"] = tau
    metrics.update(apply_update(run, step, episodes, kept, flat_adv))
    metrics.update({"duration/step": time.perf_counter() - t0, "duration/rollout": t_rollout,
                    "tokens_per_s": sum(len(e.generated_token_ids) for e in episodes) / max(t_rollout, 1e-9)})
    if step % t.eval_interval == 0 or step == t.max_steps:
        metrics.update(evaluate_all(run))
    run.metrics_log.log(step, metrics)
    for k, e in enumerate(episodes[: t.log_samples]):
        run.metrics_log.text(f"sample/{k}", f"reward {e.reward:.2f}\n\n{e.prompt}{e.text}", step)
    if run.dist.is_main:
        print(progress_line(step, t.max_steps, metrics, time.perf_counter() - t0), flush=True)
    return metrics


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    checkpoint: Path | None
    stopped_by_signal: bool = False
    rank: int = 0  # under torchrun: this process's rank (only rank 0 reports)


def train(config: Config, resume: str | bool | None = None) -> TrainResult:
    """Run GRPO as configured. `resume`: True = the newest checkpoint in training.ckpt_dir, a path = that one."""
    run = setup(config, resume)
    t = config.training
    metrics: dict[str, float] = {}
    if run.start_step == 0:
        metrics = evaluate_all(run)
        run.metrics_log.log(0, metrics)
        if run.dist.is_main:
            print(f"[eval] step 0: success {metrics['success_rate/eval']:.3f}" + (
                f", transfer {metrics['success_rate/transfer']:.3f}" if "success_rate/transfer" in metrics else ""))
    step, stopping = run.start_step, False
    with stop_on_signals() as stop:
        while step < t.max_steps and not stopping:
            step += 1
            metrics = train_step(run, step)
            # every rank stops after the same step once any rank was signalled. The handler's flag is only
            # read here, never assigned: a signal landing during the all-reduce must not be overwritten
            stopping = distributed.all_sum(float(stop["stop"]), run.dist) > 0
            if step % t.ckpt_save_interval == 0 or step == t.max_steps or stopping:
                save(run, step)
    if run.credit is not None and not stopping:
        run.credit.finalize()
    run.metrics_log.close()
    distributed.shutdown(run.dist)
    if stopping and run.dist.is_main:
        print(f"[signal] stopped after step {step}; checkpoint {run.last_ckpt}. "
              f"Resume with: python train.py --config <your config> --resume")
    return TrainResult(step=step, metrics=metrics, checkpoint=run.last_ckpt, stopped_by_signal=stopping,
                       rank=run.dist.rank)
