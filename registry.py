"""One registry shape for every swappable part: name -> part, selected by one config key, each part with the
config keys it declares (config.Param).

    ADVANTAGES = Registry("algorithm.adv_estimator")

    @ADVANTAGES.register("rloo")
    def rloo_advantages(rewards): ...

    @ADVANTAGES.register("softmax", params={"tau": Param(0.5, "temperature", "> 0", lambda v: v > 0)})
    def softmax_advantages(rewards, tau): ...

`algorithm.adv_estimator=softmax algorithm.tau=0.25` then selects the part and sets its key; parts.py hands
every registry's names and keys to config.load_config, so a typo in either is an error before anything loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from config import Param, unknown_name

T = TypeVar("T")


class Registry(Generic[T]):
    """Parts of one kind by name. `key` is the config key that selects one ("algorithm.policy_loss"); a
    part's params live in that key's section unless their Param names another."""

    def __init__(self, key: str):
        self.key = key
        self.section = key.partition(".")[0]
        self._parts: dict[str, T] = {}
        self._params: dict[str, dict[str, Param]] = {}

    def register(self, name: str, params: Mapping[str, Param] | None = None) -> Callable[[T], T]:
        """Decorator: register the function or class under `name`, with the config keys it declares."""
        def add(part: T) -> T:
            self.add(name, part, params)
            return part
        return add

    def add(self, name: str, part: T, params: Mapping[str, Param] | None = None) -> None:
        if name in self._parts:
            raise ValueError(f"{self.key} {name!r} is registered twice")
        self._parts[name] = part
        self._params[name] = {k: p if p.section else dataclasses.replace(p, section=self.section)
                              for k, p in (params or {}).items()}

    def get(self, name: str) -> T:
        if name not in self._parts:
            raise ValueError(unknown_name(self.key, name, self._parts))
        return self._parts[name]

    def names(self) -> list[str]:
        return sorted(self._parts)

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[str]:
        return iter(self._parts)

    def params(self, name: str) -> dict[str, Param]:
        """The keys part `name` declares, by their name in its section."""
        self.get(name)
        return dict(self._params[name])

    def declared(self) -> dict[str, Param]:
        """Every part's keys as "section.name" -> Param. Parts may share a key (softmax and softmax_centered
        both read `algorithm.tau`) only by declaring the same Param."""
        out: dict[str, Param] = {}
        for part, params in self._params.items():
            for name, p in params.items():
                key = f"{p.section}.{name}"
                if out.setdefault(key, p) != p:
                    raise ValueError(f"{self.key} {part!r} declares {key} differently from another part")
        return out

    def values(self, name: str, config: Any) -> dict[str, Any]:
        """Part `name`'s keys with their values in `config` (a config.Config)."""
        return {k: getattr(getattr(config, p.section), k) for k, p in self.params(name).items()}

    def bind(self, name: str, given: Mapping[str, Any]) -> dict[str, Any]:
        """Part `name`'s keys from `given` (the declared default where absent; keys it does not declare are
        ignored), each checked against its rule: the keyword arguments to call the part with."""
        values = {k: given.get(k, p.default) for k, p in self.params(name).items()}
        problems = [f"{p.section}.{k} must be {p.valid} (got {values[k]})" for k, p in self.params(name).items()
                    if values[k] is not None and not p.check(values[k])]
        if problems:
            raise ValueError("; ".join(problems))
        return values
