"""Config: shipped YAMLs load, dotted overrides are typed, every error is a ConfigError from load_config."""
import subprocess
import sys
from pathlib import Path

import pytest

import config
from config import Config, ConfigError, apply_overrides, parse_override
from grpo import ADVANTAGES
from grpo_mitigations import WEIGHTERS
from parts import config_from_dict, declarations, load_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ["config.yaml", "config_24GB.yaml", "config_tiny.yaml", "config_instrumented.yaml"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_yaml_loads(name):
    c = load_config(ROOT / name)
    assert isinstance(c, Config)
    assert c.training.num_answers_per_question >= 2
    assert c.mitigation.name == "none"


def test_shipped_yaml_values_are_read():
    c = load_config(ROOT / "config_tiny.yaml")
    assert c.model.build_tiny is True
    assert c.data.generate_num_numbers == [3]
    assert c.training.learning_rate == 1.0e-4 and isinstance(c.training.learning_rate, float)
    assert c.credit.credit_save_interval == 25
    assert c.training.betas == [0.9, 0.999]  # not in the file: the default
    assert load_config(ROOT / "config_24GB.yaml").training.optimizer == "adamw_offload"


def test_defaults_without_a_file():
    assert config.load_config().to_dict() == Config().to_dict()  # the fixed keys
    c = load_config().to_dict()  # and every registered part's keys: their declared defaults
    for key, p in declarations().params.items():
        section, name = key.split(".")
        assert c[section][name] == p.default, key


# ----------------------------------------------------------------------------- overrides


def test_overrides_are_typed():
    c = load_config(ROOT / "config_tiny.yaml", [
        "training.max_steps=20", "algorithm.tau=0.25", "training.betas=[0.8,0.9]", "eval.temperature=null",
        "training.learning_rate=1", "mitigation.name=entropy_masking"])
    assert c.training.max_steps == 20 and type(c.training.max_steps) is int
    assert c.algorithm.tau == 0.25
    assert c.training.betas == [0.8, 0.9] and all(type(b) is float for b in c.training.betas)
    assert c.eval.temperature is None
    assert c.training.learning_rate == 1.0 and type(c.training.learning_rate) is float
    assert c.mitigation.name == "entropy_masking"
    assert load_config(None, ["eval.temperature=0.7"]).eval.temperature == 0.7
    assert load_config(None, ["training.batch_size=256"]).training.batch_size == 256  # 32 x 8


def test_later_override_wins():
    assert load_config(None, ["training.max_steps=5", "training.max_steps=7"]).training.max_steps == 7


def test_string_for_int_field_names_the_key():
    with pytest.raises(ConfigError, match=r"training\.max_steps"):
        load_config(None, ["training.max_steps=twenty"])
    with pytest.raises(ConfigError, match=r"training\.max_steps"):
        load_config(None, ["training.max_steps=2.5"])
    with pytest.raises(ConfigError, match=r"data\.generate_num_numbers\[1\]"):
        load_config(None, ["data.generate_num_numbers=[3, x]"])


@pytest.mark.parametrize("value", ["1", "0", "yes_please"])
def test_bool_field_rejects_non_bool(value):
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing"):
        load_config(None, [f"model.gradient_checkpointing={value}"])
    assert load_config(None, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing is True


def test_int_field_rejects_bool():
    with pytest.raises(ConfigError, match=r"training\.max_steps"):
        load_config(None, ["training.max_steps=true"])


def test_float_field_accepts_exponent_without_dot():
    assert load_config(None, ["training.learning_rate=1e-5"]).training.learning_rate == 1e-5


def test_override_into_empty_yaml_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\ntraining:\n  max_steps: 3\n")
    assert load_config(path).eval.batch_size == 64  # the empty section alone is fine
    assert load_config(path, ["eval.batch_size=8"]).eval.batch_size == 8


def test_parse_override():
    assert parse_override("training.max_steps=20") == (["training", "max_steps"], 20)
    assert parse_override(" algorithm.tau = 0.5") == (["algorithm", "tau"], 0.5)
    assert parse_override("training.betas=[0.8, 0.9]") == (["training", "betas"], [0.8, 0.9])
    assert parse_override("eval.temperature=null") == (["eval", "temperature"], None)
    assert parse_override("model.path=a=b") == (["model", "path"], "a=b")  # split at the first '='
    assert parse_override("model.path=") == (["model", "path"], "")
    assert parse_override("model.gradient_checkpointing=false") == (["model", "gradient_checkpointing"], False)
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("training.max_steps")
    with pytest.raises(ConfigError, match="empty key path"):
        parse_override("training..max_steps=3")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("training.betas=[0.8, 0.9")


def test_apply_overrides():
    data = {"training": {"max_steps": 3, "seed": 1}}
    out = apply_overrides(data, ["training.max_steps=9", "algorithm.tau=0.5", "a.b.c=1"])
    assert out == {"training": {"max_steps": 9, "seed": 1}, "algorithm": {"tau": 0.5}, "a": {"b": {"c": 1}}}
    assert apply_overrides({}, []) == {}
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"training": {"max_steps": 3}}, ["training.max_steps.x=1"])


# ----------------------------------------------------------------------------- errors


def error_of(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    return str(err.value)


def test_unknown_top_level_section():
    msg = error_of(["trainig.max_steps=3"])
    assert "trainig" in msg
    for section in ("model", "training", "algorithm", "mitigation", "credit", "eval", "data", "tiny"):
        assert section in msg


def test_unknown_nested_key_names_dotted_key_and_valid_keys():
    msg = error_of(["training.max_step=3"])
    assert "training.max_step" in msg
    assert "max_steps" in msg and "num_answers_per_question" in msg and "micro_batch_size" in msg


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm:\n  adv_estimator: grpo\n  clip_eps: 0.2\n")
    msg = error_of([], path)
    assert "algorithm.clip_eps" in msg and "epsilon_low" in msg


def test_override_without_equals():
    assert "training.max_steps" in error_of(["training.max_steps"])


def test_wrong_literal_lists_choices():
    msg = error_of(["algorithm.loss_agg_mode=token_mean"])
    assert "algorithm.loss_agg_mode" in msg
    for choice in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        assert choice in msg
    msg = error_of(["model.dtype=float64"])
    assert "float32" in msg and "bfloat16" in msg and "float16" in msg


def test_batch_size_not_divisible_by_group_size():
    msg = error_of(["training.batch_size=30", "training.num_answers_per_question=8"])
    assert "does not divide" in msg and "batch_size=30" in msg


def test_batch_size_must_equal_questions_times_answers():
    assert "!=" in error_of(["training.batch_size=64"])  # divisible by 8, but 32 x 8 = 256


@pytest.mark.parametrize("override, needle", [
    ("training.num_answers_per_question=1", "num_answers_per_question"),
    ("algorithm.adv_eps=0", "adv_eps"),
    ("algorithm.adv_eps=-1.0e-4", "adv_eps"),
    ("algorithm.tau=0", "algorithm.tau"),
    ("algorithm.tau=-0.5", "algorithm.tau"),
    ("algorithm.beta=-0.1", "beta"),
    ("mitigation.think_discount=1.5", "think_discount"),
    ("mitigation.logprob_offset=0", "mitigation.logprob_offset"),
    ("mitigation.epsilon=0.1", "mitigation.logprob_offset"),  # the old name names the new one
    ("mitigation.credit_scale=0.5", "credit_scale"),
    ("mitigation.entropy_temp=0", "entropy_temp"),
    ("mitigation.mask_percentile=100", "mask_percentile"),
    ("training.max_steps=0", "max_steps"),
    ("training.top_p=0", "top_p"),
    ("training.learning_rate=.inf", "learning_rate"),
    ("training.betas=[0.9]", "betas"),
])
def test_out_of_range_value(override, needle):
    assert needle in error_of([override])


def test_unknown_adv_estimator_lists_valid():
    msg = error_of(["algorithm.adv_estimator=ppo"])
    assert "'ppo'" in msg
    assert {"grpo", "dr_grpo", "rloo"} <= set(ADVANTAGES)
    for name in ADVANTAGES:
        assert name in msg


def test_unknown_mitigation_lists_valid():
    msg = error_of(["mitigation.name=entropy_weigted"])
    assert "'entropy_weigted'" in msg
    for name in WEIGHTERS:
        assert name in msg


def test_top_k_filter_value_larger_than_groups():
    msg = error_of(["algorithm.rollout_filter=top_k", "algorithm.rollout_filter_value=40",
                    "training.num_questions_per_batch=32"])
    assert "rollout_filter_value" in msg and "32" in msg
    assert "rollout_filter_value" in error_of(["algorithm.rollout_filter=top_k", "algorithm.rollout_filter_value=2.5"])
    ok = load_config(None, ["algorithm.rollout_filter=top_k", "algorithm.rollout_filter_value=32"])
    assert ok.algorithm.rollout_filter_value == 32.0
    load_config(None, ["algorithm.rollout_filter=top_k", "algorithm.rollout_filter_value=0.5"])
    load_config(None, ["algorithm.rollout_filter_value=40"])  # not checked while the filter is off


def test_several_problems_reported_together():
    msg = error_of(["training.num_answers_per_question=1", "algorithm.tau=0", "algorithm.beta=-1.0",
                    "mitigation.name=nope"])
    for needle in ("num_answers_per_question", "algorithm.tau", "beta", "'nope'"):
        assert needle in msg
    assert msg.count("\n  - ") >= 4


def test_config_from_dict_validates():
    assert config_from_dict({"training": {"max_steps": 4}}).training.max_steps == 4
    with pytest.raises(ConfigError, match="adv_eps"):
        config_from_dict({"algorithm": {"adv_eps": 0.0}})


def test_missing_file_and_bad_yaml(tmp_path):
    assert "does not exist" in error_of([], tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    assert "not valid YAML" in error_of([], bad)
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("training: [1, 2]\n")
    assert "expected a mapping" in error_of([], not_mapping)


def test_errors_come_before_any_model_is_loaded():
    """A bad config fails in load_config without importing the model code or touching the model path."""
    script = (
        "import sys\n"
        "from config import ConfigError, load_config\n"
        "try:\n"
        "    load_config(None, ['model.path=/nonexistent/model', 'training.max_step=3'])\n"
        "except ConfigError as e:\n"
        "    print('CONFIG_ERROR', 'training.max_step' in str(e))\n"
        "print(sorted(m for m in ('qwen2_model', 'tokenizer', 'safetensors', 'trainer') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["CONFIG_ERROR True", "[]"]
