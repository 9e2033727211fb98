"""Train a policy with GRPO on the configured task (data.task: countdown, bandit, gsm8k, or one of your own).

    python train.py --config config.yaml [section.key=value ...] [--resume [CHECKPOINT]] [--import MODULE]
    torchrun --nproc_per_node N train.py --config config.yaml [distributed.strategy=ddp|fsdp] ...

Every config key can be overridden with a dotted path, e.g. `training.max_steps=20
algorithm.adv_estimator=softmax algorithm.tau=0.5`; unknown keys are an error. `--import my_parts` imports
your module first, so the advantage functions, policy losses, weighters and tasks it registers can be named.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from config import ConfigError


def build_parser(description: str = __doc__, default_config: str = "config_tiny.yaml") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in training.ckpt_dir, or from CHECKPOINT")
    parser.add_argument("--import", action="append", default=[], dest="imports", metavar="MODULE",
                        help="import MODULE first: the parts it registers can then be named in the config")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def load(config_path: str, overrides: list[str], imports: list[str]):
    """The validated config (parts.load_config), after importing `imports`; None after printing the error."""
    for name in imports:
        importlib.import_module(name)
    from parts import load_config

    try:
        return load_config(config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def run(config_path: str, overrides: list[str], resume: str | bool | None, imports: list[str] = ()) -> int:
    config = load(config_path, overrides, list(imports))
    if config is None:
        return 2
    # imported after validation: config errors come before any model loads
    from countdown_task import DatasetError
    from distributed import DistributedError
    from fileio import DiskFullError
    from qwen2_model import CheckpointError
    from tokenizer import TokenizerFileError
    from trainer import DeviceError, NonFiniteError, train

    try:
        result = train(config, resume=resume)
    except (CheckpointError, TokenizerFileError, DatasetError, FileExistsError, FileNotFoundError,
            DiskFullError, NonFiniteError, DistributedError, DeviceError) as e:
        # the user's input or machine, not a bug: no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result.rank == 0:
        print(f"done: step {result.step}, checkpoint {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.config, args.overrides, args.resume, args.imports)


def exit_process(code: int) -> None:
    """Exit with `code`. A torchrun worker skips the interpreter's teardown: by then every file is written and
    closed and the process group destroyed, yet torch's C++ threads can still abort a rank during teardown
    ("terminate called without an active exception") after a finished run, and torchrun reports a failure."""
    if "LOCAL_RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(main())
