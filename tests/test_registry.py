"""The one registry shape (registry.Registry) and how its parts' declared keys enter the config."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import config
from config import ConfigError, Declarations, Param
from registry import Registry

POSITIVE = Param(0.5, "a positive knob", "> 0", lambda v: v > 0)


def make(key: str = "algorithm.thing") -> Registry:
    r = Registry(key)

    @r.register("a", params={"alpha": POSITIVE})
    def a(x, alpha):
        return x * alpha

    r.add("b", lambda x: -x)
    r.add("c", lambda x: x, {"alpha": POSITIVE, "flag": Param(True, "a switch", type=bool, section="attribution")})
    return r


def test_lookup_names_and_the_one_unknown_name_message():
    r = make()
    assert r.get("a")(2.0, alpha=3.0) == 6.0 and "b" in r and "z" not in r
    assert r.names() == ["a", "b", "c"] and list(r) == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"^algorithm.thing 'z' is unknown; valid: a, b, c$"):
        r.get("z")
    with pytest.raises(ValueError, match="registered twice"):
        r.add("a", lambda x: x)


def test_params_live_in_the_selecting_key_section_unless_named():
    r = make()
    assert r.params("a")["alpha"].section == "algorithm"
    assert r.params("c")["flag"].section == "attribution"
    assert r.params("b") == {}
    assert set(r.declared()) == {"algorithm.alpha", "attribution.flag"}  # shared by a and c: declared once


def test_one_key_declared_two_ways_is_an_error():
    r = make()
    r.add("d", lambda x: x, {"alpha": Param(0.7, "another default", "> 0", lambda v: v > 0)})
    with pytest.raises(ValueError, match="algorithm.alpha"):
        r.declared()


def test_bind_fills_defaults_ignores_other_keys_and_checks_the_rule():
    r = make()
    assert r.bind("a", {}) == {"alpha": 0.5}
    assert r.bind("a", {"alpha": 2.0, "beta": 1.0}) == {"alpha": 2.0}
    assert r.bind("b", {"alpha": 2.0}) == {}
    with pytest.raises(ValueError, match=r"algorithm.alpha must be > 0 \(got -1.0\)"):
        r.bind("a", {"alpha": -1.0})


def test_values_are_read_from_each_key_section():
    cfg = SimpleNamespace(algorithm=SimpleNamespace(alpha=0.25), attribution=SimpleNamespace(flag=False))
    assert make().values("c", cfg) == {"alpha": 0.25, "flag": False}


def test_declared_keys_join_their_section_typed_defaulted_and_checked():
    r = make("algorithm.adv_estimator")  # selected by a fixed key, as the real registries are
    declared = Declarations({r.key: r.names()}, r.declared())
    c = config.load_config(None, ["algorithm.adv_estimator=c", "algorithm.alpha=2"], declared)
    assert c.algorithm.alpha == 2.0 and type(c.algorithm.alpha) is float and c.attribution.flag is True
    assert config.load_config(None, ["algorithm.adv_estimator=a"], declared).algorithm.alpha == 0.5
    for bad, needle in (("algorithm.alpha=0", "algorithm.alpha must be > 0"),
                        ("attribution.flag=1", "attribution.flag"), ("algorithm.adv_estimator=z", "'z' is unknown")):
        with pytest.raises(ConfigError, match=needle):
            config.load_config(None, ["algorithm.adv_estimator=a", bad], declared)
    with pytest.raises(ConfigError, match="'grpo' is unknown"):  # the fixed default is checked against the names
        config.load_config(None, [], declared)
    with pytest.raises(ConfigError, match="algorithm.alpha"):  # without the declarations the key is unknown
        config.load_config(None, ["algorithm.alpha=2"])


def test_a_part_cannot_declare_a_fixed_key_or_a_missing_section():
    with pytest.raises(ConfigError, match="training.seed"):
        config.load_config(None, [], Declarations(params={"training.seed": Param(3, "clash", type=int)}))
    with pytest.raises(ConfigError, match="nowhere.knob"):
        config.load_config(None, [], Declarations(params={"nowhere.knob": Param(3, "no section", type=int)}))
