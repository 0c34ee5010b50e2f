"""Reference kernel of ``npu_ffn_grouped``: ``npu_ffn``'s float modes with the expert counts as a tensor.

Both matmuls are ``moe_fusion::_segment_mm`` ops (int32 segment ends computed on the device; one
``mm`` per segment on the CPU, ``torch._grouped_mm`` elsewhere), which add each expert's bias to its
rows and zero the rows past the last segment. For rows that are mostly padding (dispatch's output)
the activation between them is ``moe_fusion::_segment_activation``; these ops, opaque to inductor,
read the segment ends on the host to touch only the rows that are real. Numerics are
``npu_ffn``'s (SPEC §5.4): fp32 matmuls, activation in fp32, ``CAST_ROUND`` to the storage dtype
after the activation (fp16 rounding of mm1 with ``inner_precise=1``), round-to-nearest-even at the
output.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..meta import LIBRARY
from ..op_protos.ffn import GLU_ACTIVATIONS
from ..op_protos.ffn_grouped import FfnGroupedConfig, validate_values
from ._precision import accumulator
from ._zeroed import zero_past
from .ffn import stored_activation

Tensor = torch.Tensor
ALIGN = 4     # fp32 elements per 16 bytes
# A segment of at most this many rows against a transposed weight (an ``(N, K)`` row-major
# ``nn.Linear`` / HF expert weight) is computed as ``(N, K) @ (K, rows)``, which streams the weight
# as it is stored: as ``(rows, K) @ (K, N)`` the CPU BLAS took 1.5x as long (HF ``batched_mm`` decode
# steps, 4 rows per expert). From 16 rows on the two orders ran alike.
FEW_ROWS = 8


def _segment_ends(expert_tokens: Tensor, tokens_index_flag: bool) -> Tensor:
    """int32 end row of each expert's segment ``(E,)``."""
    ends = expert_tokens if tokens_index_flag else torch.cumsum(expert_tokens, 0)
    return ends.to(torch.int32)


def _grouped_mm_kernel(a: Tensor, w: Tensor, ends: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``moe_fusion::_segment_mm``: see ``segment_mm``. On the CPU by ``_listed_mm_kernel`` (the same
    products): ``torch._grouped_mm`` returns all M rows, and zeroing the padding past the segments
    took 13% of a Megatron expert-parallel rank's time."""
    if a.device.type == "cpu":
        return _listed_mm_kernel(a, list(w.unbind(0)), ends, bias)
    bounds = _bounds(ends)
    y = _grouped_mm(a, w, ends)
    y[bounds[-1]:].zero_()          # _grouped_mm leaves the rows past the segments unspecified
    return _add_bias(y, bounds, bias)


def _listed_mm_kernel(a: Tensor, w: list[Tensor], ends: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``moe_fusion::_segment_mm_list``: ``segment_mm`` with the experts' ``(K, N)`` weights as a list
    (views of the model's own parameters: no ``(E, K, N)`` stack is built), by one ``mm`` per
    segment on host-read ends, the products ``torch._grouped_mm`` computes on the CPU (bit for bit
    but in segments of at most ``FEW_ROWS`` rows against a transposed weight: see there).
    ``passes.lowering.unstack_segment_weights`` puts it in place of ``_segment_mm`` of a stack."""
    acc = accumulator(a.dtype)
    bounds = _bounds(ends)
    y = zero_past(bounds[-1], (a.size(0), w[0].size(1)), acc, a.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        rows, weight = a[start:end].to(acc), w[e].to(acc)
        if end - start <= FEW_ROWS and weight.t().is_contiguous():
            y[start:end] = torch.mm(weight.t(), rows.t()).t()
        else:
            torch.mm(rows, weight, out=y[start:end])
    return _add_bias(y, bounds, bias)


def real_rows(ends: Tensor) -> int:
    """Rows inside the segments: ``ends[-1]`` (``ends`` ``(E,)`` cumulative), read on the host."""
    return int(ends[-1]) if ends.numel() else 0


def _segment_activation_kernel(h: Tensor, gate: Optional[Tensor], ends: Tensor, activation: str,
                               store: torch.dtype, fp16_intermediate: bool) -> Tensor:
    """``moe_fusion::_segment_activation``: see ``segment_activation``."""
    rows = real_rows(ends)
    out = zero_past(rows, h.shape, h.dtype, h.device)
    gate = None if gate is None else gate[:rows]
    out[:rows] = stored_activation(activation, h[:rows], store, fp16_intermediate, gate)
    return out


def glu_halves(h: Tensor, activation: str) -> tuple[Tensor, Optional[Tensor]]:
    """``(h, None)``, or for a GLU form the column halves ``(left, right)`` of ``h`` ``(M, N1)``:
    slices in the graph, so that a matmul whose weight concatenates the halves can be split
    (``passes.lowering.split_concatenated_weights``)."""
    if activation not in GLU_ACTIVATIONS:
        return h, None
    half = h.size(1) // 2
    return h[:, :half], h[:, half:]


def _bounds(ends: Tensor) -> list[int]:
    """``[0, ends...]``: the segments' row bounds, read on the host."""
    return [0, *ends.tolist()]


def _add_bias(y: Tensor, bounds: list[int], bias: Optional[Tensor]) -> Tensor:
    """``y`` ``(M, N)`` fp32/fp64, in place: ``bias[e]`` (``(E, N)``, widened to ``y``'s dtype) added
    to the rows ``bounds[e]:bounds[e + 1]``."""
    if bias is not None:
        wide = bias.to(y.dtype)
        for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
            y[start:end] += wide[e]
    return y


def _grouped_mm(a: Tensor, w: Tensor, ends: Tensor) -> Tensor:
    """fp32 (fp64) ``a[s_e:s_{e+1}] @ w[e]`` ``(M, N)`` row-major, rows past ``ends[-1]`` unspecified."""
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
    y = torch._grouped_mm(row_major(a), w, offs=ends)
    return y[:, :n].contiguous() if pad_n else y     # row-major, as the fake kernel says


def _grouped_outer_kernel(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    """``moe_fusion::_segment_outer``: see ``segment_outer``. On the CPU by ``_listed_outer_kernel``
    (the same products, as fast)."""
    if a.device.type == "cpu":
        return _listed_outer_kernel([a], b, ends)
    k, n = a.size(1), b.size(1)
    if a.dtype == torch.float64:
        rows = real_rows(ends)     # rows past the segments are not read
        a, b = a[:rows], b[:rows]
        return torch.einsum("me,mk,mn->ekn", segment_mask(a, ends), a, b.double())
    pad_k, pad_n = -k % ALIGN, -n % ALIGN
    a = row_major(F.pad(a.float(), (0, pad_k)) if pad_k else a.float())
    b = row_major(F.pad(b.float(), (0, pad_n)) if pad_n else b.float())
    y = torch._grouped_mm(a.t(), b, offs=ends)
    return y[:, :k, :n].contiguous() if pad_k or pad_n else y     # row-major, as the fake kernel says


def _listed_outer_kernel(a: list[Tensor], b: Tensor, ends: Tensor) -> Tensor:
    """``moe_fusion::_segment_outer_list``: ``(E, K_0 + K_1 + ..., N)``, the ``segment_outer`` of
    each column block ``a[i]`` ``(M, K_i)`` (slices of one matrix, any strides) with ``b`` ``(M, N)``,
    stacked along dim 1 in list order: a reordering of a matrix's column blocks costs no copy of it.
    On the CPU one ``mm`` per segment and block into its place, rows past the segments never read;
    elsewhere ``torch._grouped_mm`` per block."""
    if b.device.type != "cpu":
        return torch.cat([_grouped_outer_kernel(block, b, ends) for block in a], dim=1)
    acc = accumulator(a[0].dtype)
    bounds = _bounds(ends)
    y = torch.empty((len(bounds) - 1, sum(block.size(1) for block in a), b.size(1)), dtype=acc, device=b.device)
    for e, (start, end) in enumerate(zip(bounds, bounds[1:])):
        rows = b[start:end].to(acc)
        first = 0
        for block in a:
            torch.mm(block[start:end].to(acc).t(), rows, out=y[e, first:first + block.size(1)])
            first += block.size(1)
    return y


# ``torch._grouped_mm``'s fake kernel accepts bf16 only, so its fp32 calls cannot be traced: the two
# grouped matmuls are ops of their own, with fake kernels, which inductor calls as extern kernels
# around the pointwise code it generates (``passes.lowering``).
LIBRARY.define("_segment_mm(Tensor a, Tensor w, Tensor ends, Tensor? bias=None) -> Tensor")
LIBRARY.impl("_segment_mm", _grouped_mm_kernel, "CompositeExplicitAutograd")
LIBRARY.define("_segment_mm_list(Tensor a, Tensor[] w, Tensor ends, Tensor? bias=None) -> Tensor")
LIBRARY.impl("_segment_mm_list", _listed_mm_kernel, "CompositeExplicitAutograd")
LIBRARY.define("_segment_outer(Tensor a, Tensor b, Tensor ends) -> Tensor")
LIBRARY.impl("_segment_outer", _grouped_outer_kernel, "CompositeExplicitAutograd")
LIBRARY.define("_segment_outer_list(Tensor[] a, Tensor b, Tensor ends) -> Tensor")
LIBRARY.impl("_segment_outer_list", _listed_outer_kernel, "CompositeExplicitAutograd")
# Any strides will do (GLU halves arrive as column slices or as two matmul outputs): inductor must
# not copy its operands into the strides they had in the traced graph.
LIBRARY.define("_segment_activation(Tensor h, Tensor? gate, Tensor ends, str activation, ScalarType store, "
               "bool fp16_intermediate) -> Tensor", tags=(torch.Tag.flexible_layout,))
LIBRARY.impl("_segment_activation", _segment_activation_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("moe_fusion::_segment_mm", lib=LIBRARY)
def _segment_mm_fake(a: Tensor, w: Tensor, ends: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return a.new_empty((a.size(0), w.size(2)), dtype=accumulator(a.dtype))


@torch.library.register_fake("moe_fusion::_segment_mm_list", lib=LIBRARY)
def _segment_mm_list_fake(a: Tensor, w: list[Tensor], ends: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    return a.new_empty((a.size(0), w[0].size(1)), dtype=accumulator(a.dtype))


@torch.library.register_fake("moe_fusion::_segment_outer", lib=LIBRARY)
def _segment_outer_fake(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    return a.new_empty((ends.size(0), a.size(1), b.size(1)), dtype=accumulator(a.dtype))


@torch.library.register_fake("moe_fusion::_segment_outer_list", lib=LIBRARY)
def _segment_outer_list_fake(a: list[Tensor], b: Tensor, ends: Tensor) -> Tensor:
    return b.new_empty((ends.size(0), sum(block.size(1) for block in a), b.size(1)), dtype=accumulator(a[0].dtype))


@torch.library.register_fake("moe_fusion::_segment_activation", lib=LIBRARY)
def _segment_activation_fake(h: Tensor, gate: Optional[Tensor], ends: Tensor, activation: str, store: torch.dtype,
                             fp16_intermediate: bool) -> Tensor:
    return h.new_empty(h.shape)


def segment_mm(a: Tensor, w: Tensor, ends: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """fp32 ``a[s_e:s_{e+1}] @ w[e] + bias[e]`` per segment ``(M, N)`` for ``a`` ``(M, K)``, ``w``
    ``(E, K, N)``, int32 cumulative ``ends`` ``(E,)`` and optional ``bias`` ``(E, N)`` (any float
    dtype, added in fp32 after the product); rows past ``ends[-1]`` are 0.

    On the CPU one ``mm`` per segment on host-read ends, the rows past never written
    (``_zeroed.zero_past``). Elsewhere
    ``torch._grouped_mm``, which needs 16-byte aligned strides: K and N are zero-padded to multiples
    of 4 (a no-op for the usual sizes), which adds zero products and drops the padded columns; fp64
    ``a`` (which ``_grouped_mm`` lacks) gives fp64 by ``_dense_grouped_mm``. ``w`` may be a
    transposed view (stacked ``nn.Linear`` weights): it is read in place, not copied.
    """
    return torch.ops.moe_fusion._segment_mm(a, w, ends, bias)


def segment_outer(a: Tensor, b: Tensor, ends: Tensor) -> Tensor:
    """``(E, K, N)``: ``a[s_e:s_{e+1}]^T @ b[s_e:s_{e+1}]`` per segment of ``a`` ``(M, K)`` and ``b``
    ``(M, N)``, fp32 (0 for empty ones); fp64 for fp64 ``a``. On the CPU one ``mm`` per segment;
    elsewhere ``torch._grouped_mm`` (fp64 by a dense einsum: ``_grouped_mm`` has no fp64)."""
    return torch.ops.moe_fusion._segment_outer(a, b, ends)


def segment_activation(h: Tensor, ends: Tensor, activation: str, store: torch.dtype,
                       fp16_intermediate: bool) -> Tensor:
    """``stored_activation`` of the rows of fp32 (fp64) ``h`` ``(M, N1)`` inside the segments
    (``ends`` ``(E,)`` int32 cumulative), in ``h``'s dtype, ``(M, N1)`` (``(M, N1 // 2)`` for GLU
    forms); rows past ``ends[-1]`` are 0. An op reading the ends on the host, as the matmuls do:
    the rows past the counts (dispatch's padding, often most of them) are never touched, where
    inductor's pointwise code would compute and write every row."""
    return torch.ops.moe_fusion._segment_activation(*glu_halves(h, activation), ends, activation, store,
                                                    fp16_intermediate)


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


def npu_ffn_grouped(config: FfnGroupedConfig, x: Tensor, weight1: Tensor, weight2: Tensor, activation: str, *,
                    expert_tokens: Tensor, bias1: Optional[Tensor] = None, bias2: Optional[Tensor] = None,
                    **_: object) -> Tensor:
    """``y`` ``(M, N2)`` in x's dtype: ``act(x_e @ W1[e] + b1[e]) @ W2[e] + b2[e]`` per segment, 0 past the last.
    ``expert_tokens`` ``(E,)`` int64 (its values are checked here); activation, inner_precise and
    tokens_index_flag come from the validated ``config``."""
    validate_values(config, expert_tokens)
    return grouped_ffn(config, x, weight1, weight2, expert_tokens, bias1, bias2)


def grouped_ffn(config: FfnGroupedConfig, x: Tensor, weight1: Tensor, weight2: Tensor, expert_tokens: Tensor,
                bias1: Optional[Tensor], bias2: Optional[Tensor], rows_padded: bool = True) -> Tensor:
    """The computation of ``npu_ffn_grouped`` on counts already checked: no read of any value on
    the host outside the segment ops, so it traces (inductor's lowering of the op,
    ``passes.lowering``). ``rows_padded``: the activation by ``segment_activation``, on the counted
    rows only (``x`` may be mostly padding: dispatch's static worst case); else by ATen ops on
    every row, which inductor fuses into one pass (for rows that are all counted)."""
    store = x.dtype
    ends = _segment_ends(expert_tokens, config.tokens_index_flag)
    h = segment_mm(x, weight1, ends, bias1)
    # High-performance fp16 (inner_precise=1): mm1 and the activation in fp16, as the device does.
    fp16_intermediate = store == torch.float16 and config.inner_precise == 1
    if rows_padded:
        a = segment_activation(h, ends, config.activation, store, fp16_intermediate)
    else:
        a = stored_activation(config.activation, h, store, fp16_intermediate)
    return segment_mm(a, weight2, ends, bias2).to(store)
