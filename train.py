"""Train a policy with GRPO on Countdown.

    python train.py --config config.yaml [section.key=value ...] [--resume [CHECKPOINT]]
    torchrun --nproc_per_node N train.py --config config.yaml [distributed.strategy=ddp|fsdp] ...

Every config key can be overridden with a dotted path, e.g. `training.max_steps=20
algorithm.adv_estimator=softmax algorithm.tau=0.5`; unknown keys are an error.
"""

from __future__ import annotations

import argparse
import os
import sys

from config import ConfigError, load_config


def build_parser(description: str = __doc__, default_config: str = "config_tiny.yaml") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in training.ckpt_dir, or from CHECKPOINT")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def run(config_path: str, overrides: list[str], resume: str | bool | None) -> int:
    try:
        config = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
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
    return run(args.config, args.overrides, args.resume)


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
