"""AdamW with its state offloaded to CPU, and a name -> optimizer registry.

On a 24 GB GPU the fp32 Adam moments of a 3B model (2 x 12 GB) do not fit beside the weights, so
`MemoryEfficientAdamW` keeps them on the CPU (pinned memory when CUDA is available, for fast
copies) and does the update there, one parameter at a time: only one parameter's gradient and
new value cross the bus at a time, and no GPU copy of the state outlives a step.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from distributed import is_dtensor

ParamsT = Iterable[torch.Tensor] | Iterable[dict[str, Any]]


class MemoryEfficientAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter, 2019, "Decoupled Weight Decay Regularization").

    Per step t, with g the gradient:
        p <- p * (1 - lr * weight_decay)
        m <- beta1 * m + (1 - beta1) * g,   v <- beta2 * v + (1 - beta2) * g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    using the same operations, in the same order, as `torch.optim.AdamW` with default flags
    (single-tensor path), so on CPU fp32 the two are bit-identical.

    State (`step`, `exp_avg`, `exp_avg_sq`) is fp32 on the state device: the CPU when
    `offload=True`, else the parameter's own device. The update runs in fp32 on the state device
    and is written back in the parameter's dtype. With `master_weights=True`, a bf16/fp16 parameter
    also gets an fp32 master copy (`master`) that the update accumulates into: a bf16 weight near 1
    has a resolution of 2^-8, so an AdamW step of lr 1e-6 applied to the bf16 value itself is rounded
    away entirely, step after step; the master keeps every step and the bf16 weight follows it.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        offload: bool = True,
        master_weights: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid lr: {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if eps < 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.offload, self.master_weights = offload, master_weights
        # Pinned host memory makes GPU<->CPU copies DMA-able; without CUDA it is unavailable.
        self.pin_memory = offload and torch.cuda.is_available()

    def _state_device(self, param: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self.offload else param.device

    def _empty_state(self, param: torch.Tensor) -> torch.Tensor:
        """An uninitialised fp32 tensor shaped like `param` on the state device (an FSDP2-sharded parameter's
        state is sharded like it: zeros_like keeps the DTensor layout)."""
        if is_dtensor(param):
            return torch.zeros_like(param, dtype=torch.float32)
        device = self._state_device(param)
        pin = self.pin_memory and device.type == "cpu"
        return torch.empty(param.shape, dtype=torch.float32, device=device, pin_memory=pin)

    def _init_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            # a float32 CPU tensor, as torch.optim.AdamW stores it: the two load each other's state
            "step": torch.tensor(0.0, dtype=torch.float32),
            "exp_avg": self._empty_state(param).zero_(),
            "exp_avg_sq": self._empty_state(param).zero_(),
        }

    def _needs_master(self, param: torch.Tensor) -> bool:
        return self.master_weights and param.dtype != torch.float32

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            eps, weight_decay = group["eps"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("MemoryEfficientAdamW does not support sparse gradients")
                state = self.state[param]
                if not state:
                    state.update(self._init_state(param))
                if self._needs_master(param) and "master" not in state:  # also after loading an old state
                    state["master"] = self._empty_state(param).copy_(param.detach())
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                device = exp_avg.device

                # Blocking copies: the next line reads them, so async would only add a sync.
                grad = param.grad.detach().to(device=device, dtype=torch.float32)
                p32 = state["master"] if "master" in state else param.detach().to(device=device, dtype=torch.float32,
                                                                                   copy=True)

                step_t += 1
                if weight_decay != 0:
                    p32.mul_(1 - lr * weight_decay)
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

                step = step_t.item()
                bias_correction1 = 1 - beta1**step
                bias_correction2 = 1 - beta2**step
                step_size = lr / bias_correction1
                denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
                p32.addcdiv_(exp_avg, denom, value=-step_size)

                param.copy_(p32)  # back to the param's device, rounded to its dtype
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore hyper-parameters and state; moments land fp32 on the state device.

        The base class would first cast each moment to the parameter's device and dtype (a bf16
        GPU copy of the whole state), so it gets the param groups only and we place the state.
        """
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        id_to_param = dict(zip(saved_ids, params, strict=True))
        for saved_id, saved in state_dict["state"].items():
            param = id_to_param[saved_id]
            self.state[param] = {
                key: (
                    torch.tensor(float(value), dtype=torch.float32)
                    if key == "step"
                    else self._empty_state(param).copy_(value)
                    if isinstance(value, torch.Tensor)
                    else value
                )
                for key, value in saved.items()
            }


def _adamw(params: ParamsT, **hparams: Any) -> torch.optim.Optimizer:
    """torch's AdamW for fp32 weights (fused on CUDA; on CPU the single-tensor path, whose numbers
    MemoryEfficientAdamW reproduces); for bf16/fp16 weights fp32 moments and fp32 master weights beside them."""
    groups = list(params)
    tensors = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    if any(p.dtype in (torch.bfloat16, torch.float16) for p in tensors):
        return MemoryEfficientAdamW(groups, offload=False, master_weights=True, **hparams)
    fused = bool(tensors) and all(p.is_cuda for p in tensors) and not any(is_dtensor(p) for p in tensors)
    return torch.optim.AdamW(groups, fused=True, **hparams) if fused else torch.optim.AdamW(groups, foreach=False,
                                                                                             **hparams)


def _adamw_offload(params: ParamsT, **hparams: Any) -> torch.optim.Optimizer:
    return MemoryEfficientAdamW(params, offload=True, master_weights=True, **hparams)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw_offload": _adamw_offload,
}


def build_optimizer(
    params: ParamsT,
    name: str,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """Optimizer by config name: "adamw" (state beside the params) or "adamw_offload" (on CPU)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
