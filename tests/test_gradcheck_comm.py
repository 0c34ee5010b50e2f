"""``torch.autograd.gradcheck`` in float64 of the communication ops' autograd formulas, on real gloo
ranks (2 and 4; EP only and EP x TP; shared experts; uneven routings, a rank with no tokens and an
expert that receives nothing): the analytic gradients against finite differences of the ops.

A rank's output depends on the other ranks' inputs, so checking each rank's own function would
miss every cross-rank term. The check is on the *global* function instead: every rank builds every
rank's inputs from one seed (identical everywhere) and gradcheck perturbs them all; ``_own_part``
hands each rank its own inputs (its backward sums every rank's gradient, so each rank sees the
whole gradient of the global inputs) and ``_gathered`` makes the outputs global (its backward takes
this rank's part of the output gradient, which every rank holds whole). Every rank then calls the
collectives the same number of times, and each asserts that gradcheck passed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from test_moe_distribute_ranks import FP32, Case, _case, _groups, make_inputs, op_kwargs

from moe_fusion.launch import run_ranks

F64 = torch.float64
TIMEOUT = 420   # a 4-rank spawn of every case; each gradcheck is a few hundred small collective calls


class _OwnPart(torch.autograd.Function):
    """``parts[rank]`` of per-rank tensors every rank holds (the same values everywhere)."""

    @staticmethod
    def forward(ctx, rank: int, *parts: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.shapes = rank, [p.shape for p in parts]
        return parts[rank].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        flat = [torch.zeros(s, dtype=grad.dtype).reshape(-1) for s in ctx.shapes]
        flat[ctx.rank] = grad.reshape(-1)
        summed = torch.cat(flat)
        dist.all_reduce(summed)           # the gradient of a global input: every rank's term
        return (None, *(g.view(s) for g, s in zip(summed.split([f.numel() for f in flat]), ctx.shapes)))


class _Gathered(torch.autograd.Function):
    """Every rank's ``part`` (any sizes), flattened and concatenated in rank order."""

    @staticmethod
    def forward(ctx, part: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([part.numel()]))
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        padded = [part.new_zeros(longest) for _ in range(world)]
        dist.all_gather(padded, torch.cat([part.reshape(-1), part.new_zeros(longest - part.numel())]))
        ctx.shape, ctx.start = part.shape, sum(sizes[:rank])
        return torch.cat([p[:n] for p, n in zip(padded, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start:ctx.start + ctx.shape.numel()].view(ctx.shape)


def check_global(rank: int, fn: Callable[..., tuple], inputs: dict[str, list[torch.Tensor | None]]) -> bool:
    """gradcheck of ``fn(**own_inputs) -> outputs`` as a function of every rank's ``inputs``
    (name -> per-rank tensors; None entries are absent inputs)."""
    names = [n for n, parts in inputs.items() if parts[0] is not None]
    counts = [len(inputs[n]) for n in names]
    leaves = tuple(p.detach().to(F64).requires_grad_() for n in names for p in inputs[n])

    def global_fn(*flat):
        own, i = {}, 0
        for name, count in zip(names, counts):
            own[name] = _OwnPart.apply(rank, *flat[i:i + count])
            i += count
        return tuple(_Gathered.apply(out) for out in fn(**own))

    return torch.autograd.gradcheck(global_fn, leaves, fast_mode=False, atol=1e-7, rtol=1e-5)


# -- dispatch / combine / combine_add_rms_norm ------------------------------------------------------

def _dist_case(name: str, world: int, bs, **kw) -> Case:
    return _case(name, world, 2, 4, FP32, bs, **kw)


DIST_CASES = {
    2: [_dist_case("ep_shared_x_rms", 2, 3, ep_world_size=2, moe_expert_num=4, shared_x=2, rms=True),
        _dist_case("shared_rank_mask2d", 2, 2, ep_world_size=2, moe_expert_num=2, shared_expert_rank_num=1,
                   shared_expert_num=1, mask="2d"),
        _dist_case("rank1_has_no_tokens", 2, (3, 0), ep_world_size=2, moe_expert_num=4, global_bs=6,
                   routing="skew")],
    4: [_dist_case("ep_x_tp_rms", 4, 2, ep_world_size=2, moe_expert_num=2, tp_world_size=2, rms=True),
        _dist_case("shared_uneven_no_expert0", 4, (2, 1, 3, 0), ep_world_size=4, moe_expert_num=6,
                   shared_expert_rank_num=1, shared_expert_num=1, global_bs=12, routing="no_expert0")],
}


def _dist_rank(rank: int, world: int) -> dict[str, bool]:
    results = {}
    for case in DIST_CASES[world]:
        results |= _dist_checks(rank, world, case)
    return results


def _dist_checks(rank: int, world: int, case: Case) -> dict[str, bool]:
    """gradcheck of dispatch, combine (and combine_add_rms_norm if ``case.rms``) for one case."""
    import moe_fusion
    results = {}
    a = case.attrs
    groups = _groups(world, a.tp == 2)
    group_ep, ep_rank, kw = op_kwargs(case, rank, groups)
    inp = make_inputs(case)
    ids, mask = inp["ids"][rank], inp["mask"][rank]

    def dispatch(x):
        return (moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, group_ep, a.W, ep_rank, a.M, x_active_mask=mask,
                                                          **kw)[0],)

    results[f"{case.name}/dispatch"] = check_global(rank, dispatch, {"x": inp["x"]})

    # combine's rows: what a dispatch of the same routing delivers (padding rows included).
    meta = moe_fusion.npu_moe_distribute_dispatch_v2(inp["x"][rank], ids, group_ep, a.W, ep_rank, a.M,
                                                     x_active_mask=mask, **kw)
    row_counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(row_counts, torch.tensor([meta[0].size(0)]))
    rows = [torch.randn(int(n), case.h, generator=torch.Generator().manual_seed(50 + g))
            for g, n in enumerate(row_counts)]

    def combine(op, expand_x, expert_scales, shared_expert_x=None, residual_x=None, gamma=None):
        extra = () if residual_x is None else (residual_x, gamma)
        out = op(expand_x, ids, meta[2], meta[4], expert_scales, *extra, group_ep, a.W, ep_rank, a.M,
                 tp_send_counts=meta[5], x_active_mask=mask, shared_expert_x=shared_expert_x, **kw)
        return out if isinstance(out, tuple) else (out,)

    combined = {"expand_x": rows, "expert_scales": inp["w"], "shared_expert_x": inp["shared_x"]}
    results[f"{case.name}/combine"] = check_global(
        rank, lambda **t: combine(moe_fusion.npu_moe_distribute_combine_v2, **t), combined)
    if case.rms:
        results[f"{case.name}/combine_add_rms_norm"] = check_global(
            rank, lambda **t: combine(moe_fusion.npu_moe_distribute_combine_add_rms_norm, **t),
            combined | {"residual_x": inp["residual"], "gamma": inp["gamma"]})
    return results


# -- npu_alltoall_allgather_bmm / npu_bmm_reducescatter_alltoall ----------------------------------

@dataclasses.dataclass(frozen=True)
class BmmCase:
    ep: int
    tp: int
    shard_type: int
    act_type: int           # 0 none, 1 gelu, 2 silu, 4 fastgelu (3, relu, has a kink at 0)
    bias: bool


BMM_CASES = {2: [BmmCase(2, 1, 0, 1, True), BmmCase(2, 1, 1, 0, False)],
             4: [BmmCase(2, 2, 0, 2, True), BmmCase(2, 2, 1, 4, True)]}
E, C, H, M = 4, 2, 4, 4      # experts, capacity, hidden, FFN size (before the TP split)


def _bmm_groups(rank: int, ep: int, tp: int) -> tuple[str, str]:
    """(EP group, TP group) names of ``rank = p * tp + q``; every rank creates every group in order.
    A TP size of 1 still needs a group distinct from the EP one."""
    ep_name = tp_name = None
    for q in range(tp):
        group = dist.new_group([p * tp + q for p in range(ep)])
        if rank % tp == q:
            ep_name = group.group_name
    for p in range(ep):
        group = dist.new_group([p * tp + q for q in range(tp)])
        if rank // tp == p:
            tp_name = group.group_name
    return ep_name, tp_name


def _bmm_rank(rank: int, world: int) -> dict[str, bool]:
    results = {}
    for i, case in enumerate(BMM_CASES[world]):
        results |= _bmm_checks(rank, case, seed=70 + i)
    return results


def _bmm_checks(rank: int, case: BmmCase, seed: int) -> dict[str, bool]:
    """gradcheck of npu_alltoall_allgather_bmm and npu_bmm_reducescatter_alltoall for one case."""
    import moe_fusion
    results = {}
    world = dist.get_world_size()
    ep, tp = case.ep, case.tp
    group_ep, group_tp = _bmm_groups(rank, ep, tp)
    local = E // ep
    gen = torch.Generator().manual_seed(seed)
    # AG-BMM x (E, C, H/tp) for shard 0 or (E, C/tp, H) for shard 1; BMM-RS x (E/ep, rows, M/tp).
    x_shape = (E, C, H // tp) if case.shard_type == 0 else (E, C // tp, H)
    rows = ep * C
    per_rank = {"x": [torch.randn(x_shape, generator=gen) for _ in range(world)],
                "weight": [torch.randn(local, H, M // tp, generator=gen) * 0.5 for _ in range(world)],
                "bias": [torch.randn(local, M // tp, generator=gen) * 0.3 if case.bias else None
                         for _ in range(world)]}
    groups = (group_ep, ep, group_tp, tp)

    def ag_bmm(x, weight, bias=None):
        y1, y2, y3 = moe_fusion.npu_alltoall_allgather_bmm(
            x, weight, *groups, bias=bias, shard_type=case.shard_type, act_type=case.act_type,
            need_allgather_out=True, need_activation_feature=case.act_type != 0)
        return (y1, y2) + ((y3,) if case.act_type else ())

    name = f"ep{ep}_tp{tp}_shard{case.shard_type}_act{case.act_type}_bias{int(case.bias)}"
    results[f"{name}/alltoall_allgather_bmm"] = check_global(rank, ag_bmm, per_rank)

    h_out = H // tp if case.shard_type == 0 else H
    rs_inputs = {"x": [torch.randn(local, rows, M // tp, generator=gen) for _ in range(world)],
                 "weight": [torch.randn(local, M // tp, H, generator=gen) * 0.5 for _ in range(world)],
                 "bias": [torch.randn(local, h_out, generator=gen) * 0.3 if case.bias else None
                          for _ in range(world)]}

    def bmm_rs(x, weight, bias=None):
        return (moe_fusion.npu_bmm_reducescatter_alltoall(x, weight, *groups, bias=bias,
                                                          shard_type=case.shard_type),)

    results[f"{name}/bmm_reducescatter_alltoall"] = check_global(rank, bmm_rs, rs_inputs)
    return results


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("ops", ["dispatch_combine", "bmm"])
def test_gradcheck_float64_on_ranks(world, ops):
    fn = _dist_rank if ops == "dispatch_combine" else _bmm_rank
    per_rank = run_ranks(world, fn, timeout=TIMEOUT)
    for rank, results in enumerate(per_rank):
        assert results and all(results.values()), f"rank {rank}: {results}"
    assert len({tuple(sorted(r)) for r in per_rank}) == 1


# -- opcheck on real ranks ------------------------------------------------------------------------

OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _opcheck_rank(rank: int, world: int) -> list[str]:
    """``torch.library.opcheck`` with its autograd checks of every comm op, in fp64 on this rank's
    inputs; every rank runs the same sequence, so each collective call has its peers. Returns the
    names of the ops checked (opcheck raises on any failure)."""
    import moe_fusion
    ops = torch.ops.moe_fusion
    checked = []
    case = DIST_CASES[2][0]                     # EP over 2 ranks, shared_expert_x, add_rms_norm
    a = case.attrs
    group_ep, ep_rank, kw = op_kwargs(case, rank, _groups(world, False))
    inp = make_inputs(case)
    ids = inp["ids"][rank]
    x = inp["x"][rank].to(F64).requires_grad_()
    torch.library.opcheck(ops.npu_moe_distribute_dispatch_v2.default, (x, ids, group_ep, a.W, ep_rank, a.M), kw,
                          test_utils=OPCHECK_UTILS)
    checked.append("dispatch_v2")
    meta = moe_fusion.npu_moe_distribute_dispatch_v2(x.detach(), ids, group_ep, a.W, ep_rank, a.M, **kw)
    gen = torch.Generator().manual_seed(90 + rank)
    rows = torch.randn(meta[0].shape, generator=gen, dtype=F64, requires_grad=True)
    w = inp["w"][rank].to(F64).requires_grad_()
    head = (rows, ids, meta[2], meta[4], w)
    tail = (group_ep, a.W, ep_rank, a.M)
    ckw = kw | {"tp_send_counts": meta[5], "shared_expert_x": inp["shared_x"][rank].to(F64).requires_grad_()}
    torch.library.opcheck(ops.npu_moe_distribute_combine_v2.default, (*head, *tail), ckw, test_utils=OPCHECK_UTILS)
    checked.append("combine_v2")
    residual = inp["residual"][rank].to(F64).requires_grad_()
    gamma = inp["gamma"][rank].to(F64).requires_grad_()
    torch.library.opcheck(ops.npu_moe_distribute_combine_add_rms_norm.default, (*head, residual, gamma, *tail), ckw,
                          test_utils=OPCHECK_UTILS)
    checked.append("combine_add_rms_norm")

    group_ep, group_tp = _bmm_groups(rank, 2, 1)
    gen = torch.Generator().manual_seed(95 + rank)
    groups = (group_ep, 2, group_tp, 1)
    local = E // 2
    x = torch.randn(E, C, H, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(local, H, M, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(local, M, generator=gen, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.npu_alltoall_allgather_bmm.default, (x, weight, *groups),
                          {"bias": bias, "act_type": 2, "need_allgather_out": True, "need_activation_feature": True},
                          test_utils=OPCHECK_UTILS)
    checked.append("alltoall_allgather_bmm")
    x = torch.randn(local, 2 * C, M, generator=gen, dtype=F64, requires_grad=True)
    weight = torch.randn(local, M, H, generator=gen, dtype=F64, requires_grad=True)
    bias = torch.randn(local, H, generator=gen, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.npu_bmm_reducescatter_alltoall.default, (x, weight, *groups), {"bias": bias},
                          test_utils=OPCHECK_UTILS)
    checked.append("bmm_reducescatter_alltoall")
    return checked


def test_opcheck_float64_on_two_ranks():
    """Schema, autograd registration, fake kernels and AOT dispatch with dynamic shapes (whose
    gradients torch compares with eager) of every comm op, fp64, with real peers."""
    per_rank = run_ranks(2, _opcheck_rank, timeout=TIMEOUT)
    expected = ["dispatch_v2", "combine_v2", "combine_add_rms_norm", "alltoall_allgather_bmm",
                "bmm_reducescatter_alltoall"]
    assert per_rank == [expected, expected]
