"""Reference for ``npu_ffn`` written from SPEC §5.4 alone: plain loops over expert segments (and over
weight rows for antiquant groups), the activation formulas as SPEC writes them, its own decoders for
int4 nibbles, uint64/int64 deq scales and the rounding modes. It shares no code with ``moe_fusion.kernels``.

Numerics. Values are computed in fp64 and rounded to the storage dtype exactly where SPEC §5.4 puts a
rounding. A device (or the CPU kernel) computes in fp32, so before each rounding its value differs
from the fp64 one by a bounded amount. The oracle carries that bound, ``err``, beside every value:

* an fp32 dot product over ``K`` terms: ``|err| <= (K + 2) * 2**-24 * sum(|terms|)``;
* an fp32 activation evaluated at ``z``: ``|err| <= 2**-21 * |z|`` (a few ulps of the input, which
  covers the cancellation in ``0.5 * z * (1 + tanh(..))``); inputs off by ``e`` move the output by at
  most ``LIPSCHITZ * e``;
* rounding a value known to ``+-err``: rounding is monotone, so the result lies in
  ``[rnd(v - err), rnd(v + err)]``. That interval is one point unless a rounding boundary lies within
  ``err`` (then it is one storage ulp wide, or one quantization step for int8).

``ffn_reference`` returns the nominal ``y`` and an enclosure ``[lo, hi]`` that every fp32
implementation of the SPEC lands in: fp32 accumulation order only widens it by the first bullet, and a
storage rounding only by the ulps that may really flip.

Where SPEC §5.4 leaves the intermediate precision open, the rule is op-plugin's golden
(``test/test_custom_ops/test_npu_ffn.py``) where it rounds to fp16, and the ops-transformer kernel
where the golden keeps fp32 values the kernel cannot hold:

* antiquant, fp16 x: ``fp16(fp16(W + offset) * scale)``, two fp16 roundings; bf16 x: one rounding of
  ``(W + offset) * scale``. fp16 x then rounds mm1 and the activation to fp16 (nearest even), as
  inner_precise=1 does; bf16 x is high precision (fp32, ``CAST_ROUND``).
* quant: ``h1 = h * deqScale1`` rounded to fp16 for an fp16 output, kept fp32 for bf16; the activation
  rounded to fp16; ``u = fp16(fp16(a * fp16(scale)) + fp16(offset))``; ``q`` = round half to even,
  saturated; ``y = (q @ W2 + b2) * deqScale2`` rounded to the output dtype.

A single fp16 operation on fp16 values is exact in fp64 before its rounding, so those roundings carry
no fp32 error: the enclosure widens only where a value rounded there was already uncertain.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import torch

F32_UNIT = 2.0 ** -24
EVAL_REL = 2.0 ** -21
LIPSCHITZ = 1.2          # max |f'|: gelu 1.13, silu 1.10, fastgelu 1.10, relu 1


# -- activations: SPEC §5.4 formulas, on fp64 ----------------------------------------------------

def gelu(z: torch.Tensor) -> torch.Tensor:
    return z / (1 + torch.exp(-1.5957691 * (z + 0.044715 * z ** 3)))


def fastgelu(z: torch.Tensor) -> torch.Tensor:
    return z / (1 + torch.exp(-1.702 * z))


def silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1 + torch.exp(-z))


def relu(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z > 0, z, torch.zeros_like(z))


def geglu_gate(z: torch.Tensor) -> torch.Tensor:
    return z / (1 + torch.exp(-0.071354814 * z * (z * z + 22.36386)))


def swiglu_gate(z: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    return z / (1 + torch.exp(-beta * z))


PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": gelu, "fastgelu": fastgelu, "silu": silu, "relu": relu}
GATES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "geglu": geglu_gate, "swiglu": swiglu_gate, "reglu": relu}


# -- storage formats ---------------------------------------------------------------------------

_NIBBLE_VALUE = [v - 16 if v >= 8 else v for v in range(16)]        # two's complement 4-bit
_INT4_PAIRS = torch.tensor([[_NIBBLE_VALUE[b % 16], _NIBBLE_VALUE[b // 16]] for b in range(256)])


def int4_values(packed: torch.Tensor) -> torch.Tensor:
    """``(..., B)`` uint8 -> ``(..., 2B)`` int64: byte ``b`` holds element ``2b`` in its low nibble
    and element ``2b + 1`` in its high nibble."""
    return _INT4_PAIRS[packed.long()].reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def deq_values(deq: torch.Tensor) -> torch.Tensor:
    """fp64 values of a deq scale: uint64/int64 hold float32 bits in their low 32 bits."""
    if deq.dtype not in (torch.int64, torch.uint64):
        return deq.double()
    words = [int(v) & 0xFFFFFFFF for v in deq.reshape(-1).tolist()]
    floats = [struct.unpack("<f", struct.pack("<I", w))[0] for w in words]
    return torch.tensor(floats, dtype=torch.float64).reshape(deq.shape)


# -- rounding ----------------------------------------------------------------------------------

def round_even(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp64 -> fp32 -> ``dtype``, each to nearest even (an fp32 pipeline's cast), back to fp64."""
    return v.to(torch.float32).to(dtype).double()


def round_half_away(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """AscendC ``CAST_ROUND`` of the fp32 value of ``v``: nearest, ties away from zero."""
    v32 = v.to(torch.float32).double()
    nearest_even = v32.to(torch.float32).to(dtype).double()
    mirrored = 2 * v32 - nearest_even          # the other neighbour exactly when v32 is a tie
    tie = (mirrored != nearest_even) & (mirrored.to(torch.float32).to(dtype).double() == mirrored)
    return torch.where(tie & (mirrored.abs() > nearest_even.abs()), mirrored, nearest_even)


def _rounded(v: torch.Tensor, err: torch.Tensor, dtype: torch.dtype, rnd=round_even):
    """``(rnd(v), bound on |rnd(v') - rnd(v)| for |v' - v| <= err)``; fp32 storage keeps ``v``."""
    if dtype == torch.float32:
        return v, err
    return rnd(v, dtype), rnd(v + err, dtype) - rnd(v - err, dtype)


# -- structure ---------------------------------------------------------------------------------

def expert_segments(num_rows: int, expert_tokens, expert_tokens_index) -> list:
    """``[(expert or None, first row, end row)]``: contiguous row blocks in expert order."""
    if expert_tokens_index:
        ends = list(expert_tokens_index)
    elif expert_tokens:
        ends, total = [], 0
        for count in expert_tokens:
            total += count
            ends.append(total)
    else:
        return [(None, 0, num_rows)]
    return [(e, ends[e - 1] if e else 0, ends[e]) for e in range(len(ends))]


def _of(t: Optional[torch.Tensor], e: Optional[int]) -> Optional[torch.Tensor]:
    return t if t is None or e is None else t[e]


def _weight(w: torch.Tensor, scale, offset, dtype: torch.dtype):
    """One expert's ``(K, N)`` weight as fp64 values and error bound. Antiquant:
    ``(W[k, n] + offset[g, n]) * scale[g, n]`` with ``g = k // (K / G)`` (per-channel: G = 1). fp16 x:
    the sum rounded to fp16, then the product rounded to fp16; otherwise one rounding to x's dtype of
    the two fp32 operations."""
    values = (int4_values(w) if w.dtype == torch.uint8 else w).double()
    if scale is None:
        return values, torch.zeros_like(values)
    k = values.shape[0]
    scale2d, offset2d = (scale, offset) if scale.dim() == 2 else (scale[None], offset[None])
    rows_per_group = k // scale2d.shape[0]
    exact = torch.empty_like(values)
    scale_rows = torch.empty_like(values)
    offset_rows = torch.empty_like(values)
    for row in range(k):
        g = row // rows_per_group
        scale_rows[row], offset_rows[row] = scale2d[g].double(), offset2d[g].double()
        shifted = values[row] + offset_rows[row]
        if dtype == torch.float16:
            shifted = round_even(shifted, dtype)
        exact[row] = shifted * scale_rows[row]
    if dtype == torch.float16:   # both fp64 operations on fp16 values are exact, then rounded as the kernel rounds
        return _rounded(exact, torch.zeros_like(exact), dtype)
    err = 4 * F32_UNIT * (values.abs() + offset_rows.abs()) * scale_rows.abs()   # two fp32 ops
    return _rounded(exact, err, dtype)


def _activate(name: str, h: torch.Tensor, err: torch.Tensor):
    """SPEC activation of ``h`` ``(rows, N1)``, GLU forms ``left * f(right)`` over the two column
    halves (left = first N1/2, SPEC §9 #14), with the error bound of an fp32 evaluation."""
    if name in PLAIN:
        return PLAIN[name](h), LIPSCHITZ * err + EVAL_REL * (h.abs() + err)
    half = h.shape[-1] // 2
    left, right, e_left, e_right = h[:, :half], h[:, half:], err[:, :half], err[:, half:]
    gate = GATES[name](right)
    value = left * gate
    bound = (e_left * (gate.abs() + LIPSCHITZ * e_right) + left.abs() * LIPSCHITZ * e_right
             + EVAL_REL * (left.abs() + e_left) * (right.abs() + e_right))
    return value, bound


def _matmul(a: torch.Tensor, a_err: torch.Tensor, w: torch.Tensor, w_err: torch.Tensor, bias: torch.Tensor):
    """``a @ w + bias`` and its bound: input errors plus fp32 accumulation over K + bias."""
    value = a @ w + bias
    magnitude = a.abs() @ w.abs() + bias.abs()
    err = a_err @ (w.abs() + w_err) + a.abs() @ w_err + (a.shape[-1] + 2) * F32_UNIT * magnitude
    return value, err


# -- modes -------------------------------------------------------------------------------------

def _float_segment(rows, w1, w2, b1, b2, activation: str, store: torch.dtype, fp16_intermediate: bool):
    """Non-quant and antiquant (SPEC §5.4): x dtype ``store``; mm1 + act, rounded; mm2 + b2."""
    h, h_err = _matmul(rows, torch.zeros_like(rows), *w1, b1)
    if fp16_intermediate:                       # inner_precise=1: mm1 result and activation in fp16
        h, h_err = _rounded(h, h_err, torch.float16)
    act, act_err = _activate(activation, h, h_err)
    act, act_err = _rounded(act, act_err, store, round_even if fp16_intermediate else round_half_away)
    return _matmul(act, act_err, *w2, b2)


def _quant_segment(rows, w1, w2, b1, b2, scale16, offset16, deq1, deq2, activation: str, out: torch.dtype):
    """Quant: exact int32 matmuls; ``h1 = h * deq1`` (fp16 for an fp16 output, fp32 for bf16); act
    rounded to fp16; requant ``fp16(fp16(act * scale16) + offset16)``, round half to even, saturate;
    ``(q @ w2 + b2) * deq2``. ``scale16``/``offset16`` are already fp16 values."""
    h = rows @ w1 + b1                                         # exact: integers far below 2**53
    h1, h1_err = _rounded(h * deq1, F32_UNIT * (h * deq1).abs(),  # via fp32, or directly
                          torch.float16 if out == torch.float16 else torch.float32)
    act, act_err = _activate(activation, h1, h1_err)
    act, act_err = _rounded(act, act_err, torch.float16)
    # fp16 products and sums of fp16 values are exact in fp64 before their rounding: only act_err moves them
    prod, prod_err = _rounded(act * scale16, act_err * scale16.abs(), torch.float16)
    u, u_err = _rounded(prod + offset16, prod_err, torch.float16)
    quantize = lambda v: torch.clamp(torch.round(v), -128, 127)   # round half to even, saturate
    q = quantize(u)
    q_err = quantize(u + u_err) - quantize(u - u_err)
    y = (q @ w2 + b2) * deq2
    y_err = (q_err @ w2.abs()) * deq2.abs() + F32_UNIT * y.abs()
    return y, y_err


@dataclass
class Reference:
    y: torch.Tensor       # nominal result, in the output dtype
    lo: torch.Tensor      # fp64 enclosure of every fp32 implementation of the SPEC
    hi: torch.Tensor


def ffn_reference(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, activation: str, *,
                  expert_tokens=None, expert_tokens_index=None, bias1=None, bias2=None, scale=None, offset=None,
                  deq_scale1=None, deq_scale2=None, antiquant_scale1=None, antiquant_scale2=None,
                  antiquant_offset1=None, antiquant_offset2=None, inner_precise=None,
                  output_dtype=None) -> Reference:
    """``npu_ffn`` of a valid call (SPEC §5.4). ``y`` ``x.shape[:-1] + (N2,)``."""
    name = activation.lower()
    quant = x.dtype == torch.int8
    out = (output_dtype or torch.float16) if quant else x.dtype
    k1 = x.shape[-1]
    num_rows = math.prod(x.shape[:-1])
    rows = x.reshape(num_rows, k1).double()
    n1 = weight1.shape[-1] * (2 if weight1.dtype == torch.uint8 else 1)
    n2 = weight2.shape[-1] * (2 if weight2.dtype == torch.uint8 else 1)
    y = torch.zeros(num_rows, n2, dtype=torch.float64)
    err = torch.zeros_like(y)
    experts = bool(expert_tokens or expert_tokens_index)
    # SPEC §5.3: per-tensor scale (E,) / (1,); per-channel (E, N1) / (N1,).
    per_channel = scale is not None and (scale.dim() == 2 if experts else tuple(scale.shape) != (1,))
    for e, first, end in expert_segments(num_rows, expert_tokens, expert_tokens_index):
        if first == end:
            continue
        b1 = torch.zeros(n1, dtype=torch.float64) if bias1 is None else _of(bias1, e).double()
        b2 = torch.zeros(n2, dtype=torch.float64) if bias2 is None else _of(bias2, e).double()
        if quant:   # AscendQuant reads the scale (per-tensor or per-channel) and the offset as fp16
            scale_e = (_of(scale, e) if per_channel else scale.reshape(-1)[e or 0]).to(torch.float16).double()
            offset_e = offset.reshape(-1)[e or 0].to(torch.float16).double()
            seg = _quant_segment(rows[first:end], _of(weight1, e).double(), _of(weight2, e).double(), b1, b2, scale_e,
                                 offset_e, deq_values(_of(deq_scale1, e)), deq_values(_of(deq_scale2, e)), name, out)
        else:
            w1 = _weight(_of(weight1, e), _of(antiquant_scale1, e), _of(antiquant_offset1, e), x.dtype)
            w2 = _weight(_of(weight2, e), _of(antiquant_scale2, e), _of(antiquant_offset2, e), x.dtype)
            # fp16 mm1 + activation: inner_precise=1, and fp16 antiquant whatever inner_precise
            fp16_intermediate = x.dtype == torch.float16 and (inner_precise == 1 or antiquant_scale1 is not None)
            seg = _float_segment(rows[first:end], w1, w2, b1, b2, name, x.dtype, fp16_intermediate)
        y[first:end], err[first:end] = seg
    shape = (*x.shape[:-1], n2)
    if out == torch.float32:
        return Reference(y.float().reshape(shape), (y - err).reshape(shape), (y + err).reshape(shape))
    return Reference(round_even(y, out).to(out).reshape(shape), round_even(y - err, out).reshape(shape),
                     round_even(y + err, out).reshape(shape))
