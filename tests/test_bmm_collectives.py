"""``npu_alltoall_allgather_bmm`` and ``npu_bmm_reducescatter_alltoall`` on real gloo ranks.

Every case runs both ops on every rank of one spawn per world size (2, 4 and 8 ranks) and checks:
each rank's outputs against the world-level oracle (``oracle_bmm_collectives``); the fused op
against the unfused collective chain it replaces, computed on the same ranks; and, for a few
cases, ``torch.compile(fullgraph=True)`` against eager. Global rank ``p*tp + q`` holds EP index
``p`` and TP index ``q``. In-process tests cover a world of one rank, shapes and the act names.
"""
from __future__ import annotations

import functools
import itertools
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion.op_protos.alltoall_allgather_bmm import transpose_weight
from oracle_bmm_collectives import alltoall_allgather_bmm_world, bmm_reducescatter_alltoall_world

Tensor = torch.Tensor
SOLO_EP, SOLO_TP = "ep-solo", "tp-solo"   # names of size-1 groups, never looked up


@dataclass(frozen=True)
class Case:
    """One call of each op on every rank. Per-rank sizes: ``x`` ``(ep*local, c, h)``; ``H = h*tp``
    (shard 0) or ``h`` (shard 1); forward weight ``(local, H, m)``, reverse weight ``(local, m, H)``."""

    ep: int
    tp: int
    shard: int = 0
    act: int = 0
    bias: int = 0                       # 0: none, else the bias rank (2 or 3)
    dtype: torch.dtype = torch.float32
    transposed: bool = False            # weights as transpose views of contiguous tensors
    y2: bool = False
    y3: bool = False
    compile: str = ""                   # "", "aot_eager", "aot_eager_dynamic", "inductor"
    local: int = 2
    c: int = 3
    h: int = 4
    m: int = 5

    @property
    def hidden(self) -> int:
        return self.h * self.tp if self.shard == 0 else self.h

    @property
    def rows(self) -> int:
        return self.ep * self.c * (self.tp if self.shard == 1 else 1)

    @property
    def id(self) -> str:
        parts = [f"{self.ep}x{self.tp}", f"s{self.shard}", f"act{self.act}", f"b{self.bias}", str(self.dtype)[6:]]
        parts += [flag for flag, on in (("T", self.transposed), ("y2", self.y2), ("y3", self.y3)) if on]
        return "-".join(parts + ([self.compile] if self.compile else []))


def _layout_cases(ep: int, tp: int, full: bool) -> list[Case]:
    """Both shard types with every act_type (``full``), else four mixed cases."""
    grid = list(itertools.product((0, 1), range(5))) if full else [(0, 1), (1, 4), (0, 3), (1, 0)]
    return [Case(ep, tp, shard, act, bias=(0, 3, 2)[i % 3], dtype=(torch.float32, torch.bfloat16)[i % 2],
                 transposed=i % 4 == 3, y2=i % 2 == 0, y3=act != 0 and i % 3 != 1)
            for i, (shard, act) in enumerate(grid)]


CASES: dict[int, list[Case]] = {
    2: _layout_cases(2, 1, False) + _layout_cases(1, 2, False) + [
        Case(2, 1, 1, 2, bias=3, compile="aot_eager", y2=True, y3=True),
        Case(1, 2, 0, 1, bias=2, dtype=torch.bfloat16, compile="aot_eager_dynamic", y3=True),
        Case(2, 1, 0, 3, bias=3, compile="inductor", y2=True)],
    4: _layout_cases(2, 2, True) + _layout_cases(4, 1, False) + _layout_cases(1, 4, False) + [
        Case(2, 2, 1, 4, bias=3, dtype=torch.float16, y2=True, y3=True),
        Case(2, 2, 0, 2, bias=2, dtype=torch.bfloat16, transposed=True, compile="aot_eager", y2=True, y3=True)],
    8: [Case(2, 4, 1, 1, bias=3, dtype=torch.bfloat16, y2=True, y3=True), Case(4, 2, 0, 4, bias=2, transposed=True)],
}


# -- inputs --------------------------------------------------------------------------------------

def _weight(g: torch.Generator, case: Case, rows: int, cols: int) -> Tensor:
    """``(local, rows, cols)`` scaled by 1/sqrt(rows); a transpose view when ``case.transposed``."""
    shape = (case.local, cols, rows) if case.transposed else (case.local, rows, cols)
    w = torch.randn(shape, generator=g) / rows ** 0.5
    return (w.transpose(1, 2) if case.transposed else w).to(case.dtype)


def _bias(g: torch.Generator, case: Case, cols: int) -> Optional[Tensor]:
    if not case.bias:
        return None
    shape = (case.local, 1, cols) if case.bias == 3 else (case.local, cols)
    return torch.randn(shape, generator=g).to(torch.float16 if case.dtype == torch.float16 else torch.float32)


def world_inputs(case: Case, seed: int) -> dict[tuple[int, int], dict[str, Any]]:
    """``(p, q) -> {x, w, b, xr, wr, br}``: forward and reverse inputs of every rank."""
    g = torch.Generator().manual_seed(seed)
    h_out = case.hidden // case.tp if case.shard == 0 else case.hidden
    out = {}
    for p, q in itertools.product(range(case.ep), range(case.tp)):
        out[(p, q)] = {
            "x": torch.randn(case.ep * case.local, case.c, case.h, generator=g).to(case.dtype),
            "w": _weight(g, case, case.hidden, case.m), "b": _bias(g, case, case.m),
            "xr": torch.randn(case.local, case.rows, case.m, generator=g).to(case.dtype),
            "wr": _weight(g, case, case.m, case.hidden), "br": _bias(g, case, h_out),
        }
    return out


# -- what each rank runs -------------------------------------------------------------------------

def _groups(ep: int, tp: int, rank: int) -> tuple[str, str]:
    """Create every EP and TP group of the ``ep x tp`` layout (collective); return this rank's names."""
    names = {"ep": SOLO_EP, "tp": SOLO_TP}
    if ep > 1:
        for q in range(tp):
            group = dist.new_group([p * tp + q for p in range(ep)])
            if rank % tp == q:
                names["ep"] = group.group_name
    if tp > 1:
        for p in range(ep):
            group = dist.new_group([p * tp + q for q in range(tp)])
            if rank // tp == p:
                names["tp"] = group.group_name
    return names["ep"], names["tp"]


def _layer(case: Case, ep_name: str, tp_name: str, x, w, b, xr, wr, br):
    fwd = moe_fusion.npu_alltoall_allgather_bmm(
        x, w, ep_name, case.ep, tp_name, case.tp, bias=b, shard_type=case.shard, act_type=case.act,
        need_allgather_out=case.y2, need_activation_feature=case.y3)
    rev = moe_fusion.npu_bmm_reducescatter_alltoall(xr, wr, ep_name, case.ep, tp_name, case.tp, bias=br,
                                                     shard_type=case.shard)
    return fwd, rev


_UNFUSED_ACTS = {0: lambda z: z, 1: torch.nn.functional.gelu, 2: torch.nn.functional.silu, 3: torch.relu,
                 4: lambda z: z * torch.sigmoid(1.702 * z)}


def _unfused(case: Case, ep_group, tp_group, x, w, b, xr, wr, br) -> tuple[Tensor, Tensor, Tensor]:
    """The chains the ops replace, as a model writes them (collectives, permutes, bmm in x's dtype)."""
    ep, tp, local, c, h = case.ep, case.tp, case.local, x.size(1), x.size(2)
    a2a = torch.empty_like(x)
    dist.all_to_all_single(a2a, x, group=ep_group) if ep > 1 else a2a.copy_(x)
    a2a = a2a.view(ep, local, c, h).permute(1, 0, 2, 3).contiguous()            # (local, ep, c, h)
    gathered = x.new_empty((tp * local, ep, c, h))
    dist.all_gather_into_tensor(gathered, a2a, group=tp_group) if tp > 1 else gathered.copy_(a2a)
    g = gathered.view(tp, local, ep, c, h)
    if case.shard == 0:
        y2 = g.permute(1, 2, 3, 0, 4).reshape(local, ep * c, tp * h)
    else:
        y2 = g.permute(1, 2, 0, 3, 4).reshape(local, ep * tp * c, h)
    y3 = torch.bmm(y2, w)
    y3 = y3 if b is None else y3 + b.view(local, 1, -1).to(y3.dtype)
    y1 = _UNFUSED_ACTS[case.act](y3)

    t1 = torch.bmm(xr, wr)                                                       # (local, rows, H)
    hidden = t1.size(2)
    if case.shard == 0:
        send = t1.view(local, case.rows, tp, hidden // tp).permute(2, 0, 1, 3).contiguous()
    else:
        send = t1.view(local, ep, tp, case.c, hidden).permute(2, 0, 1, 3, 4).contiguous()
    rs = t1.new_empty(send.shape[1:])
    dist.reduce_scatter_tensor(rs, send.flatten(0, 1), group=tp_group) if tp > 1 else rs.copy_(send[0])
    rs = rs.reshape(local, ep, -1, rs.size(-1))
    rs = rs if br is None else rs + br.view(local, 1, 1, -1).to(rs.dtype)
    a2a_in = rs.permute(1, 0, 2, 3).contiguous()                                  # (ep, local, c', h')
    y = torch.empty_like(a2a_in)
    dist.all_to_all_single(y, a2a_in, group=ep_group) if ep > 1 else y.copy_(a2a_in)
    return y1, y2, y.view(ep * local, a2a_in.size(2), a2a_in.size(3))


def _compiled(case: Case, ep_name: str, tp_name: str):
    backend = "inductor" if case.compile == "inductor" else "aot_eager"
    return torch.compile(functools.partial(_layer, case, ep_name, tp_name), fullgraph=True, backend=backend,
                         dynamic=case.compile == "aot_eager_dynamic")


def _group_errors() -> list[str]:
    """Eager errors for group names only a kernel can check (every rank fails before communicating)."""
    world = dist.group.WORLD.group_name
    x, w = torch.randn(2, 2, 2), torch.randn(2, 8, 3)
    calls = [
        lambda: moe_fusion.npu_alltoall_allgather_bmm(x, torch.randn(1, 2, 3), "no-such-group", 2, SOLO_TP, 1),
        lambda: moe_fusion.npu_alltoall_allgather_bmm(x, w, SOLO_EP, 1, world, 4),
        lambda: moe_fusion.npu_bmm_reducescatter_alltoall(x, torch.randn(2, 2, 4), SOLO_EP, 1, "no-such-group", 2),
    ]
    messages = []
    for call in calls:
        try:
            call()
            messages.append("no error")
        except moe_fusion.OpValidationError as e:
            messages.append(str(e))
    return messages


def _worker(rank: int, world_size: int, cases: list[Case], inputs: list[dict]) -> dict[str, Any]:
    warnings.filterwarnings("ignore", message=".*is deprecated.*")   # the unfused chain's collectives
    layouts = {}
    for case in cases:
        if (case.ep, case.tp) not in layouts:
            layouts[(case.ep, case.tp)] = _groups(case.ep, case.tp, rank)
    results = []
    for case, world in zip(cases, inputs):
        ep_name, tp_name = layouts[(case.ep, case.tp)]
        args = world[(rank // case.tp, rank % case.tp)]
        ordered = [args[k] for k in ("x", "w", "b", "xr", "wr", "br")]
        fused = _layer(case, ep_name, tp_name, *ordered)
        ep_group = None if case.ep == 1 else torch.distributed.distributed_c10d._resolve_process_group(ep_name)
        tp_group = None if case.tp == 1 else torch.distributed.distributed_c10d._resolve_process_group(tp_name)
        result = {"fused": fused, "unfused": _unfused(case, ep_group, tp_group, *ordered)}
        if case.compile:
            result["compiled"] = _compiled(case, ep_name, tp_name)(*ordered)
        results.append(result)
    return {"cases": results, "group_errors": _group_errors() if world_size == 2 else []}


@functools.lru_cache(maxsize=None)
def _run(world_size: int) -> tuple[list[dict], list[dict]]:
    """Every rank's results for ``CASES[world_size]`` (one spawn, cached), and the inputs used."""
    inputs = [world_inputs(case, seed) for seed, case in enumerate(CASES[world_size])]
    return run_ranks(world_size, _worker, CASES[world_size], inputs, timeout=240), inputs


# -- checks --------------------------------------------------------------------------------------

def _tol(dtype: torch.dtype) -> dict[str, float]:
    # bf16/fp16: the oracle and the kernel round the same fp32 values, which may differ in the
    # last fp32 bits (summation order) and so round one ulp apart.
    return {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}[dtype]


def _all_cases() -> list[tuple[int, int]]:
    return [(n, i) for n in sorted(CASES) for i in range(len(CASES[n]))]


@pytest.mark.parametrize("world_size,index", _all_cases(), ids=[CASES[n][i].id for n, i in _all_cases()])
def test_ranks_match_oracle_and_unfused_chain(world_size: int, index: int) -> None:
    case = CASES[world_size][index]
    per_rank, inputs = _run(world_size)
    world = inputs[index]
    pick = lambda key: {k: v[key] for k, v in world.items()}                       # noqa: E731
    fwd = alltoall_allgather_bmm_world(pick("x"), pick("w"), case.ep, case.tp, biases=pick("b") if case.bias else None,
                                       shard_type=case.shard, act_type=case.act)
    rev = bmm_reducescatter_alltoall_world(pick("xr"), pick("wr"), case.ep, case.tp,
                                           biases=pick("br") if case.bias else None, shard_type=case.shard)
    tol = _tol(case.dtype)
    for rank, result in enumerate(per_rank):
        key = (rank // case.tp, rank % case.tp)
        (y1, y2, y3), y = result["cases"][index]["fused"]
        o1, o2, o3 = fwd[key]
        assert y1.dtype == y2.dtype == y3.dtype == y.dtype == case.dtype
        torch.testing.assert_close(y1, o1, **tol, msg=lambda m: f"rank {rank} y1: {m}")
        torch.testing.assert_close(y2, o2 if case.y2 else o2.new_empty(0, 0, 0), rtol=0, atol=0)
        torch.testing.assert_close(y3, o3 if case.y3 else o3.new_empty(0, 0, 0), **tol)
        torch.testing.assert_close(y, rev[key], **tol, msg=lambda m: f"rank {rank} y: {m}")
        u1, u2, uy = result["cases"][index]["unfused"]
        torch.testing.assert_close(y1, u1, **tol, msg=lambda m: f"rank {rank} y1 vs unfused: {m}")
        torch.testing.assert_close(o2, u2, rtol=0, atol=0)          # pure data movement: bit-exact
        torch.testing.assert_close(y, uy, **tol, msg=lambda m: f"rank {rank} y vs unfused: {m}")
        if case.compile:
            (c1, c2, c3), cy = result["cases"][index]["compiled"]
            for got, want in ((c1, y1), (c2, y2), (c3, y3), (cy, y)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_group_names_are_resolved_and_checked() -> None:
    per_rank, _ = _run(2)
    for result in per_rank:
        unknown_ep, wrong_size, unknown_tp = result["group_errors"]
        assert unknown_ep == ("npu_alltoall_allgather_bmm: group_ep must name a registered process group "
                              "(ProcessGroup.group_name), got 'no-such-group'")
        assert wrong_size.startswith("npu_alltoall_allgather_bmm: group_tp must have 4 ranks (the world size "
                                     "argument), got group ") and wrong_size.endswith("of size 2")
        assert unknown_tp.startswith("npu_bmm_reducescatter_alltoall: group_tp must name a registered process group")


def test_groups_need_torch_distributed() -> None:
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(moe_fusion.OpValidationError, match="group_ep needs an initialized torch.distributed default "
                       "group for a world of 2 ranks, got no process group"):
        moe_fusion.npu_alltoall_allgather_bmm(torch.randn(2, 1, 2), torch.randn(1, 2, 2), "ep", 2, "tp", 1)


# -- a world of one rank, in process --------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(shard=st.sampled_from((0, 1)), act=st.integers(0, 4), bias=st.sampled_from((0, 2, 3)),
       dtype=st.sampled_from((torch.float32, torch.bfloat16, torch.float16)), transposed=st.booleans(),
       local=st.integers(1, 3), c=st.integers(1, 4), h=st.integers(1, 6), m=st.integers(1, 6), seed=st.integers(0, 99))
def test_world_of_one_matches_oracle(shard, act, bias, dtype, transposed, local, c, h, m, seed) -> None:
    case = Case(1, 1, shard, act, bias, dtype, transposed, y2=True, y3=act != 0, local=local, c=c, h=h, m=m)
    world = world_inputs(case, seed)
    args = world[(0, 0)]
    (y1, y2, y3), y = _layer(case, SOLO_EP, SOLO_TP, *(args[k] for k in ("x", "w", "b", "xr", "wr", "br")))
    o1, o2, o3 = alltoall_allgather_bmm_world({(0, 0): args["x"]}, {(0, 0): args["w"]}, 1, 1,
                                              biases={(0, 0): args["b"]} if bias else None, shard_type=shard,
                                              act_type=act)[(0, 0)]
    oy = bmm_reducescatter_alltoall_world({(0, 0): args["xr"]}, {(0, 0): args["wr"]}, 1, 1,
                                          biases={(0, 0): args["br"]} if bias else None, shard_type=shard)[(0, 0)]
    tol = _tol(dtype)
    torch.testing.assert_close(y1, o1, **tol)
    torch.testing.assert_close(y2, o2, rtol=0, atol=0)
    torch.testing.assert_close(y3, o3 if act else o3.new_empty(0, 0, 0), **tol)
    torch.testing.assert_close(y, oy, **tol)


@pytest.mark.parametrize("name,code", [("None", 0), ("gelu", 1), ("SiLu", 2), ("RELU", 3), ("FastGeLu", 4)])
def test_act_type_names(name: str, code: int) -> None:
    x, w = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    by_name = moe_fusion.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, act_type=name)[0]
    by_code = moe_fusion.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, act_type=code)[0]
    torch.testing.assert_close(by_name, by_code, rtol=0, atol=0)


def test_gelu_is_the_erf_form() -> None:
    x, w = torch.randn(1, 64, 1) * 3, torch.ones(1, 1, 1)
    y1 = moe_fusion.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, act_type="GeLu")[0]
    torch.testing.assert_close(y1, torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)


def test_transposed_weight_is_the_same_op_and_sets_the_ge_attr() -> None:
    x, w_t = torch.randn(2, 3, 4), torch.randn(2, 5, 4)            # storage (E, M, H)
    w = w_t.transpose(1, 2)                                        # logical (E, H, M)
    assert transpose_weight(w) and not transpose_weight(w.contiguous()) and not transpose_weight(w_t)
    with torch._subclasses.FakeTensorMode() as mode:                # the converter sees FakeTensor strides
        assert transpose_weight(mode.from_tensor(w))
    got = moe_fusion.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, act_type=1)[0]
    want = moe_fusion.npu_alltoall_allgather_bmm(x, w.contiguous(), "ep", 1, "tp", 1, act_type=1)[0]
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("shard", [0, 1])
@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_fake_shapes_follow_the_spec_table(shard: int, flags: tuple[bool, bool]) -> None:
    """SPEC §6.2 on meta tensors with ep=4, tp=2 under A3 (fake kernels never look groups up)."""
    ep, tp, e, c, h, m = 4, 2, 8, 6, 16, 32
    x = torch.empty((e, c, h // tp) if shard == 0 else (e, c // tp, h), dtype=torch.bfloat16, device="meta")
    w = torch.empty(e // ep, h, m // tp, dtype=torch.bfloat16, device="meta")
    need_y2, need_y3 = flags
    with moe_fusion.target("A3"):
        y1, y2, y3 = moe_fusion.npu_alltoall_allgather_bmm(x, w, "hccl_ep", ep, "hccl_tp", tp, shard_type=shard,
                                                           act_type=2, need_allgather_out=need_y2,
                                                           need_activation_feature=need_y3)
        rows = ep * c if shard == 0 else ep * tp * (c // tp)
        assert tuple(y1.shape) == (e // ep, rows, m // tp) and y1.dtype == torch.bfloat16
        assert tuple(y2.shape) == ((e // ep, rows, h) if need_y2 else (0, 0, 0))
        assert tuple(y3.shape) == ((e // ep, rows, m // tp) if need_y3 else (0, 0, 0))
        xr = torch.empty(e // ep, rows, m // tp, dtype=torch.float16, device="meta")
        wr = torch.empty(e // ep, m // tp, h, dtype=torch.float16, device="meta")
        y = moe_fusion.npu_bmm_reducescatter_alltoall(xr, wr, "hccl_ep", ep, "hccl_tp", tp, shard_type=shard)
        assert tuple(y.shape) == ((e, c, h // tp) if shard == 0 else (e, c // tp, h)) and y.dtype == torch.float16
