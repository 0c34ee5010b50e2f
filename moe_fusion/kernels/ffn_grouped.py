"""Reference kernel of ``npu_ffn_grouped``: ``npu_ffn``'s float modes with the expert counts as a tensor.

Vectorized over rows, with no read of the counts on the host: both matmuls are
``torch._grouped_mm`` calls with int32 segment ends computed on the device, the per-row biases
are gathered by each row's expert index (``searchsorted`` of the row number in the ends), and rows
past the last segment are zeroed with a mask. Numerics are ``npu_ffn``'s (SPEC §5.4): fp32
matmuls, activation in fp32, ``CAST_ROUND`` to the storage dtype after the activation (fp16
rounding of mm1 with ``inner_precise=1``), round-to-nearest-even at the output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..op_protos.ffn_grouped import FfnGroupedConfig, validate_values
from ._precision import accumulator, widen
from .ffn import round_to, apply_activation, cast_round_

Tensor = torch.Tensor
ALIGN = 4     # fp32 elements per 16 bytes


def _segment_ends(expert_tokens: Tensor, tokens_index_flag: bool) -> Tensor:
    """int32 end row of each expert's segment ``(E,)``."""
    ends = expert_tokens if tokens_index_flag else torch.cumsum(expert_tokens, 0)
    return ends.to(torch.int32)


def _grouped_mm(a: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """fp32 ``a[s_e:s_{e+1}] @ w[e]`` per segment ``(M, N)``; rows past ``ends[-1]`` are unspecified.

    ``torch._grouped_mm`` needs 16-byte aligned strides: K and N are zero-padded to multiples of 4
    (a no-op for the usual sizes), which adds zero products and drops the padded columns. ``w`` may
    be a transposed view (stacked ``nn.Linear`` weights): it is read in place, not copied.
    fp64 ``a`` (which ``_grouped_mm`` lacks) gives fp64 by ``_dense_grouped_mm``.
    """
    if a.dtype == torch.float64:
        return _dense_grouped_mm(a, w.double(), ends)
    k, n = w.shape[1:]
    pad_k, pad_n = -k % ALIGN, -n % ALIGN
    a, w = a.float(), w.float()
    if pad_k or pad_n:
        a = F.pad(a, (0, pad_k))
        w = F.pad(w, (0, pad_n, 0, pad_k))
    if any(stride % ALIGN for stride in w.stride() if stride != 1):
        w = w.contiguous()
    return torch._grouped_mm(row_major(a), w, offs=ends)[:, :n]


def segment_mask(a: Tensor, ends: Tensor) -> Tensor:
    """``(M, E)`` in ``a``'s dtype: 1 where row ``m`` of ``a`` lies in expert ``e``'s segment
    (``ends`` ``(E,)`` cumulative), else 0; rows past ``ends[-1]`` are all 0."""
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rows = torch.arange(a.size(0), device=a.device, dtype=ends.dtype).unsqueeze(1)     # (M, 1)
    return ((rows >= starts) & (rows < ends)).to(a.dtype)


def _dense_grouped_mm(a: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """``_grouped_mm`` in fp64: every expert's matmul over all rows, each row keeping its own
    expert's (E times the work: fp64 is the gradient-check dtype, not a fast path)."""
    return torch.einsum("me,mk,ekn->mn", segment_mask(a, ends), a, w)


def row_major(t: Tensor) -> Tensor:
    """``t`` with row-major strides. An empty tensor counts as contiguous whatever its strides (numpy
    gives (0, 0)), which ``_grouped_mm`` rejects: it gets fresh storage."""
    return t.contiguous() if t.numel() else t.new_empty(t.shape)


def _row_bias(bias: Optional[Tensor], expert_of_row: Tensor) -> Optional[Tensor]:
    """``bias[expert_of_row]`` ``(M, N)`` fp32; rows of expert ``E`` (padding) get zeros."""
    if bias is None:
        return None
    padded = torch.cat([widen(bias, bias.dtype), bias.new_zeros((1, bias.size(1)), dtype=accumulator(bias.dtype))])
    return padded.index_select(0, expert_of_row)


def npu_ffn_grouped(config: FfnGroupedConfig, x: Tensor, weight1: Tensor, weight2: Tensor, activation: str, *,
                    expert_tokens: Tensor, bias1: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
                    **_: object) -> Tensor:
    """``y`` ``(M, N2)`` in x's dtype: ``act(x_e @ W1[e] + b1[e]) @ W2[e] + b2[e]`` per segment, 0 past the last.
    ``expert_tokens`` ``(E,)`` int64 (its values are checked here); activation, inner_precise and
    tokens_index_flag come from the validated ``config``."""
    validate_values(config, expert_tokens)
    store = x.dtype
    act = config.activation
    ends = _segment_ends(expert_tokens, config.tokens_index_flag)
    rows = torch.arange(x.size(0), device=x.device, dtype=torch.int32)
    expert_of_row = torch.searchsorted(ends, rows, right=True)          # (M,) in [0, E]; E = padding row
    counted = (expert_of_row < ends.numel()).unsqueeze(1)
    h = _grouped_mm(x, weight1, ends)
    b1 = _row_bias(bias1, expert_of_row)
    if b1 is not None:
        h = h + b1
    if store == torch.float16 and config.inner_precise == 1:
        # High-performance fp16: mm1 and the activation in fp16, as the device does.
        h = apply_activation(act, round_to(h, torch.float16))
        h = round_to(h, torch.float16)
    else:
        h = cast_round_(apply_activation(act, h), store)
    y = _grouped_mm(h, weight2, ends)
    b2 = _row_bias(bias2, expert_of_row)
    if b2 is not None:
        y = y + b2
    y = torch.where(counted, y, 0.0)
    return y.to(store)
