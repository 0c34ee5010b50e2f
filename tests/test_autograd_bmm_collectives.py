"""Autograd of ``npu_alltoall_allgather_bmm`` and ``npu_bmm_reducescatter_alltoall``
(``moe_fusion.autograd.bmm_collectives``) on real gloo ranks.

Reference: the world-level loop oracle (``oracle_bmm_collectives``) run in fp64 on every rank's
inputs in this process and differentiated by torch autograd; the loss is the same on both sides,
``sum over ranks of <output, cotangent>`` over every output the case uses. Each world size runs
all its cases in one spawn; global rank ``p*tp + q`` holds EP index ``p`` and TP index ``q``.

Tolerances. fp32: the ranks compute in fp32 what the oracle computes in fp64; every gradient
entry is a sum of at most ``rows * max(H, M/tp) <= 48`` products of O(1) values, after two or
three fp32 roundings of intermediates (y3, the activation derivative, gz), so errors stay
below ~50 * 2^-24 ≈ 3e-6 of the entry's scale; ``rtol = atol = 2e-5`` leaves a margin of ~5
while a wrong term (a missing y2/y3 contribution, a wrong slice, the tanh GELU instead of erf)
moves entries by 1e-3 to 1. bf16 (one case per layout): inputs are rounded to bf16 before
both sides see them, so only the kernels' roundings differ: gz, the bmm outputs and the
reduce-scatter are rounded to bf16 (relative 2^-8 each, a few in sequence): ``5e-2``.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.distributed as dist

import moe_fusion
from moe_fusion.launch import run_ranks
from oracle_bmm_collectives import alltoall_allgather_bmm_world, bmm_reducescatter_alltoall_world

Tensor = torch.Tensor
SOLO_EP, SOLO_TP = "ep-solo", "tp-solo"   # names of size-1 groups, never looked up
LAYOUTS: dict[int, tuple[tuple[int, int], ...]] = {2: ((2, 1), (1, 2)), 4: ((2, 2), (4, 1))}


@dataclass(frozen=True)
class Case:
    """One AG-BMM call and one BMM-RS-A2A call on every rank, then one backward of each.

    Per-rank sizes: AG ``x`` ``(ep*local, c, h)``, ``H = h*tp`` (shard 0) or ``h`` (shard 1),
    ``weight`` ``(local, H, m)``; BMM-RS ``x`` ``(local, rows, m)``, ``weight`` ``(local, m, H)``.
    ``grads`` names the inputs that require a gradient (x, w, b) in both ops.
    """

    ep: int
    tp: int
    shard: int
    act: int
    bias: int = 0                  # 0: none, else the bias rank (2 or 3)
    y2: bool = False               # need_allgather_out
    y3: bool = False               # need_activation_feature
    use_extras: bool = True        # the loss uses y2/y3 when requested (else they get no gradient)
    transposed: bool = False       # weights as transpose views of contiguous tensors
    grads: str = "xwb"
    dtype: torch.dtype = torch.float32
    chain: bool = False            # compiled training step: AG-BMM feeding BMM-RS, eager vs compiled
    local: int = 2
    c: int = 2
    h: int = 3
    m: int = 4

    @property
    def hidden(self) -> int:
        return self.h * self.tp if self.shard == 0 else self.h

    @property
    def rows(self) -> int:
        return self.ep * self.c * (self.tp if self.shard == 1 else 1)

    @property
    def id(self) -> str:
        parts = [f"{self.ep}x{self.tp}", f"s{self.shard}", f"act{self.act}", f"b{self.bias}", str(self.dtype)[6:]]
        flags = (("y2", self.y2), ("y3", self.y3), ("unused", not self.use_extras and (self.y2 or self.y3)),
                 ("T", self.transposed), ("chain", self.chain))
        parts += [flag for flag, on in flags if on]
        return "-".join(parts + ([f"grad-{self.grads}"] if self.grads != "xwb" else []))


def _layout_cases(ep: int, tp: int, k: int) -> list[Case]:
    """Every (shard, act) on layout number ``k``. For each act != 0, ``j`` runs over 0..7 across
    the 4 layouts x 2 shards, so every act sees every (bias, y2, y3) combination once."""
    cases = []
    for shard, act in itertools.product((0, 1), range(5)):
        j = (2 * k + shard + act) % 8
        cases.append(Case(ep, tp, shard, act, bias=(3 if (k + act) % 2 else 2) if j & 1 else 0, y2=bool(j & 2),
                          y3=act != 0 and bool(j & 4), use_extras=(k + act) % 3 != 2, transposed=(k + act) % 4 == 1))
    cases += [  # frozen inputs: the backward skips the other op's call (AG) or uses its narrow weight (BMM-RS)
        Case(ep, tp, k % 2, 2 + k % 2, bias=3, grads="wb"),
        Case(ep, tp, 1 - k % 2, 1, bias=2, y2=True, grads="x"),
        Case(ep, tp, k % 2, 4, bias=2, grads="b"),
        Case(ep, tp, 1 - k % 2, 1 + k, bias=3, y2=True, y3=True, dtype=torch.bfloat16),
        Case(ep, tp, k % 2, 4 - k, bias=2 + k % 2, y2=k % 2 == 0, chain=True)]
    return cases


# Layout numbers k: 2x1 -> 0, 1x2 -> 1, 2x2 -> 2, 4x1 -> 3.
CASES: dict[int, list[Case]] = {
    world: [case for i, ep_tp in enumerate(layouts) for case in _layout_cases(*ep_tp, k=2 * (world == 4) + i)]
    for world, layouts in LAYOUTS.items()}


# -- inputs ----------------------------------------------------------------------------------------

def _weight(g: torch.Generator, case: Case, rows: int, cols: int) -> Tensor:
    """``(local, rows, cols)`` scaled by 1/sqrt(rows); a transpose view when ``case.transposed``."""
    shape = (case.local, cols, rows) if case.transposed else (case.local, rows, cols)
    w = (torch.randn(shape, generator=g) / rows ** 0.5).to(case.dtype)
    return w.transpose(1, 2) if case.transposed else w


def _bias(g: torch.Generator, case: Case, cols: int) -> Optional[Tensor]:
    if not case.bias:
        return None
    return torch.randn((case.local, 1, cols) if case.bias == 3 else (case.local, cols), generator=g)


def world_inputs(case: Case, seed: int) -> dict[tuple[int, int], dict[str, Any]]:
    """``(p, q) -> {x, w, b, xr, wr, br, c1, c2, c3, cy}``: both ops' inputs (x's dtype; biases
    fp32) and fp32 cotangents of y1, y2, y3 and of BMM-RS's y. With ``chain``, ``w``/``b`` and
    ``wr``/``br`` are the two layers and ``cy`` the cotangent of the chain's output."""
    g = torch.Generator().manual_seed(seed)
    h_out = case.hidden // case.tp if case.shard == 0 else case.hidden
    rows, out = case.rows, {}
    for p, q in itertools.product(range(case.ep), range(case.tp)):
        out[(p, q)] = {
            "x": torch.randn(case.ep * case.local, case.c, case.h, generator=g).to(case.dtype),
            "w": _weight(g, case, case.hidden, case.m), "b": _bias(g, case, case.m),
            "xr": torch.randn(case.local, rows, case.m, generator=g).to(case.dtype),
            "wr": _weight(g, case, case.m, case.hidden), "br": _bias(g, case, h_out),
            "c1": torch.randn(case.local, rows, case.m, generator=g),
            "c2": torch.randn(case.local, rows, case.hidden, generator=g),
            "c3": torch.randn(case.local, rows, case.m, generator=g),
            "cy": torch.randn(case.ep * case.local, case.c, case.h, generator=g),
        }
    return out


def _ag_loss_terms(case: Case, y1: Tensor, y2: Tensor, y3: Tensor, cot: dict[str, Tensor]) -> Tensor:
    """``<y1, c1>`` plus ``<y2, c2>``, ``<y3, c3>`` for the requested outputs the case uses, in
    the cotangents' dtype (fp32 on the ranks, fp64 in the oracle)."""
    loss = (y1.to(cot["c1"].dtype) * cot["c1"]).sum()
    if case.y2 and case.use_extras:
        loss = loss + (y2.to(cot["c2"].dtype) * cot["c2"]).sum()
    if case.y3 and case.use_extras:
        loss = loss + (y3.to(cot["c3"].dtype) * cot["c3"]).sum()
    return loss


def _leaves(case: Case, args: dict[str, Any], names: tuple[str, str, str], dtype: Optional[torch.dtype] = None
            ) -> list[Optional[Tensor]]:
    """Copies of ``args[names]`` (x, weight, bias), in ``dtype`` if given; those named by
    ``case.grads`` require a gradient (a transposed weight stays a transposed view)."""
    out = []
    for flag, name in zip("xwb", names):
        t = args[name]
        if t is not None:
            t = t.detach().clone() if dtype is None else t.detach().to(dtype)
            t.requires_grad_(flag in case.grads)
        out.append(t)
    return out


# -- what each rank runs ---------------------------------------------------------------------------

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


def _requested(leaves: list[Optional[Tensor]]) -> list[Tensor]:
    return [t for t in leaves if t is not None and t.requires_grad]


def _chain_loss(case: Case, ep_name: str, tp_name: str, x: Tensor, w: Tensor, b: Optional[Tensor], wr: Tensor,
                br: Optional[Tensor], cy: Tensor) -> Tensor:
    """An expert layer as in training: AG-BMM (activation) feeding BMM-RS-A2A, ``<y, cy>``."""
    y1, y2, _ = moe_fusion.npu_alltoall_allgather_bmm(
        x, w, ep_name, case.ep, tp_name, case.tp, bias=b, shard_type=case.shard, act_type=case.act,
        need_allgather_out=case.y2)
    y = moe_fusion.npu_bmm_reducescatter_alltoall(y1, wr, ep_name, case.ep, tp_name, case.tp, bias=br,
                                                  shard_type=case.shard)
    loss = (y.float() * cy).sum()
    return loss + y2.float().square().sum() if case.y2 else loss


def _run_case(case: Case, ep_name: str, tp_name: str, args: dict[str, Any]) -> dict[str, Any]:
    if case.chain:
        leaves = _leaves(case, args, ("x", "w", "b")) + _leaves(case, args, ("xr", "wr", "br"))[1:]
        want = torch.autograd.grad(_chain_loss(case, ep_name, tp_name, *leaves, args["cy"]), _requested(leaves))
        leaves = _leaves(case, args, ("x", "w", "b")) + _leaves(case, args, ("xr", "wr", "br"))[1:]
        step = torch.compile(functools.partial(_chain_loss, case, ep_name, tp_name), backend="aot_eager",
                             fullgraph=True)
        got = torch.autograd.grad(step(*leaves, args["cy"]), _requested(leaves))
        return {"eager": want, "compiled": got}
    x, w, b = _leaves(case, args, ("x", "w", "b"))
    y1, y2, y3 = moe_fusion.npu_alltoall_allgather_bmm(
        x, w, ep_name, case.ep, tp_name, case.tp, bias=b, shard_type=case.shard, act_type=case.act,
        need_allgather_out=case.y2, need_activation_feature=case.y3)
    ag = torch.autograd.grad(_ag_loss_terms(case, y1, y2, y3, args), _requested([x, w, b]))
    xr, wr, br = _leaves(case, args, ("xr", "wr", "br"))
    y = moe_fusion.npu_bmm_reducescatter_alltoall(xr, wr, ep_name, case.ep, tp_name, case.tp, bias=br,
                                                  shard_type=case.shard)
    rs = torch.autograd.grad((y.float() * args["cy"]).sum(), _requested([xr, wr, br]))
    return {"ag": ag, "rs": rs, "shapes": (tuple(y2.shape), tuple(y3.shape))}


def _worker(rank: int, world_size: int, cases: list[Case], inputs: list[dict]) -> list[dict[str, Any]]:
    layouts = {}
    for case in cases:
        if (case.ep, case.tp) not in layouts:
            layouts[(case.ep, case.tp)] = _groups(case.ep, case.tp, rank)
    return [_run_case(case, *layouts[(case.ep, case.tp)], world[(rank // case.tp, rank % case.tp)])
            for case, world in zip(cases, inputs)]


@functools.lru_cache(maxsize=None)
def _run(world_size: int) -> tuple[list[list[dict]], list[dict]]:
    """Every rank's gradients for ``CASES[world_size]`` (one spawn, cached), and the inputs used."""
    inputs = [world_inputs(case, seed) for seed, case in enumerate(CASES[world_size])]
    return run_ranks(world_size, _worker, CASES[world_size], inputs, timeout=180), inputs


# -- the fp64 reference ----------------------------------------------------------------------------

def _oracle_grads(case: Case, world: dict) -> dict[tuple[int, int], dict[str, tuple[Tensor, ...]]]:
    """``(p, q) -> {"ag": ..., "rs": ...}`` (or ``{"chain": ...}``): gradients of the requested
    inputs, in (x, w, b) order, of the oracle run in fp64 on every rank's inputs."""
    f64 = torch.float64
    keys = sorted(world)
    ag = {k: _leaves(case, world[k], ("x", "w", "b"), f64) for k in keys}
    biases = {k: ag[k][2] for k in keys} if case.bias else None
    fwd = alltoall_allgather_bmm_world({k: ag[k][0] for k in keys}, {k: ag[k][1] for k in keys}, case.ep, case.tp,
                                       biases=biases, shard_type=case.shard, act_type=case.act)
    if case.chain:
        rs = {k: _leaves(case, world[k], ("xr", "wr", "br"), f64) for k in keys}
        ys = bmm_reducescatter_alltoall_world({k: fwd[k][0] for k in keys}, {k: rs[k][1] for k in keys}, case.ep,
                                              case.tp, biases={k: rs[k][2] for k in keys} if case.bias else None,
                                              shard_type=case.shard)
        loss = sum((ys[k] * world[k]["cy"].to(f64)).sum() + (fwd[k][1].square().sum() if case.y2 else 0)
                   for k in keys)
        leaves = {k: _requested(ag[k] + rs[k][1:]) for k in keys}
        flat = torch.autograd.grad(loss, [t for k in keys for t in leaves[k]])
        out, i = {}, 0
        for k in keys:
            out[k] = {"chain": flat[i:i + len(leaves[k])]}
            i += len(leaves[k])
        return out
    cot = {k: {n: world[k][n].to(f64) for n in ("c1", "c2", "c3")} for k in keys}
    ag_loss = sum(_ag_loss_terms(case, *fwd[k], cot[k]) for k in keys)
    rs = {k: _leaves(case, world[k], ("xr", "wr", "br"), f64) for k in keys}
    ys = bmm_reducescatter_alltoall_world({k: rs[k][0] for k in keys}, {k: rs[k][1] for k in keys}, case.ep, case.tp,
                                          biases={k: rs[k][2] for k in keys} if case.bias else None,
                                          shard_type=case.shard)
    rs_loss = sum((ys[k] * world[k]["cy"].to(f64)).sum() for k in keys)
    ag_leaves = [t for k in keys for t in _requested(ag[k])]
    rs_leaves = [t for k in keys for t in _requested(rs[k])]
    ag_flat, rs_flat = torch.autograd.grad(ag_loss, ag_leaves), torch.autograd.grad(rs_loss, rs_leaves)
    per_rank = len(_grad_names(case))
    return {k: {"ag": ag_flat[i * per_rank:(i + 1) * per_rank], "rs": rs_flat[i * per_rank:(i + 1) * per_rank]}
            for i, k in enumerate(keys)}


def _tol(case: Case) -> dict[str, float]:
    """See the module docstring."""
    return dict(rtol=2e-5, atol=2e-5) if case.dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)


def _grad_names(case: Case) -> list[str]:
    """Names of the gradients a rank returns, in order: the requested inputs of each op
    (x, w, b; both ops alike), or of the chain (x, w, b of AG-BMM, then wr, br of BMM-RS)."""
    present = [n for n in "xwb" if n in case.grads and (n != "b" or case.bias)]
    return present + (["wr"] + (["br"] if case.bias else []) if case.chain else [])


def _all_cases() -> list[tuple[int, int]]:
    return [(n, i) for n in sorted(CASES) for i in range(len(CASES[n]))]


@pytest.mark.parametrize("world_size,index", _all_cases(), ids=[CASES[n][i].id for n, i in _all_cases()])
def test_gradients_match_the_fp64_oracle(world_size: int, index: int) -> None:
    case = CASES[world_size][index]
    per_rank, inputs = _run(world_size)
    want = _oracle_grads(case, inputs[index])
    for rank, results in enumerate(per_rank):
        key = (rank // case.tp, rank % case.tp)
        result = results[index]
        if case.chain:
            pairs = [("chain eager", result["eager"], want[key]["chain"]),
                     ("chain compiled vs eager", result["compiled"], result["eager"])]
        else:
            # The extras the forward keeps for the backward never reach the caller.
            assert result["shapes"] == ((case.local, case.rows, case.hidden) if case.y2 else (0, 0, 0),
                                        (case.local, case.rows, case.m) if case.y3 else (0, 0, 0))
            pairs = [("AG-BMM", result["ag"], want[key]["ag"]), ("BMM-RS-A2A", result["rs"], want[key]["rs"])]
        names = _grad_names(case)
        for what, got, ref in pairs:
            assert len(got) == len(ref) == len(names)
            for name, g, r in zip(names, got, ref):
                assert g.shape == r.shape, f"rank {rank} {what} grad {name}: shape {tuple(g.shape)}"
                if what.endswith("vs eager"):
                    torch.testing.assert_close(g, r, rtol=0, atol=0,   # the same kernels and ATen ops
                                               msg=lambda m: f"rank {rank} {what} grad {name}: {m}")
                else:
                    expected_dtype = torch.float32 if name in ("b", "br") else case.dtype
                    assert g.dtype == expected_dtype, f"rank {rank} {what} grad {name}: {g.dtype}"
                    torch.testing.assert_close(g.double(), r, **_tol(case),
                                               msg=lambda m: f"rank {rank} {what} grad {name}: {m}")


# -- a world of one rank, in process ----------------------------------------------------------------

def _solo_args(act: int, bias: bool, seed: int) -> tuple[tuple, dict]:
    """AG-BMM arguments for a world of one: ``x`` ``(2, 3, 4)``, ``weight`` ``(2, 4, 5)``, bias ``(2, 5)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    w = torch.randn(2, 4, 5, generator=g, requires_grad=True)
    kwargs = {"act_type": act, "need_activation_feature": act != 0}
    if bias:
        kwargs["bias"] = torch.randn(2, 5, generator=g, requires_grad=True)
    return (x, w, SOLO_EP, 1, SOLO_TP, 1), kwargs


@pytest.mark.parametrize("act", range(5))
def test_opcheck_with_gradients(act: int) -> None:
    """Autograd registration, fake kernels and AOT dispatch (static and dynamic) of both
    formulas, whose backwards call the other op."""
    args, kwargs = _solo_args(act, bias=act % 2 == 0, seed=act)
    torch.library.opcheck(torch.ops.moe_fusion.npu_alltoall_allgather_bmm.default, args, kwargs)
    g = torch.Generator().manual_seed(20 + act)
    xr, wr = torch.randn(2, 3, 5, generator=g, requires_grad=True), torch.randn(2, 5, 4, generator=g, requires_grad=True)
    rs_kwargs = {"shard_type": act % 2} | ({"bias": torch.randn(2, 1, 4, generator=g, requires_grad=True)}
                                          if act % 2 == 0 else {})
    torch.library.opcheck(torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall.default, (xr, wr, *args[2:]),
                          rs_kwargs)


@pytest.mark.parametrize("act", [0, 1, 3])
def test_recording_a_backward_does_not_change_the_outputs(act: int) -> None:
    """The forward asks the kernel for y2/y3 for its backward: the caller's outputs stay bit-equal
    to a call without gradients, and unrequested outputs stay ``(0, 0, 0)``."""
    args, kwargs = _solo_args(act, bias=True, seed=10 + act)
    kwargs["need_activation_feature"] = False
    with torch.no_grad():
        want = moe_fusion.npu_alltoall_allgather_bmm(*args, **kwargs)
    got = moe_fusion.npu_alltoall_allgather_bmm(*args, **kwargs)
    assert got[0].requires_grad
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert tuple(got[1].shape) == tuple(got[2].shape) == (0, 0, 0)
