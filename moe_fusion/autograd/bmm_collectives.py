"""Autograd of ``npu_alltoall_allgather_bmm`` (AG-BMM) and ``npu_bmm_reducescatter_alltoall``
(BMM-RS-A2A): each op's ``x`` gradient is a call of the other op, on the same groups with the
same ``shard_type`` (SPEC §6.3: their data movements are each other's adjoints).

Per rank, with ``G`` the data movement of AG-BMM (all-to-all over EP, all-gather over TP:
``y2 = G(x)``) and ``S = G^T`` that of BMM-RS-A2A (reduce-scatter over TP, all-to-all over EP).

AG-BMM: ``y3 = y2 @ W + b``, ``y1 = act(y3)`` (``y1 = y3`` for act_type 0). With ``g1``, ``g2``,
``g3`` the gradients of ``y1``, ``y2``, ``y3`` (absent when the graph does not use the output)::

    gz = act'(y3) * g1 + g3                               (local, rows, M/tp), fp32
    gx = S(gz @ W^T + g2) = BMM-RS-A2A(cat(gz, g2), cat(W^T, I_H))
    gW = y2^T @ gz          gb = sum over rows of gz

``act'`` is the derivative of the kernel's own activation, taken at the pre-activation ``y3``
as the forward rounded it: erf GELU, SiLU, ReLU (``relu'(0) = 0``), FastGELU ``z*sigmoid(1.702z)``.
The forward asks the kernel for ``y3`` when ``act_type != 0`` and for ``y2`` when the weight
needs a gradient, whether or not the caller requested them: the backward gathers nothing again
and recomputes no matmul; the caller still gets ``(0, 0, 0)`` for outputs it did not request.
``g2`` (only when the graph uses ``y2``) rides the same collective as ``gz @ W^T`` through an
identity block of the weight: one extra ``rows x H x H`` matmul per local expert, no extra
communication.

BMM-RS-A2A: ``y = S(x @ W) + B(b)``, where ``B`` adds rank ``(p', q)``'s bias to the rows of local
expert ``e`` it sends to every EP peer (after the reduce-scatter, SPEC §6.3). With ``gy``::

    gx, g2 = AG-BMM(gy, W^T, act_type 0, need_allgather_out)    # gx = G(gy) @ W^T, g2 = G(gy)
    gW = x^T @ g2           gb = sum over rows of this rank's TP slice of g2

Every TP peer receives the same ``g2``; this rank's slice is TP block ``q`` (columns with
shard_type 0, rows with 1). ``q`` is found at run time by a BMM-RS-A2A of ``(1, ep*tp, tp)``
one-hot rows (its reduce-scatter keeps chunk ``q``), never by looking the group name up: the
formula runs wherever the op does (HCCL names on an NPU), and no rank is baked into a graph
that a compile cache could hand to another rank.

The backward is collective: every rank of both groups must run it (each rank's loss must
reach the op) with the same inputs needing gradients, as for the forward. AG-BMM's backward
calls BMM-RS-A2A once when ``x`` needs a gradient; BMM-RS-A2A's calls AG-BMM once, plus the
small one-hot call when ``bias`` needs a gradient. Gradients are computed in fp32 and rounded
to the inputs' dtypes (``gx`` as the other op rounds its output). No input of either op lacks a
gradient (the other inputs are strings and ints), so nothing raises ``NotDifferentiableError``.
Double backward is not provided.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ..kernels._precision import accumulator
from ..op_protos.alltoall_allgather_bmm import NAME as AG
from ..op_protos.bmm_reducescatter_alltoall import NAME as RS
from ._common import gradients, input_names, needed, register_formula

Tensor = torch.Tensor
_AG_INPUTS, _RS_INPUTS = input_names(AG), input_names(RS)
_GROUP_ARGS = ("group_ep", "group_ep_worldsize", "group_tp", "group_tp_worldsize")


def _fastgelu_backward(grad: Tensor, z: Tensor) -> Tensor:
    s = torch.sigmoid(1.702 * z)
    return grad * (s + 1.702 * z * s * (1 - s))


# act_type -> (g, z) -> g * act'(z), fp32: the derivatives of kernels.bmm_collectives.ACTIVATIONS.
ACTIVATION_VJPS: dict[int, Callable[[Tensor, Tensor], Tensor]] = {
    1: lambda g, z: torch.ops.aten.gelu_backward(g, z, approximate="none"),
    2: torch.ops.aten.silu_backward,
    3: lambda g, z: torch.ops.aten.threshold_backward(g, z, 0),
    4: _fastgelu_backward,
}


def _present(grad: Optional[Tensor]) -> bool:
    """A gradient that carries values: not absent, and not that of a ``(0, 0, 0)`` placeholder."""
    return grad is not None and grad.numel() > 0


def _bias_grad(sums: Tensor, ctx: Any) -> Tensor:
    """``sums`` ``(local, n)`` fp32 in the bias's shape and dtype."""
    return sums.reshape(ctx.bias_shape).to(ctx.bias_dtype)


# ---------------------------------------------------------------------------------------------
# npu_alltoall_allgather_bmm
# ---------------------------------------------------------------------------------------------

def _ag_forward(run: Callable[..., tuple], inputs: tuple) -> tuple:
    """``(y1, y2, y3)`` as the caller requested them, then ``y2``/``y3`` kept for the backward
    only (``(0, 0, 0)`` when the caller has them or the backward needs none)."""
    args = dict(zip(_AG_INPUTS, inputs))
    act = args["act_type"]
    keep_y2 = args["weight"].requires_grad and not args["need_allgather_out"]   # gW reads the gathered x
    keep_y3 = act != 0 and not args["need_activation_feature"]                 # act' reads the pre-activation
    y1, y2, y3 = run(need_allgather_out=args["need_allgather_out"] or keep_y2, need_activation_feature=act != 0)
    shown_y2, kept_y2 = (y1.new_empty((0, 0, 0)), y2) if keep_y2 else (y2, y1.new_empty((0, 0, 0)))
    shown_y3, kept_y3 = (y1.new_empty((0, 0, 0)), y3) if keep_y3 else (y3, y1.new_empty((0, 0, 0)))
    return y1, shown_y2, shown_y3, kept_y2, kept_y3


def _ag_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    args = dict(zip(_AG_INPUTS, inputs))
    y1, y2, y3, kept_y2, kept_y3 = output
    # An output the graph does not use brings None instead of zeros: no identity matmul for an unused y2.
    ctx.set_materialize_grads(False)
    ctx.groups = tuple(args[k] for k in _GROUP_ARGS)
    ctx.shard_type, ctx.act_type = args["shard_type"], args["act_type"]
    ctx.y1_shape, ctx.dtype, ctx.device = y1.shape, y1.dtype, y1.device
    bias = args["bias"]
    ctx.bias_shape, ctx.bias_dtype = (None, None) if bias is None else (bias.shape, bias.dtype)
    ctx.save_for_backward(
        args["weight"] if needed(ctx, _AG_INPUTS, "x") else None,
        (y2 if args["need_allgather_out"] else kept_y2) if needed(ctx, _AG_INPUTS, "weight") else None,
        (y3 if args["need_activation_feature"] else kept_y3) if ctx.act_type != 0 else None)


def _pre_activation_grad(ctx: Any, grad_y1: Optional[Tensor], grad_y3: Optional[Tensor],
                         y3: Optional[Tensor]) -> Tensor:
    """``gz = act'(y3) * g1 + g3``, fp32 (fp64 for fp64) ``(local, rows, M/tp)``; zeros when neither is used."""
    acc = accumulator(ctx.dtype)
    if grad_y1 is None:
        gz = torch.zeros(ctx.y1_shape, dtype=acc, device=ctx.device)
    elif ctx.act_type == 0:
        gz = grad_y1.to(acc)
    else:
        gz = ACTIVATION_VJPS[ctx.act_type](grad_y1.to(acc), y3.to(acc))
    return gz + grad_y3.to(acc) if _present(grad_y3) else gz


def _ag_backward(ctx: Any, grad_y1: Optional[Tensor], grad_y2: Optional[Tensor], grad_y3: Optional[Tensor],
                 *_kept: Optional[Tensor]) -> tuple:
    weight, y2, y3 = ctx.saved_tensors
    gz = _pre_activation_grad(ctx, grad_y1, grad_y3, y3)
    grads = {}
    if needed(ctx, _AG_INPUTS, "x"):
        rs_x, rs_w = gz.to(ctx.dtype), weight.transpose(1, 2)                  # (local, rows, M/tp), (local, M/tp, H)
        if _present(grad_y2):   # y2 is the gathered x itself: its gradient joins gz @ W^T before S
            local, hidden = weight.size(0), weight.size(1)
            eye = torch.eye(hidden, dtype=ctx.dtype, device=weight.device).expand(local, hidden, hidden)
            rs_x, rs_w = torch.cat([rs_x, grad_y2.to(ctx.dtype)], dim=2), torch.cat([rs_w, eye], dim=1)
        grads["x"] = torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall(rs_x, rs_w, *ctx.groups,
                                                                          shard_type=ctx.shard_type)
    if needed(ctx, _AG_INPUTS, "weight"):
        grads["weight"] = torch.bmm(y2.to(gz.dtype).transpose(1, 2), gz).to(ctx.dtype)
    if needed(ctx, _AG_INPUTS, "bias"):
        grads["bias"] = _bias_grad(gz.sum(1), ctx)
    return gradients(_AG_INPUTS, **grads)


register_formula(AG, _ag_setup, _ag_backward, forward=_ag_forward)


# ---------------------------------------------------------------------------------------------
# npu_bmm_reducescatter_alltoall
# ---------------------------------------------------------------------------------------------

def _rs_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    args = dict(zip(_RS_INPUTS, inputs))
    x, weight, bias = args["x"], args["weight"], args["bias"]
    ctx.groups = tuple(args[k] for k in _GROUP_ARGS)
    ctx.shard_type, ctx.dtype = args["shard_type"], x.dtype
    ctx.local, ctx.hidden = weight.size(0), weight.size(2)
    ctx.bias_shape, ctx.bias_dtype = (None, None) if bias is None else (bias.shape, bias.dtype)
    ctx.save_for_backward(weight if needed(ctx, _RS_INPUTS, "x") else None,
                          x if needed(ctx, _RS_INPUTS, "weight") else None)


def _tp_one_hot(ctx: Any, device: torch.device) -> Tensor:
    """``(tp,)`` fp32, 1 at this rank's TP index ``q``: BMM-RS-A2A of one-hot rows.

    Row ``p*tp + j`` of a ``(1, ep*tp, tp)`` input is ``onehot(j)``; with shard_type 1 the
    reduce-scatter keeps rows ``p'*tp + q`` summed over the ``tp`` peers, so every row of the
    ``(ep, 1, tp)`` result is ``tp * onehot(q)`` (small integers: exact in fp16/bf16).
    """
    ep, tp = ctx.groups[1], ctx.groups[3]
    rows = (torch.arange(ep * tp, device=device) % tp).unsqueeze(1) == torch.arange(tp, device=device)
    eye = torch.eye(tp, dtype=ctx.dtype, device=device).unsqueeze(0)
    y = torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall(rows.to(ctx.dtype).unsqueeze(0), eye, *ctx.groups,
                                                            shard_type=1)
    return y[0, 0].to(accumulator(ctx.dtype)) / tp


def _own_slice_sums(ctx: Any, gathered: Tensor) -> Tensor:
    """Row sums of this rank's TP slice of ``gathered = G(gy)`` ``(local, rows, H)``: fp32 (fp64 for
    fp64) ``(local, H/tp)`` (shard_type 0: column block q) or ``(local, H)`` (1: rows of block q)."""
    local, hidden, ep, tp = ctx.local, ctx.hidden, ctx.groups[1], ctx.groups[3]
    g = gathered.to(accumulator(ctx.dtype))
    if ctx.shard_type == 0:   # column q*H/tp + hh
        per_slice = g.sum(1).view(local, tp, hidden // tp)
    else:                     # row (p*tp + q)*c + cc
        per_slice = g.view(local, ep, tp, -1, hidden).sum((1, 3))
    if tp == 1:   # one slice: no rank to find
        return per_slice[:, 0]
    return (per_slice * _tp_one_hot(ctx, gathered.device).view(1, tp, 1)).sum(1)


def _rs_backward(ctx: Any, grad_y: Tensor) -> tuple:
    weight, x = ctx.saved_tensors
    need_x = needed(ctx, _RS_INPUTS, "x")
    need_gathered = needed(ctx, _RS_INPUTS, "weight") or needed(ctx, _RS_INPUTS, "bias")
    # Without gx only G(gy) is wanted: a one-column weight makes AG-BMM's bmm negligible.
    w_t = weight.transpose(1, 2) if need_x else grad_y.new_zeros((ctx.local, ctx.hidden, 1))
    gx, gathered, _ = torch.ops.moe_fusion.npu_alltoall_allgather_bmm(
        grad_y, w_t, *ctx.groups, shard_type=ctx.shard_type, act_type=0, need_allgather_out=need_gathered)
    grads = {}
    if need_x:
        grads["x"] = gx
    if needed(ctx, _RS_INPUTS, "weight"):
        acc = accumulator(ctx.dtype)
        grads["weight"] = torch.bmm(x.to(acc).transpose(1, 2), gathered.to(acc)).to(ctx.dtype)
    if needed(ctx, _RS_INPUTS, "bias"):
        grads["bias"] = _bias_grad(_own_slice_sums(ctx, gathered), ctx)
    return gradients(_RS_INPUTS, **grads)


register_formula(RS, _rs_setup, _rs_backward)
