"""Reference kernel of ``npu_ffn`` (SPEC §5.4).

Matmuls run in fp32 on CPU whatever the storage dtype (fp64 for fp64 values, ``_precision``; the
device accumulates in fp32 too, and fp16/bf16 matmuls are ~100x slower than fp32 on CPUs without
bf16 units); quant matmuls run in fp64, which is exact for int8 x int8 products summed over K <=
65535. Values between the matmuls are fp32 tensors rounded to the dtype the device holds them in;
an fp16 operation is an fp32 operation on fp16 values rounded to fp16, which equals the fp16
operation (fp32 has 24 >= 2 * 11 + 2 mantissa bits, so that double rounding is innocuous).

Intermediate precision (SPEC §5.4; §10.2-10.4 leave it open). The quant and antiquant rules
match op-plugin's golden (Ascend/op-plugin ``test/test_custom_ops/test_npu_ffn.py``, ``calc_ffn``)
wherever it rounds to fp16, and the ops-transformer kernels it checks (``ffn.cpp``,
``ffn_antiquant.h``, ``ffn_quant.h``, AscendC ``AscendAntiQuant`` / ``AscendQuant``) where the golden
keeps a value the kernel cannot hold (two places, named below; the golden's own check,
``assertRtolEqual(..., 0.001)``, admits both):

* float, inner_precise=0 (high precision): mm1 and the activation in fp32, cast to x's dtype
  half away from zero (AscendC ``CAST_ROUND``); inner_precise=1 (fp16 high performance): mm1
  rounded to fp16, activation rounded to fp16 (nearest even).
* antiquant: the weight ``(W + offset) * scale`` is two fp16 operations for fp16 x, each rounded
  to fp16 (the golden's fp16 tensors; AscendAntiQuant's ``Add``/``Mul`` on half), and one fp32
  computation rounded once for bf16 x (AscendAntiQuant's fp32 path, ``CAST_RINT``). fp16 x then
  runs like high performance, bf16 x like high precision: the antiquant kernel's mm1 output type
  is half for fp16 and fp32 for bf16, and mm2 reads the activation in x's dtype. (The golden keeps
  mm1 and the activation in fp32 and feeds mm2 fp32: deviation 1.)
* quant: see ``_quant`` (deviation 2 there).
* the output is rounded to its dtype to nearest even.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..int4 import INT4_CARRIER, unpack_int4
from ..op_protos.ffn import GLU_ACTIVATIONS, FfnConfig
from ._precision import accumulator


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    # AscendC Gelu: z / (1 + exp(-1.5957691 (z + 0.044715 z^3))) == tanh-approximated GELU.
    return F.gelu(z, approximate="tanh")


def _fastgelu(z: torch.Tensor) -> torch.Tensor:
    # AscendC FasterGelu: z / (1 + exp(-1.702 z)).
    return z * torch.sigmoid(1.702 * z)


# name -> f; GLU forms compute left * f(right) with the same f. Out of place: an in-place
# activation on a slice of the matmul traces to a slice_scatter copy in inductor's lowering.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu, "silu": F.silu, "gelu": _gelu_tanh, "fastgelu": _fastgelu,
    "reglu": torch.relu, "swiglu": F.silu, "geglu": _gelu_tanh,
}


def apply_activation(name: str, h: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Activation of SPEC §5.4 on fp32 ``h`` ``(rows, N1)``; GLU forms return ``(rows, N1 // 2)``:
    ``left * f(right)`` of ``h``'s column halves, or of ``h`` and ``gate`` given as the two halves."""
    f = ACTIVATIONS[name]
    if name in GLU_ACTIVATIONS:
        if gate is None:
            half = h.size(-1) // 2
            h, gate = h[:, :half], h[:, half:]
        return h * f(gate)
    return f(h)


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 (or fp64) values to ``dtype`` and back (a no-op when ``dtype`` is as wide)."""
    if dtype in (torch.float32, torch.float64) and torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return t
    return t.to(dtype).to(t.dtype)


def cast_round_(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 ``t`` to ``dtype`` half away from zero (AscendC ``CAST_ROUND``), back as fp32
    (fp64 ``t`` of an fp64 ``dtype`` is returned as it is).

    ``t.to(dtype)`` rounds half to even; the two differ on exact ties only. Branch-free (no read
    of the values on the host), so it traces.
    """
    if dtype in (torch.float32, torch.float64):
        return t
    if dtype == torch.bfloat16 and t.dtype == torch.float32:
        # bf16 is the top half of fp32: adding half a bf16 ulp to the magnitude bits and
        # truncating rounds ties away from zero (a carry moves into the exponent as it should).
        # A NaN's payload could carry into the sign bit: NaNs are kept as they are.
        rounded = t.view(torch.int32).add(0x8000).bitwise_and(-0x10000).view(torch.float32)
        return torch.where(torch.isnan(t), t, rounded)
    nearest_even = t.to(dtype).float()
    # On a tie t lies halfway between nearest_even and other = 2t - nearest_even, both representable.
    other = 2 * t - nearest_even
    away = (other.to(dtype).float() == other) & (other.abs() > nearest_even.abs()) & torch.isfinite(other)
    return torch.where(away, other, nearest_even)


def stored_activation(activation: str, h: torch.Tensor, store: torch.dtype, fp16_intermediate: bool,
                      gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The activation of fp32 (fp64) ``h`` ``(rows, N1)`` (``gate``: as for ``apply_activation``) as
    the second matmul reads it (SPEC §5.4): ``CAST_ROUND`` to ``store`` after the activation, or with
    ``fp16_intermediate`` (fp16 and ``inner_precise=1``) fp16 rounding before and after it. In
    ``h``'s dtype; GLU forms give ``(rows, N1 // 2)``."""
    if fp16_intermediate:      # fp16 arithmetic rounds to nearest even
        half_gate = None if gate is None else round_to(gate, torch.float16)
        return round_to(apply_activation(activation, round_to(h, torch.float16), half_gate), torch.float16)
    return cast_round_(apply_activation(activation, h, gate), store)


def decode_deq_scale(deq: torch.Tensor) -> torch.Tensor:
    """fp32 values of a deq scale. uint64/int64 carry fp32 bits in their low 32 bits (the layout
    ``npu_trans_quant_param`` produces); bf16/fp32 are plain values."""
    if deq.dtype in (torch.int64, torch.uint64):
        low_word = (deq.view(torch.int64) & 0xFFFFFFFF).to(torch.int32)   # wraps to the same 32 bits
        return low_word.view(torch.float32)
    return deq.float()


def _dequantize_weight(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Antiquant weight as fp32 values of ``dtype``: ``(W + offset) * scale`` (SPEC §5.4).

    ``w`` int8 ``(..., K, N)`` or packed int4 uint8 ``(..., K, N // 2)``; ``scale``/``offset`` of
    x's dtype, per-channel ``(..., N)`` or per-group ``(..., G, N)`` (group ``k // (K / G)``).
    fp16: ``W + offset`` rounded to fp16, then ``* scale`` rounded to fp16 (matches op-plugin's
    golden and AscendAntiQuant's half path). bf16 / fp32: computed in fp32, rounded once.
    """
    values = unpack_int4(w) if w.dtype == INT4_CARRIER else w
    values = values.float()
    sc, off = scale.float(), offset.float()
    if sc.dim() == values.dim():                      # per-group: repeat each group over its K/G rows
        rows_per_group = values.size(-2) // sc.size(-2)
        sc = sc.repeat_interleave(rows_per_group, dim=-2)
        off = off.repeat_interleave(rows_per_group, dim=-2)
    else:
        sc, off = sc.unsqueeze(-2), off.unsqueeze(-2)
    shifted = values.add_(off)
    if dtype == torch.float16:
        shifted = round_to(shifted, dtype)
    return round_to(shifted.mul_(sc), dtype)


def expert_segments(counts: Optional[tuple], rows: int):
    """(expert index or None, first row, end row) of each non-empty segment."""
    if counts is None:
        yield None, 0, rows
        return
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def of_expert(t: Optional[torch.Tensor], e: Optional[int]) -> Optional[torch.Tensor]:
    """``t[e]``, or ``t`` itself without experts (``e`` None) or when ``t`` is None."""
    return t if t is None or e is None else t[e]


def npu_ffn(config: FfnConfig, x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, activation: str, *,
            bias1=None, bias2=None, scale=None, offset=None, deq_scale1=None, deq_scale2=None, antiquant_scale1=None,
            antiquant_scale2=None, antiquant_offset1=None, antiquant_offset2=None, inner_precise=None,
            **_: object) -> torch.Tensor:
    """``y`` ``x.shape[:-1] + (N2,)``: fp16/bf16/fp32 as x, or fp16/bf16 (output_dtype) for int8 x.
    Mode, activation, expert counts and sizes come from the validated ``config``."""
    rows = math.prod(x.shape[:-1])                    # not numel // K1: K1 may be 0
    x2d = x.reshape(rows, config.k1)
    if config.mode == "quant":
        y = _quant(x2d, weight1, weight2, config, bias1, bias2, scale, offset, deq_scale1, deq_scale2)
    else:
        if config.mode == "antiquant":
            weight1 = _dequantize_weight(weight1, antiquant_scale1, antiquant_offset1, x.dtype)
            weight2 = _dequantize_weight(weight2, antiquant_scale2, antiquant_offset2, x.dtype)
        # fp16 mm1 and activation: high performance (inner_precise=1), and fp16 antiquant whatever
        # inner_precise (the antiquant kernel's mm1 output type is x's dtype for fp16, fp32 for bf16).
        fp16_intermediate = x.dtype == torch.float16 and (config.mode == "antiquant" or inner_precise == 1)
        y = _float(x2d, weight1, weight2, config, bias1, bias2, fp16_intermediate)
    return y.reshape(*x.shape[:-1], config.n2)


def _float(x2d, w1, w2, lay, b1, b2, fp16_intermediate: bool) -> torch.Tensor:
    store = x2d.dtype
    acc = accumulator(store)
    x32, w1, w2 = x2d.to(acc), w1.to(acc), w2.to(acc)
    b1 = None if b1 is None else b1.to(acc)
    b2 = None if b2 is None else b2.to(acc)
    # One functional result per segment (no writes into a preallocated output): the kernel is also
    # inductor's lowering of the op (``passes.lowering``), where writes into slices cost copies.
    parts = []
    for e, r0, r1 in expert_segments(lay.expert_counts, x2d.size(0)):
        bias1 = of_expert(b1, e)
        h = torch.mm(x32[r0:r1], of_expert(w1, e)) if bias1 is None else torch.addmm(bias1, x32[r0:r1], of_expert(w1, e))
        act = stored_activation(lay.activation, h, store, fp16_intermediate)
        bias2 = of_expert(b2, e)
        parts.append(torch.mm(act, of_expert(w2, e)) if bias2 is None else torch.addmm(bias2, act, of_expert(w2, e)))
    if not parts:       # no rows (every segment empty)
        return x2d.new_empty((0, lay.n2))
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(store)


def _quant(x2d, w1, w2, lay, b1, b2, scale, offset, deq1, deq2) -> torch.Tensor:
    """Quant mode (int8 x, SPEC §5.4), per expert segment, with these roundings:

    * ``h = x @ W1 + b1`` exact (int32 on the device, fp64 here);
    * ``h1 = fp32(h * deqScale1)``, then fp16 for an fp16 output (the fixpipe dequant writes fp16;
      the golden computes the fp32 product and casts it) and kept fp32 for a bf16 output (the
      kernel's ``AscendDequant`` writes fp32, activation type float);
    * ``a = act(h1)`` evaluated in fp32 and rounded to fp16 (nearest even): the fp16 activation
      output, or ``AscendQuant``'s cast of its fp32 input;
    * ``AscendQuant`` in fp16: ``u = fp16(fp16(a * fp16(scale)) + fp16(offset))`` with the
      per-tensor or per-channel scale and the per-expert offset cast to fp16 (the golden's
      ``activation_res * scale + offset`` on fp16 tensors), ``q = int8(round half to even(u))``
      saturated to [-128, 127];
    * ``y = out(fp32((q @ W2 + b2) * deqScale2))``, the same dequant as mm1. (Deviation 2: the
      golden also casts the int32 mm2 accumulator to fp16 before that product; ``ffn_quant.h``
      dequantizes mm2 as it does mm1, ``SetQuantVector`` on both, so that cast is not followed.)

    ``y`` ``(rows, N2)`` in ``lay.out_dtype`` (fp16 or bf16).
    """
    out = lay.out_dtype
    mid = torch.float16 if out == torch.float16 else torch.float32      # h1's dtype
    x64, w1, w2 = x2d.double(), w1.double(), w2.double()
    deq1, deq2 = decode_deq_scale(deq1).double(), decode_deq_scale(deq2).double()
    # Anything but (E,) / (1,) is per-channel, also (E, 1) when N1 == 1.
    per_channel = tuple(scale.shape) != ((1,) if lay.expert_counts is None else (len(lay.expert_counts),))
    scale16, offset16 = round_to(scale.float(), torch.float16), round_to(offset.float(), torch.float16)
    y = torch.zeros((x2d.size(0), lay.n2), dtype=out, device=x2d.device)
    for e, r0, r1 in expert_segments(lay.expert_counts, x2d.size(0)):
        h = x64[r0:r1] @ of_expert(w1, e)
        if b1 is not None:
            h = h + of_expert(b1, e).double()
        h1 = round_to((h * of_expert(deq1, e)).float(), mid)
        a = round_to(apply_activation(lay.activation, h1), torch.float16)
        sc = of_expert(scale16, e) if per_channel else scale16.reshape(-1)[0 if e is None else e]
        u = round_to(a.mul_(sc), torch.float16)
        u = round_to(u.add_(offset16.reshape(-1)[0 if e is None else e]), torch.float16)
        q = torch.round(u).clamp_(-128, 127)
        h2 = q.double() @ of_expert(w2, e)
        if b2 is not None:
            h2 = h2 + of_expert(b2, e).double()
        y[r0:r1] = (h2 * of_expert(deq2, e)).float()
    return y
