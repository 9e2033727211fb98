"""The run's scalar log: metrics.jsonl (one JSON object per step, rewritten atomically, so a crash never leaves
a torn line) and TensorBoard scalars and text. A resumed run drops the steps it is about to redo."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fileio import atomic_write_text


class MetricsLog:
    """metrics.jsonl (one JSON object per step, rewritten atomically) and TensorBoard scalars/text."""

    def __init__(self, log_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        self.path = log_dir / "metrics.jsonl"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():  # drop steps the resumed run will redo
                try:
                    if json.loads(line).get("step", math.inf) <= resume_step:
                        self.lines.append(line)
                except json.JSONDecodeError:
                    pass
        self.writer = SummaryWriter(str(log_dir), purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self.lines.append(json.dumps({"step": step, **clean}))
        atomic_write_text(self.path, "\n".join(self.lines) + "\n", "metrics.jsonl")

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class NullLog(MetricsLog):
    """What ranks other than 0 log to: nothing (rank 0 writes TensorBoard and metrics.jsonl)."""

    def __init__(self) -> None:  # noqa: D107 - no files
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass
