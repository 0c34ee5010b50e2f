"""fp64 world-level gradient references for dispatch_v2 / combine_v2 / combine_add_rms_norm.

The forward ops written as loops from SPEC alone, in fp64, over every rank's inputs in one
process, and differentiated by torch autograd: nothing of ``moe_fusion`` (neither its kernels nor
its backward formulas) is involved, so the gradients are an independent reference.

* dispatch: ``oracle_moe_distribute.dispatch_world`` (SPEC §3.4's routing loops), which copies
  each token row into the expert rows and keeps the rows' dtype, so autograd differentiates the
  routing itself;
* combine / add_rms_norm: ``combine_world64`` and ``add_rms_norm64`` below, SPEC §4.3 step 3 and
  "Add + RmsNorm" in fp64 (the device's roundings are the identity here: the gradients of the
  exact functions), with the routing read from the dispatch oracle's row list.

Rank numbering as in ``oracle_moe_distribute`` (with TP, global rank ``g`` is EP rank ``g // 2``,
TP index ``g % 2``). Tokens combine does not process give zero rows (the project's choice, SPEC
§4.3 [I]), so they get no gradient.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from oracle_moe_distribute import DispatchOut, MoeAttrs, active_slots, dispatch_world

Tensor = torch.Tensor
F64 = torch.float64
OptList = Optional[Sequence[Optional[Tensor]]]


def _grads(loss: Tensor, leaves: Sequence[Optional[Tensor]]) -> List[Optional[Tensor]]:
    """``d loss / d leaf`` for every leaf (zeros for a leaf the loss does not reach, None for None)."""
    present = [t for t in leaves if t is not None]
    got = iter(torch.autograd.grad(loss, present, allow_unused=True)) if present else iter(())
    out = []
    for t in leaves:
        if t is None:
            out.append(None)
            continue
        g = next(got)
        out.append(torch.zeros_like(t) if g is None else g)
    return out


def _leaves(ts: OptList, world: int) -> List[Optional[Tensor]]:
    """Independent fp64 leaves per rank (ranks may share one input tensor object)."""
    ts = list(ts) if ts is not None else [None] * world
    return [None if t is None else t.detach().to(F64).clone().requires_grad_() for t in ts]


# ----------------------------------------------------------------------------------------------
# dispatch_v2
# ----------------------------------------------------------------------------------------------

def dispatch_x_grads(xs: Sequence[Tensor], expert_ids: Sequence[Tensor], attrs: MoeAttrs,
                     grad_expand_xs: Sequence[Tensor], *, x_active_masks: OptList = None) -> List[Tensor]:
    """Every rank's ``d/dx`` of ``sum_g <expand_x_g, grad_expand_x_g>`` (quant_mode 0), fp64 ``(BS_g, H)``."""
    leaves = _leaves(xs, attrs.world)
    outs = dispatch_world(leaves, expert_ids, attrs, x_active_masks=x_active_masks)
    loss = sum((o.expand_x * ge.to(F64)).sum() for o, ge in zip(outs, grad_expand_xs))
    return _grads(loss, leaves)


# ----------------------------------------------------------------------------------------------
# combine_v2 / combine_add_rms_norm
# ----------------------------------------------------------------------------------------------

def combine_world64(expand_xs: Sequence[Tensor], expert_ids: Sequence[Tensor], expert_scales: Sequence[Tensor],
                    routes: Sequence[DispatchOut], attrs: MoeAttrs, *, x_active_masks: OptList = None,
                    shared_expert_xs: OptList = None, ori_xs: OptList = None, const_expert_alpha_1: OptList = None,
                    const_expert_alpha_2: OptList = None,
                    const_expert_v: OptList = None) -> List[List[Optional[Tensor]]]:
    """Every rank's combine accumulators in fp64: per token ``(H,)``, None if not processed.

    ``routes[g].own_rows[r] = (source EP rank, token, slot)`` of rank ``g``'s row ``r``; with TP the
    row returned is ``expand_x_g[r] + expand_x_peer[own_peer + r]`` (the peer holds our rows after
    its own). Then, per processed token: ``sum_j w_j * term_j`` over active slots (MoE row, copy
    ``ori_x``, const ``ori_x * a1[c] + v[c] * a2[c]``, zero nothing), plus the shared-expert rows
    and ``shared_expert_x`` unweighted (SPEC §4.3, §9 #3)."""
    a = attrs
    world = a.world
    n = lambda seq: list(seq) if seq is not None else [None] * world  # noqa: E731
    masks, sxs, oris = n(x_active_masks), n(shared_expert_xs), n(ori_xs)
    al1, al2, cv = n(const_expert_alpha_1), n(const_expert_alpha_2), n(const_expert_v)
    M, Z, C = a.M, a.zero_expert_num, a.copy_expert_num

    returned: Dict[Tuple[int, int, int], Tensor] = {}
    for g in range(world):
        d, t = a.split(g)
        for r, (s, tok, slot) in enumerate(routes[g].own_rows):
            row = expand_xs[g][r]
            if a.tp == 2:
                p = a.join(d, 1 - t)
                row = row + expand_xs[p][routes[p].total_own + r]
            returned[(a.join(s, t), tok, slot)] = row

    out = []
    for g in range(world):
        bs, k = expert_ids[g].shape
        H = expand_xs[g].shape[1]
        valid, slot_on = active_slots(bs, k, masks[g])
        ids = expert_ids[g].tolist()
        sx = sxs[g].reshape(bs, H) if sxs[g] is not None else None
        accs: List[Optional[Tensor]] = []
        for i in range(bs):
            if not valid[i]:
                accs.append(None)
                continue
            acc = torch.zeros(H, dtype=F64)
            for j in range(k):
                if not slot_on[i][j]:
                    continue
                e, w = ids[i][j], expert_scales[g][i, j]
                if e < M:
                    acc = acc + w * returned[(g, i, j)]
                elif e < M + Z:
                    pass
                elif e < M + Z + C:
                    acc = acc + w * oris[g][i]
                else:
                    c = e - (M + Z + C)
                    acc = acc + w * (oris[g][i] * al1[g][c] + cv[g][c] * al2[g][c])
            for q in range(a.n_sh_eff):
                acc = acc + returned[(g, i, k + q)]
            if sx is not None:
                acc = acc + sx[i]
            accs.append(acc)
        out.append(accs)
    return out


def _rows(accs: List[Optional[Tensor]], h: int) -> Tensor:
    """``(BS, H)``: the accumulators, zero rows for unprocessed tokens."""
    return torch.stack([a if a is not None else torch.zeros(h, dtype=F64) for a in accs]) if accs else \
        torch.zeros(0, h, dtype=F64)


def add_rms_norm64(accs: List[Optional[Tensor]], residual_x: Tensor, gamma: Tensor,
                   norm_eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """One rank's ``(y (BS,1,H), rstd (BS,1,1), x (BS,1,H))`` in fp64: ``xs = acc + residual``,
    ``rstd = 1 / sqrt(mean(xs^2) + eps)``, ``y = xs * rstd * gamma``, ``x = xs``; zeros for
    unprocessed tokens."""
    bs, _, H = residual_x.shape
    ys, rstds, xss = [], [], []
    for i, acc in enumerate(accs):
        if acc is None:
            ys.append(torch.zeros(H, dtype=F64))
            rstds.append(torch.zeros((), dtype=F64))
            xss.append(torch.zeros(H, dtype=F64))
            continue
        xs = acc + residual_x[i, 0]
        r = 1.0 / torch.sqrt((xs * xs).mean() + norm_eps)
        ys.append(xs * r * gamma)
        rstds.append(r)
        xss.append(xs)
    if not accs:
        return torch.zeros(0, 1, H, dtype=F64), torch.zeros(0, 1, 1, dtype=F64), torch.zeros(0, 1, H, dtype=F64)
    return torch.stack(ys).unsqueeze(1), torch.stack(rstds).view(bs, 1, 1), torch.stack(xss).unsqueeze(1)


COMBINE_LEAVES = ("expand_x", "expert_scales", "shared_expert_x", "ori_x", "const_expert_alpha_1",
                  "const_expert_alpha_2", "const_expert_v")
RMS_LEAVES = COMBINE_LEAVES + ("residual_x", "gamma")


def combine_grads(inputs: Dict[str, OptList], expert_ids: Sequence[Tensor], routes: Sequence[DispatchOut],
                  attrs: MoeAttrs, x_active_masks: OptList, grad_outs: Optional[Sequence[Tensor]], *,
                  rms_grads: Optional[Sequence[Tuple[Tensor, Tensor, Tensor]]] = None,
                  norm_eps: float = 1e-6) -> List[Dict[str, Optional[Tensor]]]:
    """Every rank's gradients of the float combine inputs, fp64.

    ``inputs[name]`` lists every rank's tensor (or None) for the names of ``COMBINE_LEAVES`` (plus
    ``residual_x``, ``gamma`` with ``rms_grads``). Without ``rms_grads`` the loss is
    ``sum_g <combine_v2 output_g, grad_outs_g>``; with it, ``sum_g <y, gy> + <rstd, gr> + <x, gx>``
    of combine_add_rms_norm, ``rms_grads[g] = (gy, gr, gx)``."""
    world = attrs.world
    names = RMS_LEAVES if rms_grads is not None else COMBINE_LEAVES
    leaves = {name: _leaves(inputs.get(name), world) for name in names}
    accs = combine_world64(leaves["expand_x"], expert_ids, leaves["expert_scales"], routes, attrs,
                           x_active_masks=x_active_masks, shared_expert_xs=leaves["shared_expert_x"],
                           ori_xs=leaves["ori_x"], const_expert_alpha_1=leaves["const_expert_alpha_1"],
                           const_expert_alpha_2=leaves["const_expert_alpha_2"],
                           const_expert_v=leaves["const_expert_v"])
    loss = torch.zeros((), dtype=F64)
    for g in range(world):
        h = leaves["expand_x"][g].shape[1]
        if rms_grads is None:
            loss = loss + (_rows(accs[g], h) * grad_outs[g].to(F64)).sum()
        else:
            outs = add_rms_norm64(accs[g], leaves["residual_x"][g], leaves["gamma"][g], norm_eps)
            loss = loss + sum((o * go.to(F64)).sum() for o, go in zip(outs, rms_grads[g]))
    flat = [t for name in names for t in leaves[name]]
    got = iter(_grads(loss, flat))
    per_name = {name: [next(got) for _ in range(world)] for name in names}
    return [{name: per_name[name][g] for name in names} for g in range(world)]
