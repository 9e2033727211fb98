"""The peak memory one piece of work adds: on CUDA the allocator's high-water mark above what was allocated
before it; on CPU the process's resident-set high-water mark (VmHWM) above the resident set before it. VmHWM
never falls, so on CPU measure each piece in a process of its own."""

from __future__ import annotations

from pathlib import Path

import torch


def rss_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now, VmHWM: the high-water mark); 0 where there is none."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith(field):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """with PeakMemory(device) as m: work()  ->  m.bytes, the peak the work added."""

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
