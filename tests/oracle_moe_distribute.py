"""World-level oracles for MoE dispatch_v2 / combine_v2 / combine_add_rms_norm (SPEC §3.4, §4.3).

Written from SPEC alone, independently of ``moe_fusion.kernels``, in the style of DeepEP's
``refs.py``: plain Python loops over source ranks, tokens and top-k slots, torch only for the
per-row arithmetic (fp32 vector ops, elementwise IEEE with round-to-nearest-even, as SPEC says
the device does them). Each function takes *every* rank's inputs and returns *every* rank's
outputs.

Rank numbering. ``world = W * max(T, 1)`` processes. Without TP (``T in (0, 1)``) the global
rank is the EP rank. With ``T == 2`` there are two independent EP domains, one per TP index
``t``; global rank ``g`` has ``t = g % 2`` and EP rank ``e = g // 2`` (SPEC §3.4, the [P] test:
``ep_ranks = range(t, world, 2)``, ``tp_ranks = [e*2, e*2+1]``).

Outputs use the canonical A3 layouts of SPEC §3.4/§4.3. What SPEC calls implementation-defined
beyond that (padding rows, the assist tail, rows of unprocessed tokens) is zero, the project's
documented choice (DESIGN "The op contract": "Padding rows are zero, documented"; SPEC §4.3 [I]
"The reference writes zeros").
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

F32 = torch.float32


@dataclasses.dataclass(frozen=True)
class MoeAttrs:
    """Attributes shared by a dispatch_v2 and its paired combine (SPEC §1, §8.2)."""
    ep_world_size: int                     # W
    moe_expert_num: int                    # M
    tp_world_size: int = 0                 # T (0, 1 or 2)
    shared_expert_num: int = 1             # n_sh
    shared_expert_rank_num: int = 0        # S
    quant_mode: int = 0                    # 0 or 2 (dispatch)
    global_bs: int = 0
    expert_token_nums_type: int = 1
    zero_expert_num: int = 0               # Z
    copy_expert_num: int = 0               # C
    const_expert_num: int = 0              # Q
    comm_quant_mode: int = 0               # 0 or 2 (combine)

    # ---- derived quantities (SPEC §1, §3.2) ----
    @property
    def W(self) -> int:
        return self.ep_world_size

    @property
    def S(self) -> int:
        return self.shared_expert_rank_num

    @property
    def M(self) -> int:
        return self.moe_expert_num

    @property
    def tp(self) -> int:
        """Number of EP domains / TP width: 2 with TP, else 1."""
        return 2 if self.tp_world_size == 2 else 1

    @property
    def world(self) -> int:
        return self.W * self.tp

    @property
    def n_sh_eff(self) -> int:
        """SPEC §3.3: the tiling forces ``shared_expert_num := 0`` when ``S == 0``."""
        return 0 if self.S == 0 else self.shared_expert_num

    @property
    def R_sh(self) -> int:
        return self.S // self.n_sh_eff if self.n_sh_eff else 0

    @property
    def L_moe(self) -> int:
        return self.M // (self.W - self.S)

    def local_expert_num(self, ep_rank: int) -> int:
        return 1 if ep_rank < self.S else self.L_moe

    def is_shared_rank(self, ep_rank: int) -> bool:
        return ep_rank < self.S

    def global_bs_real(self, bs: int) -> int:
        return self.global_bs if self.global_bs != 0 else bs * self.W

    def capacity(self, ep_rank: int, bs: int, k: int) -> int:
        """``A`` of SPEC §3.2 (the Meta's ``a``) for an EP rank whose own ``x`` has ``bs`` rows."""
        gbs = self.global_bs_real(bs)
        if self.is_shared_rank(ep_rank):
            max_bs = gbs // self.W
            r = self.S // self.shared_expert_num
            return max_bs * ((self.W + r - 1) // r)
        return gbs * min(self.L_moe, k)

    # ---- rank numbering ----
    def split(self, g: int) -> Tuple[int, int]:
        """Global rank -> (EP rank, TP index)."""
        return (g // 2, g % 2) if self.tp == 2 else (g, 0)

    def join(self, ep_rank: int, t: int) -> int:
        return ep_rank * 2 + t if self.tp == 2 else ep_rank


# ----------------------------------------------------------------------------------------------
# Activity (SPEC §3.4 step 0, §4.3 "Which tokens are processed")
# ----------------------------------------------------------------------------------------------

def active_slots(bs: int, k: int, mask: Optional[Tensor]) -> Tuple[List[bool], List[List[bool]]]:
    """``(token_valid[i], slot_active[i][j])`` on one source rank."""
    if mask is None:
        return [True] * bs, [[True] * k for _ in range(bs)]
    m = mask.tolist()
    if mask.dim() == 1:
        cnt = sum(bool(v) for v in m)          # the kernel uses only the count (SPEC §10.12)
        valid = [i < cnt for i in range(bs)]
        return valid, [[v] * k for v in valid]
    slots = [[bool(v) for v in row] for row in m]
    return [any(row) for row in slots], slots


# ----------------------------------------------------------------------------------------------
# Dynamic int8 quantization (SPEC §3.4 "Payload / quantization", quant_mode 2)
# ----------------------------------------------------------------------------------------------

def dynamic_quant_row(x_row: Tensor, smooth: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One copy of one token: ``(int8 (H,), fp32 scalar dynamic_scale)``, exactly SPEC's pseudo-code."""
    xf = x_row.to(F32)
    if smooth is not None:
        xf = xf * smooth.to(F32)
    amax = xf.abs().max()
    ds = torch.tensor(127.0, dtype=F32) / amax             # fp32 division
    q = torch.round(xf * ds)                                # fp32 mul, round half to even
    return q.to(torch.int32).to(torch.int8), torch.tensor(1.0, dtype=F32) / ds


# ----------------------------------------------------------------------------------------------
# dispatch_v2
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class DispatchOut:
    """One rank's dispatch outputs, plus the bookkeeping the tests check against."""
    expand_x: Tensor
    dynamic_scales: Tensor
    assist_info_for_combine: Tensor
    expert_token_nums: Tensor
    ep_recv_counts: Tensor
    tp_recv_counts: Tensor
    expand_scales: Tensor
    total_own: int               # rows received in this rank's own EP domain
    total_peer: int              # rows appended from the TP peer (0 without TP)
    capacity: int                # A
    own_rows: List[Tuple[int, int, int]]   # (src ep rank, token, slot) of rows [0, total_own)

    def outputs(self) -> Tuple[Tensor, ...]:
        return (self.expand_x, self.dynamic_scales, self.assist_info_for_combine, self.expert_token_nums,
                self.ep_recv_counts, self.tp_recv_counts, self.expand_scales)


def dispatch_world(xs: Sequence[Tensor], expert_ids: Sequence[Tensor], attrs: MoeAttrs, *,
                   scales: Optional[Sequence[Optional[Tensor]]] = None,
                   x_active_masks: Optional[Sequence[Optional[Tensor]]] = None) -> List[DispatchOut]:
    """Every rank's ``npu_moe_distribute_dispatch_v2`` outputs (SPEC §3.4, canonical A3 layout).

    Args:
        xs: per global rank ``(BS_g, H)`` bf16/fp16(/fp32).
        expert_ids: per global rank ``(BS_g, K)`` int32, ids in ``[0, M+Z+C+Q)``, unique per row.
        attrs: the shared attributes.
        scales: per global rank optional ``(n_sh_eff + M, H)`` fp32 smooth scales (quant_mode 2);
            the *source* rank's scales quantize each copy.
        x_active_masks: per global rank optional ``(BS,)`` True-prefix or ``(BS, K)`` bool.
    """
    a = attrs
    world = a.world
    assert len(xs) == len(expert_ids) == world
    scales = list(scales) if scales is not None else [None] * world
    masks = list(x_active_masks) if x_active_masks is not None else [None] * world
    W, M, S, K = a.W, a.M, a.S, expert_ids[0].shape[1]
    H = xs[0].shape[1]
    L = a.L_moe

    own: Dict[int, dict] = {}
    for t in range(a.tp):
        ranks = [a.join(e, t) for e in range(W)]
        # streams[d][le][s] = [(token, slot, scale row index)] in increasing token order
        streams = [[[[] for _ in range(W)] for _ in range(a.local_expert_num(d))] for d in range(W)]
        for s, g in enumerate(ranks):
            ids = expert_ids[g].tolist()
            bs = len(ids)
            valid, slot_on = active_slots(bs, K, masks[g])
            for i in range(bs):
                for j in range(K):
                    e = ids[i][j]
                    if not slot_on[i][j] or e >= M:      # special experts are never sent
                        continue
                    streams[S + e // L][e % L][s].append((i, j, a.n_sh_eff + e))
                if valid[i]:
                    for q in range(a.n_sh_eff):
                        streams[(s % a.R_sh) + q * a.R_sh][0][s].append((i, K + q, q))
        for d, g in enumerate(ranks):
            rows, payload, dyn, counts, per_le = [], [], [], [], []
            for le in range(a.local_expert_num(d)):
                start = len(rows)
                for s in range(W):
                    src = ranks[s]
                    for (i, slot, sidx) in streams[d][le][s]:
                        rows.append((s, i, slot))
                        if a.quant_mode == 2:
                            sm = scales[src][sidx] if scales[src] is not None else None
                            qv, dsc = dynamic_quant_row(xs[src][i], sm)
                            payload.append(qv)
                            dyn.append(dsc)
                        else:
                            payload.append(xs[src][i].clone())
                            dyn.append(torch.tensor(0.0, dtype=F32))
                    counts.append(len(rows))                 # inclusive prefix over (le, s)
                per_le.append(len(rows) - start)
            own[g] = dict(rows=rows, payload=payload, dyn=dyn, prefix=counts, per_le=per_le)

    outs: List[DispatchOut] = []
    for g in range(world):
        d, t = a.split(g)
        bs = expert_ids[g].shape[0]
        cap = a.capacity(d, bs, K)
        mine = own[g]
        peer = own[a.join(d, 1 - t)] if a.tp == 2 else None
        out_dtype = torch.int8 if a.quant_mode == 2 else xs[g].dtype
        expand_x = torch.zeros(a.tp * cap, H, dtype=out_dtype)
        dynamic_scales = torch.zeros(a.tp * cap, dtype=F32)
        rows_payload = mine["payload"] + (peer["payload"] if peer else [])
        rows_dyn = mine["dyn"] + (peer["dyn"] if peer else [])
        for r, (p, ds) in enumerate(zip(rows_payload, rows_dyn)):
            expand_x[r] = p
            dynamic_scales[r] = ds
        assist = torch.zeros(max(bs * K, cap * 128), dtype=torch.int32)
        for r, trip in enumerate(mine["rows"]):
            assist[3 * r:3 * r + 3] = torch.tensor(trip, dtype=torch.int32)
        total_own = len(mine["rows"])
        total_peer = len(peer["rows"]) if peer else 0
        ep_recv = mine["prefix"] + (peer["prefix"] if peer else [])
        if a.tp == 2:
            etn = [total_own + total_peer]
        else:
            per_le = mine["per_le"]
            etn = per_le if a.expert_token_nums_type == 1 else list(_cumsum(per_le))
        if a.tp_world_size == 2:
            tp_recv = [0, 0]
            tp_recv[t], tp_recv[1 - t] = total_own, total_peer
        else:
            tp_recv = [0] * a.tp_world_size      # content unspecified (SPEC §3.4); tests check only the shape
        outs.append(DispatchOut(
            expand_x=expand_x, dynamic_scales=dynamic_scales, assist_info_for_combine=assist,
            expert_token_nums=torch.tensor(etn, dtype=torch.int64),
            ep_recv_counts=torch.tensor(ep_recv, dtype=torch.int32),
            tp_recv_counts=torch.tensor(tp_recv, dtype=torch.int32),
            expand_scales=torch.zeros(0, dtype=F32),
            total_own=total_own, total_peer=total_peer, capacity=cap, own_rows=mine["rows"]))
    return outs


def _cumsum(vals):
    acc = 0
    for v in vals:
        acc += v
        yield acc


# ----------------------------------------------------------------------------------------------
# combine_v2 / combine_add_rms_norm
# ----------------------------------------------------------------------------------------------

def comm_quant_row(row: Tensor) -> Tensor:
    """Combine's int8 communication quantization of one row and its dequantization on the receiver
    (SPEC §4.3 step 2, ``comm_quant_mode == 2``): groups of 8 consecutive elements."""
    xtype = row.dtype
    xf = row.to(F32).reshape(-1, 8)
    m = xf.abs().amax(dim=1, keepdim=True)
    sc = m * torch.tensor(1.0 / 127.0, dtype=F32)                 # fp32 mul by 1/127.0f
    sc_stored = sc.to(xtype)                                      # RNE to XType
    q = torch.round(torch.round((xf / sc).to(torch.float16).to(F32)))   # fp32 div -> fp16 -> rint
    q = q.to(torch.int32).to(torch.int8)
    deq = (q.to(torch.float16).to(F32) * sc_stored.to(F32)).to(xtype)
    return deq.reshape(-1)


def comm_quant_levels(row: Tensor) -> Tensor:
    """The int8 values ``comm_quant_row`` ships (for literal self-checks)."""
    xf = row.to(F32).reshape(-1, 8)
    sc = xf.abs().amax(dim=1, keepdim=True) * torch.tensor(1.0 / 127.0, dtype=F32)
    return torch.round((xf / sc).to(torch.float16).to(F32)).to(torch.int8).reshape(-1)


def _reduce_token(h: int, i: int, k: int, ids: List[int], w: Tensor, slot_on: List[bool], attrs: MoeAttrs,
                  ret_row: Callable[[int, int], Tensor], ori_x: Optional[Tensor], alpha1: Optional[Tensor],
                  alpha2: Optional[Tensor], const_v: Optional[Tensor], shared_x: Optional[Tensor]) -> Tensor:
    """SPEC §4.3 step 3 for one processed token: the fp32 accumulator ``acc`` (H,)."""
    a = attrs
    M, Z, C, Q = a.M, a.zero_expert_num, a.copy_expert_num, a.const_expert_num
    acc = torch.zeros(h, dtype=F32)
    for j in range(k):
        if not slot_on[j]:
            continue
        wj = w[j].to(F32)
        e = ids[j]
        if e < M:
            term = ret_row(i, j).to(F32) * wj
        elif e < M + Z:
            continue
        elif e < M + Z + C:
            term = ori_x[i].to(F32) * wj
        elif e < M + Z + C + Q:
            c = e - (M + Z + C)
            term = (ori_x[i].to(F32) * alpha1[c].to(F32) + const_v[c].to(F32) * alpha2[c].to(F32)) * wj
        else:
            continue
        acc = acc + term
    for q in range(a.n_sh_eff):
        term = ret_row(i, k + q).to(F32)
        acc = acc + term
    if shared_x is not None:
        term = shared_x[i].to(F32)
        acc = acc + term
    return acc


def combine_world(expand_xs: Sequence[Tensor], expert_ids: Sequence[Tensor], assist_infos: Sequence[Tensor],
                  ep_send_counts: Sequence[Tensor], expert_scales: Sequence[Tensor], attrs: MoeAttrs, *,
                  tp_send_counts: Optional[Sequence[Tensor]] = None,
                  x_active_masks: Optional[Sequence[Optional[Tensor]]] = None,
                  shared_expert_xs: Optional[Sequence[Optional[Tensor]]] = None,
                  ori_xs: Optional[Sequence[Optional[Tensor]]] = None,
                  const_expert_alpha_1: Optional[Sequence[Optional[Tensor]]] = None,
                  const_expert_alpha_2: Optional[Sequence[Optional[Tensor]]] = None,
                  const_expert_v: Optional[Sequence[Optional[Tensor]]] = None,
                  return_acc: bool = False) -> List[Tensor]:
    """Every rank's ``npu_moe_distribute_combine_v2`` output ``(BS, H)`` (SPEC §4.3).

    ``expand_xs[g]`` holds rank ``g``'s post-FFN rows in the dispatch layout; the routing is read
    back from the documented parts of the dispatch metadata only: the ``assist`` triples of rows
    ``< own_cnt`` and ``own_cnt`` itself (``ep_send_counts[W*L - 1]``, or ``tp_send_counts[t]``
    with TP). With ``return_acc`` the fp32 accumulators (``None`` for unprocessed tokens) are
    returned instead (combine_add_rms_norm builds on them).
    """
    a = attrs
    world = a.world
    n = lambda seq: list(seq) if seq is not None else [None] * world  # noqa: E731
    masks, sxs, oris = n(x_active_masks), n(shared_expert_xs), n(ori_xs)
    al1, al2, cv = n(const_expert_alpha_1), n(const_expert_alpha_2), n(const_expert_v)
    W = a.W
    xtype = expand_xs[0].dtype

    def own_cnt(g: int) -> int:
        d, t = a.split(g)
        if a.tp == 2:
            return int(tp_send_counts[g][t])
        return int(ep_send_counts[g][W * a.local_expert_num(d) - 1])

    # step 1: the rows each expert-side rank returns (TP: own row + the peer's copy of it)
    returned: Dict[Tuple[int, int, int], Tensor] = {}      # (src global rank, token, slot) -> row
    for g in range(world):
        d, t = a.split(g)
        cnt = own_cnt(g)
        assist = assist_infos[g].tolist()
        for r in range(cnt):
            row = expand_xs[g][r]
            if a.tp == 2:
                p = a.join(d, 1 - t)
                row = (row.to(F32) + expand_xs[p][own_cnt(p) + r].to(F32)).to(xtype)
            if a.comm_quant_mode == 2:                                   # step 2
                row = comm_quant_row(row)
            s, tok, slot = assist[3 * r:3 * r + 3]
            key = (a.join(s, t), tok, slot)
            assert key not in returned, f"oracle: two rows for {key}"
            returned[key] = row

    used = set()

    def fetch(g: int, tok: int, slot: int) -> Tensor:
        used.add((g, tok, slot))
        return returned[(g, tok, slot)]

    outs = []
    for g in range(world):
        ids_t = expert_ids[g]
        bs, k = ids_t.shape
        H = expand_xs[g].shape[1]
        valid, slot_on = active_slots(bs, k, masks[g])
        ids = ids_t.tolist()
        sx = sxs[g].reshape(bs, H) if sxs[g] is not None else None
        accs = []
        for i in range(bs):
            if not valid[i]:
                accs.append(None)
                continue
            acc = _reduce_token(H, i, k, ids[i], expert_scales[g][i], slot_on[i], a,
                                lambda tok, slot, g=g: fetch(g, tok, slot), oris[g], al1[g], al2[g], cv[g], sx)
            accs.append(acc)
        if return_acc:
            outs.append(accs)
        else:
            out = torch.zeros(bs, H, dtype=xtype)
            for i, acc in enumerate(accs):
                if acc is not None:
                    out[i] = acc.to(xtype)
            outs.append(out)
    # the metadata and the sources' expert_ids / masks must describe the same routing
    assert used == set(returned), f"oracle: rows returned but never consumed: {sorted(set(returned) - used)[:5]}"
    return outs


def add_rms_norm_rows(accs: List[Optional[Tensor]], residual_x: Tensor, gamma: Tensor,
                      norm_eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """SPEC §4.3 "Add + RmsNorm" on one rank: ``(y (BS,1,H), rstd (BS,1,1) fp32, x (BS,1,H))``.
    Unprocessed tokens (``acc is None``) give zeros in all three (the project's choice, SPEC §4.3 [I])."""
    bs, _, H = residual_x.shape
    xtype = residual_x.dtype
    y = torch.zeros(bs, 1, H, dtype=xtype)
    x_out = torch.zeros(bs, 1, H, dtype=xtype)
    rstd = torch.zeros(bs, 1, 1, dtype=F32)
    inv_h = torch.tensor(1.0 / H, dtype=F32)
    for i, acc in enumerate(accs):
        if acc is None:
            continue
        xs = acc + residual_x[i, 0].to(F32)          # acc is not rounded before the add
        x_out[i, 0] = xs.to(xtype)
        ms = ((xs * xs) * inv_h).sum()                # order differs from the device's tree: tolerance
        r = torch.tensor(1.0, dtype=F32) / torch.sqrt(ms + torch.tensor(norm_eps, dtype=F32))
        rstd[i, 0, 0] = r
        y[i, 0] = ((xs * r).to(xtype).to(F32) * gamma.to(F32)).to(xtype)
    return y, rstd, x_out


def combine_add_rms_norm_world(expand_xs, expert_ids, assist_infos, ep_send_counts, expert_scales,
                               residual_xs: Sequence[Tensor], gammas: Sequence[Tensor], attrs: MoeAttrs, *,
                               norm_eps: float = 1e-6, **kwargs) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Every rank's ``npu_moe_distribute_combine_add_rms_norm`` outputs ``(y, rstd, x)`` (SPEC §4.3)."""
    accs = combine_world(expand_xs, expert_ids, assist_infos, ep_send_counts, expert_scales, attrs,
                         return_acc=True, **kwargs)
    return [add_rms_norm_rows(acc, residual_xs[g], gammas[g], norm_eps) for g, acc in enumerate(accs)]


# ----------------------------------------------------------------------------------------------
# Round trip (SPEC §8.2)
# ----------------------------------------------------------------------------------------------

def roundtrip_world(xs: Sequence[Tensor], expert_ids: Sequence[Tensor], expert_scales: Sequence[Tensor],
                    attrs: MoeAttrs, *, x_active_masks=None, shared_expert_xs=None, ori_xs=None,
                    const_expert_alpha_1=None, const_expert_alpha_2=None, const_expert_v=None) -> List[Tensor]:
    """``combine(dispatch(x))`` with identity experts: ``Σ_k w_k·x + Σ_q x (+ shared_expert_x)`` over
    the active slots, in SPEC §4.3's accumulation order, computed without any routing."""
    a = attrs
    world = a.world
    n = lambda seq: list(seq) if seq is not None else [None] * world  # noqa: E731
    masks, sxs, oris = n(x_active_masks), n(shared_expert_xs), n(ori_xs)
    al1, al2, cv = n(const_expert_alpha_1), n(const_expert_alpha_2), n(const_expert_v)
    outs = []
    for g in range(world):
        bs, k = expert_ids[g].shape
        H = xs[g].shape[1]
        valid, slot_on = active_slots(bs, k, masks[g])
        ids = expert_ids[g].tolist()
        sx = sxs[g].reshape(bs, H) if sxs[g] is not None else None
        out = torch.zeros(bs, H, dtype=xs[g].dtype)
        for i in range(bs):
            if valid[i]:
                acc = _reduce_token(H, i, k, ids[i], expert_scales[g][i], slot_on[i], a,
                                    lambda tok, slot: xs[g][tok], oris[g], al1[g], al2[g], cv[g], sx)
                out[i] = acc.to(xs[g].dtype)
        outs.append(out)
    return outs
