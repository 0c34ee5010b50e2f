"""``torch.autograd.gradcheck`` in float64 of the local ops' autograd formulas (``moe_fusion.autograd``):
the analytic gradients against finite differences of the ops themselves, on the portable target
(the one that accepts float64; the kernels then compute in float64). And ``torch.library.opcheck``
with its autograd checks on float64 and float32 samples.

The relu forms are checked on samples whose pre-activations are away from 0, relu's kink.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import moe_fusion
from moe_fusion.errors import OpValidationError

F64 = torch.float64
PLAIN = ("relu", "silu", "gelu", "fastgelu")
GLU = ("reglu", "swiglu", "geglu")


def _leaf(*shape: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).requires_grad_()


def _ffn_inputs(activation: str, rows: tuple[int, ...], k: int = 3, n1: int = 4, experts: int = 0,
                bias: bool = True) -> dict:
    """x ``rows + (k,)``, weights and biases (with a leading experts dim when ``experts``)."""
    lead = (experts,) if experts else ()
    n_act = n1 // 2 if activation in GLU else n1
    inputs = {"x": _leaf(*rows, k, seed=1), "weight1": _leaf(*lead, k, n1, scale=0.5, seed=2),
              "weight2": _leaf(*lead, n_act, 2, scale=0.5, seed=3)}
    if bias:
        inputs |= {"bias1": _leaf(*lead, n1, scale=0.3, seed=4), "bias2": _leaf(*lead, 2, scale=0.3, seed=5)}
    return inputs


def _check(fn, inputs: dict) -> None:
    names = list(inputs)
    assert gradcheck(lambda *values: fn(**dict(zip(names, values))), tuple(inputs.values()), fast_mode=False)


@pytest.mark.parametrize("activation", PLAIN + GLU)
@pytest.mark.parametrize("bias", [True, False])
def test_npu_ffn(activation, bias):
    inputs = _ffn_inputs(activation, (5,), bias=bias)
    if activation in ("relu", "reglu"):
        # gradcheck perturbs by 1e-6: a pre-activation farther than that from 0 never crosses relu's kink.
        with torch.no_grad():
            h = inputs["x"] @ inputs["weight1"] + (inputs["bias1"] if bias else 0)
        assert (h.abs() > 1e-3).all(), "the seeded sample puts a pre-activation on relu's kink"
    _check(lambda x, weight1, weight2, **biases: moe_fusion.npu_ffn(x, weight1, weight2, activation, **biases), inputs)


def test_npu_ffn_3d_x_and_expert_segments():
    """x ``(2, 3, K)`` (6 rows) over 3 experts with counts (2, 0, 4): an empty expert gets zero gradients."""
    inputs = _ffn_inputs("gelu", (2, 3), experts=3)
    _check(lambda x, weight1, weight2, **b: moe_fusion.npu_ffn(x, weight1, weight2, "gelu", expert_tokens=[2, 0, 4],
                                                                **b), inputs)
    y = moe_fusion.npu_ffn(inputs["x"], inputs["weight1"], inputs["weight2"], "gelu", expert_tokens=[2, 0, 4])
    y.sum().backward()
    assert inputs["weight1"].grad[1].abs().max() == 0 and inputs["weight2"].grad[1].abs().max() == 0


@pytest.mark.parametrize("activation", ("silu", "gelu", "fastgelu", "swiglu"))
@pytest.mark.parametrize("tokens_index_flag", [False, True])
def test_npu_ffn_grouped(activation, tokens_index_flag):
    """7 rows over 3 experts with counts (3, 0, 2): an empty expert, and 2 rows past the counts
    (their output is 0, so their gradient is too)."""
    counts = torch.tensor([3, 0, 2])
    expert_tokens = counts.cumsum(0) if tokens_index_flag else counts
    inputs = _ffn_inputs(activation, (7,), experts=3)
    _check(lambda x, weight1, weight2, **b: moe_fusion.npu_ffn_grouped(
        x, weight1, weight2, activation, expert_tokens=expert_tokens, tokens_index_flag=tokens_index_flag, **b), inputs)


def test_npu_ffn_grouped_zero_rows():
    inputs = _ffn_inputs("silu", (0,), experts=2)
    y = moe_fusion.npu_ffn_grouped(inputs["x"], inputs["weight1"], inputs["weight2"], "silu",
                                   expert_tokens=torch.tensor([0, 0]), bias1=inputs["bias1"], bias2=inputs["bias2"])
    assert y.shape == (0, 2) and y.dtype == F64
    y.sum().backward()
    for name in ("weight1", "weight2", "bias1", "bias2"):
        assert inputs[name].grad is not None and inputs[name].grad.abs().max() == 0


@pytest.mark.parametrize("with_scales", [False, True])
def test_npu_moe_re_routing(with_scales):
    """Counts ``(2 ranks, 3 experts)`` with a zero; gradients of tokens (and the scales)."""
    counts = torch.tensor([[1, 0, 2], [2, 1, 0]], dtype=torch.int32)
    tokens = _leaf(6, 3)
    inputs = {"tokens": tokens} | ({"per_token_scales": _leaf(6, seed=7)} if with_scales else {})

    def permuted(tokens, per_token_scales=None):
        out = moe_fusion.npu_moe_re_routing(tokens, counts, per_token_scales=per_token_scales)
        return (out[0], out[1]) if with_scales else out[0]

    _check(permuted, inputs)


def test_device_targets_reject_float64():
    x, w1, w2 = torch.randn(4, 8, dtype=F64), torch.randn(8, 8, dtype=F64), torch.randn(8, 8, dtype=F64)
    with moe_fusion.target("A3"):
        with pytest.raises(OpValidationError, match=r"npu_ffn: x dtype must be one of \(float16, bfloat16, int8\), "
                                                    r"got float64"):
            moe_fusion.npu_ffn(x, w1, w2, "gelu")
        with pytest.raises(OpValidationError, match="npu_moe_re_routing: tokens dtype .* got float64"):
            moe_fusion.npu_moe_re_routing(x, torch.tensor([[4]], dtype=torch.int32))


def _samples(dtype: torch.dtype) -> list[tuple]:
    """(op, args, kwargs) with every float tensor requiring grad."""
    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_()

    ops = torch.ops.moe_fusion
    return [
        (ops.npu_ffn.default, (leaf(5, 3), leaf(3, 4), leaf(4, 2), "gelu"), {"bias1": leaf(4), "bias2": leaf(2)}),
        (ops.npu_ffn.default, (leaf(6, 3), leaf(2, 3, 4), leaf(2, 2, 2), "swiglu"), {"expert_tokens": [2, 4]}),
        (ops.npu_ffn_grouped.default, (leaf(7, 4), leaf(3, 4, 4), leaf(3, 4, 4), "silu"),
         {"expert_tokens": torch.tensor([3, 0, 2]), "bias1": leaf(3, 4), "bias2": leaf(3, 4)}),
        (ops.npu_ffn_grouped.default, (leaf(7, 4), leaf(2, 4, 4), leaf(2, 2, 4), "swiglu"),
         {"expert_tokens": torch.tensor([0, 5]), "tokens_index_flag": True}),
        (ops.npu_moe_re_routing.default, (leaf(6, 4), torch.tensor([[1, 0, 2], [2, 1, 0]], dtype=torch.int32)),
         {"per_token_scales": leaf(6)}),
        (ops.npu_moe_re_routing.default, (leaf(6, 4), torch.tensor([[1, 0, 2], [2, 1, 0]], dtype=torch.int32)), {}),
    ]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_opcheck_grouped_backward_op(dtype):
    """The grouped FFN's backward op: its fake gives the kernel's accumulator dtype (fp64 for fp64).
    It has no formula of its own (no double backward), so its inputs do not require a gradient and
    test_autograd_registration does not apply."""
    def t(*shape):
        return torch.randn(*shape, dtype=dtype)

    args = (t(7, 4), t(7, 4), t(3, 4, 4), t(3, 4, 4), "gelu", torch.tensor([3, 0, 2]), t(3, 4), False, False)
    torch.library.opcheck(torch.ops.moe_fusion._ffn_grouped_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    assert all(g.dtype == dtype for g in torch.ops.moe_fusion._ffn_grouped_backward(*args))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("index", range(6))
def test_opcheck_with_autograd(dtype, index):
    op, args, kwargs = _samples(dtype)[index]
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                        "test_aot_dispatch_dynamic"))


def test_onnx_export_rejects_float64(tmp_path):
    """fp64 is the portable target's gradient-check dtype: the CANN ops (and so the ONNX custom
    ops) have no fp64, and export says so instead of writing a model no runtime accepts."""
    class Ffn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1, self.w2 = torch.nn.Parameter(torch.randn(8, 16, dtype=F64)), torch.nn.Parameter(
                torch.randn(16, 8, dtype=F64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return moe_fusion.npu_ffn(x, self.w1, self.w2, "gelu")

    with pytest.raises(OpValidationError, match=r"FFN: x element type must be one of .*got tensor\(double\)"):
        moe_fusion.onnx.export(Ffn(), (torch.randn(4, 8, dtype=F64),), str(tmp_path / "ffn.onnx"))
