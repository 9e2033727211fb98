"""Train with a credit-assignment mitigation (a per-token loss weighter from grpo_mitigations.py).

    python train_mitigations.py --config config_instrumented.yaml --mitigation NAME
        [--think_discount 0.5 --epsilon 0.1 --credit_scale 2.0 --entropy_temp 1.0 --mask_percentile 80]
        [--attribution_entropy_coef 0.01] [section.key=value ...] [--resume [CHECKPOINT]]

A thin front end over the same loop as train.py: it sets `mitigation.*`, turns the credit logger on, and
sends outputs to logs_<mitigation>/, credit_logs_<mitigation>/ and ckpt_<mitigation>/ (next to the
config's own log/checkpoint/credit directories).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from config import Param
from grpo_mitigations import WEIGHTERS
from train import build_parser, exit_process, load, run


def weighter_params() -> dict[str, tuple[str, Param]]:
    """Every key the weighters declare: name -> (the first weighter that declares it, its Param)."""
    out: dict[str, tuple[str, Param]] = {}
    for owner in WEIGHTERS:
        for name, p in WEIGHTERS.params(owner).items():
            out.setdefault(name, (owner, p))
    return out


def mitigation_flags() -> dict[str, str]:
    """--flag -> help text, from the keys each weighter declares (config.Param)."""
    return {name: f"{owner}: {p.help}" + ("" if p.default is None else f" (default {p.default})")
            for name, (owner, p) in weighter_params().items()}


def _flag_type(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return lambda text: {"true": True, "false": False}[text.lower()]
    return str if tp is str else float


def sibling(path: str, name: str) -> str:
    """`runs/x/logs` + `logs_foo` -> `runs/x/logs_foo`; a bare `logs` -> `logs_foo`."""
    parent = PurePosixPath(path).parent
    return name if str(parent) == "." else str(parent / name)


def mitigation_overrides(name: str, flags: dict[str, float | None], log_dir: str, credit_dir: str,
                         ckpt_dir: str) -> list[str]:
    out = [f"mitigation.name={name}", "credit.enabled=true",
           f"training.log_dir={sibling(log_dir, f'logs_{name}')}",
           f"credit.dir={sibling(credit_dir, f'credit_logs_{name}')}",
           f"training.ckpt_dir={sibling(ckpt_dir, f'ckpt_{name}')}"]
    params = weighter_params()
    out += [f"{params[k][1].section}.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in flags.items() if v is not None]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(__doc__, default_config="config_instrumented.yaml")
    parser.add_argument("--mitigation", required=True, choices=WEIGHTERS.names(), help="token weighter")
    flags = mitigation_flags()
    for flag, text in flags.items():
        parser.add_argument(f"--{flag}", type=_flag_type(weighter_params()[flag][1].type), default=None, help=text)
    args = parser.parse_args(argv)
    base = load(args.config, args.overrides, args.imports)  # read once to know where its outputs would go
    if base is None:
        return 2
    values = {k: getattr(args, k) for k in flags}
    extra = mitigation_overrides(args.mitigation, values, base.training.log_dir, base.credit.dir, base.training.ckpt_dir)
    return run(args.config, list(args.overrides) + extra, args.resume, args.imports)


if __name__ == "__main__":
    exit_process(main())
