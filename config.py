"""Run configuration: typed sections, YAML loading, dotted command-line overrides, validation.

Every knob of an experiment is a field here, so `train.py --config X key.path=value` can set it and
a typo is an error before any model is loaded. The YAML files mirror these sections one to one.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before anything expensive happens."""


@dataclass
class ModelSettings:
    path: str = "tiny_model"  # Hugging Face checkpoint directory (config.json + safetensors + tokenizer.json)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", or "auto" (cuda when available)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool = False
    compile_decode: Optional[bool] = None  # the rollout's decode step via torch.compile / CUDA graphs; null = on CUDA
    compile_update: bool = False  # the decoder layers of training forwards via torch.compile (fused elementwise ops)
    # free the rollout's KV cache after each rollout, for the update to use (RolloutEngine(keep_cache=False)); a
    # compiled decode step then runs without CUDA graphs, which need the cache at fixed addresses
    release_rollout_cache: bool = False
    build_tiny: bool = False  # build the built-in tiny model at `path` when it is missing


@dataclass
class TinySettings:
    """Supervised warm-up of the built-in tiny model (see tiny_model.py)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    warmup_steps: int = 700
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    num_train_problems: int = 20000
    varied_traces: bool = True  # a random one of each problem's solutions per example (else the solver's first)
    seed: int = 0


@dataclass
class DataSettings:
    task: str = "countdown"  # a tasks.TASKS name: countdown | bandit | gsm8k
    path: str = "countdown_data"  # countdown: the Countdown-Tasks-3to4 layout; gsm8k: .jsonl/.parquet file or dir
    test_size: float = 128  # last rows held out for evaluation (a count, or a fraction < 1)
    prompt_style: Literal["chat", "compact"] = "chat"
    generate_if_missing: int = 0  # >0: write this many solver-checked problems to `path` if it is missing
    generate_num_numbers: list[int] = field(default_factory=lambda: [3, 4])
    generate_seed: int = 0  # also the bandit's paying arms
    num_arms: int = 16  # bandit: K arms, one pays
    num_contexts: int = 1  # bandit: contexts, each with its own paying arm


@dataclass
class TrainingSettings:
    seed: int = 1337
    max_steps: int = 100
    num_questions_per_batch: int = 32
    num_answers_per_question: int = 8  # group size
    batch_size: Optional[int] = None  # optional check: must equal questions x answers
    micro_batch_size: int = 8
    # completions per rollout call (whole groups; None: all at once): caps the KV cache, same tokens either way
    rollout_batch_size: Optional[int] = None
    max_tokens_per_micro_batch: Optional[int] = None  # pack micro-batches by padded tokens too (long completions)
    share_prompts: bool = True  # the update runs a prompt that completions of a micro-batch share once
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-5
    lr_warmup_steps: int = 0  # linear warm-up from lr / lr_warmup_steps to lr over the first steps
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    optimizer: Literal["adamw", "adamw_offload"] = "adamw"
    skip_unfinished_episodes: bool = False
    log_dir: str = "runs/default/logs"
    ckpt_dir: str = "runs/default/ckpt"
    ckpt_save_interval: int = 100
    keep_last_n: int = 3
    eval_interval: int = 10
    max_nonfinite_steps: int = 3
    deterministic: bool = False
    num_threads: int = 0  # torch CPU threads; 0 keeps torch's default
    log_samples: int = 2  # completions written to TensorBoard as text each step


@dataclass
class EvalSettings:
    num_problems: int = 128  # taken from the held-out split
    temperature: Optional[float] = None  # None: the training temperature
    batch_size: int = 64
    seed: int = 4242  # the same sampling noise at every evaluation, so curves compare like with like
    # A transfer set: generated problems with these numbers counts (e.g. [4] for a model trained on
    # 3-number problems), evaluated beside the held-out split and logged as success_rate/transfer.
    transfer_num_numbers: list[int] = field(default_factory=list)
    transfer_problems: int = 128


@dataclass
class AlgorithmSettings:
    adv_estimator: str = "grpo"  # grpo | dr_grpo | softmax | softmax_centered | rloo
    adv_eps: float = 1e-4  # the eps in (r - mean) / (std + eps)
    tau: float = 0.5  # softmax temperature (constant schedule)
    tau_schedule: Literal["constant", "linear"] = "constant"
    tau_start: float = 0.75
    tau_end: float = 0.25
    soft_reweight: bool = False  # multiply by group_std / (max group_std + eps)
    soft_reweight_eps: float = 1e-6
    rollout_filter: Literal["none", "top_k"] = "none"
    rollout_filter_value: float = 1.0  # groups kept: a count (>= 1) or a fraction (< 1)
    # Groups whose answers all scored the same: zero advantage under grpo/dr_grpo/rloo, but weight 1 each
    # under the all-positive `softmax` estimator (imitation of the model's own samples). drop removes them.
    zero_variance_groups: Literal["keep", "drop"] = "keep"
    dynamic_sampling: bool = False  # DAPO: roll out more questions until the batch is all informative groups
    max_sampling_rounds: int = 3
    overlong_buffer_len: int = 0  # DAPO overlong shaping: penalize the last this-many tokens before max_new_tokens
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens (linear from 0 over the buffer)
    ground_truth_injection: bool = False  # one task-solver completion replaces one sample in every group
    loss_agg_mode: Literal[
        "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"
    ] = "token-mean"
    policy_loss: str = "pg"  # a grpo.POLICY_LOSSES name: pg | ppo | dual_clip | gspo | cispo
    old_log_probs: Literal["recompute", "rollout"] = "recompute"
    num_iterations: int = 1
    epsilon_low: Optional[float] = None  # None: the policy loss's default (0.2 / 0.28; gspo 3e-4 / 4e-4)
    epsilon_high: Optional[float] = None
    clip_ratio_c: float = 3.0  # dual_clip: the loss of A < 0 tokens is bounded by -A c
    beta: float = 0.0  # KL to the frozen initial policy; 0 disables it and the reference model
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    entropy_coef: float = 0.0
    teacher_forcing_coef: float = 0.0  # > 0: add coef x NLL of a solver trace per question (teacher forcing + RL)


# Keys that existed once: a config that still sets one is told what replaced it.
REMOVED_KEYS = {
    "algorithm.ppo_clip": "algorithm.policy_loss=ppo (it clips only once the policy moves: algorithm.num_iterations > 1)",
    "algorithm.drop_zero_std_groups": "algorithm.zero_variance_groups=drop",
}


def _weighter_section(section: str, with_name: bool) -> type:
    """A config section made of the parameters the registered weighters declare for it
    (grpo_mitigations.Param): each parameter is declared once, on its weighter, and the section follows."""
    from grpo_mitigations import weighter_params

    fields = [("name", str, field(default="none"))] if with_name else []
    fields += [(k, p.type, field(default=p.default)) for k, (_, p) in weighter_params().items() if p.section == section]
    return dataclasses.make_dataclass(f"{section.capitalize()}Settings", fields)


MitigationSettings = _weighter_section("mitigation", with_name=True)  # mitigation.name + its parameters
AttributionSettings = _weighter_section("attribution", with_name=False)  # the learned head's own switches


def weighter_values(config: Config) -> dict[str, Any]:
    """Every declared weighter parameter's value, read from its section."""
    from grpo_mitigations import weighter_params

    return {k: getattr(getattr(config, p.section), k) for k, (_, p) in weighter_params().items()}


@dataclass
class CreditSettings:
    enabled: bool = False
    dir: str = "runs/default/credit_logs"
    credit_save_interval: int = 10


@dataclass
class DistributedSettings:
    # Used only under torchrun (world size > 1). ddp: every rank holds the whole model and optimizer;
    # fsdp: FSDP2 shards weights, gradients and optimizer state over the ranks (gathered whole for rollouts).
    strategy: Literal["ddp", "fsdp"] = "ddp"


@dataclass
class Config:
    model: ModelSettings = field(default_factory=ModelSettings)
    tiny: TinySettings = field(default_factory=TinySettings)
    data: DataSettings = field(default_factory=DataSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    algorithm: AlgorithmSettings = field(default_factory=AlgorithmSettings)
    mitigation: MitigationSettings = field(default_factory=MitigationSettings)
    attribution: AttributionSettings = field(default_factory=AttributionSettings)
    credit: CreditSettings = field(default_factory=CreditSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing and type checking


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in this file, not in the YAML


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if f"{where}{key}" in REMOVED_KEYS:
            raise ConfigError(f"{where}{key} was removed; use {REMOVED_KEYS[f'{where}{key}']}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
            f"valid keys in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}{name}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=20` -> (["training", "max_steps"], 20); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e})") from e
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override in the raw mapping; unknown keys are caught later by `_build`."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            if node.get(p) is None:  # absent, or an empty YAML section
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {p} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    data = apply_overrides(data, overrides or [])
    config = _build(Config, data, "")
    validate_config(config)
    return config


def config_from_dict(data: dict[str, Any]) -> Config:
    config = _build(Config, data, "")
    validate_config(config)
    return config


def validate_config(c: Config) -> None:
    """Cross-field checks that the types alone cannot express."""
    from grpo import ADVANTAGE_FNS, POLICY_LOSSES  # the registries own the valid names
    from grpo_mitigations import WEIGHTERS, check_params
    from tasks import TASKS

    t, a, m = c.training, c.algorithm, c.mitigation
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for name in ("max_steps", "num_questions_per_batch", "num_answers_per_question", "micro_batch_size",
                 "max_new_tokens", "ckpt_save_interval", "eval_interval", "keep_last_n", "max_nonfinite_steps"):
        need(getattr(t, name) >= 1, f"training.{name} must be >= 1 (got {getattr(t, name)})")
    need(t.num_answers_per_question >= 2,
         "training.num_answers_per_question (group size) must be >= 2: group-relative advantages need a group")
    if t.batch_size is not None:
        need(t.batch_size % t.num_answers_per_question == 0,
             f"group size training.num_answers_per_question={t.num_answers_per_question} does not divide "
             f"training.batch_size={t.batch_size}")
        need(t.batch_size == t.num_questions_per_batch * t.num_answers_per_question,
             f"training.batch_size={t.batch_size} != num_questions_per_batch x num_answers_per_question = "
             f"{t.num_questions_per_batch * t.num_answers_per_question}")
    if t.rollout_batch_size is not None:
        need(t.rollout_batch_size >= 1 and t.rollout_batch_size % t.num_answers_per_question == 0,
             f"training.rollout_batch_size={t.rollout_batch_size} must be a positive multiple of the group size "
             f"training.num_answers_per_question={t.num_answers_per_question} (whole groups per rollout call)")
    need(t.max_tokens_per_micro_batch is None or t.max_tokens_per_micro_batch >= 1,
         "training.max_tokens_per_micro_batch must be >= 1 when set")
    need(t.temperature >= 0, f"training.temperature must be >= 0 (got {t.temperature})")
    need(0 < t.top_p <= 1, f"training.top_p must be in (0, 1] (got {t.top_p})")
    need(t.learning_rate > 0, f"training.learning_rate must be > 0 (got {t.learning_rate})")
    need(t.lr_warmup_steps >= 0, f"training.lr_warmup_steps must be >= 0 (got {t.lr_warmup_steps})")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"training.betas must be two numbers in [0, 1) (got {t.betas})")
    need(t.max_grad_norm > 0, f"training.max_grad_norm must be > 0 (got {t.max_grad_norm})")
    need(c.data.test_size > 0, f"data.test_size must be > 0 (got {c.data.test_size})")
    need(c.eval.num_problems >= 1 and c.eval.batch_size >= 1, "eval.num_problems and eval.batch_size must be >= 1")
    need(all(n >= 2 for n in c.eval.transfer_num_numbers) and c.eval.transfer_problems >= 1,
         "eval.transfer_num_numbers must be counts >= 2 and eval.transfer_problems >= 1")
    need(c.credit.credit_save_interval >= 1, "credit.credit_save_interval must be >= 1")
    need(not (c.distributed.strategy == "fsdp" and t.optimizer == "adamw_offload"),
         "distributed.strategy=fsdp shards the optimizer state already: use training.optimizer=adamw")

    need(a.adv_estimator in ADVANTAGE_FNS,
         f"algorithm.adv_estimator {a.adv_estimator!r} is unknown; valid: {', '.join(sorted(ADVANTAGE_FNS))}")
    need(a.adv_eps > 0, f"algorithm.adv_eps must be > 0 (got {a.adv_eps})")
    need(a.soft_reweight_eps > 0, f"algorithm.soft_reweight_eps must be > 0 (got {a.soft_reweight_eps})")
    for name in ("tau", "tau_start", "tau_end"):
        need(getattr(a, name) > 0, f"algorithm.{name} must be > 0 (got {getattr(a, name)})")
    if a.rollout_filter == "top_k":
        v = a.rollout_filter_value
        need(v > 0, f"algorithm.rollout_filter_value must be > 0 (got {v})")
        if v >= 1:
            need(float(v).is_integer() and v <= t.num_questions_per_batch,
                 f"algorithm.rollout_filter_value={v} must be a whole number of groups <= "
                 f"num_questions_per_batch={t.num_questions_per_batch}, or a fraction < 1")
    need(a.num_iterations >= 1, f"algorithm.num_iterations must be >= 1 (got {a.num_iterations})")
    need(a.policy_loss in POLICY_LOSSES,
         f"algorithm.policy_loss {a.policy_loss!r} is unknown; valid: {', '.join(sorted(POLICY_LOSSES))}")
    need((a.epsilon_low is None or 0 <= a.epsilon_low < 1) and (a.epsilon_high is None or a.epsilon_high >= 0),
         f"algorithm.epsilon_low must be in [0, 1) and epsilon_high >= 0 (got {a.epsilon_low}, {a.epsilon_high})")
    need(a.clip_ratio_c > 1, f"algorithm.clip_ratio_c must be > 1 (got {a.clip_ratio_c})")
    need(a.max_sampling_rounds >= 1, f"algorithm.max_sampling_rounds must be >= 1 (got {a.max_sampling_rounds})")
    need(0 <= a.overlong_buffer_len < t.max_new_tokens,
         f"algorithm.overlong_buffer_len must be in [0, training.max_new_tokens) (got {a.overlong_buffer_len})")
    need(a.overlong_penalty >= 0, f"algorithm.overlong_penalty must be >= 0 (got {a.overlong_penalty})")
    need(a.beta >= 0 and a.entropy_coef >= 0 and a.teacher_forcing_coef >= 0,
         "algorithm.beta, entropy_coef and teacher_forcing_coef must be >= 0")

    need(c.data.task in TASKS, f"data.task {c.data.task!r} is unknown; valid: {', '.join(sorted(TASKS))}")
    need(2 <= c.data.num_arms <= 52 and 1 <= c.data.num_contexts <= 10,
         "data.num_arms must be in [2, 52] and data.num_contexts in [1, 10]")
    need(m.name in WEIGHTERS, f"mitigation.name {m.name!r} is unknown; valid: {', '.join(sorted(WEIGHTERS))}")
    problems.extend(check_params(weighter_values(c)))
    for name in ("learning_rate", "max_grad_norm"):
        need(math.isfinite(getattr(t, name)), f"training.{name} must be finite")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
