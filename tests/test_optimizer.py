"""MemoryEfficientAdamW against torch.optim.AdamW, state_dict resume, bf16, registry."""
import copy
import io

import pytest
import torch

from optimizer import MemoryEfficientAdamW, build_optimizer

HPARAMS = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)


def make_params(dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(1)
    shapes = [(7, 5), (5,), (3, 4, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def fake_grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: range) -> None:
    for t in steps:
        for p, g in zip(params, fake_grads(params, t)):
            p.grad = g
        opt.step()


def test_matches_torch_adamw_bit_identical():
    ours, ref = make_params(), make_params()
    run(MemoryEfficientAdamW(ours, **HPARAMS), ours, range(10))
    run(torch.optim.AdamW(ref, foreach=False, **HPARAMS), ref, range(10))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_grad_params_untouched_and_stateless():
    params = make_params()
    frozen = params[1]
    before = frozen.detach().clone()
    opt = MemoryEfficientAdamW(params, **HPARAMS)
    for t in range(3):
        for p, g in zip(params, fake_grads(params, t)):
            p.grad = None if p is frozen else g
        opt.step()
    assert torch.equal(frozen, before)
    assert frozen not in opt.state


def test_state_is_fp32_on_cpu():
    params = make_params()
    opt = MemoryEfficientAdamW(params, **HPARAMS)
    run(opt, params, range(1))
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt.state[p][key].device.type == "cpu"
            assert opt.state[p][key].dtype == torch.float32


@pytest.mark.parametrize("via_bytes", [False, True])
def test_state_dict_resume_continues_identically(via_bytes):
    uninterrupted = make_params()
    run(MemoryEfficientAdamW(uninterrupted, **HPARAMS), uninterrupted, range(8))

    first = make_params()
    opt = MemoryEfficientAdamW(first, **HPARAMS)
    run(opt, first, range(3))
    sd = opt.state_dict()
    if via_bytes:  # the checkpoint path: torch.save / torch.load
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        sd = torch.load(buf, weights_only=True)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    fresh = MemoryEfficientAdamW(resumed, lr=123.0)  # hyper-params come from the state dict
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["lr"] == HPARAMS["lr"]
    run(opt, first, range(3, 4))  # the old optimizer moving on must not affect the loaded one
    run(fresh, resumed, range(3, 8))
    for a, b in zip(resumed, uninterrupted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for p in resumed:
        assert fresh.state[p]["exp_avg"].dtype == torch.float32
        assert fresh.state[p]["exp_avg"].device.type == "cpu"


def test_state_dict_interchangeable_with_torch_adamw():
    """A run can switch between "adamw" and "adamw_offload" on resume."""
    ref = make_params()
    run(torch.optim.AdamW(ref, foreach=False, **HPARAMS), ref, range(6))

    params = make_params()
    torch_opt = torch.optim.AdamW(params, foreach=False, **HPARAMS)
    run(torch_opt, params, range(3))
    ours = MemoryEfficientAdamW(params)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    run(ours, params, range(3, 6))
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bf16_params_fp32_state():
    params32 = make_params()
    params16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params32]
    opt = MemoryEfficientAdamW(params16, **HPARAMS)
    ref = torch.optim.AdamW(params32, foreach=False, **HPARAMS)
    for t in range(5):
        grads = fake_grads(params32, t)
        for p16, p32, g in zip(params16, params32, grads):
            p16.grad, p32.grad = g.to(torch.bfloat16), g
        opt.step()
        ref.step()
    for p16, p32 in zip(params16, params32):
        assert p16.dtype == torch.bfloat16
        assert opt.state[p16]["exp_avg"].dtype == torch.float32
        assert opt.state[p16]["exp_avg_sq"].dtype == torch.float32
        # bf16 has ~3 significant digits; 5 steps of lr=1e-2 must track the fp32 run closely
        torch.testing.assert_close(p16.float(), p32.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["adamw", "adamw_offload"])
def test_bf16_weights_keep_small_updates_through_fp32_master_weights(name):
    """lr 1e-5 on a bf16 weight of 0.01 (resolution ~6e-5): each step is below half the resolution, so pure-bf16
    AdamW rounds every one away; the registry's optimizers accumulate them in fp32 master weights."""
    hp = dict(lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    start = torch.full((64,), 0.01)
    grads = [torch.randn(64, generator=torch.Generator().manual_seed(t)).abs() + 0.5 for t in range(100)]

    def train(param, opt):
        for g in grads:
            param.grad = g.to(param.dtype)
            opt.step()
        return param.detach().float()

    fp32 = torch.nn.Parameter(start.clone())
    reference = train(fp32, torch.optim.AdamW([fp32], foreach=False, **hp))
    pure = torch.nn.Parameter(start.to(torch.bfloat16))
    assert torch.equal(train(pure, torch.optim.AdamW([pure], foreach=False, **hp)), start.to(torch.bfloat16).float())
    ours = torch.nn.Parameter(start.to(torch.bfloat16))
    opt = build_optimizer([ours], name, **hp)
    moved = train(ours, opt)
    assert float((reference - start).abs().min()) > 5e-4  # the fp32 run moved ~100 x lr (= 16 bf16 steps)
    assert torch.allclose(moved, reference, atol=6e-5, rtol=0)  # within one bf16 step of it
    assert opt.state[ours]["master"].dtype == torch.float32


def test_fp32_weights_need_no_master_copy():
    params = make_params()
    opt = build_optimizer(params, "adamw_offload", **HPARAMS)
    for p, g in zip(params, fake_grads(params, 0)):
        p.grad = g
    opt.step()
    assert all("master" not in opt.state[p] for p in params)


def test_offload_false_keeps_state_beside_params():
    params = make_params()
    opt = MemoryEfficientAdamW(params, offload=False, **HPARAMS)
    run(opt, params, range(2))
    assert all(opt.state[p]["exp_avg"].device == p.device for p in params)


def test_registry():
    assert type(build_optimizer(make_params(), "adamw", **HPARAMS)) is torch.optim.AdamW
    opt = build_optimizer(make_params(), "adamw_offload", **HPARAMS)
    assert isinstance(opt, MemoryEfficientAdamW) and opt.offload
    with pytest.raises(ValueError, match="adamw_offload"):
        build_optimizer(make_params(), "sgd", **HPARAMS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_stays_on_pinned_cpu():
    ours = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    ref = [torch.nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = MemoryEfficientAdamW(ours, **HPARAMS)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **HPARAMS)
    for t in range(5):
        for a, b, g in zip(ours, ref, fake_grads(ours, t)):
            a.grad, b.grad = g.cuda(), g.cuda()
        opt.step()
        ref_opt.step()
    for a, b in zip(ours, ref):
        assert a.device.type == "cuda"
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[a][key]
            assert state.device.type == "cpu" and state.is_pinned()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    resumed = MemoryEfficientAdamW(ours)
    resumed.load_state_dict(opt.state_dict())
    assert all(resumed.state[p]["exp_avg"].is_pinned() for p in ours)
