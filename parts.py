"""Every swappable part, by the config key that selects it, and the configuration they make up.

The built-in tasks are imported here so that they register themselves; a part of your own registers when
its module is imported (`train.py --import my_parts`). `load_config` is config.load_config with every
registry's names and declared keys, so a typo in a name or a key is an error before anything loads.

    algorithm.adv_estimator   grpo.ADVANTAGES          algorithm.policy_loss   grpo.POLICY_LOSSES
    algorithm.kl_estimator    grpo.KL_ESTIMATORS       mitigation.name         grpo_mitigations.WEIGHTERS
    data.task                 tasks.TASKS              algorithm.loss_agg_mode grpo.LOSS_AGG_MODES
"""

from __future__ import annotations

from pathlib import Path

import bandit_task  # noqa: F401  (registers data.task=bandit)
import config
import countdown_task  # noqa: F401  (registers data.task=countdown)
import credit_values  # noqa: F401  (registers algorithm.adv_estimator=vine)
import grpo
import grpo_mitigations
import gsm8k_task  # noqa: F401  (registers data.task=gsm8k)
import tasks
from config import Config, Declarations, Param
from registry import Registry

REGISTRIES: tuple[Registry, ...] = (grpo.ADVANTAGES, grpo.POLICY_LOSSES, grpo.KL_ESTIMATORS,
                                    grpo_mitigations.WEIGHTERS, tasks.TASKS)


def declarations() -> Declarations:
    """Every registry's names (by its selecting key) and every registered part's declared keys."""
    params: dict[str, Param] = {}
    for registry in REGISTRIES:
        for key, p in registry.declared().items():
            if params.setdefault(key, p) != p:
                raise ValueError(f"{key} is declared differently by parts of two registries")
    choices = {r.key: r.names() for r in REGISTRIES}
    return Declarations({**choices, "algorithm.loss_agg_mode": grpo.LOSS_AGG_MODES}, params)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """config.load_config with every registered part's names and keys."""
    return config.load_config(path, overrides, declarations())


def config_from_dict(data: dict) -> Config:
    return config.config_from_dict(data, declarations())
