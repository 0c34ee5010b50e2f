"""Reference kernel of ``npu_ffn`` (SPEC §5.4).

Matmuls run in fp32 on CPU whatever the storage dtype (the device accumulates in fp32 too, and
fp16/bf16 matmuls are ~100x slower than fp32 on CPUs without bf16 units); quant matmuls run in
fp64, which is exact for int8 x int8 products summed over K <= 65535. Rounding to the storage
dtype happens where the device rounds: after mm1+activation (half away from zero, AscendC
``CAST_ROUND``, in high precision) and at the output (half to even).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..int4 import INT4_CARRIER, unpack_int4
from ..op_protos.ffn import GLU_ACTIVATIONS, layout


def _gelu_tanh(z: torch.Tensor) -> torch.Tensor:
    # AscendC Gelu: z / (1 + exp(-1.5957691 (z + 0.044715 z^3))) == tanh-approximated GELU.
    return F.gelu(z, approximate="tanh")


def _fastgelu(z: torch.Tensor) -> torch.Tensor:
    # AscendC FasterGelu: z / (1 + exp(-1.702 z)).
    return z * torch.sigmoid(1.702 * z)


def _relu(z: torch.Tensor) -> torch.Tensor:
    return torch.relu_(z)


def _silu(z: torch.Tensor) -> torch.Tensor:
    return F.silu(z, inplace=True)


# name -> f; GLU forms compute left * f(right) with the same f.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": _relu, "silu": _silu, "gelu": _gelu_tanh, "fastgelu": _fastgelu,
    "reglu": _relu, "swiglu": _silu, "geglu": _gelu_tanh,
}


def apply_activation(name: str, h: torch.Tensor) -> torch.Tensor:
    """Activation of SPEC §5.4 on fp32 ``h`` ``(rows, N1)``; GLU forms return ``(rows, N1 // 2)``.
    May overwrite ``h``."""
    f = ACTIVATIONS[name]
    if name in GLU_ACTIVATIONS:
        half = h.size(-1) // 2
        return h[:, :half] * f(h[:, half:])
    return f(h)


def round_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 values to ``dtype`` and back (a no-op for fp32)."""
    return t if dtype == torch.float32 else t.to(dtype).float()


def cast_round_(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round fp32 ``t`` to ``dtype`` half away from zero (AscendC ``CAST_ROUND``), back as fp32;
    may overwrite ``t`` (callers pass their own temporaries).

    ``t.to(dtype)`` rounds half to even; the two differ on exact ties only.
    """
    if dtype == torch.float32:
        return t
    if dtype == torch.bfloat16 and t.is_contiguous() and not bool(torch.isnan(t).any()):
        # bf16 is the top half of fp32: adding half a bf16 ulp to the magnitude bits and
        # truncating rounds ties away from zero (a carry moves into the exponent as it should).
        # (A NaN's payload could carry into the sign bit: those take the general path.)
        t.view(torch.int32).add_(0x8000).bitwise_and_(-0x10000)
        return t
    nearest_even = t.to(dtype).float()
    # On a tie t lies halfway between nearest_even and other = 2t - nearest_even, both representable.
    other = 2 * t - nearest_even
    away = (other.to(dtype).float() == other) & (other.abs() > nearest_even.abs()) & torch.isfinite(other)
    return torch.where(away, other, nearest_even)


def decode_deq_scale(deq: torch.Tensor) -> torch.Tensor:
    """fp32 values of a deq scale. uint64/int64 carry fp32 bits in their low 32 bits (the layout
    ``npu_trans_quant_param`` produces); bf16/fp32 are plain values."""
    if deq.dtype in (torch.int64, torch.uint64):
        low_word = (deq.view(torch.int64) & 0xFFFFFFFF).to(torch.int32)   # wraps to the same 32 bits
        return low_word.view(torch.float32)
    return deq.float()


def _dequantize_weight(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(W + offset) * scale`` rounded to ``dtype``; per-channel ``(..., N)`` or per-group ``(..., G, N)``."""
    values = unpack_int4(w) if w.dtype == INT4_CARRIER else w
    values = values.float()
    sc, off = scale.float(), offset.float()
    if sc.dim() == values.dim():                      # per-group: repeat each group over its K/G rows
        rows_per_group = values.size(-2) // sc.size(-2)
        sc = sc.repeat_interleave(rows_per_group, dim=-2)
        off = off.repeat_interleave(rows_per_group, dim=-2)
    else:
        sc, off = sc.unsqueeze(-2), off.unsqueeze(-2)
    return round_to((values + off) * sc, dtype)


def _segments(counts: Optional[tuple], rows: int):
    """(expert index or None, first row, end row) of each non-empty segment."""
    if counts is None:
        yield None, 0, rows
        return
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _pick(t: Optional[torch.Tensor], e: Optional[int]) -> Optional[torch.Tensor]:
    return t if t is None or e is None else t[e]


def npu_ffn(x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, activation: str, *,
            expert_tokens=None, expert_tokens_index=None, bias1=None, bias2=None, scale=None, offset=None,
            deq_scale1=None, deq_scale2=None, antiquant_scale1=None, antiquant_scale2=None, antiquant_offset1=None,
            antiquant_offset2=None, inner_precise=None, output_dtype=None) -> torch.Tensor:
    """``y`` ``x.shape[:-1] + (N2,)``: fp16/bf16/fp32 as x, or fp16/bf16 (output_dtype) for int8 x."""
    lay = layout(x, weight1, weight2, activation, expert_tokens=expert_tokens, expert_tokens_index=expert_tokens_index,
                 bias1=bias1, bias2=bias2, scale=scale, offset=offset, deq_scale1=deq_scale1, deq_scale2=deq_scale2,
                 antiquant_scale1=antiquant_scale1, antiquant_scale2=antiquant_scale2,
                 antiquant_offset1=antiquant_offset1, antiquant_offset2=antiquant_offset2,
                 inner_precise=inner_precise, output_dtype=output_dtype)
    rows = math.prod(x.shape[:-1])                    # not numel // K1: K1 may be 0
    x2d = x.reshape(rows, lay.k1)
    if lay.mode == "quant":
        y = _quant(x2d, weight1, weight2, lay, bias1, bias2, scale, offset, deq_scale1, deq_scale2)
    else:
        if lay.mode == "antiquant":
            weight1 = _dequantize_weight(weight1, antiquant_scale1, antiquant_offset1, x.dtype)
            weight2 = _dequantize_weight(weight2, antiquant_scale2, antiquant_offset2, x.dtype)
        # High-performance fp16 (inner_precise=1) keeps mm1 in fp16; quant modes ignore inner_precise.
        fp16_intermediate = lay.mode == "float" and x.dtype == torch.float16 and inner_precise == 1
        y = _float(x2d, weight1, weight2, lay, bias1, bias2, fp16_intermediate)
    return y.reshape(*x.shape[:-1], lay.n2)


def _float(x2d, w1, w2, lay, b1, b2, fp16_intermediate: bool) -> torch.Tensor:
    store = x2d.dtype
    x32, w1, w2 = x2d.float(), w1.float(), w2.float()
    b1 = None if b1 is None else b1.float()
    b2 = None if b2 is None else b2.float()
    y = torch.empty((x2d.size(0), lay.n2), dtype=torch.float32, device=x2d.device)
    for e, r0, r1 in _segments(lay.expert_counts, x2d.size(0)):
        bias1 = _pick(b1, e)
        h = torch.mm(x32[r0:r1], _pick(w1, e)) if bias1 is None else torch.addmm(bias1, x32[r0:r1], _pick(w1, e))
        if fp16_intermediate:
            h = round_to(h, torch.float16)
        act = apply_activation(lay.activation, h)
        # fp16 arithmetic rounds to nearest even; the high-precision cast is CAST_ROUND (SPEC §5.4).
        act = round_to(act, store) if fp16_intermediate else cast_round_(act, store)
        bias2 = _pick(b2, e)
        if bias2 is None:
            torch.mm(act, _pick(w2, e), out=y[r0:r1])
        else:
            torch.addmm(bias2, act, _pick(w2, e), out=y[r0:r1])
    return y if store == torch.float32 else y.to(store)


def _quant(x2d, w1, w2, lay, b1, b2, scale, offset, deq1, deq2) -> torch.Tensor:
    out = lay.out_dtype
    x64, w1, w2 = x2d.double(), w1.double(), w2.double()
    deq1, deq2 = decode_deq_scale(deq1).double(), decode_deq_scale(deq2).double()
    # Anything but (E,) / (1,) is per-channel, also (E, 1) when N1 == 1.
    per_channel = tuple(scale.shape) != ((1,) if lay.expert_counts is None else (len(lay.expert_counts),))
    y = torch.zeros((x2d.size(0), lay.n2), dtype=out, device=x2d.device)
    for e, r0, r1 in _segments(lay.expert_counts, x2d.size(0)):
        h = x64[r0:r1] @ _pick(w1, e)
        if b1 is not None:
            h = h + _pick(b1, e).double()
        h1 = round_to((h * _pick(deq1, e)).float(), out)
        a = round_to(apply_activation(lay.activation, h1), out)
        # AscendQuant: per-channel scales are fp16 on the device; round half to even, saturate.
        sc = _pick(scale, e).half().float() if per_channel else scale.reshape(-1)[0 if e is None else e]
        off = offset.reshape(-1)[0 if e is None else e]
        q = torch.round(a * sc + off).clamp_(-128, 127)
        h2 = q.double() @ _pick(w2, e)
        if b2 is not None:
            h2 = h2 + _pick(b2, e).double()
        y[r0:r1] = (h2 * _pick(deq2, e)).to(out)
    return y
