"""The README's "Extend it" examples run, so they cannot rot: each python block there is executed as a module of
its own, must register exactly one part, and that part is then used for real: called through its registry
with its declared key, and trained with for two steps on the tiny random model.

The section is read from README.md, or from the markdown file named by $EXTEND_IT_MARKDOWN (a draft of it).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch

import grpo
import grpo_mitigations
import parts
import tasks
import train
import trainer
from conftest import run_config
from data_types import TokenBatch
from parts import config_from_dict

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Extend it"


def extend_section() -> str:
    path = Path(os.environ.get("EXTEND_IT_MARKDOWN", ROOT / "README.md"))
    text = path.read_text()
    assert SECTION in text, f"{path} has no '{SECTION}' section"
    body = text.split(SECTION, 1)[1]
    # up to the next heading: its "### Name your module once" subsection is test_plugins.py's example
    return re.split(r"^#{2,3} ", body, maxsplit=1, flags=re.M)[0]


def python_blocks() -> list[str]:
    blocks = re.findall(r"^```python\n(.*?)^```", extend_section(), flags=re.M | re.S)
    assert blocks, f"the '{SECTION}' section has no python example"
    return blocks


@pytest.fixture
def registries():
    """Every registry as it was before the test: an example's part is gone again after it."""
    saved = [(r, dict(r._parts), dict(r._params)) for r in parts.REGISTRIES]
    yield
    for r, parts_, params in saved:
        r._parts, r._params = parts_, params


def register(code: str) -> tuple[object, str]:
    """Run one example as a module; the one (registry, name) it added."""
    before = {r.key: set(r) for r in parts.REGISTRIES}
    exec(compile(code, "<README Extend it>", "exec"), types.ModuleType("my_parts").__dict__)
    added = [(r, name) for r in parts.REGISTRIES for name in set(r) - before[r.key]]
    assert len(added) == 1, f"an example must register exactly one part, this one registered {added}"
    return added[0]


def train_two_steps(tiny_assets, out: Path, **sections) -> list[dict]:
    cfg = config_from_dict(run_config(tiny_assets, out, training={"max_steps": 2, "eval_interval": 2}, **sections))
    assert trainer.train(cfg).step == 2
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def check_advantage(name: str, tiny_assets, tmp_path: Path) -> None:
    (key, p), = grpo.ADVANTAGES.params(name).items()
    rewards = torch.tensor([[0.0, 1.0, 0.5, 0.2], [3.0, 2.5, 1.0, 2.0]])
    adv = grpo.compute_advantages(rewards, name, **{key: p.default})
    assert adv.shape == rewards.shape and torch.isfinite(adv).all()
    for g in range(2):  # a better answer never gets a smaller advantage
        order = rewards[g].argsort()
        assert (adv[g, order].diff() >= 0).all()
    rows = train_two_steps(tiny_assets, tmp_path, algorithm={"adv_estimator": name, key: p.default})
    assert all(math.isfinite(r["grad_norm"]) for r in rows[1:])


def check_policy_loss(name: str, tiny_assets, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    lp = (-3 * torch.rand(3, 5, generator=gen)).requires_grad_()
    old = lp.detach() + torch.randn(3, 5, generator=gen)
    mask = torch.ones(3, 5, dtype=torch.bool)
    loss = grpo.policy_loss(name)
    for adv, zero in ((torch.zeros(3, 5), True), (torch.ones(3, 5), False)):  # A x something, as every loss
        token_loss, metrics = loss(lp, old, adv, mask)
        grad = torch.autograd.grad(token_loss.sum(), lp)[0]
        assert torch.equal(grad, torch.zeros_like(lp)) == zero
    rows = train_two_steps(tiny_assets, tmp_path, algorithm={"policy_loss": name, "num_iterations": 2})
    assert set(metrics) <= set(rows[-1]) and all(math.isfinite(r["loss"]) for r in rows[1:])


def check_weighter(name: str, tiny_assets, tmp_path: Path) -> None:
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    zeros = torch.zeros(2, 6)
    batch = TokenBatch(token_ids=zeros.long(), mask=mask, log_probs=zeros - 1, entropy=zeros + 1,
                       rollout_entropy=zeros + 1, answer_mask=torch.zeros_like(mask), advantages=torch.ones(2))
    w = grpo_mitigations.build_weighter(name).weights(batch)
    assert w.shape == mask.shape and (w[~mask] == 0).all() and not torch.equal(w, mask.float())
    rows = train_two_steps(tiny_assets, tmp_path, mitigation={"name": name})
    assert all(r["weight/std"] > 0 for r in rows[1:])  # the weights reached the update


def check_task(name: str, tiny_assets, tmp_path: Path) -> None:
    cfg = config_from_dict(run_config(tiny_assets, tmp_path / "cfg", data={"task": name}))
    task = tasks.build_task(cfg)
    train_set, test_set = task.load()
    assert train_set and test_set and isinstance(task.prompt(train_set[0]), str)
    info = task.reward(train_set[0], "")["reward_info"]
    assert {"format_reward", "answer_reward"} <= set(info)
    rows = train_two_steps(tiny_assets, tmp_path, data={"task": name})
    assert 0.0 <= rows[-1]["success_rate/eval"] <= 1.0


CHECKS = {"algorithm.adv_estimator": check_advantage, "algorithm.policy_loss": check_policy_loss,
          "mitigation.name": check_weighter, "data.task": check_task}


def test_the_section_has_one_example_of_each_kind(registries):
    kinds = sorted(register(code)[0].key for code in python_blocks())
    assert kinds == sorted(CHECKS)


@pytest.mark.parametrize("index", range(len(CHECKS)))
def test_an_example_registers_and_trains(index, registries, tiny_assets, tmp_path):
    registry, name = register(python_blocks()[index])
    for key, p in registry.params(name).items():  # its keys are config keys, set like any other
        value = parts.load_config(None, [f"{registry.key}={name}", f"{p.section}.{key}={p.default}"])
        assert getattr(getattr(value, p.section), key) == p.default
    CHECKS[registry.key](name, tiny_assets, tmp_path)


def test_the_documented_command_imports_the_module_that_registers_the_part(registries, tmp_path, monkeypatch, capsys):
    """`python train.py --import my_parts algorithm.adv_estimator=rank ...`: the part is known once its module is
    imported, and an unknown name without it is a config error."""
    code = next(c for c in python_blocks() if "ADVANTAGES.register" in c)
    name = re.search(r'ADVANTAGES\.register\("(\w+)"', code).group(1)
    (tmp_path / "my_parts.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_parts", raising=False)
    args = ["--config", "config_bandit.yaml", f"algorithm.adv_estimator={name}", "training.max_steps=1",
            f"model.path={tmp_path / 'model'}", f"training.log_dir={tmp_path / 'logs'}",
            f"training.ckpt_dir={tmp_path / 'ckpt'}", f"credit.dir={tmp_path / 'credit'}"]
    assert train.main(args) == 2
    assert f"algorithm.adv_estimator {name!r} is unknown" in capsys.readouterr().err
    assert train.main(["--import", "my_parts", *args]) == 0
    assert name in grpo.ADVANTAGES
    sys.modules.pop("my_parts", None)
