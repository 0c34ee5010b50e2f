"""Autograd of the local ops: ``npu_ffn`` and ``npu_ffn_grouped`` (float modes) and
``npu_moe_re_routing`` (a permutation). ``npu_moe_update_expert`` has none: its outputs are integer
ids and a bool mask, through which no gradient can flow.

FFN, per expert segment ``e`` (rows ``r0:r1``), with ``h = x W1[e] + b1[e]``, ``a = act(h)`` and
``y = a W2[e] + b2[e]``::

    ga = gy W2[e]^T        gh = act'(h) * ga          gx = gh W1[e]^T
    gW2[e] = a^T gy        gW1[e] = x^T gh            gb2[e] = sum_rows gy     gb1[e] = sum_rows gh

``act'`` is the derivative of the forward's own activation (tanh GELU, ``x * sigmoid(1.702 x)`` for
fastgelu, SiLU, ReLU with ``relu'(0) = 0``; GLU ``left * f(right)``: ``g_left = ga * f(right)``,
``g_right = ga * left * f'(right)``). The backward recomputes ``h`` from the saved inputs instead
of saving it (memory: the forward keeps nothing of size ``M x N1``); it computes in fp32 (fp64 for
fp64 inputs) and uses the activation rounded to the storage dtype as the forward's second matmul
does. Rows outside every segment (``npu_ffn_grouped``'s rows past the counts) get zero gradient.
Quant and antiquant modes have no gradient (int8 operands, dequantization scales): a backward that
needs one raises.

``npu_ffn_grouped`` keeps its counts on the device in the backward too: the per-expert matmuls are
the kernel's grouped matmul ops (``kernels.ffn_grouped.segment_mm`` / ``segment_outer``) inside the
op ``moe_fusion::_ffn_grouped_backward``, which inductor lowers into its kernel (``passes.lowering``).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..kernels._precision import accumulator
from ..kernels._zeroed import zero_past
from ..kernels.ffn import apply_activation, expert_segments, of_expert, stored_activation
from ..kernels.ffn_grouped import (_bounds, _segment_ends, glu_halves, real_rows, segment_activation, segment_mm,
                                   segment_outer)
from ..meta import LIBRARY
from ..op_protos.ffn import GLU_ACTIVATIONS, expert_counts_of
from ._common import gradients, input_names, needed, not_differentiable, refuse_needed, register_formula

Tensor = torch.Tensor
FFN, FFN_GROUPED, RE_ROUTING = "npu_ffn", "npu_ffn_grouped", "npu_moe_re_routing"
_GLU_BASE = {"reglu": "relu", "swiglu": "silu", "geglu": "gelu"}


# ---------------------------------------------------------------------------------------------
# Activations and their derivatives (fp32)
# ---------------------------------------------------------------------------------------------

def _derivative(kind: str, z: Tensor) -> Tensor:
    """``f'(z)`` of the plain activation ``kind`` (relu, silu, gelu = tanh GELU, fastgelu)."""
    if kind == "relu":
        return (z > 0).to(z.dtype)
    if kind == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(torch.ones_like(z), z, approximate="tanh")
    if kind == "fastgelu":
        s = torch.sigmoid(1.702 * z)
        return s + 1.702 * z * s * (1 - s)
    raise ValueError(f"no derivative for activation {kind!r}")


def activation_grad(activation: str, h: Tensor, ga: Tensor) -> Tensor:
    """The gradient of fp32 ``h`` ``(rows, N1)`` given the gradient ``ga`` of its activation
    (``(rows, N1)``, or ``(rows, N1/2)`` for GLU forms)."""
    gate = None
    if activation in GLU_ACTIVATIONS:
        half = h.size(-1) // 2
        h, gate = h[:, :half], h[:, half:]
    blocks = [a * b for a, b in _grad_factors(activation, h, gate, ga)]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-1)


def _grad_factors(activation: str, h: Tensor, gate: Optional[Tensor], ga: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The gradient of ``h`` (GLU forms: of its left half ``h`` and right half ``gate``) as column
    blocks, each the product of a pair: ``ga * act'(h)``; GLU ``left * f(right)``: ``g_left = ga *
    f(right)``, ``g_right = (ga * left) * f'(right)``."""
    if gate is None:
        return [(ga, _derivative(activation, h))]
    base = _GLU_BASE[activation]
    return [(ga, apply_activation(base, gate)), (ga * h, _derivative(base, gate))]


# ---------------------------------------------------------------------------------------------
# npu_ffn
# ---------------------------------------------------------------------------------------------

_FFN_INPUTS = input_names(FFN)
_FFN_QUANT_ARGS = ("scale", "offset", "deq_scale1", "deq_scale2", "antiquant_scale1", "antiquant_scale2",
                   "antiquant_offset1", "antiquant_offset2")


def _ffn_mode(x: Tensor, weight1: Tensor) -> str:
    if x.dtype == torch.int8:
        return "quant"
    return "antiquant" if weight1.dtype in (torch.int8, torch.uint8) else "float"


def _ffn_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    args = dict(zip(_FFN_INPUTS, inputs))
    x, w1 = args["x"], args["weight1"]
    ctx.mode = _ffn_mode(x, w1)
    ctx.activation = args["activation"].lower()
    ctx.counts = expert_counts_of(args["expert_tokens"], args["expert_tokens_index"])
    ctx.fp16_intermediate = x.dtype == torch.float16 and args["inner_precise"] == 1
    ctx.save_for_backward(x, w1, args["weight2"], args["bias1"], args["bias2"])


def _ffn_backward(ctx: Any, grad_y: Tensor) -> tuple:
    refuse_needed(ctx, FFN, _FFN_INPUTS, {name: "a quantization parameter" for name in _FFN_QUANT_ARGS})
    if ctx.mode != "float":
        for name in ("x", "weight1", "weight2", "bias1", "bias2"):
            if needed(ctx, _FFN_INPUTS, name):
                not_differentiable(FFN, name, f"{ctx.mode} mode: int8 operands and integer matmuls")
    x, w1, w2, b1, b2 = ctx.saved_tensors
    k1, n2 = w1.size(-2), w2.size(-1)
    acc = accumulator(x.dtype)
    x2d, gy = x.reshape(-1, k1).to(acc), grad_y.reshape(-1, n2).to(acc)
    w1f, w2f = w1.to(acc), w2.to(acc)
    b1f = None if b1 is None else b1.to(acc)
    stored = {"x": x, "weight1": w1, "weight2": w2, "bias1": b1, "bias2": b2}
    wanted = [name for name, t in stored.items() if t is not None and needed(ctx, _FFN_INPUTS, name)]
    # Functional: each segment's gradients are new tensors, assembled at the end (the formula is
    # traced into training graphs, where writes into preallocated gradients cost copies).
    parts: dict[str, dict[Any, Tensor]] = {name: {} for name in wanted}
    for e, r0, r1 in expert_segments(ctx.counts, x2d.size(0)):
        xe, gye, w1e = x2d[r0:r1], gy[r0:r1], of_expert(w1f, e)
        bias1 = of_expert(b1f, e)
        h = xe @ w1e if bias1 is None else torch.addmm(bias1, xe, w1e)
        gh = activation_grad(ctx.activation, h, gye @ of_expert(w2f, e).t())
        a = stored_activation(ctx.activation, h, x.dtype, ctx.fp16_intermediate)
        for name, value in (("x", lambda: gh @ w1e.t()), ("weight1", lambda: _outer(xe, gh, w1)),
                            ("weight2", lambda: _outer(a, gye, w2)), ("bias1", lambda: gh.sum(0)),
                            ("bias2", lambda: gye.sum(0))):
            if name in parts:
                parts[name][r0 if name == "x" else e] = value()
    grads = {name: _assemble(name, parts[name], stored[name], acc) for name in wanted}
    return gradients(_FFN_INPUTS, **{name: g.reshape(stored[name].shape).to(stored[name].dtype)
                                     for name, g in grads.items()})


def _column_major(weight: Tensor) -> bool:
    """``weight`` ``(..., K, N)`` is stored transposed (``nn.Linear``-style ``(..., N, K)`` weights
    viewed as ``(..., K, N)``)."""
    return weight.stride(-2) < weight.stride(-1)


def _outer(a: Tensor, b: Tensor, weight: Tensor) -> Tensor:
    """``a^T b`` ``(K, N)`` laid out as ``weight`` is: a transposed weight gets a transposed
    gradient, so the parameter's gradient needs no reordering copy (autograd copies a gradient
    whose strides differ from its parameter's)."""
    return (b.t() @ a).t() if _column_major(weight) else a.t() @ b


def _assemble(name: str, parts: dict, like: Tensor, dtype: torch.dtype) -> Tensor:
    """One input's gradient from its segments' parts: ``x``'s rows in order (keyed by first row);
    a weight's or bias's per expert (keyed by expert, None without experts; zeros for an expert
    with no rows), stacked in ``like``'s layout."""
    if name == "x":
        rows = [parts[r0] for r0 in sorted(parts)]
        return torch.cat(rows) if rows else like.new_zeros(like.reshape(-1, like.size(-1)).shape, dtype=dtype)
    if None in parts:
        return parts[None]
    per_expert = [parts[e] if e in parts else like.new_zeros(like.shape[1:], dtype=dtype) for e in range(like.size(0))]
    if like.dim() == 3 and _column_major(like):
        return torch.stack([g.t() for g in per_expert]).transpose(1, 2)
    return torch.stack(per_expert)


register_formula(FFN, _ffn_setup, _ffn_backward)


# ---------------------------------------------------------------------------------------------
# npu_ffn_grouped
# ---------------------------------------------------------------------------------------------

_GROUPED_INPUTS = input_names(FFN_GROUPED)

LIBRARY.define("_ffn_grouped_backward(Tensor grad_y, Tensor x, Tensor weight1, Tensor weight2, str activation, "
               "Tensor expert_tokens, Tensor? bias1, bool tokens_index_flag, bool fp16_intermediate) "
               "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")


LIBRARY.define("_segment_sum(Tensor rows, Tensor ends) -> Tensor")
LIBRARY.define("_segment_activation_grad(Tensor h, Tensor? gate, Tensor ga, Tensor ends, str activation) -> Tensor",
               tags=(torch.Tag.flexible_layout,))      # any strides will do (kernels.ffn_grouped's _segment_activation)


def _segment_sum_kernel(rows: Tensor, ends: Tensor) -> Tensor:
    """``moe_fusion::_segment_sum``: ``(E, N)``, the rows ``(M, N)`` of each segment (``ends``
    ``(E,)`` int32 cumulative, read on the host) summed; rows past ``ends[-1]`` are not read."""
    bounds = _bounds(ends)
    return torch.stack([rows[start:end].sum(0) for start, end in zip(bounds, bounds[1:])])


def _segment_activation_grad_kernel(h: Tensor, gate: Optional[Tensor], ga: Tensor, ends: Tensor,
                                    activation: str) -> Tensor:
    """``moe_fusion::_segment_activation_grad``: ``activation_grad`` of the rows of ``h`` ``(M, N1)``
    (with ``gate``, GLU forms: ``h`` and ``gate`` its column halves, ``kernels.ffn_grouped.glu_halves``)
    inside the segments, ``(M, N1)``; rows past ``ends[-1]`` are 0 and never touched (the
    backward's counterpart of ``kernels.ffn_grouped.segment_activation``)."""
    rows = real_rows(ends)
    width = h.size(1) + (0 if gate is None else gate.size(1))
    gh = zero_past(rows, (h.size(0), width), h.dtype, h.device)
    start = 0
    for a, b in _grad_factors(activation, h[:rows], None if gate is None else gate[:rows], ga[:rows]):
        torch.mul(a, b, out=gh[:rows, start:start + b.size(1)])     # each block straight into its columns
        start += b.size(1)
    return gh


LIBRARY.impl("_segment_sum", _segment_sum_kernel, "CompositeExplicitAutograd")
LIBRARY.impl("_segment_activation_grad", _segment_activation_grad_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("moe_fusion::_segment_sum", lib=LIBRARY)
def _segment_sum_fake(rows: Tensor, ends: Tensor) -> Tensor:
    return rows.new_empty((ends.size(0), rows.size(1)))


@torch.library.register_fake("moe_fusion::_segment_activation_grad", lib=LIBRARY)
def _segment_activation_grad_fake(h: Tensor, gate: Optional[Tensor], ga: Tensor, ends: Tensor,
                                  activation: str) -> Tensor:
    return h.new_empty((h.size(0), h.size(1) + (0 if gate is None else gate.size(1))))


def _ffn_grouped_backward_kernel(grad_y: Tensor, x: Tensor, weight1: Tensor, weight2: Tensor, activation: str,
                                 expert_tokens: Tensor, bias1: Optional[Tensor], tokens_index_flag: bool,
                                 fp16_intermediate: bool, rows_padded: bool = True) -> tuple[Tensor, ...]:
    """``(gx (M, K1), gW1 (E, K1, N1), gW2 (E, N1', N2), gb1 (E, N1), gb2 (E, N2))`` in fp32 (fp64
    for fp64 x). ``rows_padded``: as for ``kernels.ffn_grouped.grouped_ffn`` (the activation's
    gradient by the segment ops, else by ATen ops on every row)."""
    ends = _segment_ends(expert_tokens, tokens_index_flag)
    gy = grad_y.to(accumulator(x.dtype))       # only read inside the segments
    h = segment_mm(x, weight1, ends, bias1)
    ga = segment_mm(gy, weight2.transpose(1, 2), ends)
    act = activation.lower()
    # The activation is the forward's own computation on the same operands: in a training graph the
    # two are one (CSE).
    if rows_padded:
        gh = torch.ops.moe_fusion._segment_activation_grad(*glu_halves(h, act), ga, ends, act)
        a = segment_activation(h, ends, act, x.dtype, fp16_intermediate)
    else:
        gh, a = activation_grad(act, h, ga), stored_activation(act, h, x.dtype, fp16_intermediate)
    gx = segment_mm(gh, weight1.transpose(1, 2), ends)
    segment_sum = torch.ops.moe_fusion._segment_sum
    return (gx, _weight_gradient(x, gh, ends, weight1), _weight_gradient(a, gy, ends, weight2),
            segment_sum(gh, ends), segment_sum(gy, ends))


def _weight_gradient(a: Tensor, b: Tensor, ends: Tensor, weight: Tensor) -> Tensor:
    """``(E, K, N)`` per-segment ``a^T b`` laid out as ``weight`` is: a transposed weight gets a
    transposed gradient, so the parameter's gradient needs no reordering copy (autograd copies a
    gradient whose strides differ from its parameter's)."""
    return segment_outer(b, a, ends).transpose(1, 2) if _column_major(weight) else segment_outer(a, b, ends)


def _empty_like_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``_weight_gradient``'s result as a fake kernel makes it: ``weight``'s shape and layout."""
    experts, k, n = weight.shape
    if _column_major(weight):
        return weight.new_empty((experts, n, k), dtype=dtype).transpose(1, 2)
    return weight.new_empty((experts, k, n), dtype=dtype)


LIBRARY.impl("_ffn_grouped_backward", _ffn_grouped_backward_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("moe_fusion::_ffn_grouped_backward", lib=LIBRARY)
def _ffn_grouped_backward_fake(grad_y: Tensor, x: Tensor, weight1: Tensor, weight2: Tensor, activation: str,
                               expert_tokens: Tensor, bias1: Optional[Tensor], tokens_index_flag: bool,
                               fp16_intermediate: bool) -> tuple[Tensor, ...]:
    experts, _, n1 = weight1.shape
    n2 = weight2.size(2)
    acc = accumulator(x.dtype)
    return (x.new_empty(x.shape, dtype=acc), _empty_like_weight(weight1, acc), _empty_like_weight(weight2, acc),
            x.new_empty((experts, n1), dtype=acc), x.new_empty((experts, n2), dtype=acc))


def _grouped_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    args = dict(zip(_GROUPED_INPUTS, inputs))
    ctx.activation = args["activation"]
    ctx.tokens_index_flag = args["tokens_index_flag"]
    ctx.fp16_intermediate = args["x"].dtype == torch.float16 and args["inner_precise"] == 1
    ctx.save_for_backward(args["x"], args["weight1"], args["weight2"], args["expert_tokens"], args["bias1"],
                          args["bias2"])


def _grouped_backward(ctx: Any, grad_y: Tensor) -> tuple:
    x, w1, w2, counts, b1, b2 = ctx.saved_tensors
    gx, gw1, gw2, gb1, gb2 = torch.ops.moe_fusion._ffn_grouped_backward(
        grad_y, x, w1, w2, ctx.activation, counts, b1, ctx.tokens_index_flag, ctx.fp16_intermediate)
    found = {"x": (gx, x), "weight1": (gw1, w1), "weight2": (gw2, w2), "bias1": (gb1, b1), "bias2": (gb2, b2)}
    return gradients(_GROUPED_INPUTS, **{name: g.to(t.dtype) for name, (g, t) in found.items()
                                         if t is not None and needed(ctx, _GROUPED_INPUTS, name)})


register_formula(FFN_GROUPED, _grouped_setup, _grouped_backward)


# ---------------------------------------------------------------------------------------------
# npu_moe_re_routing, npu_moe_update_expert
# ---------------------------------------------------------------------------------------------

_RE_ROUTING_INPUTS = input_names(RE_ROUTING)


def _re_routing_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    args = dict(zip(_RE_ROUTING_INPUTS, inputs))
    ctx.rows = args["tokens"].size(0)
    ctx.save_for_backward(output[2])


def _re_routing_backward(ctx: Any, grad_tokens: Tensor, grad_scales: Tensor, *_: Tensor) -> tuple:
    """``permute_tokens[j] = tokens[idx[j]]``: the gradient of ``tokens`` (and of the scales) is
    the output gradient scattered back by ``idx``, a permutation (``index_add`` keeps it exact)."""
    refuse_needed(ctx, RE_ROUTING, _RE_ROUTING_INPUTS, {"expert_token_num_per_rank": "integer counts"})
    (index,) = ctx.saved_tensors
    index = index.long()
    grads = {}
    if needed(ctx, _RE_ROUTING_INPUTS, "tokens"):
        grads["tokens"] = grad_tokens.new_zeros((ctx.rows,) + tuple(grad_tokens.shape[1:])).index_add_(
            0, index, grad_tokens)
    if needed(ctx, _RE_ROUTING_INPUTS, "per_token_scales"):
        grads["per_token_scales"] = grad_scales.new_zeros(ctx.rows).index_add_(0, index, grad_scales)
    return gradients(_RE_ROUTING_INPUTS, **grads)


register_formula(RE_ROUTING, _re_routing_setup, _re_routing_backward)
