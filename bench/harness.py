"""What the benchmarks and probes in bench/ share, so that each script holds only its own measurement.

Import it before the repository's modules (`import harness` first: it puts the repository root on sys.path).
It holds the named model shapes and random weights loaded by both sides (ours and transformers'), the rollout
workloads, timing in alternating rounds (a slow spell of a shared machine hits every side alike), the ratio
with its 95% interval, peak memory, child processes that answer with one JSON line, markdown tables, and the
overrides that make a training run step without evaluating, saving or ending.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import cli  # noqa: E402
from qwen2_model import ModelConfig, Transformer  # noqa: E402
from stats import ratio_interval  # noqa: E402

# name -> (hidden, layers, heads, kv_heads, head_dim, intermediate, vocab, tied, qwen3)
SHAPES = {
    "small": (256, 4, 4, 2, 64, 768, 8192, True, False),
    "qwen2.5-0.5b": (896, 24, 14, 2, 64, 4864, 151936, True, False),
    "qwen2.5-1.5b": (1536, 28, 12, 2, 128, 8960, 151936, True, False),
    "qwen2.5-3b": (2048, 36, 16, 2, 128, 11008, 151936, True, False),
    "qwen3-0.6b": (1024, 28, 16, 8, 128, 3072, 151936, True, True),
}
NEVER_STEPS = 10 ** 9  # an interval no run reaches: no evaluation, checkpoint or end within a bench


def model_config(shape: str, dtype: str) -> ModelConfig:
    """A named shape of SHAPES."""
    h, layers, heads, kv, hd, inter, vocab, tied, qwen3 = SHAPES[shape]
    return ModelConfig(model_type="qwen3" if qwen3 else "qwen2", vocab_size=vocab, hidden_size=h,
                       intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=hd, max_position_embeddings=4096, rope_theta=1e6,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, attention_bias=not qwen3, use_qk_norm=qwen3,
                       torch_dtype=dtype)


def body_config(hidden: int, layers: int, vocab: int, kv_heads: int, dtype: str) -> ModelConfig:
    """A Qwen2 body of heads of 64 dims and an MLP of 3 x hidden, for benches that size the model by flags."""
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=kv_heads,
                       head_dim=64, max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, torch_dtype=dtype)


def parser(description: str | None) -> cli.ArgumentParser:
    """A bench's parser: flags in either spelling (--new_tokens = --new-tokens), errors in one line."""
    return cli.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def device_arg(text: str) -> str:
    """--device's value, checked before any model is built: a CUDA device on a machine without one is an error."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:1, ...)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch "
                                         f"{torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", type=device_arg, help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def add_body_args(p: argparse.ArgumentParser, hidden: int, layers: int, vocab: int) -> None:
    """--device, --dtype and the body_config flags, with the bench's own defaults."""
    add_device_args(p)
    p.add_argument("--hidden", type=int, default=hidden)
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--vocab", type=int, default=vocab)


def load_models(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, sides: Sequence[str]) -> dict:
    """The same random weights (seed 0, saved once) as our Transformer ("ours") and as transformers' model
    ("reference"), for the sides asked."""
    torch.manual_seed(0)
    out = {}
    with tempfile.TemporaryDirectory() as d:
        Transformer.from_config(cfg, dtype=torch.float32).save_pretrained(d)
        if "ours" in sides:
            out["ours"] = Transformer.from_pretrained(d, device=device, dtype=dtype).eval()
        if "reference" in sides:
            import transformers

            out["reference"] = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    return out


def workloads(vocab: int, rows: int) -> dict[str, tuple[list[list[int]], int]]:
    """name -> (prompts, rows per prompt): `rows` distinct prompts of 20-60 tokens; GRPO's 16 questions x 8."""
    g = torch.Generator().manual_seed(1)
    distinct = [torch.randint(1, vocab, (int(torch.randint(20, 61, (1,), generator=g)),), generator=g).tolist()
                for _ in range(max(rows, 16))]
    return {"distinct": (distinct[:rows], 1), "grpo": (distinct[:16], 8)}


def sampling_keys(n_prompts: int, group: int) -> torch.Tensor:
    """The rollout engine's noise keys for `group` samples of each of `n_prompts` questions (stream 0)."""
    from rollout import row_keys, stream_key

    return row_keys(stream_key(0), [q for q in range(n_prompts) for _ in range(group)],
                    [j for _ in range(n_prompts) for j in range(group)])


def synchronizer(device: torch.device) -> Callable[[], None]:
    """Waits for the device's queued work, so a timer reads the work and not its launch."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def alternate(fns: dict[str, Callable[[], Any]], rounds: int,
              sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each function in each of `rounds` rounds, the functions run in turn within a round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> tuple[float, float, float]:
    """Geometric mean of the per-round ratios and its 95% t interval on their logs (stats.ratio_interval)."""
    return ratio_interval([a / b for a, b in zip(numerator, denominator)])


def ratio_text(ratio: tuple[float, float, float]) -> str:
    """'1.73x [1.44, 1.89]'; the interval left out where there is none (one round)."""
    mean, low, high = ratio
    return f"{mean:.2f}x" if low != low else f"{mean:.2f}x [{low:.2f}, {high:.2f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the high-water mark); 0 where there is none."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """with PeakMemory(device) as m: work()  ->  m.bytes, the peak the work added: on CUDA the allocator's
    high-water mark above what was allocated before it; on CPU the resident-set high-water mark (VmHWM) above
    the resident set before it. VmHWM never falls, so on CPU measure each piece in a process of its own."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.bytes = 0

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = rss_kib("VmRSS:") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = rss_kib("VmHWM:") * 1024 - self.base


def child_json(cmd: Sequence[str]) -> dict:
    """Run a child process (a measurement that needs a process of its own) and return the JSON object on the
    last line of its output; a failed child ends the bench with its error output."""
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quiet_run_overrides(out: Path) -> list[str]:
    """Config overrides that put a run's logs, checkpoints and credit logs under `out` and keep it from
    evaluating, saving or ending while a bench steps it."""
    return [f"training.log_dir={out / 'logs'}", f"training.ckpt_dir={out / 'ckpt'}", f"credit.dir={out / 'credit'}",
            f"training.max_steps={NEVER_STEPS}", f"training.eval_interval={NEVER_STEPS}",
            f"training.ckpt_save_interval={NEVER_STEPS}"]


def setup_run(config_path: str | Path, out: Path, extra: Sequence[str] = ()):
    """A trainer.Run of the config, stepped with trainer.train_step(run, step); the tiny default builds its
    model and data first when they are missing."""
    import trainer
    from parts import load_config

    return trainer.setup(load_config(str(config_path), [*quiet_run_overrides(out), *extra]), resume=None)
