"""Your own parts without a fork: the modules a config's `imports` names (or `--import`, the same list) are
imported before the config is checked, in train.py, train_mitigations.py (whose flags then include the part's
keys), run_experiment.py and each of its runs, and every rank under torchrun; a module that fails to import is
one line naming it; the README's example (its module, its YAML, its commands) runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

import parts
import run_experiment
import train
import train_mitigations
from config import ConfigError
from conftest import run_config
from credit_logger import read_logs

ROOT = Path(__file__).resolve().parent.parent
SECTION = "### Name your module once: `imports`"

ADVANTAGE = '''
from config import Param
from grpo import ADVANTAGES


@ADVANTAGES.register("{name}", params={{"{key}": Param(1.0, "scale", "> 0", lambda v: v > 0)}})
def advantages(rewards, {key}):
    return {key} * (rewards - rewards.mean(dim=-1, keepdim=True))
'''

WEIGHTER = '''
import torch

from config import Param
from grpo_mitigations import WEIGHTERS, TokenWeighter


@WEIGHTERS.register("{name}", params={{"{key}": Param(2.0, "weight of every token", ">= 0", lambda v: v >= 0)}})
class Weighter(TokenWeighter):
    def __init__(self, {key}: float = 2.0, **_):
        super().__init__()
        self.value = {key}

    def weights(self, batch):
        return self.value * batch.mask.float()
'''


@pytest.fixture
def clean_registries():
    """Every registry and sys.modules as before the test: a module imported in it and its parts are gone after."""
    saved = [(r, dict(r._parts), dict(r._params)) for r in parts.REGISTRIES]
    modules = set(sys.modules)
    yield
    for r, parts_, params in saved:
        r._parts, r._params = parts_, params
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def plugin(directory: Path, template: str = ADVANTAGE) -> tuple[str, str, str, Path]:
    """A module file registering one part under fresh names: (module, part name, its key, file)."""
    tag = uuid.uuid4().hex[:8]
    module, name, key = f"plug_{tag}", f"plug_{tag}", f"plug_scale_{tag}"
    path = directory / f"{module}.py"
    path.write_text(template.format(name=name, key=key))
    return module, name, key, path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ the config key and the flag: one list


def test_a_config_key_imports_the_module_before_validation(clean_registries, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, name, key, _ = plugin(tmp_path)
    chosen = [f"algorithm.adv_estimator={name}", f"algorithm.{key}=0.5"]
    with pytest.raises(ConfigError, match=f"unknown config key.* algorithm.{key}"):
        parts.load_config(None, chosen)  # not imported: unknown, as before anything loads
    with pytest.raises(ConfigError, match=f"algorithm.adv_estimator '{name}' is unknown"):
        parts.load_config(None, chosen[:1])
    cfg = parts.load_config(write_yaml(tmp_path / "c.yaml", {"imports": [module]}), chosen)
    assert cfg.imports == [module] and cfg.algorithm.adv_estimator == name
    assert getattr(cfg.algorithm, key) == 0.5


def test_the_flag_the_override_and_the_key_add_to_one_list(clean_registries, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    first, second, third = (plugin(tmp_path) for _ in range(3))
    cfg_file = write_yaml(tmp_path / "c.yaml", {"imports": [first[0]]})
    cfg = parts.load_config(cfg_file, [f"algorithm.adv_estimator={third[1]}"], imports=[second[0], third[0]])
    assert cfg.imports == [first[0], second[0], third[0]]
    # train.py: --import and --set imports=[...] (an override replaces the file's list; --import adds to it)
    assert train.main(["--config", str(cfg_file), "--set", f"imports=[{second[0]}]", "--import", third[0],
                       f"algorithm.adv_estimator={third[1]}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["imports"] == [second[0], third[0]] and printed["algorithm"]["adv_estimator"] == third[1]
    assert parts.config_from_dict(printed).to_dict() == printed  # the printed config loads back as itself


def test_an_entry_may_be_a_py_files_path(clean_registries, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    module, name, _, path = plugin(tmp_path / "elsewhere")
    cfg = parts.load_config(None, [f"imports=[{path}]", f"algorithm.adv_estimator={name}"])
    assert cfg.algorithm.adv_estimator == name and sys.modules[module].__file__ == str(path)
    assert parts.load_config(None, [f"imports=[{path}]"]).imports == [str(path)]  # a second import: no clash


def test_a_module_in_the_current_directory_is_found_when_train_py_lives_elsewhere(clean_registries, tmp_path,
                                                                                 monkeypatch):
    module, name, _, _ = plugin(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    assert parts.load_config(None, [f"algorithm.adv_estimator={name}"], imports=[module]).imports == [module]


@pytest.mark.parametrize("code, setting, message", [
    (None, "imports=[no_such_module_x]", "imports: no module named 'no_such_module_x'"),
    ("raise RuntimeError('my parts are broken')", None, "failed to import: RuntimeError: my parts are broken"),
    ("import no_such_dependency_y", None, "failed to import: ModuleNotFoundError: No module named "
                                          "'no_such_dependency_y'"),
    (None, "imports=5", "imports: expected a list, got 5"),
    (None, "imports=['']", "imports: an entry is empty"),
    (None, "imports=[/no/such/file.py]", "imports: '/no/such/file.py' is not a file"),
])
def test_a_module_that_fails_to_import_is_one_line_naming_it(clean_registries, tmp_path, monkeypatch, capsys,
                                                            code, setting, message):
    monkeypatch.syspath_prepend(str(tmp_path))
    if code is not None:
        (tmp_path / "broken_parts.py").write_text(code + "\n")
        setting = "imports=[broken_parts]"
    assert train.main(["--config", "config_tiny.yaml", setting, f"model.path={tmp_path / 'never'}"]) == 2
    err = one_line_error(capsys)
    assert err.startswith("config error: imports: ") and message in err, err
    if code is not None:
        assert "'broken_parts'" in err
    assert not (tmp_path / "never").exists()


def test_registering_a_name_twice_is_one_line(clean_registries, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "dup_parts.py").write_text("from grpo import ADVANTAGES\nADVANTAGES.register('grpo')(len)\n")
    assert train.main(["--config", "config_tiny.yaml", "--import", "dup_parts"]) == 2
    assert "'dup_parts' failed to import: ValueError: algorithm.adv_estimator 'grpo' is registered twice" in \
        one_line_error(capsys)


# ------------------------------------------------------------------ the other front ends


def test_train_mitigations_offers_a_weighter_of_your_own_with_its_flag(clean_registries, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, name, key, _ = plugin(tmp_path, WEIGHTER)
    flag = "--" + key.replace("_", "-")  # either spelling
    with pytest.raises(SystemExit):  # before the import, the name is not offered
        train_mitigations.main(["--config", "config_tiny.yaml", "--mitigation", name, "--print-config"])
    assert "invalid choice" in capsys.readouterr().err
    for how in (["--import", module], [f"imports=[{module}]"]):
        assert train_mitigations.main(["--config", "config_tiny.yaml", *how, "--mitigation", name, flag, "3",
                                       "--print-config"]) == 0
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["mitigation"] == {"name": name, **printed["mitigation"], key: 3.0}
        assert printed["credit"]["enabled"] is True and printed["imports"] == [module]


def experiment_args(tmp_path: Path, *extra: str):
    args = run_experiment.build_parser().parse_args(["--task", "bandit", "--ablations", "baseline", "--seeds", "2",
                                                    "--steps", "2", "--out", str(tmp_path / "exp"), *extra])
    args.overrides = [*args.words, *args.overrides]
    return args


def test_run_experiment_hands_the_imports_to_every_run(clean_registries, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    module, name, key, path = plugin(tmp_path)
    choose = [f"algorithm.adv_estimator={name}", f"algorithm.{key}=2"]
    base = write_yaml(tmp_path / "base.yaml", {**yaml.safe_load((ROOT / "config_bandit.yaml").read_text()),
                                               "imports": [module]})
    ways = {"--import": experiment_args(tmp_path, "--import", str(path), *[f"--set={c}" for c in choose]),
            "--set": experiment_args(tmp_path, "--set", f"imports=[{module}]", *choose),
            "base config": experiment_args(tmp_path, "--config", str(base), *choose)}
    for how, args in ways.items():
        plan = run_experiment.prepare(args)
        for job in plan.jobs:
            cfg = run_experiment.resolve_config(plan.spec["config"], job.overrides)
            assert cfg.algorithm.adv_estimator == name and getattr(cfg.algorithm, key) == 2.0, how
            cmd = run_experiment.job_command(plan.spec["config"], job, "cpu0", gpu=False, threads=1)
            assert set(job.overrides) <= set(cmd), how
        if how == "--import":  # the runner writes the list into each run's overrides (and so its run.json)
            assert f'imports=["{path}"]' in plan.jobs[0].overrides
    with pytest.raises(run_experiment.ExperimentError, match="imports: no module named 'nope_x'"):
        run_experiment.prepare(experiment_args(tmp_path, "--import", "nope_x"))


COIN = """from bandit_task import BanditTask
from tasks import TASKS


@TASKS.register("coin")
class CoinTask(BanditTask):
    \"\"\"The bandit under a name of its own.\"\"\"
"""


def test_run_experiment_runs_a_task_of_your_own(clean_registries, tmp_path):
    """A whole (tiny) experiment: the runner checks the task name after importing, each run imports the file."""
    path = tmp_path / "coin_parts.py"
    path.write_text(COIN)
    out = subprocess.run([sys.executable, "run_experiment.py", "--task", "coin", "--config", "config_bandit.yaml",
                          "--ablations", "baseline", "--seeds", "1", "--steps", "2", "--import", str(path),
                          "--out", str(tmp_path / "exp"), "--no-credit"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    record = json.loads((tmp_path / "exp" / "runs" / "baseline" / "seed1" / "run.json").read_text())
    assert record["config"]["data"]["task"] == "coin" and record["config"]["imports"] == [str(path)]


# ------------------------------------------------------------------ the README's example


def readme_section() -> str:
    path = Path(os.environ.get("PLUGINS_MARKDOWN", ROOT / "README.md"))
    text = path.read_text()
    assert SECTION in text, f"{path} has no '{SECTION}' section (PLUGINS_MARKDOWN names a draft)"
    # up to the next heading (a code block's comment has one #) or the draft's next piece
    return re.split(r"^(?:#{2,3} |---- )", text.split(SECTION, 1)[1], maxsplit=1, flags=re.M)[0]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"^```{kind}\n(.*?)^```", readme_section(), flags=re.M | re.S)


def test_the_readme_example_trains_with_its_module_and_yaml(tiny_assets, tmp_path):
    """The module next to a copy of the config, run from its directory by train.py: every advantage in the credit
    logs is the example's formula, adv_scale x (reward - the group's mean)."""
    (code,), (extra,) = blocks("python"), blocks("yaml")
    (tmp_path / "my_parts.py").write_text(code)
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 2, "eval_interval": 2})
    for section, values in yaml.safe_load(extra).items():
        cfg[section] = values if not isinstance(values, dict) else {**cfg.get(section, {}), **values}
    write_yaml(tmp_path / "my_experiment.yaml", cfg)
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", "my_experiment.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    scale = cfg["algorithm"]["adv_scale"]
    logs = read_logs(tmp_path / "credit")
    episodes = logs.groupby("episode_idx").first()
    group_mean = episodes.groupby(["step", "group_idx"])["reward"].transform("mean")
    pd.testing.assert_series_equal(episodes["advantage"], (scale * (episodes["reward"] - group_mean)).astype("float32"),
                                   check_names=False, rtol=1e-5, atol=1e-6)
    assert episodes["advantage"].abs().max() > 0  # some group had different rewards: the check is not 0 == 0
    assert json.loads((tmp_path / "logs" / "config.json").read_text())["imports"] == ["my_parts"]


def test_every_readme_command_line_parses(clean_registries, tmp_path, monkeypatch):
    """Each command of the example is accepted by the script it names (flags, overrides, --import)."""
    (tmp_path / "my_parts.py").write_text(blocks("python")[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    parsers = {"train.py": train.build_parser, "train_mitigations.py": train_mitigations.build_mitigation_parser,
               "run_experiment.py": run_experiment.build_parser}
    (commands,) = blocks("bash")
    lines = [line.split("#")[0].split() for line in commands.splitlines() if line.strip()]
    assert {next(w for w in words if w.endswith(".py")) for words in lines} == set(parsers)
    parts.import_module("my_parts")  # a --import on the line registers its part; the YAML's are imported the same
    for words in lines:
        script = next(w for w in words if w.endswith(".py"))
        args = parsers[script]().parse_args(words[words.index(script) + 1:])
        assert args.config.endswith(".yaml"), words


@pytest.mark.slow
def test_torchrun_ranks_import_the_configs_modules(tiny_assets, tmp_path):
    """Both ranks of `torchrun --nproc_per_node 2 train.py` import the config's module: the run trains with its
    advantage (a rank that did not would stop at the unknown name)."""
    module, name, key, path = plugin(tmp_path)
    cfg = run_config(tiny_assets, tmp_path, training={"max_steps": 2, "num_questions_per_batch": 4},
                     algorithm={"adv_estimator": name, key: 3.0})
    cfg["imports"] = [str(path)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "train.py", "--config", str(write_yaml(tmp_path / "c.yaml", cfg))],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    episodes = read_logs(tmp_path / "credit").groupby("episode_idx").first()
    group_mean = episodes.groupby(["step", "group_idx"])["reward"].transform("mean")
    assert ((episodes["advantage"] - 3.0 * (episodes["reward"] - group_mean)).abs() < 1e-5).all()
