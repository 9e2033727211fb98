"""Linear layers run from oneDNN-packed weights (qwen2_model.Linear.pack, Transformer.packed_linears): the
results of F.linear to float rounding, a row's result independent of the batch, never stale weights, never
with gradient, and the copies dropped after the context (an exception included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from qwen2_model import _PACKED, Linear, Transformer, can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="no oneDNN in this torch build")


def linear(n_in: int = 96, n_out: int = 200, bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_inference_is_f_linear_to_rounding_and_row_independent(bias):
    lin, x = linear(bias=bias), torch.randn(70, 3, 96)
    with torch.no_grad():
        expected = F.linear(x, lin.weight, lin.bias)
        lin.pack(32)
        out = lin(x)
        assert out.shape == expected.shape
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        # a row's result does not depend on the rows it is computed with (sampling keys rows, not batches)
        for rows in (1, 5, 31, 33):
            assert torch.equal(lin(x[:rows]), out[:rows])


def test_a_weight_changed_after_packing_is_used_as_it_is_now():
    lin, x = linear(), torch.randn(8, 96)
    with torch.no_grad():
        lin.pack(8)
        lin.weight.mul_(-2.0)  # an optimizer step in place: the packed copy is now stale
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))


def test_with_gradient_the_weight_itself_runs_and_gets_its_gradient():
    lin, x = linear(), torch.randn(8, 96)
    lin.pack(8)
    out = lin(x)
    assert torch.equal(out, F.linear(x, lin.weight, lin.bias))
    out.sum().backward()
    torch.testing.assert_close(lin.weight.grad, x.new_ones(8, 200).t() @ x)


def model() -> Transformer:
    return random_model(300, hidden_size=64, intermediate_size=128, head_dim=16, max_position_embeddings=64,
                        attention_bias=True).eval()


def test_packed_linears_packs_every_linear_for_the_context_only():
    m, tokens = model(), torch.randint(0, 300, (3, 12))
    linears = [mod for mod in m.modules() if isinstance(mod, Linear)]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the (tied) lm_head
    with torch.no_grad():
        expected = m(tokens)
        with m.packed_linears(3) as n:
            assert n == len(linears) and all(mod.is_packed and _PACKED in mod.weight.__dict__ for mod in linears)
            torch.testing.assert_close(m(tokens), expected, rtol=1e-5, atol=1e-5)
        assert not any(mod.is_packed or _PACKED in mod.weight.__dict__ for mod in linears)
        with pytest.raises(RuntimeError, match="inside"):
            with m.packed_linears(3):
                raise RuntimeError("inside")
        assert not any(mod.is_packed or _PACKED in mod.weight.__dict__ for mod in linears)


def test_nothing_is_packed_where_onednn_does_not_apply():
    m = model().to(torch.bfloat16)
    assert not can_pack(m.lm_head.weight)
    with m.packed_linears(4) as n:
        assert n == 0
    assert not can_pack(torch.zeros(2, 2, device="meta"))
