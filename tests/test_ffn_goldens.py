"""``npu_ffn`` quant and antiquant against Huawei's own goldens for ``torch_npu.npu_ffn``.

Source: Ascend/op-plugin ``test/test_custom_ops/test_npu_ffn.py`` (commit 517f2e7d): ``TestFFN.calc_ffn``
computes the expected output and ``test_npu_ffn_antiquant`` / ``test_npu_ffn_quant(_with_outputdtype)``
build the inputs; the device result must match it with ``assertRtolEqual(..., 0.001)``.
``golden_calc_ffn`` is that ``calc_ffn`` ported to CPU statement by statement (``.npu()`` dropped; its
fp16 tensor operations run on CPU, where each rounds its result to fp16 like the NPU's), and the
``*_inputs`` builders are the tests' input code with the same seeds and generators.

Shapes: the goldens' K and N (320, 2560) with 256 rows of x instead of 8192 (the CPU reference kernels
and the port run in well under a second then).

Two statements of the golden are not followed by the kernel (``moe_fusion/kernels/ffn.py`` says why);
each is a flag of the port, and the kernel equals the port with those flags bit for bit:

1. antiquant: the golden keeps mm1 and the activation in fp32 and multiplies fp32 by fp32 in mm2; the
   ops-transformer kernel holds them in fp16 (``ffn.cpp``: mm1's output type is half for fp16 x, mm2
   reads x's dtype). ``fp16_activation=True`` rounds both to fp16.
2. quant: the golden casts mm2's int32 accumulator to fp16 before the deq_scale2 product; the kernel
   dequantizes mm2 as it does mm1 (``SetQuantVector``). ``fp16_mm2_accumulator=False`` drops that cast.

The literal golden is compared too: it differs from the kernel by what those two roundings can move.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_fusion import npu_ffn

M = 256      # rows of x (the goldens use 8192)


# ---------------------------------------------------------------------------------------------
# Port of op-plugin test_npu_ffn.py (quant and antiquant branches of calc_ffn; the tests' inputs)
# ---------------------------------------------------------------------------------------------

def deq_scale_generate(deq_scale_shape):
    fp32_deq_scale = np.random.uniform(low=0.01, high=0.05, size=deq_scale_shape).astype(np.float32)
    uint32_deq_scale = np.frombuffer(fp32_deq_scale, np.uint32).reshape(deq_scale_shape)
    # Perform AND operation with the upper 19 bits to simulate hardware
    uint32_deq_scale &= 0XFFFFE000
    fp32_deq_scale = np.frombuffer(uint32_deq_scale, np.float32)
    uint64_deq_scale = np.zeros(deq_scale_shape, np.uint64)
    uint64_deq_scale |= np.uint64(uint32_deq_scale)
    return fp32_deq_scale, uint64_deq_scale


def golden_calc_ffn(x, weight1, weight2, activation, *, antiquant_scale1=None, antiquant_scale2=None,
                    antiquant_offset1=None, antiquant_offset2=None, scale=None, offset=None, deq_scale1=None,
                    deq_scale2=None, fp16_activation=False, fp16_mm2_accumulator=True):
    """``calc_ffn``; the two keyword flags at the end select deviations 1 and 2 of the module docstring
    (their defaults are the golden as written)."""
    if antiquant_scale1 is not None:
        x = x.to(torch.float32)
        weight1 = torch.from_numpy(weight1).to(torch.float16)
        antiquant_offset1 = torch.broadcast_to(antiquant_offset1, weight1.size())
        antiquant_scale1 = torch.broadcast_to(antiquant_scale1, weight1.size())
        weight1 = (weight1 + antiquant_offset1) * antiquant_scale1
        weight1 = weight1.to(torch.float32)

        weight2 = torch.from_numpy(weight2).to(torch.float16)
        antiquant_offset2 = torch.broadcast_to(antiquant_offset2, weight2.size())
        antiquant_scale2 = torch.broadcast_to(antiquant_scale2, weight2.size())
        weight2 = (weight2 + antiquant_offset2) * antiquant_scale2
        weight2 = weight2.to(torch.float32)
    elif scale is not None:
        x = x.to(torch.int32)
        weight1 = torch.from_numpy(weight1).to(torch.int32)
        weight2 = torch.from_numpy(weight2).to(torch.int32)

    # mm1
    mm1_res = x @ weight1
    if scale is not None:
        deq_scale1 = deq_scale1.reshape(1, -1)[:, :mm1_res.shape[-1]]
        deq_scale1 = torch.from_numpy(deq_scale1)
        mm1_res = (mm1_res * deq_scale1).to(torch.float16)
    if fp16_activation:                                                      # deviation 1
        mm1_res = mm1_res.to(torch.float16).to(torch.float32)
    # activation
    if activation == "relu":
        activation_res = torch.nn.functional.relu(mm1_res)
    elif activation == "gelu":
        activation_res = torch.nn.functional.gelu(mm1_res)
    if fp16_activation:                                                      # deviation 1
        activation_res = activation_res.to(torch.float16).to(torch.float32)
    if scale is not None:
        scale = torch.from_numpy(scale).to(torch.float16)
        offset = torch.from_numpy(offset).to(torch.float16)
        activation_res = activation_res * scale + offset
        activation_res = torch.round(activation_res, decimals=0)
        activation_res = activation_res.clamp(-128, 127).to(torch.int32)
    # mm2
    mm2_res = torch.matmul(activation_res, weight2)
    if scale is None or fp16_mm2_accumulator:                                # deviation 2 when False
        mm2_res = mm2_res.to(torch.float16)
    if scale is not None:
        deq_scale2 = deq_scale2.reshape(1, -1)[:, :mm2_res.shape[-1]]
        deq_scale2 = torch.from_numpy(deq_scale2)
        mm2_res = (mm2_res * deq_scale2).to(torch.float16)
    return mm2_res


def antiquant_inputs() -> dict:
    """``test_npu_ffn_antiquant``'s inputs (x with M rows)."""
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.normal(mean=0., std=0.02, size=(M, 320), dtype=torch.float16)
    weight1 = np.random.randint(-9, 9, size=(320, 2560), dtype=np.int8)
    weight2 = np.random.randint(-9, 9, size=(2560, 320), dtype=np.int8)
    antiquant_scale1 = torch.normal(mean=0., std=0.02, size=(2560,), dtype=torch.float16)
    antiquant_scale2 = torch.normal(mean=0., std=0.02, size=(320,), dtype=torch.float16)
    antiquant_offset1 = torch.normal(mean=0., std=0.02, size=(2560,), dtype=torch.float16)
    antiquant_offset2 = torch.normal(mean=0., std=0.02, size=(320,), dtype=torch.float16)
    return dict(x=x, weight1=weight1, weight2=weight2, activation="relu", antiquant_scale1=antiquant_scale1,
                antiquant_scale2=antiquant_scale2, antiquant_offset1=antiquant_offset1,
                antiquant_offset2=antiquant_offset2)


def quant_inputs() -> dict:
    """``test_npu_ffn_quant``'s inputs (x with M rows): golden ``deq_scale*`` fp32, kernel ones uint64."""
    torch.manual_seed(0)
    np.random.seed(0)
    x = torch.from_numpy(np.random.randint(-128, 127, size=(M, 320), dtype=np.int8))
    weight1 = np.random.randint(-128, 127, size=(320, 2560), dtype=np.int8)
    weight2 = np.random.randint(-128, 127, size=(2560, 320), dtype=np.int8)
    scale = np.ones(1, dtype=np.float32) * 0.001
    offset = np.zeros(1, dtype=np.float32)
    deq_scale1_fp32, deq_scale1_uint64 = deq_scale_generate((2560,))
    deq_scale2_fp32, deq_scale2_uint64 = deq_scale_generate((320,))
    return dict(x=x, weight1=weight1, weight2=weight2, activation="gelu", scale=scale, offset=offset,
                deq_scale1=deq_scale1_fp32, deq_scale2=deq_scale2_fp32,
                deq_scale1_uint64=deq_scale1_uint64, deq_scale2_uint64=deq_scale2_uint64)


# ---------------------------------------------------------------------------------------------
# moe_fusion calls on the same inputs
# ---------------------------------------------------------------------------------------------

def kernel_antiquant(t: dict) -> torch.Tensor:
    # custom_op_exec passes inner_precise=1: antiquant ignores it (SPEC §5.4)
    return npu_ffn(t["x"], torch.from_numpy(t["weight1"]), torch.from_numpy(t["weight2"]), t["activation"],
                   antiquant_scale1=t["antiquant_scale1"], antiquant_scale2=t["antiquant_scale2"],
                   antiquant_offset1=t["antiquant_offset1"], antiquant_offset2=t["antiquant_offset2"],
                   inner_precise=1)


def kernel_quant(t: dict, output_dtype=None) -> torch.Tensor:
    # custom_op_exec: the uint64 deq scales as int64 (torch_npu's carrier), inner_precise=1
    return npu_ffn(t["x"], torch.from_numpy(t["weight1"]), torch.from_numpy(t["weight2"]), t["activation"],
                   scale=torch.from_numpy(t["scale"]), offset=torch.from_numpy(t["offset"]),
                   deq_scale1=torch.from_numpy(t["deq_scale1_uint64"].astype(np.int64)),
                   deq_scale2=torch.from_numpy(t["deq_scale2_uint64"].astype(np.int64)), inner_precise=1,
                   output_dtype=output_dtype)


def golden(t: dict, **flags) -> torch.Tensor:
    args = {k: v for k, v in t.items() if not k.endswith("_uint64")}
    return golden_calc_ffn(args.pop("x"), args.pop("weight1"), args.pop("weight2"), args.pop("activation"),
                           **args, **flags)


def fp16_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of fp16 values from ``a`` to ``b`` (elementwise, finite fp16)."""
    def ordered(v):
        bits = v.contiguous().view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


# ---------------------------------------------------------------------------------------------
# antiquant
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", [1, 2])
def test_antiquant_weight_equals_golden_dequant(which):
    """The dequantized weight alone, where golden and kernel state the same rule:
    ``(fp16(W) + offset) * scale`` on fp16 tensors. With x = identity and W2 = identity (scale 1,
    offset 0) the output is relu(W_deq) exactly (one nonzero term per sum, values already fp16);
    negating the scale negates W_deq exactly, so relu(W) - relu(-W) recovers every element."""
    t = antiquant_inputs()
    w, sc, off = t[f"weight{which}"], t[f"antiquant_scale{which}"], t[f"antiquant_offset{which}"]
    expected = (torch.from_numpy(w).to(torch.float16) + off) * sc                  # the golden's two statements
    k, n = w.shape
    x = torch.eye(k, dtype=torch.float16)
    eye = torch.eye(n, dtype=torch.int8)
    ones, zeros = torch.ones(n, dtype=torch.float16), torch.zeros(n, dtype=torch.float16)

    def relu_w(s):
        return npu_ffn(x, torch.from_numpy(w), eye, "relu", antiquant_scale1=s, antiquant_offset1=off,
                       antiquant_scale2=ones, antiquant_offset2=zeros)
    assert torch.equal(relu_w(sc) - relu_w(-sc), expected)


def test_antiquant_equals_golden_with_fp16_activation():
    t = antiquant_inputs()
    assert torch.equal(kernel_antiquant(t), golden(t, fp16_activation=True))


def test_antiquant_differs_from_literal_golden_by_the_activation_rounding_only():
    """The literal golden feeds mm2 the fp32 activation a; the kernel feeds fp16(a). So
    |y - golden| <= |fp16(a) - a| @ |W2| plus both fp32 accumulations (2 * (K2 + 2) * 2**-24 * |a| @ |W2|)
    plus half an fp16 ulp for each output's rounding (a and W2 computed in fp64 from the golden's
    fp16 weights)."""
    t = antiquant_inputs()
    y, literal = kernel_antiquant(t), golden(t)
    w1 = ((torch.from_numpy(t["weight1"]).half() + t["antiquant_offset1"]) * t["antiquant_scale1"]).double()
    w2 = ((torch.from_numpy(t["weight2"]).half() + t["antiquant_offset2"]) * t["antiquant_scale2"]).double()
    a = torch.relu(t["x"].double() @ w1)
    accumulation = 2 * (a.shape[1] + 2) * 2 ** -24 * (a @ w2.abs())
    half_ulps = sum(torch.finfo(torch.float16).eps / 2 * v.double().abs().clamp_min(2 ** -14) for v in (y, literal))
    bound = (a.half().double() - a).abs() @ w2.abs() + accumulation + half_ulps
    assert ((y.double() - literal.double()).abs() <= bound).all()
    assert not torch.equal(y, literal)        # the deviation is real on this data (12533 of 81920 here)


# ---------------------------------------------------------------------------------------------
# quant
# ---------------------------------------------------------------------------------------------

def test_quant_golden_gelu_form_does_not_matter_here():
    """The golden's gelu is torch's erf form; AscendC's (and the kernel's, SPEC §9 #15) is the tanh form.
    They differ on a few small fp16 mm1 values, but the requant (scale 0.001) maps both to the same int8
    activations on this data, so the port keeps the erf."""
    t = quant_inputs()
    h = t["x"].to(torch.int32) @ torch.from_numpy(t["weight1"]).to(torch.int32)
    mm1 = (h * torch.from_numpy(t["deq_scale1"].reshape(1, -1))).to(torch.float16)
    scale, offset = torch.from_numpy(t["scale"]).to(torch.float16), torch.from_numpy(t["offset"]).to(torch.float16)
    erf, tanh = torch.nn.functional.gelu(mm1), torch.nn.functional.gelu(mm1, approximate="tanh")
    assert not torch.equal(erf, tanh)
    assert torch.equal(torch.round(erf * scale + offset).clamp(-128, 127),
                       torch.round(tanh * scale + offset).clamp(-128, 127))


@pytest.mark.parametrize("output_dtype", [None, torch.float16])    # test_npu_ffn_quant(_with_outputdtype)
def test_quant_equals_golden_with_int32_mm2_dequant(output_dtype):
    t = quant_inputs()
    y = kernel_quant(t, output_dtype)
    assert y.dtype == torch.float16
    assert torch.equal(y, golden(t, fp16_mm2_accumulator=False))


def test_quant_differs_from_literal_golden_by_one_fp16_step_at_most():
    """The golden's extra cast moves the int32 accumulator by <= 2**-11 of itself, under one fp16 ulp
    of the product with deq_scale2, so each output moves by one fp16 step at most."""
    t = quant_inputs()
    y, literal = kernel_quant(t), golden(t)
    assert torch.isfinite(literal).all()
    assert int(fp16_steps(y, literal).max()) == 1     # 17532 of 81920 outputs differ here
