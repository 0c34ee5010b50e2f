"""Autograd of the MoE communication ops: ``npu_moe_distribute_dispatch_v2``,
``npu_moe_distribute_combine_v2`` and ``npu_moe_distribute_combine_add_rms_norm``.

Dispatch and combine are each other's adjoints, as in DeepEP: dispatch copies token rows to expert
rows, so its backward adds the expert-row gradients back up per token (a combine with unit
weights); combine adds weighted expert rows up per token, so its backward copies each token's
gradient to the expert rows (a dispatch) and scales every copy by its weight. Every collective of
a backward is one of the fused ops, so the backward runs on the device kernels too.

Notation (SPEC §1, §4.3): rank ``r`` of ``W`` EP ranks, ``M`` MoE experts, ``L`` local experts
per MoE rank, ``S`` shared-expert ranks; token ``i`` of a source rank has top-k slots ``j`` with
weights ``w_ij`` (``expert_scales``); ``y(i, j)`` is the expert row combine returns for slot ``j``
(with TP, the sum of the TP pair's two rows); ``g_i`` is the gradient of combine's fp32
accumulator ``acc_i`` (the combine_v2 output gradient; see below for add_rms_norm). Tokens
combine does not process (masked out) have constant zero outputs: their ``g_i`` is 0.

Formulas:

* dispatch, ``x`` ``(BS, H)``: ``grad_x = combine_v2(grad_expand_x, expert_scales=1)`` with the
  dispatch's own ``assist_info_for_combine`` / ``ep_recv_counts`` / ``tp_recv_counts``: every
  copy of token ``i`` (top-k rows, shared-expert rows, the TP peer's copy) adds its row gradient.
  Zero/copy/const experts are never sent; the combine treats all of them as zero experts.
* combine, ``expand_x`` row holding ``(token i, slot j)``: ``w_ij * g_i`` (a shared-expert row:
  ``g_i``, unweighted; padding rows: 0). One ``dispatch_v2`` of the payload ``[g | D]``
  ``(BS, H + M)`` with ``D[i, e] = w_ij`` where ``expert_ids[i, j] = e``; each received row's
  expert is known on the expert side (rows are contiguous per local expert in the counts of the
  dispatch's ``expert_token_nums``, SPEC §8.3; local expert ``l`` of MoE rank ``r`` is expert
  ``(r - S) * L + l``) and picks its weight from column ``e`` of its ``D`` part. The TP all-gather
  of that dispatch hands each rank the payload of its peer rows too.
* combine, ``expert_scales[i, j]`` of a MoE expert: ``g_i . y(i, j)``, the per-copy dot product
  taken on the expert side (each TP rank with its own rows), sent back by one ``combine_v2`` of
  rows ``(dot) * onehot(e)`` ``(rows, M)`` with unit weights (the TP reduce-scatter adds the
  pair's halves) and read at column ``expert_ids[i, j]``. Copy experts: ``g_i . ori_x[i]``;
  const expert ``c``: ``g_i . (ori_x[i] * alpha_1[c] + v[c] * alpha_2[c])``; zero experts: 0.
* ``shared_expert_x``: ``g`` (added unweighted). ``ori_x``: ``sum_j w_ij g_i`` over copy slots
  plus ``sum_j w_ij g_i alpha_1[c]`` over const slots; ``alpha_1[c]``: ``sum w_ij g_i * ori_x[i]``,
  ``alpha_2[c]``: ``sum w_ij g_i * v[c]`` (summed over H for the kernel's ``(Q,)`` scalars,
  elementwise for ``(Q, H)``); ``v[c]``: ``sum w_ij g_i * alpha_2[c]``.
* add_rms_norm, with ``xs = acc + residual_x``, ``rstd = (mean(xs^2) + eps)^-1/2``,
  ``y = xs * rstd * gamma``, outputs ``(y, rstd, x = xs)`` and ``gn = grad_y * gamma``::

      g = rstd * gn - rstd^3 / H * xs * (sum_h(gn * xs) + grad_rstd) + grad_x
      grad_residual_x = g          grad_gamma = sum_i grad_y * xs * rstd

  then ``g`` flows into the combine formulas above. The roundings of the forward are taken as
  the identity (straight-through); ``xs`` is read back from the ``x`` output, so for bf16 it is
  ``xs`` rounded to bf16.

Precision: the backward collectives move the gradients in the op's token dtype (``x`` /
``expand_x``), as the forward moves the tokens; in bf16/fp16 the weights in ``D`` and the dot
products are rounded to that dtype (exact in fp32).

No gradient (``NotDifferentiableError`` naming the op and the argument, raised before any
collective, when the backward needs it): ``x`` with ``quant_mode`` 2 (int8 payload) and the smooth
``scales``; ``expand_x`` and ``expert_scales`` with ``comm_quant_mode`` 2 (the rows travel as int8);
``expert_scales`` of dispatch when the ``expand_scales`` output is used, and combine's
``expand_scales`` input (implementation-defined metadata, SPEC §3.4). Integer and bool inputs
(ids, counts, assist info, masks, ``elastic_info``, ``performance_info``) cannot require a gradient
in torch, and integer outputs do not carry one.

**The backward is a collective.** Every rank of the EP (and TP) group must run the backward of
each dispatch/combine call, in the same order, and ask for the same gradients (``requires_grad``
of ``x``; of ``expand_x`` and ``expert_scales``), even a rank whose own gradient is zero or that
has no tokens (``BS == 0``): a rank that skips it leaves its peers waiting in the collective. So
every rank's loss must depend on the op's output (a zero weight is fine), as in DeepEP and
Megatron's expert parallelism. Errors the backward refuses with depend only on attributes and
``requires_grad``, which all ranks share, so all ranks raise together.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..kernels._moe_tokens import active_slots, valid_tokens
from ..kernels._precision import accumulator
from ._common import gradients, input_names, needed, not_differentiable, refuse_needed, register_formula

Tensor = torch.Tensor
DISPATCH = "npu_moe_distribute_dispatch_v2"
COMBINE = "npu_moe_distribute_combine_v2"
COMBINE_RMS = "npu_moe_distribute_combine_add_rms_norm"

# Attributes a dispatch and its paired combine share (SPEC §8.2), passed to the backward's ops.
_HEAD = ("group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num")
_SHARED = ("group_tp", "tp_world_size", "tp_rank_id", "expert_shard_type", "shared_expert_num",
           "shared_expert_rank_num", "global_bs", "comm_alg")
_SPECIAL = ("zero_expert_num", "copy_expert_num", "const_expert_num")
_METADATA = "implementation-defined metadata of the paired op (SPEC §3.4)"


class _Route:
    """The attributes of one dispatch/combine call, to run the backward's ops on the same route."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.head = tuple(args[n] for n in _HEAD)
        self.shared = {n: args[n] for n in _SHARED}
        self.zero, self.copy, self.const = (args[n] for n in _SPECIAL)

    @property
    def experts(self) -> int:
        return self.head[3]

    @property
    def special(self) -> int:
        """Zero + copy + const expert ids: the backward's ops pass them all as zero experts (never
        sent; their local terms are differentiated on the token side)."""
        return self.zero + self.copy + self.const

    def dispatch(self, payload: Tensor, expert_ids: Tensor, mask: Optional[Tensor],
                 elastic_info: Optional[Tensor]) -> tuple[Tensor, ...]:
        """``dispatch_v2`` of ``payload`` ``(BS, P)`` on this route (counts as expert_token_nums)."""
        return torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(
            payload, expert_ids, *self.head, x_active_mask=mask, elastic_info=elastic_info,
            zero_expert_num=self.special, expert_token_nums_type=1, **self.shared)

    def combine(self, rows: Tensor, expert_ids: Tensor, assist: Tensor, ep_counts: Tensor, tp_counts: Tensor,
                mask: Optional[Tensor], elastic_info: Optional[Tensor],
                expand_scales: Optional[Tensor] = None) -> Tensor:
        """``combine_v2`` of ``rows`` ``(max(T,1)*A, P)`` with unit weights: ``(BS, P)``, each
        token's rows summed (top-k and shared alike)."""
        ones = torch.ones(expert_ids.shape, dtype=torch.float32, device=rows.device)
        return torch.ops.moe_fusion.npu_moe_distribute_combine_v2(
            rows, expert_ids, assist, ep_counts, ones, *self.head, tp_send_counts=tp_counts, x_active_mask=mask,
            expand_scales=expand_scales, elastic_info=elastic_info, zero_expert_num=self.special, **self.shared)

    def row_experts(self, token_nums: Tensor, rows: int) -> Tensor:
        """``(rows,)`` int64: the MoE expert of each row a dispatch on this route delivered to this
        rank (rows are contiguous per local expert, ``token_nums`` counts), ``M`` for shared-expert
        rows and padding."""
        world, rank, experts = self.head[1], self.head[2], self.experts
        shared_ranks = self.shared["shared_expert_rank_num"]
        none = torch.full((rows,), experts, dtype=torch.int64, device=token_nums.device)
        if rank < shared_ranks:                    # a shared-expert rank receives only shared rows
            return none
        local = experts // (world - shared_ranks)
        ends = token_nums[:local].cumsum(0)        # static shapes: no nonzero/repeat_interleave
        slot = torch.searchsorted(ends, torch.arange(rows, device=ends.device), right=True)
        return torch.where(slot < local, (rank - shared_ranks) * local + slot, none)


# ---------------------------------------------------------------------------------------------
# npu_moe_distribute_dispatch_v2
# ---------------------------------------------------------------------------------------------

_DISPATCH_INPUTS = input_names(DISPATCH)


def _dispatch_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    args = dict(zip(_DISPATCH_INPUTS, inputs))
    ctx.set_materialize_grads(False)   # an unused expand_scales must stay None (see expert_scales)
    ctx.route = _Route(args)
    ctx.quant_mode = args["quant_mode"]
    ctx.rows_shape, ctx.x_dtype = output[0].shape, args["x"].dtype
    ctx.expand_scales_shape = output[6].shape if args["expert_scales"] is not None else None
    ctx.save_for_backward(args["expert_ids"], args["x_active_mask"], args["elastic_info"], output[2], output[4],
                          output[5])


def _dispatch_backward(ctx: Any, grad_expand_x: Optional[Tensor], _grad_dynamic_scales: Optional[Tensor],
                       _assist: None, _token_nums: None, _ep_counts: None, _tp_counts: None,
                       grad_expand_scales: Optional[Tensor]) -> tuple:
    """``grad_x`` ``(BS, H)`` in ``x``'s dtype: a unit-weight combine of ``grad_expand_x``.

    ``dynamic_scales`` carries no gradient to ``x``: with ``quant_mode`` 0 it is a constant zero
    buffer, with ``quant_mode`` 2 ``x`` is refused."""
    refuse_needed(ctx, DISPATCH, _DISPATCH_INPUTS, {"scales": "smooth-quant scales of an int8 payload (quant_mode 2)"})
    if grad_expand_scales is not None:
        # expert_scales reaches only expand_scales, whose gradient is undefined; unused, it has none.
        refuse_needed(ctx, DISPATCH, _DISPATCH_INPUTS, {"expert_scales": f"it only feeds expand_scales, {_METADATA}"})
    if not needed(ctx, _DISPATCH_INPUTS, "x"):
        return gradients(_DISPATCH_INPUTS)
    if ctx.quant_mode != 0:
        not_differentiable(DISPATCH, "x", f"quant_mode {ctx.quant_mode}: expand_x is an int8 payload")
    expert_ids, mask, elastic_info, assist, ep_counts, tp_counts = ctx.saved_tensors
    if grad_expand_x is None:   # this rank's loss does not use expand_x: it still joins the collective
        grad_expand_x = torch.zeros(ctx.rows_shape, dtype=ctx.x_dtype, device=expert_ids.device)
    # Unit weights under either weighting convention (A2 hierarchy weights by expand_scales).
    unit_scales = None if ctx.expand_scales_shape is None else torch.ones(
        ctx.expand_scales_shape, dtype=torch.float32, device=expert_ids.device)
    grad_x = ctx.route.combine(grad_expand_x, expert_ids, assist, ep_counts, tp_counts, mask, elastic_info,
                               unit_scales)
    return gradients(_DISPATCH_INPUTS, x=grad_x)


register_formula(DISPATCH, _dispatch_setup, _dispatch_backward)


# ---------------------------------------------------------------------------------------------
# npu_moe_distribute_combine_v2 and npu_moe_distribute_combine_add_rms_norm
# ---------------------------------------------------------------------------------------------

_COMBINE_INPUTS = input_names(COMBINE)
_RMS_INPUTS = input_names(COMBINE_RMS)
_TOKEN_SIDE = ("expand_x", "expert_ids", "expert_scales", "x_active_mask", "elastic_info", "ori_x",
               "const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v")


def _combine_setup_common(ctx: Any, args: dict[str, Any]) -> list[Optional[Tensor]]:
    """Attributes on ``ctx``; returns the tensors to save (``_TOKEN_SIDE`` order)."""
    ctx.route = _Route(args)
    ctx.comm_quant_mode = args["comm_quant_mode"]
    shared_x = args["shared_expert_x"]
    ctx.shared_x_shape = None if shared_x is None else (shared_x.shape, shared_x.dtype)
    return [args[n] for n in _TOKEN_SIDE]


def _combine_setup(ctx: Any, inputs: tuple, output: Tensor) -> None:
    ctx.save_for_backward(*_combine_setup_common(ctx, dict(zip(_COMBINE_INPUTS, inputs))))


def _combine_backward(ctx: Any, grad_out: Tensor) -> tuple:
    """Gradients of every float input of combine_v2 from ``grad_out`` ``(BS, H)``."""
    saved = dict(zip(_TOKEN_SIDE, ctx.saved_tensors))
    processed = valid_tokens(saved["x_active_mask"], grad_out.size(0), grad_out.device).unsqueeze(1)
    g = torch.where(processed, grad_out.to(accumulator(grad_out.dtype)), 0.0)
    return gradients(_COMBINE_INPUTS, **_combine_grads(ctx, COMBINE, _COMBINE_INPUTS, saved, g))


def _combine_grads(ctx: Any, op: str, names: tuple[str, ...], saved: dict[str, Any], g: Tensor) -> dict[str, Tensor]:
    """The gradients of combine's inputs given ``g`` ``(BS, H)`` fp32 (fp64 for fp64 rows), the gradient of ``acc``
    (0 on unprocessed tokens)."""
    refuse_needed(ctx, op, names, {"expand_scales": _METADATA})
    if ctx.comm_quant_mode != 0:
        refuse_needed(ctx, op, names, {name: f"comm_quant_mode {ctx.comm_quant_mode}: the expert rows travel as int8"
                                       for name in ("expand_x", "expert_scales")})
    expert_ids, expert_scales = saved["expert_ids"], saved["expert_scales"]
    bs, k = expert_ids.shape
    ids = expert_ids.long()
    active = active_slots(saved["x_active_mask"], bs, k, g.device)
    grads: dict[str, Tensor] = {}
    need_rows, need_weights = needed(ctx, names, "expand_x"), needed(ctx, names, "expert_scales")
    if need_rows or need_weights:
        grad_rows, moe_weights = _expert_side(ctx.route, saved, g, active & (ids < ctx.route.experts), need_weights)
        if need_rows:
            grads["expand_x"] = grad_rows
    special_weights, special = _special_experts(ctx, names, saved, g, ids, active)
    grads.update(special)
    if need_weights:
        grads["expert_scales"] = (moe_weights + special_weights).to(expert_scales.dtype)
    if needed(ctx, names, "shared_expert_x"):
        shape, dtype = ctx.shared_x_shape
        grads["shared_expert_x"] = g.reshape(shape).to(dtype)
    return grads


def _expert_side(route: _Route, saved: dict[str, Any], g: Tensor, moe_slot: Tensor,
                 need_weights: bool) -> tuple[Tensor, Optional[Tensor]]:
    """Collectives: ``(grad expand_x (rows, H) in its dtype, MoE-slot weight gradients (BS, K) fp32
    or None)``. One dispatch of ``[g | D]``; with ``need_weights`` also one combine of the per-row
    dot products."""
    expand_x, expert_ids = saved["expand_x"], saved["expert_ids"]
    mask, elastic_info = saved["x_active_mask"], saved["elastic_info"]
    experts, bs, h, dtype = route.experts, expert_ids.size(0), g.size(1), expand_x.dtype
    ids = expert_ids.long()
    column = torch.where(moe_slot, ids, experts)   # column M: a dump for slots that are not sent
    dense = g.new_zeros((bs, experts + 1)).scatter_(1, column, saved["expert_scales"].to(g.dtype))[:, :experts]
    rows, _, assist, token_nums, ep_counts, tp_counts, _ = route.dispatch(
        torch.cat([g, dense], dim=1).to(dtype), expert_ids, mask, elastic_info)
    n_rows = rows.size(0)
    row_expert = route.row_experts(token_nums, n_rows)
    is_moe = row_expert < experts
    picked = rows[:, h:].to(g.dtype).gather(1, row_expert.clamp(max=experts - 1).unsqueeze(1)).squeeze(1)
    shared_rank = route.head[2] < route.shared["shared_expert_rank_num"]
    weight = torch.where(is_moe, picked, 1.0 if shared_rank else 0.0)   # shared rows: unweighted
    token_grad = rows[:, :h].to(g.dtype)
    # expand_x may have more or fewer rows than the dispatch allocates: only the dispatched ones count.
    n = min(n_rows, expand_x.size(0))
    grad_rows = torch.zeros_like(expand_x)
    grad_rows[:n] = (token_grad[:n] * weight[:n].unsqueeze(1)).to(dtype)
    if not need_weights:
        return grad_rows, None
    y = torch.zeros((n_rows, h), dtype=g.dtype, device=g.device)
    y[:n] = expand_x[:n].to(g.dtype)
    dots = torch.where(is_moe, (token_grad * y).sum(dim=1), 0.0)
    onehot = dots.new_zeros((n_rows, experts + 1)).scatter_(1, row_expert.unsqueeze(1), dots.unsqueeze(1))
    back = route.combine(onehot[:, :experts].to(dtype), expert_ids, assist, ep_counts, tp_counts, mask, elastic_info)
    picked_back = back.to(g.dtype).gather(1, ids.clamp(max=experts - 1))
    return grad_rows, torch.where(moe_slot, picked_back, 0.0)


def _special_experts(ctx: Any, names: tuple[str, ...], saved: dict[str, Any], g: Tensor, ids: Tensor,
                     active: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-side terms (SPEC §4.3 step 3): ``(weight gradients of the copy/const slots (BS, K) fp32,
    gradients of ori_x and the const parameters)``."""
    route = ctx.route
    bs, k = ids.shape
    weight_grads = g.new_zeros((bs, k))
    ori = saved["ori_x"]
    if ori is None:   # no copy/const experts (ori_x is required when there are any)
        return weight_grads, {}
    zero_end = route.experts + route.zero
    copy_end, const_end = zero_end + route.copy, zero_end + route.copy + route.const
    w = saved["expert_scales"].to(g.dtype)
    orif = ori.to(g.dtype)
    is_copy = active & (ids >= zero_end) & (ids < copy_end)
    weight_grads = torch.where(is_copy, (g * orif).sum(dim=1, keepdim=True), 0.0)
    grad_ori = (w * is_copy).sum(dim=1, keepdim=True) * g
    grads: dict[str, Tensor] = {}
    if route.const:
        a1, a2, v = (saved[n] for n in ("const_expert_alpha_1", "const_expert_alpha_2", "const_expert_v"))
        is_const = active & (ids >= copy_end) & (ids < const_end)
        c = (ids - copy_end).clamp(0, route.const - 1)

        def per_slot(alpha: Tensor) -> Tensor:   # (BS, K, H) or (BS, K, 1): (Q, H) rows or (Q,) scalars
            picked = alpha.to(g.dtype)[c]
            return picked if alpha.dim() == 2 else picked.unsqueeze(2)

        alpha1, alpha2, vc = per_slot(a1), per_slot(a2), v.to(g.dtype)[c]
        term = orif.unsqueeze(1) * alpha1 + vc * alpha2
        weight_grads = weight_grads + torch.where(is_const, (g.unsqueeze(1) * term).sum(dim=2), 0.0)
        coef = (w * is_const).unsqueeze(2) * g.unsqueeze(1)          # d acc / d term, (BS, K, H)
        grad_ori = grad_ori + (coef * alpha1).sum(dim=1)
        flat = c.reshape(-1)

        def to_experts(per_slot_grad: Tensor, like: Tensor) -> Tensor:
            """Sum (BS, K, H) slot terms into ``like``'s shape: (Q, H), or (Q,) summing over H."""
            values = per_slot_grad if like.dim() == 2 else per_slot_grad.sum(dim=2, keepdim=True)
            out = torch.zeros((route.const, values.size(2)), dtype=g.dtype, device=g.device)
            out.index_add_(0, flat, values.reshape(bs * k, -1))
            return out.reshape(like.shape).to(like.dtype)

        for name, value, like in (("const_expert_alpha_1", lambda: coef * orif.unsqueeze(1), a1),
                                  ("const_expert_alpha_2", lambda: coef * vc, a2),
                                  ("const_expert_v", lambda: coef * alpha2, v)):
            if needed(ctx, names, name):
                grads[name] = to_experts(value(), like)
    if needed(ctx, names, "ori_x"):
        grads["ori_x"] = grad_ori.to(ori.dtype)
    return weight_grads, grads


register_formula(COMBINE, _combine_setup, _combine_backward)


def _rms_setup(ctx: Any, inputs: tuple, output: tuple) -> None:
    args = dict(zip(_RMS_INPUTS, inputs))
    token_side = _combine_setup_common(ctx, args)
    ctx.residual = (args["residual_x"].shape, args["residual_x"].dtype)
    ctx.save_for_backward(*token_side, args["gamma"], output[1], output[2])


def _rms_backward(ctx: Any, grad_y: Tensor, grad_rstd: Tensor, grad_x: Tensor) -> tuple:
    """``g`` of the add + RMSNorm (module docstring), then the combine formulas."""
    *token_side, gamma, rstd, x_out = ctx.saved_tensors
    saved = dict(zip(_TOKEN_SIDE, token_side))
    bs, _, h = x_out.shape
    processed = valid_tokens(saved["x_active_mask"], bs, x_out.device).view(bs, 1)
    acc = accumulator(x_out.dtype)
    xs, r = x_out.reshape(bs, h).to(acc), rstd.reshape(bs, 1).to(acc)
    gy, gx = grad_y.reshape(bs, h).to(acc), grad_x.reshape(bs, h).to(acc)
    gn = gy * gamma.to(acc)
    g = r * gn - (r ** 3 / h) * xs * ((gn * xs).sum(dim=1, keepdim=True) + grad_rstd.reshape(bs, 1).to(acc)) + gx
    g = torch.where(processed, g, 0.0)   # unprocessed tokens: every output is a constant zero
    grads = _combine_grads(ctx, COMBINE_RMS, _RMS_INPUTS, saved, g)
    if needed(ctx, _RMS_INPUTS, "residual_x"):
        shape, dtype = ctx.residual
        grads["residual_x"] = g.reshape(shape).to(dtype)
    if needed(ctx, _RMS_INPUTS, "gamma"):
        grads["gamma"] = torch.where(processed, gy * xs * r, 0.0).sum(dim=0).to(gamma.dtype)
    return gradients(_RMS_INPUTS, **grads)


register_formula(COMBINE_RMS, _rms_setup, _rms_backward)
