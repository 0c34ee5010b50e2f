"""Autograd of the local ops (``moe_fusion.autograd.local_ops``) against gradients of independent
references: the FFN written from SPEC §5.4's activation formulas (``oracle_ffn``) in fp64 and
differentiated by torch autograd, re-routing's inverse permutation written as a loop."""
from __future__ import annotations

import itertools

import pytest
import torch

import moe_fusion
from moe_fusion import NotDifferentiableError

from oracle_ffn import GATES, PLAIN

ACTIVATIONS = ["relu", "gelu", "fastgelu", "silu", "reglu", "geglu", "swiglu"]


def ffn_fp64(x, w1, w2, b1, b2, activation: str, segments: list[tuple[int, int]]):
    """``cat(act(x_e W1[e] + b1[e]) W2[e] + b2[e])`` over row segments; weights ``(E, ...)``."""
    outs = []
    for e, (r0, r1) in enumerate(segments):
        h = x[r0:r1] @ w1[e] + (0 if b1 is None else b1[e])
        if activation in GATES:
            half = h.size(-1) // 2
            a = h[:, :half] * GATES[activation](h[:, half:])
        else:
            a = PLAIN[activation](h)
        outs.append(a @ w2[e] + (0 if b2 is None else b2[e]))
    return torch.cat(outs)


def _inputs(rows: int, experts: int, k1: int, n1: int, n2: int, activation: str, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_act = n1 // 2 if activation in GATES else n1
    shapes = [(rows, k1), (experts, k1, n1), (experts, n_act, n2)] + ([(experts, n1), (experts, n2)] if bias else [])
    tensors = [torch.randn(s, generator=gen) for s in shapes]
    return tensors + ([None, None] if not bias else [])


def _reference_grads(tensors, activation, segments, grad_y):
    leaves = [None if t is None else t.double().requires_grad_() for t in tensors]
    y = ffn_fp64(*leaves, activation, segments)
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(y, present, grad_y.double())


@pytest.mark.parametrize("activation, bias, counts", list(itertools.product(
    ACTIVATIONS, [False, True], [None, (3, 0, 5)])))
def test_npu_ffn_gradients(activation, bias, counts):
    experts = 1 if counts is None else len(counts)
    tensors = _inputs(8, experts, 12, 16, 12, activation, bias, seed=len(activation) + 7 * bias)
    leaves = [None if t is None else t.clone().requires_grad_() for t in tensors]
    x, w1, w2, b1, b2 = leaves
    args = (w1[0], w2[0]) if counts is None else (w1, w2)
    biases = {} if not bias else ({"bias1": b1[0], "bias2": b2[0]} if counts is None else {"bias1": b1, "bias2": b2})
    y = moe_fusion.npu_ffn(x, *args, activation, expert_tokens=None if counts is None else list(counts), **biases)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(y, [t for t in leaves if t is not None], grad_y)
    segments = [(0, 8)] if counts is None else [(0, 3), (3, 3), (3, 8)]
    want = _reference_grads(tensors, activation, segments, grad_y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_npu_ffn_3d_input_and_bf16():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    w1 = torch.randn(8, 16, generator=gen).to(torch.bfloat16).requires_grad_()
    w2 = torch.randn(16, 8, generator=gen).to(torch.bfloat16).requires_grad_()
    y = moe_fusion.npu_ffn(x, w1, w2, "silu")
    gx, gw1, gw2 = torch.autograd.grad(y.float().sum(), (x, w1, w2))
    assert (gx.dtype, gx.shape, gw1.dtype, gw2.dtype) == (torch.bfloat16, x.shape, torch.bfloat16, torch.bfloat16)
    want = _reference_grads([x.detach().float().reshape(6, 8), w1.detach().float()[None], w2.detach().float()[None],
                             None, None], "silu", [(0, 6)], torch.ones(6, 8))
    torch.testing.assert_close(gx.double().reshape(6, 8), want[0], rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(gw1.double(), want[1][0], rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("activation", ["silu", "swiglu", "gelu"])
@pytest.mark.parametrize("counts", [(2, 0, 3), (0, 0, 7), (4, 3, 0)])
def test_npu_ffn_grouped_gradients(activation, counts):
    """Rows past the counts (7 - sum) are 0 in the forward: their gradient is 0."""
    tensors = _inputs(7, 3, 8, 12, 8, activation, True, seed=sum(counts))
    leaves = [t.clone().requires_grad_() for t in tensors]
    x, w1, w2, b1, b2 = leaves
    y = moe_fusion.npu_ffn_grouped(x, w1, w2, activation, expert_tokens=torch.tensor(counts), bias1=b1, bias2=b2)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad(y, leaves, grad_y)
    bounds = [0] + list(itertools.accumulate(counts))
    segments = list(zip(bounds, bounds[1:]))
    used = bounds[-1]
    want = _reference_grads([x[:used].detach()] + tensors[1:], activation, segments, grad_y[:used])
    torch.testing.assert_close(got[0][:used].double(), want[0], rtol=1e-4, atol=1e-4)
    assert not got[0][used:].any()
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_npu_ffn_grouped_gradients_compile_with_the_counts_on_the_device():
    tensors = _inputs(6, 2, 8, 8, 8, "silu", False, seed=9)[:3]
    counts = torch.tensor([2, 4])

    def loss(x, w1, w2):
        return (moe_fusion.npu_ffn_grouped(x, w1, w2, "silu", expert_tokens=counts) ** 2).sum()

    leaves = [t.clone().requires_grad_() for t in tensors]
    want = torch.autograd.grad(loss(*leaves), leaves)
    leaves = [t.clone().requires_grad_() for t in tensors]
    got = torch.autograd.grad(torch.compile(loss, backend="inductor", fullgraph=True)(*leaves), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_re_routing_gradient_is_the_inverse_permutation():
    gen = torch.Generator().manual_seed(5)
    counts = torch.tensor([[1, 2, 0], [2, 0, 1]])
    tokens = torch.randn(6, 4, generator=gen, requires_grad=True)
    scales = torch.randn(6, generator=gen, requires_grad=True)
    out_tokens, out_scales, idx, _ = moe_fusion.npu_moe_re_routing(tokens, counts, per_token_scales=scales)
    g_tokens, g_scales = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    got = torch.autograd.grad((out_tokens * g_tokens).sum() + (out_scales * g_scales).sum(), (tokens, scales))
    # Output rows: expert-major, rank-minor blocks of the rank-major input (SPEC §7.3).
    starts, order, row = {}, [], 0
    for i in range(2):
        for j in range(3):
            starts[i, j] = row
            row += int(counts[i, j])
    for j in range(3):
        for i in range(2):
            order += range(starts[i, j], starts[i, j] + int(counts[i, j]))
    want_tokens, want_scales = torch.zeros(6, 4), torch.zeros(6)
    for out_row, src in enumerate(order):
        want_tokens[src] += g_tokens[out_row]
        want_scales[src] += g_scales[out_row]
    assert idx.tolist() == order
    torch.testing.assert_close(got[0], want_tokens)
    torch.testing.assert_close(got[1], want_scales)


def test_quant_parameters_are_not_differentiable():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 32, generator=gen).half()
    w1 = torch.randint(-8, 8, (32, 32), dtype=torch.int8, generator=gen)
    w2 = torch.randint(-8, 8, (32, 32), dtype=torch.int8, generator=gen)
    scale = torch.rand(32, generator=gen).half().requires_grad_()
    offset = torch.zeros(32).half()
    y = moe_fusion.npu_ffn(x, w1, w2, "relu", antiquant_scale1=scale, antiquant_scale2=scale.detach(),
                           antiquant_offset1=offset, antiquant_offset2=offset)
    with pytest.raises(NotDifferentiableError, match="npu_ffn: antiquant_scale1 is not differentiable"):
        y.float().sum().backward()


def test_antiquant_activations_are_not_differentiable():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 32, generator=gen).half().requires_grad_()
    w = torch.randint(-8, 8, (32, 32), dtype=torch.int8, generator=gen)
    scale, offset = torch.rand(32, generator=gen).half(), torch.zeros(32).half()
    y = moe_fusion.npu_ffn(x, w, w, "relu", antiquant_scale1=scale, antiquant_scale2=scale, antiquant_offset1=offset,
                           antiquant_offset2=offset)
    with pytest.raises(NotDifferentiableError, match="npu_ffn: x is not differentiable \\(antiquant mode"):
        y.float().sum().backward()


def test_opcheck_with_gradients():
    tensors = _inputs(6, 2, 8, 8, 8, "silu", True, seed=2)
    x, w1, w2, b1, b2 = [t.clone().requires_grad_() for t in tensors]
    torch.library.opcheck(torch.ops.moe_fusion.npu_ffn.default, (x, w1, w2, "silu"),
                          {"expert_tokens": [2, 4], "bias1": b1, "bias2": b2})
    torch.library.opcheck(torch.ops.moe_fusion.npu_ffn_grouped.default, (x, w1, w2, "silu"),
                          {"expert_tokens": torch.tensor([2, 4]), "bias1": b1, "bias2": b2})
    tokens = torch.randn(6, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_fusion.npu_moe_re_routing.default, (tokens, torch.tensor([[1, 2], [2, 1]])))


def test_antiquant_bias_is_not_differentiable():
    """Antiquant mode (int8 weights): every FFN operand, a float bias included, is refused by name."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 32, generator=gen).half()
    w = torch.randint(-8, 8, (32, 32), dtype=torch.int8, generator=gen)
    scale, offset = torch.rand(32, generator=gen).half(), torch.zeros(32).half()
    bias1 = torch.randn(32, generator=gen).half().requires_grad_()
    y = moe_fusion.npu_ffn(x, w, w, "relu", bias1=bias1, antiquant_scale1=scale, antiquant_scale2=scale,
                           antiquant_offset1=offset, antiquant_offset2=offset)
    with pytest.raises(NotDifferentiableError, match="npu_ffn: bias1 is not differentiable \\(antiquant mode"):
        y.float().sum().backward()


def test_re_routing_int8_tokens_still_give_the_scales_gradient():
    """int8 tokens cannot require a gradient; their float32 per_token_scales can, and get the
    output gradient scattered back by expanded_row_idx (the integer outputs carry none)."""
    counts = torch.tensor([[1, 2], [2, 1]])
    tokens = torch.randint(-100, 100, (6, 4), dtype=torch.int8)
    scales = torch.rand(6, requires_grad=True)
    _, out_scales, idx, num = moe_fusion.npu_moe_re_routing(tokens, counts, per_token_scales=scales)
    assert not idx.requires_grad and not num.requires_grad
    g = torch.arange(6, dtype=torch.float32)
    (grad,) = torch.autograd.grad((out_scales * g).sum(), scales)
    # Rank-major input blocks r0e0 = row 0, r0e1 = rows 1-2, r1e0 = rows 3-4, r1e1 = row 5;
    # the output is expert-major (SPEC §7.3).
    order = [0, 3, 4, 1, 2, 5]
    want = torch.zeros(6)
    for out_row, src in enumerate(order):
        want[src] += g[out_row]
    assert idx.tolist() == order
    torch.testing.assert_close(grad, want)
