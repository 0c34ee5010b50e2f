"""``npu_ffn`` numerics: the int4 format, hand-computed examples, the kernel against the loop oracle
(``oracle_ffn.py``) over grids and hypothesis, and torch.compile against eager. Validation rules are in
``test_ffn_validation.py``.

Tolerances. The oracle computes in fp64 and rounds where the rule rounds (SPEC §5.4; the intermediate
dtypes of quant and antiquant follow op-plugin's golden, see ``oracle_ffn.py`` and ``test_ffn_goldens.py``);
the kernel (like the device) computes in fp32. The oracle therefore returns an enclosure ``[lo, hi]``
instead of one value, derived from a worst-case fp32 error model (see its docstring):

* fp32 data: the only difference is accumulation order and fp32 evaluation, bounded by
  ``(K + 2) * 2**-24 * sum(|terms|)`` per matmul: about 1e-7 relative to the terms, "exact-ish".
* fp16/bf16 data: values are rounded to the storage dtype after the activation (and after mm1 with
  inner_precise=1 or fp16 antiquant); those roundings can differ by one storage ulp only where the fp32
  value lies within the bound above of a rounding boundary, and the output by one ulp of the output. So
  the enclosure is usually the single nominal value or its two ulp-neighbours. fp16 dequantized weights
  (two fp16 operations on fp16 values) carry no error: the oracle and the kernel round the same exact
  values.
* int8 quant: the int32 matmuls are exact; the requant ``fp16(fp16(a * scale) + offset)`` is exact fp16
  arithmetic on the fp16 activation ``a``, so an int8 value can differ by one step only where ``a``
  itself may round either way, and that step is carried through the second matmul.
Expected values never come from the kernel: from the oracle, or written by hand.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from cases.npu_ffn import FfnCase, make_call
from moe_fusion import npu_ffn, pack_int4, unpack_int4
from oracle_ffn import PLAIN, ffn_reference, int4_values

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
PLAIN_NAMES = ("fastgelu", "gelu", "relu", "silu")
GLU_NAMES = ("geglu", "swiglu", "reglu")


def assert_matches_reference(y: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """``y`` has the oracle's dtype and shape and lies inside its enclosure."""
    ref = ffn_reference(*args, **kwargs)
    assert y.dtype == ref.y.dtype and y.shape == ref.y.shape, (y.dtype, y.shape, ref.y.dtype, ref.y.shape)
    values = y.double()
    outside = (values < ref.lo) | (values > ref.hi)
    if outside.any():
        idx = tuple(outside.nonzero()[0].tolist())
        raise AssertionError(f"{int(outside.sum())} of {y.numel()} outside the reference enclosure; at {idx}: "
                             f"kernel {values[idx].item()!r}, reference {ref.y[idx].item()!r} in "
                             f"[{ref.lo[idx].item()!r}, {ref.hi[idx].item()!r}]")


def run_case(case: FfnCase) -> None:
    args, kwargs = make_call(case)
    assert_matches_reference(npu_ffn(*args, **kwargs), args, kwargs)


def f16(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=FP16)


def f32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=FP32)


def bytes_u8(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)


def deq_bits(value: float, dtype: torch.dtype, high_word: int) -> int:
    """A uint64/int64 deq element: ``value``'s float32 bits in the low word, junk in the high word."""
    low = torch.tensor([value], dtype=FP32).view(torch.int32).item() & 0xFFFFFFFF
    word = (high_word << 32) | low
    return word - (1 << 64) if dtype == torch.int64 and word >= 1 << 63 else word


# ---------------------------------------------------------------------------------------------
# int4 carrier format: uint8 (..., N // 2); element 2b in the low nibble of byte b, 2b+1 in the high.
# ---------------------------------------------------------------------------------------------

INT4_EXAMPLES = [
    ([0, 1], [0x10]),
    ([1, 0], [0x01]),
    ([-1, 0], [0x0F]),
    ([0, -1], [0xF0]),
    ([-8, 7], [0x78]),
    ([7, -8], [0x87]),
    ([1, 2, 3, 4], [0x21, 0x43]),
    ([-2, -3, 5, -6], [0xDE, 0xA5]),
]


@pytest.mark.parametrize("values,packed", INT4_EXAMPLES)
def test_pack_int4_hand_bytes(values, packed):
    out = pack_int4(torch.tensor([values], dtype=torch.int8))
    assert out.dtype == torch.uint8 and out.tolist() == [packed]


@pytest.mark.parametrize("values,packed", INT4_EXAMPLES)
def test_unpack_int4_hand_bytes(values, packed):
    out = unpack_int4(bytes_u8([packed]))
    assert out.dtype == torch.int8 and out.tolist() == [values]
    assert int4_values(bytes_u8([packed])).tolist() == [values]          # the oracle's own decoder


def test_int4_multi_dim_layout():
    packed = bytes_u8([[[0x10, 0x32]], [[0xFE, 0x98]]])                     # (2, 1, 2)
    expected = [[[0, 1, 2, 3]], [[-2, -1, -8, -7]]]
    assert unpack_int4(packed).shape == (2, 1, 4) and unpack_int4(packed).tolist() == expected
    assert pack_int4(torch.tensor(expected, dtype=torch.int32)).tolist() == packed.tolist()


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3), half=st.integers(0, 5), seed=st.integers(0, 2 ** 31))
def test_int4_round_trip(shape, half, seed):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 8, (*shape, 2 * half), generator=gen, dtype=torch.int64)
    packed = pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape, half)
    assert torch.equal(unpack_int4(packed), values.to(torch.int8))
    assert torch.equal(int4_values(packed), values)
    raw = torch.randint(0, 256, (*shape, half), generator=gen, dtype=torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(raw)), raw)


@pytest.mark.parametrize("values,message", [
    (torch.zeros(2, 3, dtype=torch.int8), "pack_int4: last dim must be even, got shape (2, 3)"),
    (torch.tensor([[0, 8]]), "pack_int4: values must be in [-8, 7], got [0, 8]"),
    (torch.tensor([[-9, 0]]), "pack_int4: values must be in [-8, 7], got [-9, 0]"),
    (torch.zeros(1, 2), "pack_int4: values must be an integer tensor, got torch.float32"),
])
def test_pack_int4_rejects(values, message):
    with pytest.raises(ValueError) as info:
        pack_int4(values)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# Hand-computed examples
# ---------------------------------------------------------------------------------------------

def test_hand_example_with_biases():
    # h = [1, -2, -1] + [0, 0, -0.5]; relu -> [1, 0, 0]; y = [2, 1] + [0.5, 0]
    y = npu_ffn(f32([[1, -2]]), f32([[1, 0, 1], [0, 1, 1]]), f32([[2, 1], [5, 5], [7, 7]]), "relu",
                bias1=f32([0, 0, -0.5]), bias2=f32([0.5, 0]))
    assert y.tolist() == [[2.5, 1.0]]


def _silu(z):
    return z / (1 + math.exp(-z))


def _gelu_tanh(z):
    return 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))


@pytest.mark.parametrize("name,gate", [("reglu", lambda z: max(z, 0.0)), ("swiglu", _silu), ("geglu", _gelu_tanh)])
def test_glu_gates_the_left_half_with_the_right(name, gate):
    # h = [2, 3 | -1, 4]: left = [2, 3], right = [-1, 4]; act = left * f(right) (SPEC §9 #14)
    y = npu_ffn(f32([[1]]), f32([[2, 3, -1, 4]]), f32([[1], [1]]), name)
    assert y.item() == pytest.approx(2 * gate(-1.0) + 3 * gate(4.0), rel=1e-6)


@pytest.mark.parametrize("form", ["expert_tokens", "expert_tokens_index"])
def test_zero_count_expert_takes_no_rows(form):
    # rows 1, 2, 3; experts 0, 1, 2 scale by (e + 1) * 10**e; expert 1 has no rows
    x = f32([[1], [2], [3]])
    w1 = f32([[[1]], [[2]], [[3]]])
    w2 = f32([[[1]], [[10]], [[100]]])
    tokens = [1, 0, 2] if form == "expert_tokens" else [1, 1, 3]
    y = npu_ffn(x, w1, w2, "relu", **{form: tokens})
    assert y.tolist() == [[1.0], [600.0], [900.0]]


@pytest.mark.parametrize("name,z,expected", [
    # AscendC Gelu is the tanh form: gelu(1) = 0.84119199 (erf GELU would be 0.84134475)
    ("gelu", 1.0, 0.8411919906), ("gelu", -2.0, -0.0454023059),
    ("fastgelu", 1.0, 1 / (1 + math.exp(-1.702))), ("fastgelu", -3.0, -3 / (1 + math.exp(5.106))),
    ("silu", 1.0, 0.7310585786), ("relu", -1.5, 0.0), ("relu", 2.5, 2.5),
])
def test_activation_values(name, z, expected):
    y = npu_ffn(f32([[z]]), f32([[1]]), f32([[1]]), name.upper())
    # fp32 evaluation: a few ulps of |z| (0.5 z (1 + tanh(..)) cancels for z < 0)
    assert y.item() == pytest.approx(expected, rel=0, abs=2 ** -21 * abs(z))


def test_activations_match_spec_formulas():
    """fp32, K = 1, identity weights: y = f(z) up to fp32 evaluation error (2**-21 |z|)."""
    z = torch.linspace(-9, 9, 721, dtype=torch.float64)
    for name, formula in PLAIN.items():
        y = npu_ffn(z.float()[:, None], f32([[1]]), f32([[1]]), name)[:, 0].double()
        expected = formula(z.float().double())
        assert ((y - expected).abs() <= 2 ** -21 * z.abs()).all(), name


@pytest.mark.parametrize("dtype,tie,away", [(FP16, 1 + 2 ** -11, 1 + 2 ** -10), (BF16, 1 + 2 ** -8, 1 + 2 ** -7)])
def test_high_precision_cast_rounds_ties_away_from_zero(dtype, tie, away):
    """inner_precise=0: the fp32 activation is cast with CAST_ROUND (SPEC §5.4): a tie goes away from
    zero, where round-to-even would give 1.0. h = 1 * 1 + 1 * (tie - 1) is exact in fp32."""
    x = torch.tensor([[1, 1]], dtype=dtype)
    w1 = torch.tensor([[1], [tie - 1]], dtype=dtype)
    y = npu_ffn(x, w1, torch.tensor([[1]], dtype=dtype), "relu", inner_precise=0)
    assert y.item() == away
    # negative tie through a GLU: left = -tie, right = 1 -> act = -tie -> -away
    w1 = torch.tensor([[-1, 1], [1 - tie, 0]], dtype=dtype)
    y = npu_ffn(x, w1, torch.tensor([[1]], dtype=dtype), "reglu", inner_precise=0)
    assert y.item() == -away


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_npu_ffn_traces_with_fake_values(dtype):
    """No read of the values on the host (the bf16 CAST_ROUND once branched on ``isnan(t).any()``):
    the op and its backward trace on fake tensors, so a compiled training step keeps one graph."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def step(x, w1, w2):
        return torch.autograd.grad(npu_ffn(x, w1, w2, "gelu", inner_precise=0).float().sum(), (x, w1, w2))

    args = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape in ((4, 8), (8, 16), (16, 8))]
    graph = make_fx(step, tracing_mode="fake")(*args)
    assert "_local_scalar_dense" not in graph.code and "npu_ffn" in graph.code


def test_high_performance_rounds_mm1_to_fp16_nearest_even():
    """inner_precise=1: the mm1 result is fp16 (round to nearest even): the tie 1 + 2**-11 becomes 1."""
    x = f16([[1, 1]])
    w1 = f16([[1], [2 ** -11]])
    assert npu_ffn(x, w1, f16([[1]]), "relu", inner_precise=1).item() == 1.0
    # relu(1 + 2**-11 + 2**-12) -> fp16 1 + 2**-10 either way
    w1 = f16([[1], [2 ** -11 + 2 ** -12]])
    assert npu_ffn(x, w1, f16([[1]]), "relu", inner_precise=1).item() == 1 + 2 ** -10


def test_int4_nibble_order_in_ffn():
    # W1 byte 0x2F = [-1, 2] (low nibble first); relu(x @ W1) = [0, 2]
    # W2 bytes [[0x10], [0x32]] = [[0, 1], [2, 3]]; y = 2 * [2, 3]
    ones, zeros = f16([1, 1]), f16([0, 0])
    y = npu_ffn(f16([[1]]), bytes_u8([[0x2F]]), bytes_u8([[0x10], [0x32]]), "relu",
                antiquant_scale1=ones, antiquant_offset1=zeros, antiquant_scale2=ones, antiquant_offset2=zeros)
    assert y.tolist() == [[4.0, 6.0]]


def test_per_group_antiquant_hand_example():
    # W1 (K=4, N=2) int4 rows [k+1, 0]; groups of 2 rows: group 0 scale 1 offset 0, group 1 scale 10 offset 1
    # column 0 dequantizes to [1, 2, (3+1)*10, (4+1)*10] -> h = [93, 0]; W2 = identity (one group)
    w1 = bytes_u8([[0x01], [0x02], [0x03], [0x04]])
    y = npu_ffn(f16([[1, 1, 1, 1]]), w1, bytes_u8([[0x01], [0x10]]), "relu",
                antiquant_scale1=f16([[1, 1], [10, 1]]), antiquant_offset1=f16([[0, 0], [1, 0]]),
                antiquant_scale2=f16([[1, 1]]), antiquant_offset2=f16([[0, 0]]))
    assert y.tolist() == [[93.0, 0.0]]


def _quant_identity(x_rows, deq1, deq2, scale, offset, out=None, counts=None):
    """int8 FFN with identity weights (one per expert), relu."""
    n = len(x_rows[0])
    eye = torch.eye(n, dtype=torch.int8)
    w = eye if counts is None else eye.expand(len(counts), n, n).contiguous()
    kwargs = {} if counts is None else {"expert_tokens": counts}
    return npu_ffn(torch.tensor(x_rows, dtype=torch.int8), w, w, "relu", scale=scale, offset=offset,
                   deq_scale1=deq1, deq_scale2=deq2, output_dtype=out, **kwargs)


@pytest.mark.parametrize("deq_dtype", [torch.uint64, torch.int64])
@pytest.mark.parametrize("high_word", [0, 0x1, 0xDEADBEEF])
def test_quant_decodes_low_word_of_64_bit_deq_scales(deq_dtype, high_word):
    # h = [2, -4] * 0.5 = [1, -2]; relu [1, 0]; q = round(3 * [1, 0]) = [3, 0]; y = q * 0.25
    deq1 = torch.tensor([deq_bits(0.5, deq_dtype, high_word)] * 2, dtype=deq_dtype)
    deq2 = torch.tensor([deq_bits(0.25, deq_dtype, high_word)] * 2, dtype=deq_dtype)
    y = _quant_identity([[2, -4]], deq1, deq2, f32([3.0]), f32([0.0]))
    assert y.dtype == FP16 and y.tolist() == [[0.75, 0.0]]


def test_quant_64_bit_deq_scale_uses_all_32_low_bits():
    """0x3FC00001 = 1.5 + 2**-23 (not FP19-truncated). h = 127 * 10 + 96 = 1366: 1366 * 1.5 = 2049 is an
    fp16 tie (-> 2048) but 1366 * (1.5 + 2**-23) is just above it (-> 2050). Requant in fp16 with scale
    1/32, offset fp16(0.47) = 0.46997: 2050 / 32 + 0.46997 = 64.53 -> fp16 64.5625 -> 65 (2048 would
    give 64.47 -> fp16 64.5 -> 64, half to even)."""
    y = npu_ffn(torch.tensor([[127, 96]], dtype=torch.int8), torch.tensor([[10], [1]], dtype=torch.int8),
                torch.tensor([[1]], dtype=torch.int8), "relu", scale=f32([1 / 32]), offset=f32([0.47]),
                deq_scale1=torch.tensor([0x3FC00001], dtype=torch.int64),
                deq_scale2=torch.tensor([0x3F800000], dtype=torch.int64))
    assert y.tolist() == [[65.0]]


@pytest.mark.parametrize("out,deq_dtype", [(FP16, FP32), (BF16, BF16)])
def test_quant_float_deq_scales(out, deq_dtype):
    deq1, deq2 = torch.tensor([0.5, 0.5], dtype=deq_dtype), torch.tensor([0.25, 0.25], dtype=deq_dtype)
    y = _quant_identity([[2, -4]], deq1, deq2, f32([3.0]), f32([0.0]), out=out)
    assert y.dtype == out and y.tolist() == [[0.75, 0.0]]


def test_quant_requant_saturates():
    # expert 0: q = round(3 * 50) = 150 -> 127; expert 1: q = round(0 - 200) -> -128
    y = _quant_identity([[100, 0], [0, 0]], f32([[0.5, 0.5], [0.5, 0.5]]), f32([[0.25, 0.25], [0.25, 0.25]]),
                        f32([3.0, 3.0]), f32([0.0, -200.0]), counts=[1, 1])
    assert y.tolist() == [[31.75, 0.0], [-32.0, -32.0]]


def test_quant_requant_rounds_half_to_even():
    # h1 = [2.5, 3.5]; q = [2, 4] (half to even, SPEC §5.4 [I]); half away would give [3, 4]
    y = _quant_identity([[5, 7]], f32([0.5, 0.5]), f32([1.0, 1.0]), f32([1.0]), f32([0.0]))
    assert y.tolist() == [[2.0, 4.0]]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quant_scale_and_offset_are_cast_to_fp16(per_channel):
    """AscendQuant reads scale and offset as fp16 (per-tensor too, as the op-plugin golden casts them).
    Scale 1 + 3 * 2**-12 is 1 + 2**-10 in fp16 and offset 0.41 is 0.409912109375:
    100 * (1 + 2**-10) = 100.0977 -> fp16 100.125; + 0.4099 = 100.5349 -> fp16 100.5625 -> q = 101.
    With the fp32 scale, 100.0732 + 0.41 = 100.483 would give 100."""
    s = 1 + 3 * 2 ** -12
    ones = torch.tensor([0x3F800000, 0x3F800000], dtype=torch.int64)              # 1.0
    y = _quant_identity([[100, 0]], ones, ones, f32([s, s] if per_channel else [s]), f32([0.41]))
    assert y.tolist() == [[101.0, 0.0]]


def test_quant_requant_product_rounds_to_fp16():
    """fp16 ``act * scale``: 7 * (1609 / 2048) = 5.49951171875 is 5.5 in fp16 (ulp 2**-8), and
    round half to even gives q = 6; the unrounded product would give 5."""
    ones = torch.tensor([0x3F800000, 0x3F800000], dtype=torch.int64)
    y = _quant_identity([[7, 0]], ones, ones, f32([1609 / 2048]), f32([0.0]))
    assert y.tolist() == [[6.0, 0.0]]


def test_quant_requant_sum_rounds_to_fp16():
    """fp16 ``+ offset``: 100 + fp16(0.51) = 100.51025390625 is 100.5 in fp16 (ulp 2**-4), so q = 100
    (half to even); an fp32 sum would give 101. The zero activation gives round(0.51) = 1."""
    ones = torch.tensor([0x3F800000, 0x3F800000], dtype=torch.int64)
    y = _quant_identity([[100, 0]], ones, ones, f32([1.0]), f32([0.51]))
    assert y.tolist() == [[100.0, 1.0]]


def test_quant_bf16_output_keeps_the_dequantized_mm1_in_fp32():
    """bf16 output: mm1 is dequantized to fp32 (AscendDequant, activation type float), not bf16.
    h = 127 * 2 + 3 * 1 = 257 (bf16 would make it 256); u = fp16(257 * 0.5) - 64.75 = 63.75 -> q = 64
    (256 would give 63.25 -> 63); y = 64 * 1."""
    one = torch.tensor([1.0], dtype=BF16)
    y = npu_ffn(torch.tensor([[127, 3]], dtype=torch.int8), torch.tensor([[2], [1]], dtype=torch.int8),
                torch.tensor([[1]], dtype=torch.int8), "relu", scale=f32([0.5]), offset=f32([-64.75]),
                deq_scale1=one, deq_scale2=one, output_dtype=BF16)
    assert y.dtype == BF16 and y.tolist() == [[64.0]]


@pytest.mark.parametrize("dtype,offset,expected", [
    # fp16: 1 + 2**-11 is a tie -> 1.0, then * 3 = 3.0 (one rounding of 3.00146 would give 3.001953125)
    (FP16, 2 ** -11, 3.0),
    # bf16: (1 + 2**-8) * 3 = 3.01171875 rounded once -> 3.015625 (two bf16 roundings would give 3.0)
    (BF16, 2 ** -8, 3.015625),
])
def test_antiquant_weight_rounding(dtype, offset, expected):
    """(W + offset) * scale: two fp16 roundings for fp16 (op-plugin golden, AscendAntiQuant on half),
    one rounding of the fp32 value for bf16 (AscendAntiQuant's fp32 path). x = 1, W2 = 1: y = W1's value."""
    t = lambda v: torch.tensor(v, dtype=dtype)
    int8 = lambda v: torch.tensor(v, dtype=torch.int8)
    y = npu_ffn(t([[1]]), int8([[1]]), int8([[1]]), "relu", antiquant_scale1=t([3]), antiquant_offset1=t([offset]),
                antiquant_scale2=t([1]), antiquant_offset2=t([0]))
    assert y.item() == expected


@pytest.mark.parametrize("inner_precise", [None, 0, 1])
@pytest.mark.parametrize("dtype,tiny,expected", [
    (FP16, 2 ** -11, 1.0),                  # mm1 in fp16, nearest even: the tie 1 + 2**-11 -> 1
    (BF16, 2 ** -8, 1 + 2 ** -7),           # mm1 in fp32, CAST_ROUND: the tie 1 + 2**-8 -> away from zero
])
def test_antiquant_intermediate_follows_x_dtype(inner_precise, dtype, tiny, expected):
    """The antiquant kernel's mm1 output is fp16 for fp16 x (like inner_precise=1) and fp32 for bf16 x
    (high precision), whatever inner_precise. h = 1 * 1 + tiny * 1 is exact in fp32."""
    t = lambda v: torch.tensor(v, dtype=dtype)
    int8 = lambda v: torch.tensor(v, dtype=torch.int8)
    one, zero = t([1]), t([0])
    y = npu_ffn(t([[1, tiny]]), int8([[1], [1]]), int8([[1]]), "relu", antiquant_scale1=one, antiquant_offset1=zero,
                antiquant_scale2=one, antiquant_offset2=zero, inner_precise=inner_precise)
    assert y.item() == expected


def test_output_dtype():
    args, kwargs = make_call(FfnCase(mode="quant", dtype=FP16, output_dtype_arg=False))
    assert npu_ffn(*args, **kwargs).dtype == FP16                               # int8 x: fp16 by default
    args, kwargs = make_call(FfnCase(mode="quant", dtype=BF16))
    assert kwargs["output_dtype"] == BF16 and npu_ffn(*args, **kwargs).dtype == BF16
    args, kwargs = make_call(FfnCase(dtype=FP16))
    y = npu_ffn(*args, **kwargs, output_dtype=BF16)                              # ignored without int8 x
    assert y.dtype == FP16
    assert_matches_reference(y, args, kwargs)


@pytest.mark.parametrize("case", [
    FfnCase(lead=(0,)),                                                   # M = 0
    FfnCase(lead=(0, 3), counts=(0, 0), activation="swiglu"),
    FfnCase(k1=0, activation="gelu"),                                     # y = act(b1) @ W2 + b2
    FfnCase(k1=5, hidden=3, n2=7, activation="silu"),                     # N2 != K1 (portable)
    FfnCase(lead=(1, 2, 1, 1, 2, 1, 1), dtype=FP16, activation="fastgelu"),   # x 8-D
    FfnCase(hidden=0, activation="relu"),                                 # N1 = K2 = 0: y = b2
], ids=["M0", "M0-experts", "K1-0", "N2-ne-K1", "x-8d", "N1-0"])
def test_edge_shapes(case):
    run_case(case)


# ---------------------------------------------------------------------------------------------
# Grids against the oracle
# ---------------------------------------------------------------------------------------------

EXPERT_FORMS = {
    "none": dict(lead=(2, 3)),
    "counts": dict(lead=(2, 3), counts=(2, 0, 4)),
    "index": dict(lead=(6,), counts=(0, 5, 1), index_form=True),
}
SPELLINGS = {"fastgelu": "FastGelu", "gelu": "gelu", "relu": "RELU", "silu": "Silu", "geglu": "GeGLU",
             "swiglu": "swiglu", "reglu": "ReGlu"}


@pytest.mark.parametrize("experts", EXPERT_FORMS)
@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=str)
@pytest.mark.parametrize("activation", PLAIN_NAMES + GLU_NAMES)
def test_float_grid(activation, dtype, experts):
    run_case(FfnCase(dtype=dtype, activation=SPELLINGS[activation], k1=6, hidden=5, n2=6, seed=7,
                     **EXPERT_FORMS[experts]))


@pytest.mark.parametrize("inner_precise", [None, 0, 1])
@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu", "geglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_fp16_inner_precise(inner_precise, activation, bias):
    run_case(FfnCase(dtype=FP16, activation=activation, inner_precise=inner_precise, bias=bias, k1=16, hidden=12,
                     n2=16, lead=(4, 4), seed=3))


QUANT_DEQ = [(FP16, torch.uint64), (FP16, torch.int64), (FP16, FP32), (BF16, BF16)]
# fp32 deq scales and GLU activations take per-tensor scales only (test_ffn_validation.py)
QUANT_GRID = [(out, deq, per_channel, act) for out, deq in QUANT_DEQ for per_channel in (False, True)
              for act in ("relu", "gelu", "fastgelu", "silu", "swiglu")
              if not (per_channel and (deq == FP32 or act in GLU_NAMES))]


@pytest.mark.parametrize("out,deq,per_channel,activation", QUANT_GRID,
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("experts", EXPERT_FORMS)
def test_quant_grid(out, deq, per_channel, activation, experts):
    run_case(FfnCase(mode="quant", dtype=out, deq_dtype=deq, per_channel=per_channel, activation=activation,
                     k1=12, hidden=10, n2=12, seed=11, **EXPERT_FORMS[experts]))


@pytest.mark.parametrize("dtype", [FP16, BF16, FP32], ids=str)
@pytest.mark.parametrize("weight,groups", [("int8", 0), ("int4", 0), ("int4", 2), ("int4", 4)])
@pytest.mark.parametrize("experts", EXPERT_FORMS)
def test_antiquant_grid(dtype, weight, groups, experts):
    run_case(FfnCase(mode="antiquant", dtype=dtype, weight_dtype=weight, groups=groups, activation="gelu",
                     k1=8, hidden=12, n2=8, seed=5, **EXPERT_FORMS[experts]))


# ---------------------------------------------------------------------------------------------
# Hypothesis against the oracle: shapes, x with 2..4 dims, zero-count experts, every mode
# ---------------------------------------------------------------------------------------------

@st.composite
def layouts(draw, even=False):
    """Shape fields of an FfnCase: x 2..4-D, optional experts (with empty ones) in either form."""
    lead = tuple(draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)))
    rows = math.prod(lead)
    form = draw(st.sampled_from(["none", "counts", "index"]))
    counts = None
    if form != "none":
        cuts = sorted(draw(st.lists(st.integers(0, rows), min_size=0, max_size=4)))
        bounds = [0, *cuts, rows]
        counts = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    dim = st.integers(1, 6).map(lambda v: 2 * v) if even else st.integers(1, 12)
    return dict(lead=lead, counts=counts, index_form=form == "index", k1=draw(st.integers(1, 12)),
                hidden=draw(dim), n2=draw(dim), seed=draw(st.integers(0, 2 ** 31)))


def spelled(name_strategy):
    return st.tuples(name_strategy, st.sampled_from([str.lower, str.upper, str.title])).map(lambda p: p[1](p[0]))


@settings(max_examples=80, deadline=None)
@given(shape=layouts(), dtype=st.sampled_from([FP32, FP16, BF16]),
       activation=spelled(st.sampled_from(PLAIN_NAMES + GLU_NAMES)), bias=st.booleans(),
       inner_precise=st.sampled_from([None, 0, 1]))
def test_float_hypothesis(shape, dtype, activation, bias, inner_precise):
    run_case(FfnCase(dtype=dtype, activation=activation, bias=bias, inner_precise=inner_precise, **shape))


@settings(max_examples=60, deadline=None)
@given(shape=layouts(), out_deq=st.sampled_from(QUANT_DEQ), per_channel=st.booleans(),
       activation=spelled(st.sampled_from(PLAIN_NAMES + GLU_NAMES)), bias=st.booleans(), output_arg=st.booleans())
def test_quant_hypothesis(shape, out_deq, per_channel, activation, bias, output_arg):
    out, deq = out_deq
    per_channel = per_channel and deq != FP32 and activation.lower() not in GLU_NAMES
    run_case(FfnCase(mode="quant", dtype=out, deq_dtype=deq, per_channel=per_channel, activation=activation, bias=bias,
                     output_dtype_arg=output_arg or out == BF16, **shape))


@settings(max_examples=60, deadline=None)
@given(shape=layouts(even=True), dtype=st.sampled_from([FP16, BF16, FP32]), weight=st.sampled_from(["int8", "int4"]),
       activation=spelled(st.sampled_from(PLAIN_NAMES + GLU_NAMES)), bias=st.booleans(), data=st.data())
def test_antiquant_hypothesis(shape, dtype, weight, activation, bias, data):
    groups = 0
    if weight == "int4":
        k2 = shape["hidden"]
        divisors = [g for g in range(1, min(shape["k1"], k2) + 1) if shape["k1"] % g == 0 and k2 % g == 0]
        groups = data.draw(st.sampled_from([0] + divisors), label="groups")
    run_case(FfnCase(mode="antiquant", dtype=dtype, weight_dtype=weight, groups=groups, activation=activation,
                     bias=bias, **shape))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager
# ---------------------------------------------------------------------------------------------

def _ffn(x, weight1, weight2, activation, kwargs):
    return npu_ffn(x, weight1, weight2, activation, **kwargs)


def _compiled(backend: str, dynamic: bool):
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    return torch.compile(_ffn, fullgraph=True, backend=counter, dynamic=dynamic), counter


def test_compile_inductor_static():
    args, kwargs = make_call(FfnCase(activation="gelu", lead=(2, 4), counts=(3, 0, 5), k1=16, hidden=24, n2=16))
    fn, counter = _compiled("inductor", dynamic=False)
    assert torch.equal(fn(*args, kwargs), npu_ffn(*args, **kwargs))
    assert counter.frame_count == 1


def test_compile_inductor_dynamic():
    fn, counter = _compiled("inductor", dynamic=True)
    for rows in (5, 9):
        args, kwargs = make_call(FfnCase(mode="antiquant", dtype=FP16, weight_dtype="int4", groups=2,
                                         activation="swiglu", lead=(rows,), k1=8, hidden=8, n2=8, seed=rows))
        assert torch.equal(fn(*args, kwargs), npu_ffn(*args, **kwargs))
    assert counter.frame_count == 1             # one graph serves both row counts


COMPILE_CASES = {
    "float-experts": FfnCase(activation="silu", lead=(2, 3), counts=(2, 0, 4), seed=1),
    "fp16-index-glu": FfnCase(dtype=FP16, activation="ReGLU", lead=(6,), counts=(2, 4), index_form=True,
                              inner_precise=1, seed=2),
    "bf16": FfnCase(dtype=BF16, activation="fastgelu", lead=(3, 2), seed=3),
    "quant-uint64": FfnCase(mode="quant", dtype=FP16, activation="gelu", counts=(1, 5), per_channel=True, seed=4),
    "quant-bf16": FfnCase(mode="quant", dtype=BF16, activation="relu", seed=5),
    "quant-int64": FfnCase(mode="quant", dtype=FP16, deq_dtype=torch.int64, activation="silu", output_dtype_arg=False,
                           seed=6),
    "antiquant-int8": FfnCase(mode="antiquant", dtype=BF16, activation="gelu", counts=(6, 0), seed=7),
}


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_aot_eager(name, dynamic):
    args, kwargs = make_call(COMPILE_CASES[name])
    fn, counter = _compiled("aot_eager", dynamic=dynamic)
    y = fn(*args, kwargs)
    assert torch.equal(y, npu_ffn(*args, **kwargs)) and y.dtype == npu_ffn(*args, **kwargs).dtype
    assert counter.frame_count == 1


def test_compile_dynamic_shapes_track_rows():
    """dynamic=True: new row counts (and new x ranks' leading sizes) reuse the graph and stay correct."""
    fn, counter = _compiled("aot_eager", dynamic=True)
    for lead in ((2, 3), (4, 5), (3, 7)):
        args, kwargs = make_call(FfnCase(activation="gelu", lead=lead, k1=8, hidden=8, n2=8, seed=sum(lead)))
        y = fn(*args, kwargs)
        assert y.shape == (*lead, 8)
        assert_matches_reference(y, args, kwargs)
    assert counter.frame_count == 1
