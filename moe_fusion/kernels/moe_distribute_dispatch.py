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
   disagreement;
4. EP exchange: one count exchange (counts per destination and local expert), one payload
   exchange of packed rows ``[payload | dynamic scale | expand scale | token, slot]``
   (``RowLayout``: each field aligned to its element size);
5. receive layout: rows sorted local-expert-major, source-minor, token order kept;
6. TP (T == 2): after the EP exchange the peer's rows are appended after ours with one count
   all-gather and one payload all-gather.

Implementation-defined outputs (SPEC §3.4), all zero where not written:
``assist_info_for_combine[3*row : 3*row+3] = (source rank, source token, slot)`` for own rows;
``ep_recv_counts`` inclusive prefix sums over (local expert, source) (peer's at ``[W:2W]`` with
TP); ``tp_recv_counts = [rows of tp rank 0, rows of tp rank 1]`` (T == 1: ``[own rows]``);
``expand_scales[row]`` = the source's ``expert_scales`` weight for that copy (0 for shared rows).
Rows past the received count are zero: the outputs come zero-filled from ``calloc`` on CPU
(``_zeroed_outputs``), whose untouched pages cost nothing.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from ..errors import OpValidationError, fail
from ..op_protos._proto import OutSpec
from ..op_protos.moe_distribute_common import DistConfig, validate_id_values, validate_mask_values
from ..op_protos.moe_distribute_dispatch_v2 import NAME, PROTO, QUANT_DYNAMIC, DispatchConfig
from ._moe_exchange import (Field, RowLayout, dist_fields, exchange_counts, exchange_rows, open_exchange,
                            peer_guard)
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


def _plan(cfg: DistConfig, expert_ids: Tensor, x_active_mask: Optional[Tensor]) -> dict[str, Tensor]:
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
    return {"tok": tok[order], "slot": slot[order], "dst": dst[order], "local": local[order],
            "scale_row": scale_row[order]}


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
    exchange.agree(_fields(config, expert_scales is not None, global_bs), error, x.device)

    outs = _zeroed_outputs(PROTO.infer_shape(config), x.device)
    expand_x, dynamic_scales, assist, token_nums, ep_counts, tp_counts, expand_scales = outs
    h, k = cfg.hidden, cfg.top_k
    plan = _plan(cfg, expert_ids, x_active_mask)
    lm = cfg.moe_local_experts
    send_counts = torch.bincount(plan["dst"] * lm + plan["local"], minlength=cfg.world * lm).view(cfg.world, lm)
    recv_counts = exchange_counts(NAME, exchange.ep, send_counts)

    layout = RowLayout(((x.dtype if quant_mode != QUANT_DYNAMIC else torch.int8, h),)
                       + ((torch.float32, 1),) * (quant_mode == QUANT_DYNAMIC)
                       + ((torch.float32, 1),) * (expert_scales is not None) + ((torch.int32, 2),))
    send = _pack(layout, plan, x, scales, expert_scales, quant_mode, k, exchange.ep)
    buf = exchange_rows(NAME, exchange.ep, send, send_counts.sum(1), recv_counts.sum(1))
    parts = layout.unpack(buf)

    # Receive order is (source, local expert, token); the layout is (local expert, source, token).
    lo = cfg.local_experts
    code = torch.repeat_interleave(torch.arange(cfg.world * lm, device=x.device), recv_counts.reshape(-1))
    source, local = code // lm, code % lm
    order = torch.argsort(local * cfg.world + source, stable=True)
    own = order.numel()
    torch.index_select(parts[0], 0, order, out=expand_x[:own])
    if quant_mode == QUANT_DYNAMIC:
        dynamic_scales[:own] = parts[1][order, 0]
    if expert_scales is not None:
        expand_scales[:own] = parts[-2][order, 0]
    meta = parts[-1][order]
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


def _zeroed_outputs(specs: Sequence[OutSpec], device: torch.device) -> tuple[Tensor, ...]:
    """Zero-filled tensors of ``specs`` (``infer_shape``'s). On CPU each is a ``calloc`` buffer
    (numpy's zeros): the OS maps a large one's pages zero-filled when first touched, so the
    padding rows past the received count, most of ``expand_x``, are never written (elsewhere, and
    for empty tensors, which numpy gives stride 0, ``torch.zeros``)."""
    def zeros(spec: OutSpec) -> Tensor:
        nbytes = math.prod(spec.shape) * spec.dtype.itemsize
        if device.type != "cpu" or nbytes == 0:
            return torch.zeros(spec.shape, dtype=spec.dtype, device=device)
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(spec.dtype).view(spec.shape)

    return tuple(zeros(spec) for spec in specs)


def _pack(layout: RowLayout, plan: dict[str, Tensor], x: Tensor, scales: Optional[Tensor],
          expert_scales: Optional[Tensor], quant_mode: int, k: int, group: Optional[dist.ProcessGroup]) -> Tensor:
    """The send buffer ``(copies, layout.row_bytes)`` uint8: ``[payload | dyn scale | expand scale | token, slot]``,
    in ``group``'s send staging (``_moe_exchange.staging_rows``)."""
    tok, slot = plan["tok"], plan["slot"]
    buf = layout.empty(tok.numel(), x.device, ("send", "" if group is None else group.group_name))
    views = layout.unpack(buf)
    if quant_mode == QUANT_DYNAMIC:
        rows = x.index_select(0, tok).float()
        if scales is not None:
            rows = rows * scales.index_select(0, plan["scale_row"])
        q, dyn = dynamic_quant(rows)
        views[0].copy_(q)
        views[1].copy_(dyn.unsqueeze(1))
    else:
        torch.index_select(x, 0, tok, out=views[0])
    if expert_scales is not None:
        moe = slot < k
        weight = expert_scales[tok, slot.clamp(max=k - 1)]
        views[-2].copy_(torch.where(moe, weight, 0.0).unsqueeze(1))
    views[-1].copy_(torch.stack([tok, slot], dim=1))
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
