"""torchrun support: the process group, how work is split over ranks and results gathered, and the
DDP / FSDP2 wrapping of the policy for the update.

Every rank holds the whole step's episodes: questions are rolled out in contiguous shards (the sampling
noise is keyed by question, not by batch position, so the tokens do not depend on the number of ranks)
and gathered in rank order, so the gathered list is exactly what one process would have sampled. Group
statistics, filtering and normalizers are then computed identically on every rank. The update splits the
micro-batches over ranks and lets DDP / FSDP2 sum the gradients.

A single process (no torchrun) gets `Dist()` with world_size 1, and every helper here is then a no-op.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

T = TypeVar("T")
K = TypeVar("K")
STRATEGIES = ("ddp", "fsdp")


class DistributedError(RuntimeError):
    """A launch that cannot work as asked (e.g. more ranks on a node than GPUs)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        """Parameters are FSDP2-sharded (torchrun with distributed.strategy=fsdp)."""
        return self.enabled and self.strategy == "fsdp"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device, strategy: str = "ddp") -> Dist:
    """Join the torchrun job (nccl on CUDA, gloo on CPU); a plain `python` launch gets a 1-process Dist."""
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not launched_by_torchrun():
        return Dist(strategy=strategy)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise DistributedError(f"torchrun started local rank {local_rank} but this node sees {visible} GPU(s): use "
                               f"--nproc_per_node <= {visible} (CUDA_VISIBLE_DEVICES limits what is seen)")
        torch.cuda.set_device(local_rank)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(tdist.get_rank(), tdist.get_world_size(), local_rank, strategy)


def local_device(device: torch.device, d: Dist) -> torch.device:
    """Each rank's own GPU under torchrun; the CPU stays the CPU."""
    return torch.device("cuda", d.local_rank) if device.type == "cuda" and d.enabled else device


def shutdown(d: Dist) -> None:
    if d.enabled and tdist.is_initialized():
        # every rank arrives first: tearing gloo down while a peer still saves or gathers can abort a rank
        tdist.barrier()
        tdist.destroy_process_group()


def shard(n: int, d: Dist) -> range:
    """Rank d.rank's contiguous part of range(n); parts differ in size by at most one, in rank order."""
    base, extra = divmod(n, d.world_size)
    start = d.rank * base + min(d.rank, extra)
    return range(start, start + base + (d.rank < extra))


def gather(items: list[T], d: Dist) -> list[T]:
    """Concatenate every rank's list in rank order (picklable objects: episodes, token lists)."""
    if not d.enabled:
        return items
    parts: list[Any] = [None] * d.world_size
    tdist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def sum_values(values: dict[K, float], d: Dist) -> dict[K, float]:
    """Key-wise sum of every rank's dict (keys missing on a rank count as 0)."""
    if not d.enabled:
        return values
    parts: list[Any] = [None] * d.world_size
    tdist.all_gather_object(parts, values)
    out: dict[K, float] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0.0) + v
    return out


def all_sum(x: float, d: Dist) -> float:
    return sum_values({"x": x}, d)["x"] if d.enabled else x


def barrier(d: Dist) -> None:
    if d.enabled:
        tdist.barrier()


@contextmanager
def main_first(d: Dist) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds the tiny model or generates data on disk), then the others
    run it and find the files there. If rank 0 fails, the others still go on and meet the same error (a
    missing model directory, ...) instead of waiting for rank 0 forever; torchrun then stops the job."""
    if not d.is_main:
        barrier(d)
    try:
        yield
    finally:
        if d.is_main:
            barrier(d)


# ---------------------------------------------------------------- the update


def wrap(model: torch.nn.Module, d: Dist, device: torch.device | None = None) -> torch.nn.Module:
    """The module the update calls: DDP around the model, or the model itself sharded in place by FSDP2
    (each decoder layer, then the root; the shards then go to `device`). One process: the model unchanged."""
    if not d.enabled:
        return model
    if d.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model.to(device) if device is not None else model
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [d.local_rank] if next(model.parameters()).is_cuda else None
    # buffers (rotary tables, the rollout's KV cache) are the same everywhere: no per-forward broadcast
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.13
    no_sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def grad_scale(d: Dist) -> float:
    """DDP and FSDP2 average gradients over ranks; each rank's loss already carries the global normalizers,
    so it is multiplied by the world size to make the average the sum (the single-process gradient)."""
    return float(d.world_size)


def gradient_sync(model: torch.nn.Module, d: Dist, sync: bool) -> Any:
    """Context for one backward of a gradient-accumulation loop: reduce gradients only when `sync`."""
    if d.fsdp:
        model.set_requires_gradient_sync(sync)
    if d.enabled and not d.fsdp and not sync:
        return model.no_sync()
    return nullcontext()


def sum_gradients(params: Sequence[torch.nn.Parameter], d: Dist) -> None:
    """Sum the gradients of parameters outside the wrapped model (e.g. the attribution head) over ranks.
    Their backward was scaled by `grad_scale` like the model's, so the sum is divided by it again."""
    if not d.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        tdist.all_reduce(p.grad)
        p.grad.div_(grad_scale(d))


def split_work(n: int, d: Dist) -> tuple[range, int]:
    """This rank's contiguous part of n work units and the count every rank must run (ranks with fewer
    run empty units, so every rank makes the same number of forward/backward calls: DDP and FSDP2
    synchronize inside them)."""
    part = shard(n, d)
    return part, math.ceil(n / d.world_size)


# ---------------------------------------------------------------- rollouts and checkpoints under FSDP2


def _fsdp_modules(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def full_weights(model: torch.nn.Module, d: Dist) -> Iterator[None]:
    """Under FSDP2, gather the whole model on every rank for rollouts, so each rank can decode its own
    shard for as many steps as it needs without lock-step collectives; sharded again on exit."""
    if not d.fsdp:
        yield
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


def is_dtensor(t: Any) -> bool:
    """An FSDP2-sharded tensor (DTensor), checked without importing torch.distributed.tensor."""
    return type(t).__name__ == "DTensor"


def full_tensor(t: Any) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank must call it); a plain tensor as is."""
    return t.full_tensor() if is_dtensor(t) else t


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over parameters that may mix FSDP2-sharded (DTensor) and plain tensors
    (the attribution head beside a sharded model): one global norm, each kind clipped on its own."""
    kinds: dict[bool, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            kinds.setdefault(is_dtensor(p), []).append(p)
    if len(kinds) < 2:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = {k: torch.nn.utils.get_total_norm([p.grad for p in ps]) for k, ps in kinds.items()}
    total = torch.linalg.vector_norm(torch.stack([norms[True].full_tensor(), norms[False].to(norms[True].device)]))
    for ps in kinds.values():
        torch.nn.utils.clip_grads_with_norm_(ps, max_norm, total)
    return total


def _to_main(t: Any, d: Dist) -> Any:
    """Gather a (possibly sharded) tensor whole, one at a time, and keep it on rank 0's CPU only: no rank
    ever holds a second whole copy of the model on its GPU. Other ranks get None."""
    if not isinstance(t, torch.Tensor):
        return t
    whole = full_tensor(t)
    return whole.detach().cpu() if d.is_main else None


def full_model_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor] | None:
    """The model's checkpoint tensors gathered whole onto rank 0's CPU (None on the other ranks)."""
    state = {k: _to_main(v, d) for k, v in model.checkpoint_state_dict().items()}
    return state if d.is_main else None


def full_optimizer_state(optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any] | None:
    """The optimizer's state dict gathered whole onto rank 0's CPU, in the single-process layout (so a
    checkpoint from N ranks resumes on any number); None on the other ranks."""
    sd = optimizer.state_dict()
    state = {k: {name: _to_main(v, d) for name, v in s.items()} for k, s in sd["state"].items()}
    return {**sd, "state": state} if d.is_main else None


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a single-process-layout optimizer state; moments of sharded parameters are cut to this rank's shard."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    for k, s in sd["state"].items():
        p = params[int(k)]
        if is_dtensor(p):
            s.update({n: distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
                      for n, v in s.items() if isinstance(v, torch.Tensor) and v.shape == p.shape})
    optimizer.load_state_dict(sd)
