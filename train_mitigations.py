"""Train with a credit-assignment mitigation (a per-token loss weighter from grpo_mitigations.py, or one your
module registers: --import my_parts, or `imports: [my_parts]` in the config).

    python train_mitigations.py --config config_instrumented.yaml --mitigation NAME
        [--think_discount 0.5 --logprob_offset 0.1 --credit_scale 2.0 --entropy_temp 1.0 --mask_percentile 80]
        [--attribution_entropy_coef 0.01] [section.key=value ...] [--resume [CHECKPOINT]] [--print-config]

A thin front end over the same loop as train.py: it sets `mitigation.*`, turns the credit logger on, and
sends outputs to logs_<mitigation>/, credit_logs_<mitigation>/ and ckpt_<mitigation>/ (next to the
config's own log/checkpoint/credit directories). Each weighter's parameter is a flag of the same name.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import cli
from config import ConfigError, Param
from grpo_mitigations import WEIGHTERS
from train import build_parser, exit_process, load, preload_imports, resume_and_overrides, run

DEFAULT_CONFIG = "config_instrumented.yaml"
# flags that were renamed: the old name is an error that names the new one
RENAMED_FLAGS = {"epsilon": "logprob_offset (inverse_logprob's w = 1 / (|log_prob| + logprob_offset); not a clip "
                            "epsilon like algorithm.epsilon_low / epsilon_high)"}


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


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _flag_type(tp: Any) -> Callable[[str], Any]:
    if tp is bool:
        return _bool
    return str if tp is str else float


def _renamed(new: str) -> type[argparse.Action]:
    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} was renamed: use --{new}")
    return Renamed


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


def build_mitigation_parser() -> cli.ArgumentParser:
    """train.py's parser with --mitigation and a flag per weighter parameter (those registered by now)."""
    parser = build_parser(__doc__, default_config=DEFAULT_CONFIG)
    parser.add_argument("--mitigation", required=True, choices=WEIGHTERS.names(), help="token weighter")
    for flag, text in mitigation_flags().items():
        parser.add_argument(f"--{flag}", type=_flag_type(weighter_params()[flag][1].type), default=None, help=text)
    for old, new in RENAMED_FLAGS.items():
        if old not in weighter_params():
            parser.add_argument(f"--{old}", nargs="?", action=_renamed(new), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        preload_imports(argv, DEFAULT_CONFIG)  # a weighter of the user's own gets its flags too
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    args = build_mitigation_parser().parse_args(argv)
    resume, overrides = resume_and_overrides(args.resume, cli.overrides(args))
    base = load(args.config, overrides, args.imports)  # read once to know where its outputs would go
    if base is None:
        return 2
    values = {k: getattr(args, k) for k in mitigation_flags()}
    extra = mitigation_overrides(args.mitigation, values, base.training.log_dir, base.credit.dir, base.training.ckpt_dir)
    return run(args.config, overrides + extra, resume, args.imports, args.print_config)


if __name__ == "__main__":
    exit_process(main())
