"""Reference kernel of ``npu_moe_distribute_dispatch_v2`` (SPEC §3.4), canonical A3 layout.

Per rank, vectorized over all (token, slot) copies:

1. plan: every active MoE slot ``(i, j)`` with ``e = expert_ids[i, j] < M`` is a copy for rank
   ``S + e // L``, local expert ``e % L``; every valid token also goes to shared expert ``q`` on
   rank ``r % R_sh + q * R_sh`` (slot ``K + q``). Copies are sorted by (destination, local expert,
   token), which is the all-to-all send order;
2. payload: the token row (``quant_mode`` 0) or its int8 dynamic quantization per copy with the
   scale ``1 / ds`` (``quant_mode`` 2, optional smooth ``scales`` row of the destination expert);
3. agreement (``_moe_exchange.Exchange.agree``): one fixed-size all-gather over the TP pair (T == 2)
   then over the EP group carries every rank's verdict on its inputs and the attributes that shape
   the rows (``_fields``), so every rank of both groups stops together on a rejection or a
   disagreement; the EP all-gather also carries the counts per destination and local expert
   and unique payload rows per destination (the count exchange; a separate all-gather after it
   only when ``W * (L + 1)`` exceeds its count area);
4. EP exchange: one payload exchange. Each destination's segment holds its payload rows
   ``[payload | dynamic scale]`` (``RowLayout``), one per (destination, token) a token reaches
   through any of its slots (one per copy with smooth ``scales``, whose payload depends on the
   expert), then the meta words of its copies in send order ``[token, slot, payload row(, expand
   scale bits)]`` int32, padded to whole rows; the receiver expands the rows per copy in step 5;
5. receive layout: rows sorted local-expert-major, source-minor, token order kept;
6. TP (T == 2): after the EP exchange the peer's rows are appended after ours with one count
   all-gather and one payload all-gather.

Implementation-defined outputs (SPEC §3.4), all zero where not written:
``assist_info_for_combine[3*row : 3*row+3] = (source rank, source token, slot)`` for own rows;
``ep_recv_counts`` inclusive prefix sums over (local expert, source) (peer's at ``[W:2W]`` with
TP); ``tp_recv_counts = [rows of tp rank 0, rows of tp rank 1]`` (T == 1: ``[own rows]``);
``expand_scales[row]`` = the source's ``expert_scales`` weight for that copy (0 for shared rows).
Rows past the received count are zero (``_zeroed_outputs``): on CPU ``expand_x`` comes from a
mapping whose untouched pages cost nothing, reused across calls with its written rows resident.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import OpValidationError, fail
from ..op_protos._proto import OutSpec
from ..op_protos.moe_distribute_common import DistConfig, validate_id_values, validate_mask_values
from ..op_protos.moe_distribute_dispatch_v2 import NAME, PROTO, QUANT_DYNAMIC, DispatchConfig
from ._moe_exchange import Field, RowLayout, dist_fields, exchange_rows, open_exchange, peer_guard, staging_rows
from ._zeroed import zero_past, zeroed
from ._moe_tokens import active_slots, valid_tokens

Tensor = torch.Tensor


def dynamic_quant(rows: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row dynamic int8 quantization of fp32 ``rows`` ``(N, H)`` (SPEC §3.4 pseudo-code).

    Returns ``q`` ``(N, H)`` int8 and ``scale`` ``(N,)`` fp32 = ``1 / ds`` with ``ds = 127 / amax``.
    Rows with ``amax == 0`` quantize to zeros with scale 0 (the device's NaN path is undefined).
    """
    amax = rows.abs().amax(dim=1, keepdim=True)
    # tensor / tensor is IEEE division; ``scalar / tensor`` would multiply by a rounded reciprocal.
    ds = amax.new_tensor(127.0) / amax
    q = torch.where(amax > 0, torch.round(rows * ds), 0.0).to(torch.int8)
    return q, (amax.new_tensor(1.0) / ds).squeeze(1)


def _plan(cfg: DistConfig, expert_ids: Tensor, x_active_mask: Optional[Tensor], dedup: bool = True) -> dict[str, Tensor]:
    """Every copy this rank sends, in send order: token, slot, destination rank, local expert and
    the smooth-scales row (``n_sh + e`` for MoE expert ``e``, ``q`` for shared expert ``q``)."""
    bs, k = expert_ids.shape
    dev = expert_ids.device
    ids = expert_ids.long()
    moe = active_slots(x_active_mask, bs, k, dev) & (ids < cfg.moe_experts)   # special experts stay local
    tok, slot = moe.nonzero(as_tuple=True)
    e = ids[tok, slot]
    dst = cfg.shared_ranks + e // cfg.moe_local_experts
    local = e % cfg.moe_local_experts
    scale_row = cfg.n_shared + e
    if cfg.n_shared:
        shared_tok = valid_tokens(x_active_mask, bs, dev).nonzero().squeeze(1).repeat(cfg.n_shared)
        q = torch.arange(cfg.n_shared, device=dev).repeat_interleave(shared_tok.numel() // cfg.n_shared)
        r_sh = cfg.ranks_per_shared_expert
        tok, slot = torch.cat([tok, shared_tok]), torch.cat([slot, k + q])
        dst = torch.cat([dst, cfg.rank % r_sh + q * r_sh])
        local, scale_row = torch.cat([local, torch.zeros_like(q)]), torch.cat([scale_row, q])
    order = torch.argsort((dst * cfg.moe_local_experts + local) * max(bs, 1) + tok, stable=True)
    plan = {"tok": tok[order], "slot": slot[order], "dst": dst[order], "local": local[order],
            "scale_row": scale_row[order]}
    # Payload rows: one per (destination, token) when the payload is the token row alone (``dedup``),
    # else one per copy; ``unique_idx``: each copy's payload row within its destination's rows.
    n = plan["tok"].numel()
    key = plan["dst"] * max(bs, 1) + plan["tok"] if dedup else torch.arange(n, device=dev)
    ukey, inverse = torch.unique(key, sorted=True, return_inverse=True)
    first = torch.zeros(ukey.numel(), dtype=torch.int64, device=dev)
    first.scatter_(0, inverse.flip(0), torch.arange(n - 1, -1, -1, device=dev))   # a copy of each payload row
    udst = plan["dst"][first]
    unique_counts = torch.bincount(udst, minlength=cfg.world)
    plan.update(unique_tok=plan["tok"][first], unique_scale_row=plan["scale_row"][first],
                unique_counts=unique_counts, unique_idx=inverse - (unique_counts.cumsum(0) - unique_counts)[plan["dst"]],
                copy_counts=torch.bincount(plan["dst"], minlength=cfg.world))
    return plan


def _local_error(cfg: DistConfig, expert_ids: Tensor, x_active_mask: Optional[Tensor],
                 elastic_info: Optional[Tensor]) -> Optional[OpValidationError]:
    """The value rules (SPEC §3.5 doc-only rules), as an error to share with the peers."""
    try:
        validate_id_values(NAME, expert_ids, cfg.special_bounds[3])
        validate_mask_values(NAME, x_active_mask)
        if elastic_info is not None and int(elastic_info[0]) != 0:
            # Scale-down remaps ranks and experts (SPEC §10.8): not implemented, so refuse it.
            fail(NAME, "elastic_info", "must not request a scale-down (elastic_info[0] != 0 is not supported)",
                 int(elastic_info[0]))
    except OpValidationError as error:
        return error
    return None


def _fields(config: DispatchConfig, has_expert_scales: bool, global_bs: int) -> list[Field]:
    """What every rank must agree on before rows move (they shape the rows and their meaning)."""
    cfg = config.dist
    return dist_fields(cfg, "x", global_bs) + [
        Field("quant_mode", config.quant_mode), Field("expert_scales (given or not)", int(has_expert_scales)),
        # A = global_bs_real * ... sizes every rank's buffers from this rank's BS when global_bs is 0.
        Field("x rows (BS; ranks may differ only when global_bs > 0)", cfg.num_tokens if global_bs == 0 else 0),
    ]


def moe_distribute_dispatch_v2(config: DispatchConfig, x: Tensor, expert_ids: Tensor, group_ep: str,
                               ep_world_size: int, ep_rank_id: int, moe_expert_num: int, *,
                               scales: Optional[Tensor] = None, x_active_mask: Optional[Tensor] = None,
                               expert_scales: Optional[Tensor] = None, elastic_info: Optional[Tensor] = None,
                               group_tp: str = "", global_bs: int = 0, **_: object) -> tuple[Tensor, ...]:
    """Returns the 7 outputs of SPEC §3.2 in the canonical layout of the module docstring. ``x``
    ``(BS, H)``, ``expert_ids`` ``(BS, K)`` int32 (its values are checked here, agreed on by every
    rank); sizes, TP rank and modes come from the validated ``config``."""
    cfg = config.dist
    quant_mode, tp_world_size = config.quant_mode, cfg.tp_world
    exchange = open_exchange(NAME, group_ep, cfg.world, cfg.rank, group_tp, tp_world_size, cfg.tp_rank)
    error = _local_error(cfg, expert_ids, x_active_mask, elastic_info)
    lm, world = cfg.moe_local_experts, cfg.world
    plan = counts = None
    if error is None:           # the plan reads the ids' values: only once they passed their checks
        plan = _plan(cfg, expert_ids, x_active_mask, dedup=quant_mode != QUANT_DYNAMIC or scales is None)
        copies = torch.bincount(plan["dst"] * lm + plan["local"], minlength=world * lm).view(world, lm)
        counts = torch.cat([copies, plan["unique_counts"].unsqueeze(1)], dim=1)     # (W, L + 1)
    # The counts ride on the agreement when they fit (W * (L + 1) entries: agreed values, so every
    # rank decides alike), else they are exchanged after it (``Exchange.counts_after``).
    carried = counts if counts is not None and exchange.carries(counts.numel()) else None
    h, k = cfg.hidden, cfg.top_k
    payload = RowLayout(((x.dtype if quant_mode != QUANT_DYNAMIC else torch.int8, h),)
                        + ((torch.float32, 1),) * (quant_mode == QUANT_DYNAMIC))
    row_bytes = -(-payload.row_bytes // 4) * 4          # meta rows are int32 words
    n_meta = 3 + (expert_scales is not None)            # token, slot, payload row[, expand scale bits]
    send_rows = None if counts is None else counts[:, lm] + _meta_rows(counts[:, :lm].sum(1), n_meta, row_bytes)

    def pack() -> Tensor:                               # while the agreement is in flight
        return _pack(payload, row_bytes, n_meta, plan, counts[:, lm], send_rows, x, scales, expert_scales,
                     quant_mode, k, exchange.ep)

    ep_rows, _, send = exchange.agree(_fields(config, expert_scales is not None, global_bs), error, x.device,
                                      counts=carried, meanwhile=pack)
    recv_all = exchange.counts_after(ep_rows, counts)
    recv_counts, recv_unique = recv_all[:, :lm], recv_all[:, lm]

    own = int(recv_counts.sum())
    outs = _zeroed_outputs(PROTO.infer_shape(config), own, x.device)
    expand_x, dynamic_scales, assist, token_nums, ep_counts, tp_counts, expand_scales = outs
    recv_rows = recv_unique + _meta_rows(recv_counts.sum(1), n_meta, row_bytes)
    buf = exchange_rows(NAME, exchange.ep, send, send_rows, recv_rows)

    # Each source's segment: its unique payload rows, then its copies' meta words (send order).
    starts = (recv_rows.cumsum(0) - recv_rows).tolist()
    flat = buf.view(-1)
    metas = []
    for s_, (start, u, c) in enumerate(zip(starts, recv_unique.tolist(), recv_counts.sum(1).tolist())):
        words = flat[(start + u) * row_bytes:(start + u) * row_bytes + c * n_meta * 4].view(torch.int32)
        m = words.view(c, n_meta).clone()
        m[:, 2] += start                                    # payload row in the whole receive buffer
        metas.append(m)
    meta_all = torch.cat(metas) if metas else torch.zeros((0, n_meta), dtype=torch.int32, device=x.device)
    parts = payload.unpack(buf)

    # Receive order is (source, local expert, token); the layout is (local expert, source, token).
    lo = cfg.local_experts
    code = torch.repeat_interleave(torch.arange(world * lm, device=x.device), recv_counts.reshape(-1))
    source, local = code // lm, code % lm
    order = torch.argsort(local * world + source, stable=True)
    meta = meta_all[order]
    prow = meta[:, 2].long()
    torch.index_select(parts[0], 0, prow, out=expand_x[:own])
    if quant_mode == QUANT_DYNAMIC:
        dynamic_scales[:own] = parts[1][prow, 0]
    if expert_scales is not None:
        expand_scales[:own] = meta[:, 3].view(torch.float32)
    assist[:3 * own] = torch.stack([source[order].int(), meta[:, 0], meta[:, 1]], dim=1).reshape(-1)

    per_expert = recv_counts[:, :lo].t()                             # (L, W) rows per (local expert, source)
    _write_prefix(ep_counts, 0, per_expert.reshape(-1).cumsum(0))
    nums = per_expert.sum(1)
    if tp_world_size == 2:
        nums = nums + _tp_gather(exchange.tp, cfg, expand_x, dynamic_scales, ep_counts, tp_counts, own, quant_mode,
                                 per_expert.reshape(-1))
    elif tp_world_size == 1:
        tp_counts[0] = own
    token_nums[:lo] = nums.cumsum(0) if config.expert_token_nums_type == 0 else nums
    return outs


def _zeroed_outputs(specs: Sequence[OutSpec], own: int, device: torch.device) -> tuple[Tensor, ...]:
    """Tensors of ``specs`` (``infer_shape``'s), zero-filled but for ``expand_x``'s first ``own`` rows,
    which the caller writes (``_zeroed.zero_past``): on CPU its padding rows, most of it, are never
    written."""
    expand_x, *rest = specs
    return (zero_past(own, expand_x.shape, expand_x.dtype, device),) + tuple(
        zeroed(spec.shape, spec.dtype, device) for spec in rest)


def _meta_rows(copies: Tensor, n_meta: int, row_bytes: int) -> Tensor:
    """Rows of ``row_bytes`` holding ``copies`` meta entries of ``n_meta`` int32 each (per rank)."""
    return -(-(copies * (n_meta * 4)) // row_bytes)


def _pack(payload: RowLayout, row_bytes: int, n_meta: int, plan: dict[str, Tensor], unique_counts: Tensor,
          send_rows: Tensor, x: Tensor, scales: Optional[Tensor], expert_scales: Optional[Tensor], quant_mode: int,
          k: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """The send buffer ``(rows, row_bytes)`` uint8, in ``group``'s send staging
    (``_moe_exchange.staging_rows``): per destination rank, its unique payload rows ``[payload |
    dyn scale]`` (one per token, or per copy with smooth scales), then the meta words of its copies
    in send order ``[token, slot, payload row in the segment(, expand scale bits)]``."""
    tok, slot = plan["tok"], plan["slot"]
    total = int(send_rows.sum())
    buf = staging_rows("send", "" if group is None else group.group_name, total, row_bytes, x.device)
    for start, end in payload.gaps + ((payload.row_bytes, row_bytes),):     # bytes no field covers: zeros
        if end > start:
            buf[:, start:end].zero_()
    views = payload.unpack(buf)
    utok, uidx = plan["unique_tok"], plan["unique_idx"]
    if quant_mode == QUANT_DYNAMIC:
        rows = x.index_select(0, utok).float()
        if scales is not None:
            rows = rows * scales.index_select(0, plan["unique_scale_row"])
        q, dyn = dynamic_quant(rows)
    meta = torch.stack([tok.int(), slot.int(), uidx.int()], dim=1)
    if expert_scales is not None:
        moe = slot < k
        weight = torch.where(moe, expert_scales[tok, slot.clamp(max=k - 1)], 0.0).to(torch.float32)
        meta = torch.cat([meta, weight.view(torch.int32).unsqueeze(1)], dim=1)
    flat = buf.view(-1)
    row, first, copy_first = 0, 0, 0
    copies = plan["copy_counts"].tolist()
    for u, c, r in zip(unique_counts.tolist(), copies, send_rows.tolist()):
        if u:
            if quant_mode == QUANT_DYNAMIC:
                views[0][row:row + u].copy_(q[first:first + u])
                views[1][row:row + u].copy_(dyn[first:first + u].unsqueeze(1))
            else:
                torch.index_select(x, 0, utok[first:first + u], out=views[0][row:row + u])
        words = flat[(row + u) * row_bytes:(row + r) * row_bytes].view(torch.int32)
        words[:c * n_meta].copy_(meta[copy_first:copy_first + c].reshape(-1))
        words[c * n_meta:].zero_()
        row, first, copy_first = row + r, first + u, copy_first + c
    return buf


def _write_prefix(out: Tensor, start: int, values: Tensor) -> None:
    """``out[start:start+n] = values``, cut to the buffer (Meta's lengths may be shorter, e.g. with
    ``expert_scales`` and TP, where it drops the TP factor)."""
    n = max(0, min(values.numel(), out.numel() - start))
    out[start:start + n] = values[:n].to(out.dtype)


def _tp_gather(group: dist.ProcessGroup, cfg: DistConfig, expand_x: Tensor, dynamic_scales: Tensor,
               ep_counts: Tensor, tp_counts: Tensor, own: int, quant_mode: int, own_counts: Tensor) -> Tensor:
    """Append the TP peer's rows after ours (SPEC §3.4 TP all-gather); returns the peer's row count
    ``(1,)`` int64. ``own_counts`` ``(L * W,)``: our rows per (local expert, source)."""
    t = cfg.tp_rank
    layout = RowLayout(((expand_x.dtype, expand_x.size(1)),) + ((torch.float32, 1),) * (quant_mode == QUANT_DYNAMIC))
    info = torch.cat([own_counts.new_tensor([own]), own_counts.to(torch.int64)])
    infos = info.new_empty(2 * info.numel())
    with peer_guard(NAME, "group_tp", group, "TP all-gather"):
        dist.all_gather_single(infos, info, group=group)
        infos = infos.view(2, -1)
        rows = int(infos[:, 0].max())
        parts = [expand_x[:rows]] + ([dynamic_scales[:rows].unsqueeze(1)] if quant_mode == QUANT_DYNAMIC else [])
        mine = layout.pack(parts)
        gathered = mine.new_empty((2 * rows, mine.size(1)))
        dist.all_gather_single(gathered, mine, group=group)
    peer = int(infos[1 - t, 0])
    peer_parts = layout.unpack(gathered[(1 - t) * rows:(1 - t) * rows + peer])
    expand_x[own:own + peer] = peer_parts[0]
    if quant_mode == QUANT_DYNAMIC:
        dynamic_scales[own:own + peer] = peer_parts[1][:, 0]
    _write_prefix(ep_counts, cfg.world, infos[1 - t, 1:].cumsum(0))
    tp_counts[t], tp_counts[1 - t] = own, peer
    return own_counts.new_tensor([peer])
