"""Reference kernels of ``npu_moe_distribute_combine_v2`` and ``..._combine_add_rms_norm`` (SPEC §4.3).

Combine consumes only what the paired dispatch wrote (canonical layout, see
``moe_distribute_dispatch``): this rank's own row count is the last entry of its part of
``ep_send_counts``; row ``i < own`` returns to ``(source rank, token, slot) = assist[3i : 3i+3]``.

1. agreement (``_moe_exchange.Exchange.agree``): one fixed-size all-gather over the TP pair (T == 2)
   then over the EP group carries every rank's verdict on its inputs, the attributes that shape
   the rows and the TP pair's row counts (``_fields``), so every rank stops together; the EP
   all-gather also carries the rows going back to each source rank (the count exchange);
2. TP (T == 2): one fp32 ``reduce_scatter_tensor`` adds the peer's copy of our rows (its rows
   ``[peer_own, peer_own + own)``) to ours; the sum is rounded to the ``expand_x`` dtype;
   EP return: one payload exchange of packed rows
   ``[row or int8 row + per-8-group scales | token, slot]`` (``RowLayout``; ``comm_quant_mode`` 2
   quantizes per group of 8 elements, SPEC §4.3);
3. on the token's rank, in fp32: ``acc = sum_j w_j * row_j`` over slots ``j = 0..K-1`` (copy
   experts use ``ori_x``, const experts ``ori_x * alpha_1 + v * alpha_2``, zero experts nothing),
   then the shared-expert rows and ``shared_expert_x`` unweighted. On CPU, a large call whose every
   slot is a received row (no masked slot, no copy/const experts) sums in one inductor-generated
   loop (``_slot_sum``), bit-identical to the ATen passes used otherwise.

Rows of tokens that are not processed (masked out) are zero in every output (rstd too).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..errors import OpValidationError, fail
from ..op_protos import moe_distribute_combine_add_rms_norm as rms_proto
from ..op_protos import moe_distribute_combine_v2 as combine_proto
from ..op_protos.moe_distribute_common import DistConfig, validate_id_values, validate_mask_values
from ._precision import accumulator
from ._moe_exchange import PER_RANK, Field, RowLayout, dist_fields, exchange_rows, open_exchange, peer_guard
from ._slot_sum import fused_slot_sum
from ._zeroed import zeroed
from ._moe_tokens import active_slots, valid_tokens

Tensor = torch.Tensor
QUANT_GROUP = 8                       # elements per comm-quant scale (one 32-byte fp32 block)
BLOCK_ELEMENTS = 1 << 18              # accumulator elements per token block of the weighted sum (1 MB in fp32)


# ---------------------------------------------------------------------------------------------
# comm_quant_mode 2: int8 per group of 8 elements (SPEC §4.3).
# ---------------------------------------------------------------------------------------------

def comm_quant(rows: Tensor) -> tuple[Tensor, Tensor]:
    """``rows`` ``(N, H)`` -> ``q`` ``(N, H)`` int8 and ``scales`` ``(N, G)`` in the rows' dtype,
    ``G = ceil(H / 8)``. All-zero groups give zeros (the device divides by 0 there)."""
    n, h = rows.shape
    groups = -(-h // QUANT_GROUP)
    xf = F.pad(rows.float(), (0, groups * QUANT_GROUP - h)).view(n, groups, QUANT_GROUP)
    amax = xf.abs().amax(dim=2, keepdim=True)
    scale = amax * torch.tensor(1.0 / 127.0, dtype=torch.float32)
    q = (xf / scale).to(torch.float16).float().round()          # fp32 div -> RINT to fp16 -> RINT
    q = torch.where(amax > 0, q, 0.0).to(torch.int8).view(n, groups * QUANT_GROUP)[:, :h]
    return q, scale.squeeze(2).to(rows.dtype)


def comm_dequant(q: Tensor, scales: Tensor) -> Tensor:
    """``round_to_dtype(f32(f16(q)) * f32(scale))`` per group; returns the scales' dtype."""
    n, h = q.shape
    groups = scales.size(1)
    qf = F.pad(q.to(torch.float16).float(), (0, groups * QUANT_GROUP - h)).view(n, groups, QUANT_GROUP)
    return (qf * scales.float().unsqueeze(2)).to(scales.dtype).view(n, groups * QUANT_GROUP)[:, :h]


# ---------------------------------------------------------------------------------------------
# Expert side: own rows, TP reduce-scatter, return exchange.
# ---------------------------------------------------------------------------------------------

def _local_error(cfg: DistConfig, op: str, expand_x: Tensor, expert_ids: Tensor, assist: Tensor, assist_arg: str,
                 ep_send_counts: Tensor, tp_send_counts: Optional[Tensor], x_active_mask: Optional[Tensor],
                 elastic_info: Optional[Tensor]) -> tuple[Optional[OpValidationError], int, int]:
    """Value rules and the rows this rank owns: ``(error, own rows, TP peer rows)``."""
    try:
        validate_id_values(op, expert_ids, cfg.special_bounds[3])
        validate_mask_values(op, x_active_mask)
        if elastic_info is not None and int(elastic_info[0]) != 0:
            fail(op, "elastic_info", "must not request a scale-down (elastic_info[0] != 0 is not supported)",
                 int(elastic_info[0]))
        own = int(ep_send_counts[cfg.recv_slots - 1])
        peer = int(tp_send_counts[1 - cfg.tp_rank]) if cfg.tp_world == 2 else 0
        if cfg.tp_world == 2:
            require_value(int(tp_send_counts[cfg.tp_rank]) == own, op, "tp_send_counts",
                          f"[tp_rank_id] must equal the own row count ep_send_counts[{cfg.recv_slots - 1}] = {own}",
                          int(tp_send_counts[cfg.tp_rank]))
        require_value(0 <= own and 0 <= peer and own + peer <= expand_x.size(0), op, "ep_send_counts",
                      f"must count at most expand_x.size(0) = {expand_x.size(0)} rows (own + TP peer)",
                      f"{own} + {peer}")
        require_value(3 * own <= assist.numel(), op, assist_arg, f"must hold 3 entries per own row ({3 * own})",
                      f"{assist.numel()} entries")
        triples = assist[:3 * own].view(own, 3)
        bad = (triples[:, 0] < 0) | (triples[:, 0] >= cfg.world) | (triples[:, 1:] < 0).any(dim=1)
        require_value(not bool(bad.any()), op, assist_arg, f"source ranks must be in [0, {cfg.world})",
                      triples[bad][0].tolist() if bool(bad.any()) else None)
    except OpValidationError as error:
        return error, 0, 0
    return None, own, peer


def require_value(cond: bool, op: str, arg: str, rule: str, seen: Any) -> None:
    if not cond:
        fail(op, arg, rule, seen)


def _fields(cfg: DistConfig, comm_quant_mode: int, global_bs: int, own: int, peer: int) -> list[Field]:
    """What every rank must agree on before rows move; ``own``/``peer`` (this rank's and its TP
    peer's row counts, last: ``_tp_counts_check`` reads them there) are per rank, checked across
    the TP pair by ``_tp_counts_check``."""
    return dist_fields(cfg, "expand_x", global_bs) + [
        Field("comm_quant_mode", comm_quant_mode),
        Field("own rows", own, PER_RANK), Field("TP peer rows", peer, PER_RANK),
    ]


def _tp_counts_check(op: str, t: int, own: int, peer: int,
                     own_column: int) -> Callable[[Tensor], Optional[OpValidationError]]:
    """Our peer rows are copies of the TP peer's own rows: the two counts must match across the pair
    (``tp_rows`` ``(2, AGREEMENT_LEN)`` int64 hold own and peer rows at ``own_column`` and the next)."""
    def check(tp_rows: Tensor) -> Optional[OpValidationError]:
        theirs = tp_rows[1 - t, own_column:own_column + 2].tolist()
        if theirs != [peer, own]:
            return OpValidationError(f"{op}: tp_send_counts must be the same on both TP ranks, got "
                                     f"{[own, peer]} here and {theirs} on the peer")
        return None
    return check


def _tp_reduce(op: str, group: dist.ProcessGroup, cfg: DistConfig, expand_x: Tensor, own: int, peer: int) -> Tensor:
    """Own rows ``(own, H)`` plus the peer's copy of them, rounded to expand_x's dtype (SPEC §4.3
    step 1): one fp32 (fp64 for fp64) reduce-scatter over the pair, whose counts the agreement checked."""
    t = cfg.tp_rank
    rows = max(own, peer)
    acc = accumulator(expand_x.dtype)
    send = expand_x.new_zeros((2, rows, expand_x.size(1)), dtype=acc)
    send[t, :own] = expand_x[:own].to(acc)
    send[1 - t, :peer] = expand_x[own:own + peer].to(acc)
    summed = send.new_empty((rows, expand_x.size(1)))
    with peer_guard(op, "group_tp", group, "TP reduce-scatter"):
        dist.reduce_scatter_tensor(summed, send.view(2 * rows, expand_x.size(1)), group=group)
    return summed[:own].to(expand_x.dtype)


def _pack_return(rows: Tensor, triples: Tensor, comm_quant_mode: int,
                 staging: tuple[str, str]) -> tuple[RowLayout, Tensor]:
    """The return exchange's rows: ``rows`` ``(own, H)`` (this rank's computed rows) with their
    ``(token, slot)`` from ``triples`` ``(own, 3)`` int64, sorted by source rank (stable), packed
    ``[row or int8 row + per-8-group scales | token, slot]`` into the ``staging`` send buffer.
    Returns ``(layout, buf (own, row_bytes) uint8)``."""
    dtype, h = rows.dtype, rows.size(1)
    order = torch.argsort(triples[:, 0], stable=True)
    meta = triples[order, 1:]
    if comm_quant_mode == combine_proto.COMM_QUANT_INT8:
        q, scales = comm_quant(rows[order])
        layout = RowLayout(((torch.int8, h), (dtype, scales.size(1)), (torch.int32, 2)))
        return layout, layout.pack([q, scales, meta], staging)
    layout = RowLayout(((dtype, h), (torch.int32, 2)))
    buf = layout.empty(order.numel(), rows.device, staging)
    payload, buf_meta = layout.unpack(buf)
    torch.index_select(rows, 0, order, out=payload)
    buf_meta.copy_(meta)
    return layout, buf


def _return_rows(op: str, cfg: DistConfig, inputs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """Steps 1–2: every row this rank computed for another rank's token, delivered there.
    Returns ``(rows (R, H), token (R,), slot (R,))`` of the rows this rank received (rows in
    expand_x's dtype, or its dtype after int8 comm quant; without it, a view of the receive
    staging buffer, valid until the next exchange)."""
    expand_x, expert_ids = inputs["expand_x"], inputs["expert_ids"]
    assist, comm_quant_mode = inputs["assist"], inputs["comm_quant_mode"]
    exchange = open_exchange(op, inputs["group_ep"], cfg.world, cfg.rank, inputs["group_tp"], cfg.tp_world,
                             cfg.tp_rank)
    error, own, peer = _local_error(cfg, op, expand_x, expert_ids, assist, inputs["assist_arg"],
                                    inputs["ep_send_counts"], inputs["tp_send_counts"], inputs["x_active_mask"],
                                    inputs["elastic_info"])
    fields = _fields(cfg, comm_quant_mode, inputs["global_bs"], own, peer)
    # Rows back to each source rank (checked in range by ``_local_error``): they ride on the
    # agreement (W entries always fit its count area).
    triples = assist[:3 * own].view(-1, 3).long()
    send_counts = torch.bincount(triples[:, 0], minlength=cfg.world) if error is None else None
    staging = ("send", "" if exchange.ep is None else exchange.ep.group_name)
    # Without TP the rows to return are expand_x's own: packed while the agreement is in flight.
    pack_own = None if cfg.tp_world == 2 else lambda: _pack_return(expand_x[:own], triples, comm_quant_mode, staging)
    ep_rows, _, packed = exchange.agree(fields, error, expand_x.device,
                                        _tp_counts_check(op, cfg.tp_rank, own, peer, len(fields)),
                                        counts=None if send_counts is None else send_counts.unsqueeze(1),
                                        meanwhile=pack_own)
    recv_counts = exchange.counts_after(ep_rows, send_counts.unsqueeze(1))
    if packed is None:
        packed = _pack_return(_tp_reduce(op, exchange.tp, cfg, expand_x, own, peer), triples, comm_quant_mode, staging)
    layout, buf = packed
    parts = layout.unpack(exchange_rows(op, exchange.ep, buf, send_counts, recv_counts.squeeze(1)))
    got = comm_dequant(parts[0], parts[1]) if comm_quant_mode == combine_proto.COMM_QUANT_INT8 else parts[0]
    return got, parts[-1][:, 0].long(), parts[-1][:, 1].long()


# ---------------------------------------------------------------------------------------------
# Token side: the weighted reduction.
# ---------------------------------------------------------------------------------------------

def _check_received(op: str, assist_arg: str, expected: Tensor, token: Tensor, slot: Tensor) -> None:
    """The rows received are exactly one per (token, slot) this rank dispatched (else the inputs
    do not come from the paired dispatch)."""
    bs, slots = expected.shape
    in_range = (token >= 0) & (token < bs) & (slot >= 0) & (slot < slots)
    seen = torch.zeros(bs * slots, dtype=torch.int64, device=token.device)
    seen.index_add_(0, (token * slots + slot)[in_range], torch.ones_like(token[in_range]))
    if not bool(in_range.all()) or not torch.equal(seen.view(bs, slots), expected.long()):
        fail(op, assist_arg, "and ep_send_counts must come from the paired dispatch (one returned row per "
             "dispatched token and slot)", f"{token.numel()} rows received for {int(expected.sum())} dispatched")


def combine_sum(op: str, cfg: DistConfig, inputs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(acc (BS, H) fp32, processed (BS,) bool)``: the combined value of each token before rounding."""
    expert_ids, expert_scales = inputs["expert_ids"], inputs["expert_scales"]
    mask = inputs["x_active_mask"]
    bs, k = expert_ids.shape
    h = inputs["expand_x"].size(1)
    dev = expert_ids.device
    rows, token, slot = _return_rows(op, cfg, inputs)
    ids = expert_ids.long()
    active = active_slots(mask, bs, k, dev)
    processed = valid_tokens(mask, bs, dev)
    moe_end, zero_end, copy_end, const_end = cfg.special_bounds
    expected = torch.cat([active & (ids < moe_end), processed.unsqueeze(1).expand(bs, cfg.n_shared)], dim=1)
    _check_received(op, inputs["assist_arg"], expected, token, slot)

    # Row of each (token, slot) among the received ones, slot-major so that a block's tokens of one
    # slot are a contiguous index; absent pairs (0 there) are zeroed after the gather.
    slots = k + cfg.n_shared
    pos = torch.zeros(slots * bs, dtype=torch.int64, device=dev)
    pos[slot * bs + token] = torch.arange(token.numel(), device=dev)
    pos, absent = pos.view(slots, bs), (~expected if bool((~expected).any()) else None)
    wide = accumulator(inputs["expand_x"].dtype)
    weights = expert_scales.to(wide)
    ori = inputs["ori_x"].to(wide) if inputs["ori_x"] is not None else None
    acc = None
    if absent is None and const_end == zero_end:   # every slot a received row, no copy/const experts configured
        acc = fused_slot_sum(rows, pos, weights)
    if acc is None:
        acc = _weighted_sum(rows, pos, absent, weights, ids, active, ori, inputs, cfg, h)
    if inputs["shared_expert_x"] is not None:
        acc = acc + inputs["shared_expert_x"].reshape(bs, h).to(wide)
    return acc, processed


def _weighted_sum(rows: Tensor, pos: Tensor, absent: Optional[Tensor], weights: Tensor, ids: Tensor, active: Tensor,
                  ori: Optional[Tensor], inputs: dict[str, Any], cfg: DistConfig, h: int) -> Tensor:
    """SPEC §4.3 step 3 with ATen ops, token block by token block: ``(BS, H)`` in ``weights``' dtype.
    ``rows`` ``(R, H)`` received, ``pos`` ``(K + n_shared, BS)`` the row of each (slot, token),
    ``absent`` ``(BS, K + n_shared)`` bool where none was received (a zero row) or None."""
    bs, k = ids.shape
    slots, dev, wide = pos.size(0), ids.device, weights.dtype
    _, zero_end, copy_end, const_end = cfg.special_bounds
    acc = zeroed((bs, h), wide, dev)
    block = max(1, BLOCK_ELEMENTS // max(h, 1))
    row = rows.new_empty((min(block, bs), h))    # slot j's row of each token of the block
    widen = row.dtype != wide
    term = acc.new_empty(row.shape) if widen else row
    for first in range(0, bs, block):            # token blocks: each one's accumulator stays in cache
        t = slice(first, min(first + block, bs))
        a, r, w_r = acc[t], row[:t.stop - first], term[:t.stop - first]
        for j in range(k):                       # fixed slot order 0..K-1, as the kernel sums
            w = weights[t, j:j + 1]
            slot_rows = _slot_rows(rows, pos[j, t], None if absent is None else absent[t, j:j + 1], r)
            if widen:                    # first: a same-dtype multiply vectorizes, a mixed one does not
                w_r.copy_(slot_rows)
            a += w_r.mul_(w)             # (w_r is slot_rows' memory when the rows are already wide)
            if copy_end > zero_end:
                e = ids[t, j]
                a += torch.where((active[t, j] & (e >= zero_end) & (e < copy_end)).unsqueeze(1), ori[t] * w, 0.0)
            if const_end > copy_end:
                e = ids[t, j]
                is_const = active[t, j] & (e >= copy_end) & (e < const_end)
                a += torch.where(is_const.unsqueeze(1), _const_expert(inputs, ori[t], e - copy_end) * w, 0.0)
        for q in range(k, slots):                # shared experts: unweighted (SPEC §9 #3)
            a += _slot_rows(rows, pos[q, t], None if absent is None else absent[t, q:q + 1], r)
    return acc


def _slot_rows(rows: Tensor, pos: Tensor, absent: Optional[Tensor], out: Tensor) -> Tensor:
    """``out`` ``(n, H)`` = ``rows[pos]`` (``pos`` ``(n,)`` int64 into ``rows`` ``(R, H)``), zero where
    ``absent`` ``(n, 1)`` bool (no row was received for that token and slot: a zero row)."""
    if rows.size(0):
        torch.index_select(rows, 0, pos, out=out)
    if absent is not None:
        out.masked_fill_(absent, 0)
    return out


def _const_expert(inputs: dict[str, Any], ori: Tensor, c: Tensor) -> Tensor:
    """``ori_x * alpha_1[c] + v[c] * alpha_2[c]`` in ori's (the accumulator) dtype; alphas ``(Q,)``
    scalars or ``(Q, H)`` rows."""
    c = c.clamp(0, inputs["const_expert_v"].size(0) - 1)
    a1, a2 = (inputs[name].to(ori.dtype)[c] for name in ("const_expert_alpha_1", "const_expert_alpha_2"))
    a1, a2 = (a if a.dim() == 2 else a.unsqueeze(1) for a in (a1, a2))
    return ori * a1 + inputs["const_expert_v"].to(ori.dtype)[c] * a2


def _inputs(expand_x, expert_ids, assist, assist_arg, ep_send_counts, expert_scales, group_ep, kwargs) -> dict:
    names = ("tp_send_counts", "x_active_mask", "shared_expert_x", "elastic_info", "ori_x", "const_expert_alpha_1",
             "const_expert_alpha_2", "const_expert_v")
    inputs = {name: kwargs.get(name) for name in names}
    inputs.update(expand_x=expand_x, expert_ids=expert_ids, assist=assist, assist_arg=assist_arg,
                  ep_send_counts=ep_send_counts, expert_scales=expert_scales, group_ep=group_ep,
                  group_tp=kwargs.get("group_tp", ""), comm_quant_mode=kwargs.get("comm_quant_mode", 0),
                  global_bs=kwargs.get("global_bs", 0))
    return inputs


def moe_distribute_combine_v2(config: DistConfig, expand_x: Tensor, expert_ids: Tensor,
                              assist_info_for_combine: Tensor, ep_send_counts: Tensor, expert_scales: Tensor,
                              group_ep: str, ep_world_size: int, ep_rank_id: int, moe_expert_num: int,
                              **kwargs: Any) -> Tensor:
    """``(BS, H)`` in the ``expand_x`` dtype: ``round(acc)``, zero rows for unprocessed tokens. The
    world, ranks and expert layout come from the validated ``config``; the values of ids, counts and
    assist info are checked here, agreed on by every rank."""
    inputs = _inputs(expand_x, expert_ids, assist_info_for_combine, "assist_info_for_combine", ep_send_counts,
                     expert_scales, group_ep, kwargs)
    acc, processed = combine_sum(combine_proto.NAME, config, inputs)
    if not bool(processed.all()):       # (a full pass over the rows, for masked-out tokens only)
        acc.masked_fill_(~processed.unsqueeze(1), 0.0)
    return acc.to(expand_x.dtype)


def moe_distribute_combine_add_rms_norm(config: DistConfig, expand_x: Tensor, expert_ids: Tensor,
                                        expand_idx: Tensor, ep_send_counts: Tensor, expert_scales: Tensor,
                                        residual_x: Tensor, gamma: Tensor, group_ep: str, ep_world_size: int,
                                        ep_rank_id: int, moe_expert_num: int, *, norm_eps: float = 1e-6,
                                        **kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``(y (BS,1,H), rstd (BS,1,1) fp32 (fp64 for fp64), x (BS,1,H))`` with SPEC §4.3's rounding steps:
    ``xs = acc + residual`` (acc unrounded), ``rstd = 1 / sqrt(sum(xs*xs * (1/H)) + eps)``,
    ``y = round(round(xs * rstd) * gamma)``, ``x = round(xs)``. ``config`` as for combine_v2."""
    inputs = _inputs(expand_x, expert_ids, expand_idx, "expand_idx", ep_send_counts, expert_scales, group_ep, kwargs)
    acc, processed = combine_sum(rms_proto.NAME, config, inputs)
    dtype, h = config.dtype, config.hidden
    xs = acc + residual_x.reshape(acc.shape).to(acc.dtype)
    mean_sq = (xs * xs * torch.tensor(1.0 / h, dtype=acc.dtype)).sum(dim=1, keepdim=True)
    rstd = mean_sq.new_tensor(1.0) / torch.sqrt(mean_sq + norm_eps)     # IEEE division, not a reciprocal
    y = ((xs * rstd).to(dtype).to(acc.dtype) * gamma.to(acc.dtype)).to(dtype)
    keep = processed.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype, device=acc.device)
    return (torch.where(keep, y, zero).unsqueeze(1), torch.where(keep, rstd, 0.0).unsqueeze(1),
            torch.where(keep, xs.to(dtype), zero).unsqueeze(1))
