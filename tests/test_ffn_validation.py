"""``npu_ffn`` validation (SPEC §5.5): every rule raises OpValidationError with its exact message in
eager mode, and the same message at trace time under torch.compile(fullgraph=True) (dynamo wraps it in
TorchRuntimeError). Device-only rules fire under the A2/A3 targets and are accepted, with correct
results, under the portable target.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch._dynamo.exc import TorchRuntimeError

import moe_fusion
from cases.npu_ffn import FfnCase, make_call
from moe_fusion import OpValidationError, npu_ffn
from oracle_ffn import ffn_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DROP = object()

# Baselines, valid on every target: M = K1 = N1 = K2 = N2 = 4; experts (1, 3).
F = FfnCase(dtype=FP16, lead=(4,), k1=4, hidden=4, n2=4)
FE = replace(F, counts=(1, 3))
Q = FfnCase(mode="quant", dtype=FP16, lead=(4,), k1=4, hidden=4, n2=4)
QE = replace(Q, counts=(1, 3))
A = FfnCase(mode="antiquant", dtype=FP16, lead=(4,), k1=4, hidden=4, n2=4)
AE = replace(A, counts=(1, 3))
AG = replace(A, weight_dtype="int4", groups=2)


def named(case: FfnCase, **changes) -> dict:
    """All arguments of ``case`` by name, with ``changes`` applied (``DROP`` removes one)."""
    args, kwargs = make_call(case)
    call = dict(zip(("x", "weight1", "weight2", "activation"), args), **kwargs)
    for key, value in changes.items():
        if value is DROP:
            call.pop(key)
        else:
            call[key] = value
    return call


def t(shape, dtype=FP16) -> torch.Tensor:
    return torch.ones(shape, dtype=dtype)


def _ffn(x, weight1, weight2, activation, kwargs):
    return npu_ffn(x, weight1, weight2, activation, **kwargs)


def call_eager(call: dict):
    return npu_ffn(**call)


def call_compiled(call: dict):
    torch._dynamo.reset()
    call = dict(call)
    head = [call.pop(k) for k in ("x", "weight1", "weight2", "activation")]
    return torch.compile(_ffn, fullgraph=True, backend="aot_eager")(*head, call)


def expect_error(call: dict, message: str, how: str) -> None:
    if how == "eager":
        with pytest.raises(OpValidationError) as info:
            call_eager(call)
        assert str(info.value) == message
    else:
        with pytest.raises((TorchRuntimeError, OpValidationError)) as info:
            call_compiled(call)
        assert message in str(info.value)


ACTS = "('fastgelu', 'gelu', 'relu', 'silu', 'geglu', 'swiglu', 'reglu')"

# (id, call, message) for rules of every target.
RULES = [
    # -- x, activation, weight dtypes
    ("x-1d", lambda: named(F, x=t((4,))), "npu_ffn: x must be 2-D to 8-D, got shape (4,)"),
    ("x-9d", lambda: named(F, x=t((1,) * 8 + (4,))),
     "npu_ffn: x must be 2-D to 8-D, got shape (1, 1, 1, 1, 1, 1, 1, 1, 4)"),
    ("activation", lambda: named(F, activation="tanh"),
     f"npu_ffn: activation must be one of {ACTS} (case-insensitive), got 'tanh'"),
    ("x-dtype", lambda: named(F, x=t((4, 4), torch.int32)),
     "npu_ffn: x dtype must be one of (float16, bfloat16, int8, float32, float64), got int32"),
    ("weight-dtype", lambda: named(F, weight1=t((4, 4), torch.int32), weight2=t((4, 4), torch.int32)),
     "npu_ffn: weight1 dtype must be one of (float16, bfloat16, int8, uint8, float32, float64), got int32"),
    ("weight2-dtype", lambda: named(F, weight2=t((4, 4), FP32)),
     "npu_ffn: weight2 dtype must equal weight1's (float16), got float32"),
    # -- experts
    ("both-forms", lambda: named(FE, expert_tokens_index=[1, 4]),
     "npu_ffn: expert_tokens/expert_tokens_index must not both be given, got both"),
    ("index-negative", lambda: named(F, expert_tokens_index=[-1, 4]),
     "npu_ffn: expert_tokens_index entries must be >= 0, got [-1, 4]"),
    ("index-decreasing", lambda: named(F, expert_tokens_index=[3, 1, 4]),
     "npu_ffn: expert_tokens_index must be non-decreasing, got [3, 1, 4]"),
    ("index-last-not-M", lambda: named(replace(FE, index_form=True), expert_tokens_index=[1, 3]),
     "npu_ffn: expert_tokens_index must cover all M=4 rows of x (sum of counts / last end), got [1, 3]"),
    ("counts-negative", lambda: named(FE, expert_tokens=[5, -1]),
     "npu_ffn: expert_tokens entries must be >= 0, got [5, -1]"),
    ("counts-sum", lambda: named(FE, expert_tokens=[1, 2]),
     "npu_ffn: expert_tokens must cover all M=4 rows of x (sum of counts / last end), got [1, 2]"),
    ("counts-sum-3d-x", lambda: named(FE, x=t((2, 3, 4)), expert_tokens=[1, 3]),
     "npu_ffn: expert_tokens must cover all M=6 rows of x (sum of counts / last end), got [1, 3]"),
    # -- weight ranks and sizes
    ("weight1-2d-with-experts", lambda: named(FE, weight1=t((4, 4))), "npu_ffn: weight1 must be 3-D, got shape (4, 4)"),
    ("weight2-2d-with-experts", lambda: named(FE, weight2=t((4, 4))), "npu_ffn: weight2 must be 3-D, got shape (4, 4)"),
    ("weight1-3d-without", lambda: named(F, weight1=t((2, 4, 4))), "npu_ffn: weight1 must be 2-D, got shape (2, 4, 4)"),
    ("weight2-3d-without", lambda: named(F, weight2=t((1, 4, 4))), "npu_ffn: weight2 must be 2-D, got shape (1, 4, 4)"),
    ("weight1-E", lambda: named(FE, weight1=t((3, 4, 4))),
     "npu_ffn: weight1 must have E=2 experts in dim 0, got shape (3, 4, 4)"),
    ("weight2-E", lambda: named(FE, weight2=t((1, 4, 4))),
     "npu_ffn: weight2 must have E=2 experts in dim 0, got shape (1, 4, 4)"),
    ("K1", lambda: named(F, weight1=t((5, 4))), "npu_ffn: weight1 must have K1 == x.size(-1) == 4, got shape (5, 4)"),
    ("K2-ne-N1", lambda: named(F, weight2=t((5, 4))), "npu_ffn: weight2 must have K2 == N1 == 4, got shape (5, 4)"),
    ("glu-K2", lambda: named(F, activation="swiglu", weight1=t((4, 4)), weight2=t((4, 4))),
     "npu_ffn: weight2 must have an even N1 and K2 == N1 / 2 for swiglu (N1 = 4), got shape (4, 4)"),
    ("glu-odd-N1", lambda: named(F, activation="GeGLU", weight1=t((4, 5)), weight2=t((2, 4))),
     "npu_ffn: weight2 must have an even N1 and K2 == N1 / 2 for geglu (N1 = 5), got shape (2, 4)"),
    # -- biases
    ("bias1-shape", lambda: named(F, bias1=t((5,))), "npu_ffn: bias1 must have shape (4,), got shape (5,)"),
    ("bias2-1d-with-experts", lambda: named(FE, bias2=t((4,))),
     "npu_ffn: bias2 must have shape (2, 4), got shape (4,)"),
    ("bias1-E", lambda: named(FE, bias1=t((3, 4))), "npu_ffn: bias1 must have shape (2, 4), got shape (3, 4)"),
    ("bias-fp16-x-fp32", lambda: named(F, bias1=t((4,), FP32)),
     "npu_ffn: bias1 dtype must be one of (float16), got float32"),
    ("bias-bf16-x-bf16", lambda: named(replace(F, dtype=BF16), bias2=t((4,), BF16)),
     "npu_ffn: bias2 dtype must be one of (float32), got bfloat16"),
    ("bias-fp32-x-fp16", lambda: named(replace(F, dtype=FP32), bias1=t((4,), FP16)),
     "npu_ffn: bias1 dtype must be one of (float32), got float16"),
    ("bias-quant", lambda: named(Q, bias1=t((4,), FP32)), "npu_ffn: bias1 dtype must be one of (int32), got float32"),
    ("bias-antiquant-fp16", lambda: named(A, bias2=t((4,), FP32)),
     "npu_ffn: bias2 dtype must be one of (float16), got float32"),
    ("bias-antiquant-bf16", lambda: named(replace(A, dtype=BF16), bias1=t((4,), BF16)),
     "npu_ffn: bias1 dtype must be one of (float32), got bfloat16"),
    # -- dtype rules per mode
    ("float-weight-dtype", lambda: named(F, weight1=t((4, 4), BF16), weight2=t((4, 4), BF16)),
     "npu_ffn: weight1 dtype must equal x's (float16), or be int8/int4, got bfloat16"),
    ("quant-fp16-weights", lambda: named(Q, weight1=t((4, 4)), weight2=t((4, 4))),
     "npu_ffn: weight1 dtype must be one of (int8), got float16"),
    ("quant-int4-weights", lambda: named(Q, weight1=t((4, 2), torch.uint8), weight2=t((4, 2), torch.uint8)),
     "npu_ffn: weight1 dtype must be one of (int8), got uint8"),
    ("quant-output-dtype", lambda: named(Q, output_dtype=FP32),
     "npu_ffn: output_dtype must be one of (None, torch.float16, torch.bfloat16), got torch.float32"),
    # -- missing or mixed parameters
    *[(f"quant-missing-{p}", (lambda p=p: named(Q, **{p: DROP})),
       f"npu_ffn: {p} is required with int8 x (quant mode), got None")
      for p in ("scale", "offset", "deq_scale1", "deq_scale2")],
    ("quant-with-antiquant", lambda: named(Q, antiquant_scale1=t((4,))),
     "npu_ffn: antiquant_scale1 must not be given in quant mode, got a tensor"),
    ("antiquant-with-quant", lambda: named(A, scale=t((1,), FP32)),
     "npu_ffn: scale must not be given in antiquant mode, got a tensor"),
    ("antiquant-with-deq", lambda: named(A, deq_scale2=t((4,), torch.int64)),
     "npu_ffn: deq_scale2 must not be given in antiquant mode, got a tensor"),
    ("float-with-quant", lambda: named(F, offset=t((1,), FP32)),
     "npu_ffn: offset must not be given without int8 x (quant) or int8/int4 weights (antiquant), got a tensor"),
    ("float-with-antiquant", lambda: named(F, antiquant_offset2=t((4,))),
     "npu_ffn: antiquant_offset2 must not be given without int8 x (quant) or int8/int4 weights (antiquant), "
     "got a tensor"),
    # -- quant parameter dtypes and shapes
    ("scale-dtype", lambda: named(Q, scale=t((1,), FP16)),
     "npu_ffn: scale dtype must be one of (float32), got float16"),
    ("offset-dtype", lambda: named(Q, offset=t((1,), BF16)),
     "npu_ffn: offset dtype must be one of (float32), got bfloat16"),
    ("scale-shape", lambda: named(Q, scale=t((2,), FP32)),
     "npu_ffn: scale must have shape (1,) (per-tensor) or (4,) (per-channel), got shape (2,)"),
    ("scale-shape-experts", lambda: named(QE, scale=t((1,), FP32)),
     "npu_ffn: scale must have shape (2,) (per-tensor) or (2, 4) (per-channel), got shape (1,)"),
    ("scale-2d-without-experts", lambda: named(Q, scale=t((1, 4), FP32)),
     "npu_ffn: scale must have shape (1,) (per-tensor) or (4,) (per-channel), got shape (1, 4)"),
    ("offset-shape", lambda: named(Q, offset=t((2,), FP32)), "npu_ffn: offset must have shape (1,), got shape (2,)"),
    ("offset-shape-experts", lambda: named(QE, offset=t((1,), FP32)),
     "npu_ffn: offset must have shape (2,), got shape (1,)"),
    ("deq1-shape", lambda: named(Q, deq_scale1=t((5,), torch.uint64)),
     "npu_ffn: deq_scale1 must have shape (4,), got shape (5,)"),
    ("deq2-1d-with-experts", lambda: named(QE, deq_scale2=t((4,), torch.uint64)),
     "npu_ffn: deq_scale2 must have shape (2, 4), got shape (4,)"),
    ("deq1-E", lambda: named(QE, deq_scale1=t((3, 4), torch.uint64)),
     "npu_ffn: deq_scale1 must have shape (2, 4), got shape (3, 4)"),
    # -- deq dtype rules
    ("deq-fp16-out-bf16", lambda: named(Q, deq_scale1=t((4,), BF16), deq_scale2=t((4,), BF16)),
     "npu_ffn: deq_scale1 dtype must be one of (uint64, int64, float32), got bfloat16"),
    ("deq-bf16-out-uint64", lambda: named(replace(Q, dtype=BF16), deq_scale1=t((4,), torch.uint64),
                                          deq_scale2=t((4,), torch.uint64)),
     "npu_ffn: deq_scale1 dtype must be one of (bfloat16), got uint64"),
    ("deq-bf16-out-fp32", lambda: named(replace(Q, dtype=BF16), deq_scale1=t((4,), FP32), deq_scale2=t((4,), FP32)),
     "npu_ffn: deq_scale1 dtype must be one of (bfloat16), got float32"),
    ("deq2-dtype-differs", lambda: named(Q, deq_scale2=t((4,), torch.int64)),
     "npu_ffn: deq_scale2 dtype must equal deq_scale1's (uint64), got int64"),
    ("deq-fp32-per-channel", lambda: named(replace(Q, per_channel=True), deq_scale1=t((4,), FP32),
                                           deq_scale2=t((4,), FP32)),
     "npu_ffn: deq_scale1 must be uint64/int64/bfloat16 with a per-channel scale, got float32"),
    ("deq-fp32-per-channel-experts", lambda: named(replace(QE, per_channel=True), deq_scale1=t((2, 4), FP32),
                                                   deq_scale2=t((2, 4), FP32)),
     "npu_ffn: deq_scale1 must be uint64/int64/bfloat16 with a per-channel scale, got float32"),
    ("glu-per-channel-scale", lambda: named(replace(Q, activation="swiglu", hidden=2), scale=t((4,), FP32)),
     "npu_ffn: scale must be per-tensor (1,) with swiglu, got shape (4,)"),
    # -- antiquant parameters
    *[(f"antiquant-missing-{p}", (lambda p=p: named(A, **{p: DROP})),
       f"npu_ffn: {p} is required with int8/int4 weights (antiquant mode), got None")
      for p in ("antiquant_scale1", "antiquant_scale2", "antiquant_offset1", "antiquant_offset2")],
    ("antiquant-dtype", lambda: named(A, antiquant_scale1=t((4,), BF16)),
     "npu_ffn: antiquant_scale1 dtype must be one of (float16), got bfloat16"),
    ("antiquant-dtype-bf16", lambda: named(replace(A, dtype=BF16), antiquant_offset2=t((4,), FP16)),
     "npu_ffn: antiquant_offset2 dtype must be one of (bfloat16), got float16"),
    ("antiquant-rank", lambda: named(A, antiquant_scale1=t((1, 2, 4)), antiquant_offset1=t((1, 2, 4))),
     "npu_ffn: antiquant_scale1 must be 1-D (per-channel) or 2-D (per-group), got shape (1, 2, 4)"),
    ("antiquant-rank-experts", lambda: named(AE, antiquant_scale1=t((4,)), antiquant_offset1=t((4,))),
     "npu_ffn: antiquant_scale1 must be 2-D (per-channel) or 3-D (per-group), got shape (4,)"),
    ("antiquant-ranks-differ", lambda: named(A, antiquant_offset2=t((2, 4))),
     "npu_ffn: antiquant_offset2 must have the same rank as antiquant_scale1 (1), got shape (2, 4)"),
    ("antiquant-offset-ne-scale", lambda: named(A, antiquant_offset1=t((5,))),
     "npu_ffn: antiquant_offset1 must have shape (4,), got shape (5,)"),
    ("antiquant-N", lambda: named(A, antiquant_scale2=t((5,)), antiquant_offset2=t((5,))),
     "npu_ffn: antiquant_scale2 must have shape (4,), got shape (5,)"),
    ("antiquant-E", lambda: named(AE, antiquant_scale2=t((3, 4)), antiquant_offset2=t((3, 4))),
     "npu_ffn: antiquant_scale2 must have shape (2, 4), got shape (3, 4)"),
    ("antiquant-group-N", lambda: named(AG, antiquant_scale1=t((2, 6)), antiquant_offset1=t((2, 6))),
     "npu_ffn: antiquant_scale1 must have shape (2, 4), got shape (2, 6)"),
    ("antiquant-group-divides-K1", lambda: named(AG, antiquant_scale1=t((3, 4)), antiquant_offset1=t((3, 4))),
     "npu_ffn: antiquant_scale1 group count must divide K=4, got shape (3, 4)"),
    ("antiquant-group-divides-K2", lambda: named(AG, antiquant_scale2=t((8, 4)), antiquant_offset2=t((8, 4))),
     "npu_ffn: antiquant_scale2 group count must divide K=4, got shape (8, 4)"),
    ("antiquant-zero-groups", lambda: named(AG, antiquant_scale1=t((0, 4)), antiquant_offset1=t((0, 4))),
     "npu_ffn: antiquant_scale1 group count must divide K=4, got shape (0, 4)"),
    ("per-group-needs-int4", lambda: named(replace(A, groups=2)),
     "npu_ffn: weight1 must be int4 (uint8-packed) for per-group antiquant, got int8"),
    # -- inner_precise
    ("inner-precise-2", lambda: named(F, inner_precise=2), "npu_ffn: inner_precise must be one of (0, 1), got 2"),
    ("inner-precise-neg", lambda: named(Q, inner_precise=-1), "npu_ffn: inner_precise must be one of (0, 1), got -1"),
]


@pytest.mark.parametrize("how", ["eager", "compile"])
@pytest.mark.parametrize("build,message", [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rule(build, message, how):
    expect_error(build(), message, how)


@pytest.mark.parametrize("case", [F, FE, Q, QE, A, AE, AG], ids=["F", "FE", "Q", "QE", "A", "AE", "AG"])
@pytest.mark.parametrize("target", ["portable", "A2", "A3"])
def test_baselines_are_valid(case, target):
    """The calls the rules above break are valid everywhere, so each rule tests only its change."""
    call = named(case)
    with moe_fusion.target(target):
        y = call_eager(call)
        assert torch.equal(call_compiled(call), y)


# ---------------------------------------------------------------------------------------------
# Device-only rules: rejected on A2/A3, accepted (and computed per SPEC) on the portable target
# ---------------------------------------------------------------------------------------------

def _big_k(k1: int, k2: int) -> dict:
    """No experts, K1 == N2: x (1, K1), W1 (K1, K2), W2 (K2, K1); small values."""
    return dict(x=torch.full((1, k1), 0.01, dtype=FP16), weight1=torch.full((k1, k2), 0.01, dtype=FP16),
                weight2=torch.full((k2, k1), 0.5, dtype=FP16), activation="relu")


def _many_experts(num: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(num, 2, generator=gen).half(), weight1=torch.randn(num, 2, 2, generator=gen).half(),
                weight2=torch.randn(num, 2, 2, generator=gen).half(), activation="gelu", expert_tokens=[1] * num)


GLU_DEVICE = "npu_ffn: activation {act} needs fp16 x and weights, inner_precise=1 and no experts on A2/A3, got {seen}"
DEVICE_RULES = [
    ("N2-ne-K1", lambda: named(replace(F, n2=6)),
     "npu_ffn: weight2 must have N2 == K1 == 4 on A2/A3, got shape (4, 6)"),
    ("K1-max", lambda: _big_k(65536, 2), "npu_ffn: weight1/weight2 must have K1, K2 <= 65535, got (65536, 2)"),
    ("K2-max", lambda: _big_k(2, 65536), "npu_ffn: weight1/weight2 must have K1, K2 <= 65535, got (2, 65536)"),
    ("257-experts", lambda: _many_experts(257), "npu_ffn: expert_tokens must have at most 256 experts, got 257"),
    ("x-fp32", lambda: named(replace(F, dtype=FP32)),
     "npu_ffn: x dtype must be one of (float16, bfloat16, int8), got float32"),
    ("glu-bf16", lambda: named(replace(F, dtype=BF16, activation="swiglu", hidden=2)),
     GLU_DEVICE.format(act="swiglu", seen="x bfloat16, weights bfloat16, inner_precise=0, experts=no")),
    ("glu-fp16-ip0", lambda: named(replace(F, activation="GEGLU", hidden=2, inner_precise=0)),
     GLU_DEVICE.format(act="geglu", seen="x float16, weights float16, inner_precise=0, experts=no")),
    ("glu-fp16-experts", lambda: named(replace(FE, activation="reglu", hidden=2, inner_precise=1)),
     GLU_DEVICE.format(act="reglu", seen="x float16, weights float16, inner_precise=1, experts=yes")),
    ("glu-quant", lambda: named(replace(Q, activation="swiglu", hidden=2, inner_precise=1)),
     GLU_DEVICE.format(act="swiglu", seen="x int8, weights int8, inner_precise=1, experts=no")),
    ("glu-antiquant", lambda: named(replace(A, activation="reglu", hidden=2, inner_precise=1)),
     GLU_DEVICE.format(act="reglu", seen="x float16, weights int8, inner_precise=1, experts=no")),
    ("bf16-high-performance", lambda: named(replace(F, dtype=BF16, inner_precise=1)),
     "npu_ffn: inner_precise must be 0 (high precision) for bfloat16 x, got 1"),
]


@pytest.mark.parametrize("how", ["eager", "compile"])
@pytest.mark.parametrize("target", ["A2", "A3"])
@pytest.mark.parametrize("build,message", [r[1:] for r in DEVICE_RULES], ids=[r[0] for r in DEVICE_RULES])
def test_device_rule_rejected(build, message, target, how):
    with moe_fusion.target(target):
        expect_error(build(), message, how)


def assert_matches_reference(y: torch.Tensor, call: dict) -> None:
    ref = ffn_reference(**call)
    assert y.dtype == ref.y.dtype and y.shape == ref.y.shape
    assert ((y.double() >= ref.lo) & (y.double() <= ref.hi)).all()


@pytest.mark.parametrize("build", [r[1] for r in DEVICE_RULES], ids=[r[0] for r in DEVICE_RULES])
def test_device_rule_accepted_on_portable(build):
    call = build()
    with moe_fusion.target("portable"):
        y = call_eager(call)
        assert torch.equal(call_compiled(call), y)
    assert_matches_reference(y, call)


def test_glu_valid_on_device_when_fp16_high_performance():
    """The one GLU configuration the device runs: fp16, inner_precise=1, no experts, N1 = 2 * K2."""
    call = named(replace(F, activation="swiglu", hidden=2, inner_precise=1))
    with moe_fusion.target("A3"):
        y = call_eager(call)
        assert torch.equal(call_compiled(call), y)
    assert y.shape == (4, 4) and y.dtype == FP16


def test_empty_expert_list_means_no_experts():
    """SPEC §5.5: an empty list means no experts, so 2-D weights are required and accepted."""
    call = named(F, expert_tokens=[], expert_tokens_index=[])
    assert_matches_reference(call_eager(call), call)
    expect_error(named(F, weight1=t((1, 4, 4)), expert_tokens=[]), "npu_ffn: weight1 must be 2-D, got shape (1, 4, 4)",
                 "eager")
