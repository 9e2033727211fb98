"""Run configuration: typed sections, YAML loading, dotted command-line overrides, validation.

Every knob of an experiment is a key here, so `train.py --config X key.path=value` can set it and a typo is
an error before any model is loaded. The YAML files mirror these sections one to one. The sections below
hold the fixed keys; a registered part (an advantage function, a policy loss, a weighter, a task) declares
its own keys with `Param`, and the caller hands them to `load_config` (parts.py collects them), so this
module knows no part and imports nothing of the project.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported before anything expensive happens."""


@dataclass(frozen=True)
class Param:
    """A config key that a registered part declares for itself (a weighter's `think_discount`, the bandit's
    `num_arms`): `section.name` is then set in YAML or on the command line like any fixed key, checked
    against `check`, and `train_mitigations.py --name` and the docs come from here too."""

    default: Any
    help: str
    valid: str = ""  # the rule in words, for error messages
    check: Callable[[Any], bool] = lambda v: True
    type: Any = float
    section: str | None = None  # None: the section of the key that selects the part (registry.Registry)


@dataclass(frozen=True)
class Declarations:
    """What the registered parts add to the fixed sections: the names each selecting key accepts
    ("algorithm.adv_estimator" -> grpo, rloo, ...) and the keys the parts declare ("algorithm.tau" -> Param)."""

    choices: Mapping[str, Collection[str]] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)


def unknown_name(key: str, name: Any, valid: Collection[str]) -> str:
    """The one message for a name that no registered part has."""
    return f"{key} {name!r} is unknown; valid: {', '.join(sorted(valid))}"


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
    build_tiny: bool = False  # build the task's built-in model at `path` when it is missing


@dataclass
class TinySettings:
    """The built-in model's shape and supervised warm-up (tiny_model.py; the bandit's policy uses the shape)."""

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
    """The task and its data; a task's own keys (countdown's generate_*, the bandit's num_arms) are declared
    by the task (countdown_task.py, bandit_task.py)."""

    task: str = "countdown"  # a registered task: countdown | countdown_words | bandit | gsm8k
    path: str = "countdown_data"  # countdown: the Countdown-Tasks-3to4 layout; gsm8k: .jsonl/.parquet file or dir
    test_size: float = 128  # last rows held out for evaluation (a count, or a fraction < 1)
    prompt_style: Literal["chat", "compact"] = "chat"
    generate_seed: int = 0  # seed of generated problems (countdown's, the bandit's paying arms)


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


@dataclass
class AlgorithmSettings:
    """The GRPO variant. The registered parts' own keys (grpo's adv_eps, softmax's tau, the clipped losses'
    epsilon_low / epsilon_high, dual_clip's clip_ratio_c) are declared in grpo.py beside them."""

    adv_estimator: str = "grpo"  # a registered advantage function: grpo | dr_grpo | softmax | softmax_centered | rloo | vine
    # the softmax temperature `tau` over the run: constant, or linear from tau_start to tau_end
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
    loss_agg_mode: str = "token-mean"  # grpo.LOSS_AGG_MODES
    policy_loss: str = "pg"  # a registered policy loss: pg | ppo | dual_clip | gspo | cispo
    old_log_probs: Literal["recompute", "rollout"] = "recompute"
    num_iterations: int = 1
    beta: float = 0.0  # KL to the frozen initial policy; 0 disables it and the reference model
    kl_estimator: str = "k3"  # a registered KL estimator: k1 | k2 | k3
    entropy_coef: float = 0.0
    teacher_forcing_coef: float = 0.0  # > 0: add coef x NLL of a solver trace per question (teacher forcing + RL)


@dataclass
class MitigationSettings:
    """The token weighter (grpo_mitigations.py) by name; each weighter declares its own keys here."""

    name: str = "none"


@dataclass
class AttributionSettings:
    """The learned attribution head's switches, declared by the `attribution` weighter."""


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
    # modules imported before the config is validated (parts.import_modules): a module name, or a .py file's
    # path; the parts they register can then be named ("train.py --import my_parts" adds to this list)
    imports: list[str] = field(default_factory=list)
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


# Keys that existed once: a config that still sets one is told what replaced it (unless a part declares it).
REMOVED_KEYS = {
    "algorithm.ppo_clip": "algorithm.policy_loss=ppo (it clips only once the policy moves: algorithm.num_iterations > 1)",
    "algorithm.drop_zero_std_groups": "algorithm.zero_variance_groups=drop",
    # not TRL's clip epsilon (algorithm.epsilon_low / epsilon_high): the offset in inverse_logprob's 1 / (|log pi| + c)
    "mitigation.epsilon": "mitigation.logprob_offset (inverse_logprob's w = 1 / (|log_prob| + logprob_offset); "
                          "the same value means the same weights)",
}
TOP_LEVEL_KEYS = ("imports",)  # the top level's keys that are not sections


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
    raise ConfigError(f"{where}: unsupported annotation {tp!r}")  # a bug in this file or a Param, not in the YAML


def section_types(params: Mapping[str, Param]) -> dict[str, type]:
    """Each section's dataclass by name, with the keys declared for it (`section.name` -> Param) added."""
    extra: dict[str, list[tuple[str, Param]]] = {}
    for key, p in params.items():
        section, _, name = key.partition(".")
        extra.setdefault(section, []).append((name, p))
    out = {}
    for section, cls in typing.get_type_hints(Config).items():
        if section in TOP_LEVEL_KEYS:
            continue
        added = extra.pop(section, [])
        fixed = {f.name for f in dataclasses.fields(cls)}
        clash = [f"{section}.{name}" for name, _ in added if name in fixed]
        if clash:  # a part declaring a fixed key: a bug in that part
            raise ConfigError(f"declared key(s) {', '.join(clash)} are fixed keys of config.py")
        out[section] = cls if not added else dataclasses.make_dataclass(cls.__name__, [
            (name, p.type, field(default_factory=lambda d=p.default: copy.deepcopy(d))) for name, p in added],
            bases=(cls,))
    if extra:
        raise ConfigError(f"declared key(s) in no section: {', '.join(f'{s}.{n}' for s in extra for n, _ in extra[s])}")
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if f"{where}{key}" in REMOVED_KEYS and key not in names:
            raise ConfigError(f"{where}{key} was removed; use {REMOVED_KEYS[f'{where}{key}']}")
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; "
            f"valid keys in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}"
        )
    return cls(**{name: _coerce(value, hints[name], f"{where}{name}") for name, value in data.items()})


def _build_config(data: Any, declared: Declarations) -> Config:
    """Every section from its mapping in `data` (absent: its defaults), declared keys included."""
    sections = section_types(declared.params)
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - set(sections) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys in the top level: "
                          f"{', '.join(sorted([*sections, *TOP_LEVEL_KEYS]))}")
    return Config(imports=imports_of(data),
                  **{name: _build(cls, data.get(name) or {}, f"{name}.") for name, cls in sections.items()})


def imports_of(data: Any) -> list[str]:
    """The raw config's `imports` (a list of module names or .py paths; absent or null: none)."""
    if not isinstance(data, dict) or data.get("imports") is None:
        return []
    imports = _coerce(data["imports"], list[str], "imports")
    bad = [m for m in imports if not m.strip()]
    if bad:
        raise ConfigError("imports: an entry is empty; each is a module name (my_parts) or a .py file's path")
    return imports


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


def load_raw(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The YAML file's mapping (empty when `path` is None) with the overrides applied, not yet checked."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, training:, ...), "
                              f"got a {type(data).__name__}")
    return apply_overrides(data, overrides or [])


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                declared: Declarations | None = None) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate. `declared`: the
    registered parts' names and keys (parts.declarations()); without it only the fixed keys exist."""
    return config_from_dict(load_raw(path, overrides), declared)


def to_yaml(config: Config) -> str:
    """The resolved config as YAML that load_config reads back to the same config (train.py --print-config)."""
    return yaml.safe_dump(json.loads(json.dumps(config.to_dict())), sort_keys=False)


def config_from_dict(data: dict[str, Any], declared: Declarations | None = None) -> Config:
    declared = declared or Declarations()
    config = _build_config(data, declared)
    validate_config(config, declared)
    return config


def _section_value(config: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(config, section), name)


def validate_config(c: Config, declared: Declarations | None = None) -> None:
    """Cross-field checks that the types alone cannot express, the registered names, and each declared
    key's own rule."""
    t, a = c.training, c.algorithm
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
    for name in ("learning_rate", "max_grad_norm"):
        need(math.isfinite(getattr(t, name)), f"training.{name} must be finite")
    need(c.data.test_size > 0, f"data.test_size must be > 0 (got {c.data.test_size})")
    need(c.eval.num_problems >= 1 and c.eval.batch_size >= 1, "eval.num_problems and eval.batch_size must be >= 1")
    need(c.credit.credit_save_interval >= 1, "credit.credit_save_interval must be >= 1")
    need(not (c.distributed.strategy == "fsdp" and t.optimizer == "adamw_offload"),
         "distributed.strategy=fsdp shards the optimizer state already: use training.optimizer=adamw")

    need(a.soft_reweight_eps > 0, f"algorithm.soft_reweight_eps must be > 0 (got {a.soft_reweight_eps})")
    for name in ("tau_start", "tau_end"):
        need(getattr(a, name) > 0, f"algorithm.{name} must be > 0 (got {getattr(a, name)})")
    if a.rollout_filter == "top_k":
        v = a.rollout_filter_value
        need(v > 0, f"algorithm.rollout_filter_value must be > 0 (got {v})")
        if v >= 1:
            need(float(v).is_integer() and v <= t.num_questions_per_batch,
                 f"algorithm.rollout_filter_value={v} must be a whole number of groups <= "
                 f"num_questions_per_batch={t.num_questions_per_batch}, or a fraction < 1")
    need(a.num_iterations >= 1, f"algorithm.num_iterations must be >= 1 (got {a.num_iterations})")
    need(a.max_sampling_rounds >= 1, f"algorithm.max_sampling_rounds must be >= 1 (got {a.max_sampling_rounds})")
    need(0 <= a.overlong_buffer_len < t.max_new_tokens,
         f"algorithm.overlong_buffer_len must be in [0, training.max_new_tokens) (got {a.overlong_buffer_len})")
    need(a.overlong_penalty >= 0, f"algorithm.overlong_penalty must be >= 0 (got {a.overlong_penalty})")
    need(a.beta >= 0 and a.entropy_coef >= 0 and a.teacher_forcing_coef >= 0,
         "algorithm.beta, entropy_coef and teacher_forcing_coef must be >= 0")

    declared = declared or Declarations()
    for key, names in declared.choices.items():
        value = _section_value(c, key)
        need(value in names, unknown_name(key, value, names))
    for key, p in declared.params.items():
        value = _section_value(c, key)
        need(value is None or p.check(value), f"{key} must be {p.valid} (got {value})")
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
