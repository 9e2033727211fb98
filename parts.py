"""Every swappable part, by the config key that selects it, and the configuration they make up.

The built-in tasks are imported here so that they register themselves; a part of your own registers when
its module is imported: the config's `imports: [my_parts]` (or `train.py --import my_parts`) names the modules
`load_config` imports first. It is then config.load_config with every registry's names and declared keys, so
a typo in a name or a key is an error before anything loads.

    algorithm.adv_estimator   grpo.ADVANTAGES          algorithm.policy_loss   grpo.POLICY_LOSSES
    algorithm.kl_estimator    grpo.KL_ESTIMATORS       mitigation.name         grpo_mitigations.WEIGHTERS
    data.task                 tasks.TASKS              algorithm.loss_agg_mode grpo.LOSS_AGG_MODES
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bandit_task  # noqa: F401  (registers data.task=bandit)
import config
import countdown_task  # noqa: F401  (registers data.task=countdown)
import credit_values  # noqa: F401  (registers algorithm.adv_estimator=vine)
import grpo
import grpo_mitigations
import gsm8k_task  # noqa: F401  (registers data.task=gsm8k)
import tasks
import words_testbed  # noqa: F401  (registers data.task=countdown_words)
from config import Config, ConfigError, Declarations, Param
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


def _import_file(path: Path) -> None:
    """Import a .py file as the module named by its stem (once: a second import of the same file is a no-op)."""
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == path.resolve():
        return
    if not path.is_file():
        raise ConfigError(f"imports: {str(path)!r} is not a file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_module(name: str) -> None:
    """Import one entry of `imports`: a module name (found on sys.path, then in the current directory) or the
    path of a .py file. Any failure is one ConfigError line naming the entry."""
    try:
        if name.endswith(".py") or os.sep in name:
            _import_file(Path(name))
            return
        if os.getcwd() not in sys.path:  # `python path/to/train.py --import my_parts` run from my_parts' directory
            sys.path.append(os.getcwd())
        importlib.import_module(name)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        if e.name == name.split(".")[0] or e.name == name:
            raise ConfigError(f"imports: no module named {name!r} (looked on the Python path, in the repository and "
                              f"in {os.getcwd()}; a file can be given by its path, e.g. my_parts.py)") from e
        raise ConfigError(f"imports: {name!r} failed to import: {type(e).__name__}: {e}") from e
    except Exception as e:  # the module's own code raised: its message, one line, naming the module
        raise ConfigError(f"imports: {name!r} failed to import: {type(e).__name__}: {e}") from e


def import_modules(names: Sequence[str]) -> None:
    for name in names:
        import_module(name)


def with_imports(data: dict[str, Any], imports: Sequence[str] = ()) -> dict[str, Any]:
    """`data` (a raw config) with `imports` added to its own, after importing all of them."""
    merged = config.imports_of(data)
    merged += [m for m in imports if m not in merged]
    import_modules(merged)
    if merged:
        data["imports"] = merged
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                imports: Sequence[str] = ()) -> Config:
    """config.load_config with every registered part's names and keys, after importing the config's `imports`
    and `imports` (train.py's --import)."""
    return config.config_from_dict(with_imports(config.load_raw(path, overrides), imports), declarations())


def config_from_dict(data: dict) -> Config:
    return config.config_from_dict(with_imports(data), declarations())
