"""Train a policy with GRPO on the configured task (data.task: countdown, countdown_words, bandit, gsm8k, or one
of your own).

    python train.py --config config.yaml [section.key=value ...] [--resume [CHECKPOINT]] [--import MODULE]
    python train.py --config config.yaml [section.key=value ...] --print-config
    torchrun --nproc_per_node N train.py --config config.yaml [distributed.strategy=ddp|fsdp] ...

Every config key can be overridden with a dotted path, e.g. `training.max_steps=20
algorithm.adv_estimator=softmax algorithm.tau=0.5` (or `--set training.max_steps=20`); unknown keys are an
error. Your own advantage functions, policy losses, weighters and tasks register when their module is
imported: name it in the config (`imports: [my_parts]`) or with `--import my_parts` (a module name or a .py
file's path), then select it like a built-in part. Flags take `-` or `_` between words.
"""

from __future__ import annotations

import argparse
import os
import sys

import cli
from config import ConfigError


def build_parser(description: str = __doc__, default_config: str = "config_tiny.yaml") -> cli.ArgumentParser:
    parser = cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                        help="continue from the newest checkpoint in training.ckpt_dir, or from CHECKPOINT")
    parser.add_argument("--import", action="append", default=[], dest="imports", metavar="MODULE",
                        help="import MODULE (a name, or a .py file's path) first, as the config's `imports` do: the "
                             "parts it registers can then be named in the config")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (every key, defaults included) and exit")
    cli.add_overrides(parser)
    return parser


def resume_and_overrides(resume: str | bool | None, overrides: list[str]) -> tuple[str | bool | None, list[str]]:
    """`--resume training.max_steps=9` means the newest checkpoint and an override, not a checkpoint named so."""
    if isinstance(resume, str) and "=" in resume and not os.path.exists(resume):
        return True, [resume, *overrides]
    return resume, overrides


def preload_imports(argv: list[str], default_config: str) -> None:
    """Import the modules that the command line (--import, `imports=...`) and its config file name, before a
    parser whose flags come from the registries is built (train_mitigations.py's --mitigation and its
    parameters then offer the parts they register). Raises ConfigError."""
    pre = cli.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=default_config)
    pre.add_argument("--import", action="append", default=[], dest="imports")
    cli.add_overrides(pre)
    args, _ = pre.parse_known_args(argv)
    words = [o for o in cli.overrides(args) if o.partition("=")[0].strip() == "imports"]
    from config import load_raw
    from parts import with_imports

    with_imports(load_raw(args.config, words), args.imports)


def load(config_path: str, overrides: list[str], imports: list[str]):
    """The validated config (parts.load_config, after importing the config's `imports` and `imports`); None after
    printing the error."""
    try:
        from parts import load_config

        return load_config(config_path, overrides, imports)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None


def run(config_path: str, overrides: list[str], resume: str | bool | None, imports: list[str] = (),
        print_config: bool = False) -> int:
    config = load(config_path, overrides, list(imports))
    if config is None:
        return 2
    if print_config:
        from config import to_yaml

        print(to_yaml(config), end="")
        return 0
    # imported after validation: config errors come before any model loads
    from checkpoint import check_checkpoint
    from countdown_task import DatasetError
    from distributed import DistributedError
    from fileio import DiskFullError
    from qwen2_model import CheckpointError
    from tokenizer import TokenizerFileError
    from trainer import DeviceError, NonFiniteError, train

    try:
        if isinstance(resume, str):
            check_checkpoint(resume)
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
    resume, overrides = resume_and_overrides(args.resume, cli.overrides(args))
    return run(args.config, overrides, resume, args.imports, args.print_config)


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
