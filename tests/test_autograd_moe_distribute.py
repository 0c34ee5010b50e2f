"""Gradients of dispatch_v2 / combine_v2 / combine_add_rms_norm (``moe_fusion.autograd.moe_distribute``)
on real gloo ranks against the fp64 world-level references of ``oracle_moe_distribute_grad``
(the SPEC forward written as loops, differentiated by torch autograd over all ranks' inputs).

One spawn per world size (2 and 4) runs every case: each rank builds the case's world inputs from
its seed, differentiates the three ops on its own slice with seeded output gradients, and returns
its gradients; the parent compares them with the oracle. The cases cover EP only and EP x TP
(``tp_world_size`` 2), shared experts (1 and 2 of them, ``L`` 1 and 2 local experts), zero/copy/
const experts with ``(Q,)`` and ``(Q, H)`` alphas, 1-D and 2-D masks, uneven ``BS`` with
``global_bs`` (a rank with no tokens), routings where a rank sends nothing and an expert receives
nothing, ``shared_expert_x`` of both shapes, and ``expert_scales`` passed to dispatch. The 2-rank
spawn also runs the refusals (every rank raises, then the group keeps working) and a compiled
training step. fp32 throughout (fp64 gradient checks: ``test_gradcheck_comm``). In-process (a world of
one rank needs no group): the gradient oracle by hand and against the forward oracle, the other
refusals, and opcheck with gradients.

Tolerances. The references are exact up to fp64 rounding. For the gradients that are multilinear
in the inputs (everything but add_rms_norm's), the reference is also evaluated on the inputs'
absolute values, which gives ``mag`` = the sum of the absolute values of the terms of each
gradient entry. The fp32 kernels sum at most ``n`` such terms (``n`` = H for the weight
gradients' dot products, plus the K + shared + TP row sums, plus a few roundings), each fp32 step
erring by at most ``2^-24`` of the running sum, so ``|got - want| <= n * 2^-23 * mag`` (a factor 2
of margin) + one fp32 rounding of ``want``. Padding rows and masked tokens have ``mag = 0``: their
gradients must be exactly zero. add_rms_norm's gradients are not multilinear (rstd^3 terms): its
backward reads ``xs`` and ``rstd`` from the fp32 outputs (each within ~(K + 4) * 2^-24 ~ 4e-7
relative of exact) and evaluates sums of H = 16..32 terms (at most 32 * 2^-24 ~ 2e-6 relative)
with rstd ~ 1 and |xs| ~ 1, so errors stay within a few 1e-6 of the largest gradient entry
(3e-7 measured); the check allows 1e-5 of it plus 1e-5 relative, while a missing term or factor
moves entries by the order of the entries themselves.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import traceback
from typing import Any, Dict, List, Optional

import pytest
import torch

from moe_fusion.launch import run_ranks
from oracle_moe_distribute import combine_world, dispatch_world
from oracle_moe_distribute_grad import COMBINE_LEAVES, combine_grads, combine_world64, dispatch_x_grads
from test_moe_distribute_ranks import FP32, Case, _case, _groups, make_inputs, op_kwargs

NORM_EPS = 1e-6
U32 = 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class GradCase:
    base: Case
    dispatch_scales: bool = False     # also pass expert_scales to dispatch (its expand_scales output is unused)


def _grad_case(name: str, world: int, k: int, h: int, bs, dispatch_scales: bool = False, **kw) -> GradCase:
    return GradCase(_case(name, world, k, h, FP32, bs, **kw), dispatch_scales)


CASES: Dict[int, List[GradCase]] = {
    2: [
        _grad_case("ep_L2_rms_shared_x", 2, 2, 32, 5, ep_world_size=2, moe_expert_num=4, shared_x=2, rms=True),
        _grad_case("shared_S1_L2_mask2d_rms_shared_x3", 2, 2, 32, 4, ep_world_size=2, moe_expert_num=2,
                   shared_expert_rank_num=1, shared_expert_num=1, mask="2d", rms=True, shared_x=3),
        _grad_case("special_mask1d_dispatch_scales_shared_x", 2, 3, 32, 5, dispatch_scales=True, ep_world_size=2,
                   moe_expert_num=4, zero_expert_num=1, copy_expert_num=1, const_expert_num=2, mask="1d", shared_x=2),
        _grad_case("special_alpha_2d_mask2d_rms", 2, 2, 16, 4, ep_world_size=2, moe_expert_num=2,
                   zero_expert_num=1, copy_expert_num=1, const_expert_num=2, alpha_2d=True, mask="2d", rms=True),
        _grad_case("skew_rank1_has_no_tokens", 2, 2, 16, (5, 0), ep_world_size=2, moe_expert_num=4, global_bs=10,
                   routing="skew"),
    ],
    4: [
        _grad_case("tp_rms", 4, 2, 32, 4, ep_world_size=2, moe_expert_num=2, tp_world_size=2, rms=True),
        _grad_case("tp_shared_S1_mask2d", 4, 1, 16, 3, ep_world_size=2, moe_expert_num=1, tp_world_size=2,
                   shared_expert_rank_num=1, shared_expert_num=1, mask="2d"),
        _grad_case("tp_skew_uneven_bs", 4, 1, 16, (4, 3, 0, 2), ep_world_size=2, moe_expert_num=2, tp_world_size=2,
                   global_bs=8, routing="skew", shared_x=2),
        _grad_case("shared_S2_n2_L2_shared_x3_rms", 4, 2, 32, 4, ep_world_size=4, moe_expert_num=4,
                   shared_expert_rank_num=2, shared_expert_num=2, shared_x=3, rms=True),
        _grad_case("no_expert0_uneven_mask1d_dispatch_scales", 4, 2, 16, (2, 4, 1, 3), dispatch_scales=True,
                   ep_world_size=4, moe_expert_num=8, global_bs=16, routing="no_expert0", mask="1d"),
        _grad_case("shared_special_mask2d", 4, 3, 32, 4, ep_world_size=4, moe_expert_num=6, shared_expert_rank_num=1,
                   shared_expert_num=1, zero_expert_num=1, copy_expert_num=1, const_expert_num=1, mask="2d"),
    ],
}
ALL_CASES = [c for cs in CASES.values() for c in cs]


# ----------------------------------------------------------------------------------------------
# Inputs beyond the forward's (identical on every rank and in the parent)
# ----------------------------------------------------------------------------------------------

def seeded_tensors(gc: GradCase, g: int) -> Dict[str, torch.Tensor]:
    """Rank ``g``'s combine input rows and output gradients: ``expand_x`` and ``grad_expand_x``
    ``(max(T,1)*A, H)`` (padding rows included), ``grad_out`` ``(BS, H)``, and add_rms_norm's
    ``grad_y`` ``(BS,1,H)``, ``grad_rstd`` ``(BS,1,1)``, ``grad_x`` ``(BS,1,H)``; all fp32."""
    case, a = gc.base, gc.base.attrs
    rows = a.tp * a.capacity(a.split(g)[0], case.bs[g], case.k)
    bs, h = case.bs[g], case.h
    gen = torch.Generator().manual_seed(case.seed * 7 + g)
    shapes = {"expand_x": (rows, h), "grad_expand_x": (rows, h), "grad_out": (bs, h), "grad_y": (bs, 1, h),
              "grad_rstd": (bs, 1, 1), "grad_x": (bs, 1, h)}
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def combine_inputs(inp: dict, seeded: List[Dict[str, torch.Tensor]]) -> Dict[str, list]:
    """Every rank's float combine inputs, by schema name."""
    return {"expand_x": [s["expand_x"] for s in seeded], "expert_scales": inp["w"], "shared_expert_x": inp["shared_x"],
            "ori_x": inp["ori_x"], "const_expert_alpha_1": inp["alpha1"], "const_expert_alpha_2": inp["alpha2"],
            "const_expert_v": inp["v"]}


# ----------------------------------------------------------------------------------------------
# Rank side
# ----------------------------------------------------------------------------------------------

def _leaves(named: Dict[str, Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    return {n: t.clone().requires_grad_() for n, t in named.items() if t is not None}


def run_grad_case(gc: GradCase, rank: int, groups: dict) -> dict:
    import moe_fusion
    case, a = gc.base, gc.base.attrs
    inp = make_inputs(case)
    seeded = seeded_tensors(gc, rank)   # this rank's; combine_inputs takes every rank's
    group_ep, ep_rank, kw = op_kwargs(case, rank, groups)
    ids, mask = inp["ids"][rank], inp["mask"][rank]
    res: Dict[str, Any] = {}

    x = inp["x"][rank].clone().requires_grad_()
    disp = moe_fusion.npu_moe_distribute_dispatch_v2(
        x, ids, group_ep, a.W, ep_rank, a.M, x_active_mask=mask,
        expert_scales=inp["w"][rank] if gc.dispatch_scales else None, **kw)
    (disp[0] * seeded["grad_expand_x"]).sum().backward()
    res["x"] = x.grad
    assist, ep_counts, tp_counts = disp[2], disp[4], disp[5]

    def combine_call(op, leaves, *extra_positional, **extra):
        return op(leaves["expand_x"], ids, assist, ep_counts, leaves["expert_scales"], *extra_positional, group_ep,
                  a.W, ep_rank, a.M, tp_send_counts=tp_counts, x_active_mask=mask,
                  shared_expert_x=leaves.get("shared_expert_x"), ori_x=leaves.get("ori_x"),
                  const_expert_alpha_1=leaves.get("const_expert_alpha_1"),
                  const_expert_alpha_2=leaves.get("const_expert_alpha_2"),
                  const_expert_v=leaves.get("const_expert_v"), **extra, **kw)

    all_seeded = [seeded_tensors(gc, g) for g in range(a.world)]
    named = {n: v[rank] for n, v in combine_inputs(inp, all_seeded).items()}
    leaves = _leaves(named)
    out = combine_call(moe_fusion.npu_moe_distribute_combine_v2, leaves)
    (out * seeded["grad_out"]).sum().backward()
    res["combine"] = {n: t.grad for n, t in leaves.items()}
    if case.rms:
        leaves = _leaves({**named, "residual_x": inp["residual"][rank], "gamma": inp["gamma"][rank]})
        y, rstd, x_out = combine_call(moe_fusion.npu_moe_distribute_combine_add_rms_norm, leaves,
                                      leaves["residual_x"], leaves["gamma"], norm_eps=NORM_EPS)
        loss = (y * seeded["grad_y"]).sum() + (rstd * seeded["grad_rstd"]).sum() + (x_out * seeded["grad_x"]).sum()
        loss.backward()
        res["rms"] = {n: t.grad for n, t in leaves.items()}
    return res


# The refusals, on 2 ranks: every rank raises at once, before any backward collective.
REFUSALS = {
    "quant_mode_2_x": "npu_moe_distribute_dispatch_v2: x is not differentiable \\(quant_mode 2",
    "comm_quant_mode_2_expand_x": "npu_moe_distribute_combine_v2: expand_x is not differentiable \\(comm_quant_mode 2",
}


def run_refusal(name: str, rank: int, group: str) -> str:
    """Run the refused backward; returns the error text (raises if nothing is raised)."""
    import moe_fusion
    gen = torch.Generator().manual_seed(11 + rank)
    x = torch.randn(4, 32, generator=gen, requires_grad=True)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(4)]).to(torch.int32)
    w = torch.rand(4, 2, generator=gen)
    try:
        if name == "quant_mode_2_x":
            expand_x, scales, *_ = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, group, 2, rank, 4, quant_mode=2)
            (expand_x.float() * scales.unsqueeze(1)).sum().backward()     # a dequantized payload
        else:
            expand_x, _, assist, _, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
                x.detach(), ids, group, 2, rank, 4)
            rows = torch.randn(expand_x.shape, generator=gen, requires_grad=True)
            out = moe_fusion.npu_moe_distribute_combine_v2(rows, ids, assist, ep_counts, w, group, 2, rank, 4,
                                                           tp_send_counts=tp_counts, comm_quant_mode=2)
            out.sum().backward()
    except moe_fusion.NotDifferentiableError as error:
        return str(error)
    raise AssertionError(f"{name}: no NotDifferentiableError")


# The compiled training step (2 ranks): dispatch -> a local expert layer -> combine.
STEP_W, STEP_M, STEP_K, STEP_H, STEP_BS = 2, 4, 2, 32, 6


def step_inputs(rank: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return {"x": torch.randn(STEP_BS, STEP_H, generator=gen),
            "ids": torch.stack([torch.randperm(STEP_M, generator=gen)[:STEP_K]
                                for _ in range(STEP_BS)]).to(torch.int32),
            "w": torch.rand(STEP_BS, STEP_K, generator=gen),
            "w1": torch.randn(STEP_H, STEP_H, generator=gen) / STEP_H ** 0.5,
            "target": torch.randn(STEP_BS, STEP_H, generator=gen)}


def train_step(x, w, w1, ids, target, *, group: str, rank: int):
    import moe_fusion
    expand_x, _, assist, _, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
        x, ids, group, STEP_W, rank, STEP_M)
    hidden = torch.tanh(expand_x @ w1)           # padding rows stay zero: tanh(0) = 0
    out = moe_fusion.npu_moe_distribute_combine_v2(hidden, ids, assist, ep_counts, w, group, STEP_W, rank, STEP_M,
                                                   tp_send_counts=tp_counts)
    return ((out - target) ** 2).sum()


def run_compiled_step(rank: int, group: str) -> dict:
    import torch._dynamo
    inp = step_inputs(rank)
    fn = functools.partial(train_step, group=group, rank=rank)
    grads = {}
    for mode in ("eager", "compiled"):
        leaves = {n: inp[n].clone().requires_grad_() for n in ("x", "w", "w1")}
        if mode == "compiled":
            torch._dynamo.reset()
            call = torch.compile(fn, fullgraph=True, backend="aot_eager")
        else:
            call = fn
        loss = call(leaves["x"], leaves["w"], leaves["w1"], inp["ids"], inp["target"])
        grads[mode] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))), loss=loss.detach())
    return grads


def _rank_fn(rank: int, world: int, names: List[str]) -> dict:
    cases = {c.base.name: c for c in CASES[world]}
    groups = _groups(world, any(cases[n].base.attrs.tp == 2 for n in names))
    out: Dict[str, Any] = {}

    def attempt(key: str, fn, *args) -> None:
        try:
            out[key] = fn(*args)
        except Exception:   # reported per case; the following cases still run (and show the group is healthy)
            out[key] = {"error": traceback.format_exc()}

    if world == 2:
        for name in REFUSALS:
            attempt(name, run_refusal, name, rank, groups["world"])
    for n in names:
        attempt(n, run_grad_case, cases[n], rank, groups)
    if world == 2:
        attempt("compiled_step", run_compiled_step, rank, groups["world"])
    return out


@functools.lru_cache(maxsize=None)
def _world_run(world: int):
    names = [c.base.name for c in CASES[world]]
    try:
        return run_ranks(world, _rank_fn, names, timeout=200, pg_timeout=60), None
    except Exception as error:   # cached too: a broken spawn must not be retried by every test
        return None, f"{type(error).__name__}: {error}"


def results_for(world: int, key: str) -> List[Any]:
    results, error = _world_run(world)
    if error is not None:
        pytest.fail(f"the {world}-rank spawn failed: {error}")
    per_rank = [r[key] for r in results]
    for g, r in enumerate(per_rank):
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"{key}: rank {g} raised:\n{r['error']}")
    return per_rank


# ----------------------------------------------------------------------------------------------
# Expected gradients
# ----------------------------------------------------------------------------------------------

def _abs(seq):
    return None if seq is None else [None if t is None else t.abs() for t in seq]


@functools.lru_cache(maxsize=None)
def expected(name: str) -> dict:
    gc = next(c for c in ALL_CASES if c.base.name == name)
    case, a = gc.base, gc.base.attrs
    inp = make_inputs(case)
    seeded = [seeded_tensors(gc, g) for g in range(a.world)]
    routes = dispatch_world(inp["x"], inp["ids"], a, x_active_masks=inp["mask"])
    exp: Dict[str, Any] = {}
    grad_expand = [s["grad_expand_x"] for s in seeded]
    exp["x"] = dispatch_x_grads(inp["x"], inp["ids"], a, grad_expand, x_active_masks=inp["mask"])
    exp["x_mag"] = dispatch_x_grads(inp["x"], inp["ids"], a, _abs(grad_expand), x_active_masks=inp["mask"])
    comb = combine_inputs(inp, seeded)
    grad_out = [s["grad_out"] for s in seeded]
    exp["combine"] = combine_grads(comb, inp["ids"], routes, a, inp["mask"], grad_out)
    exp["combine_mag"] = combine_grads({n: _abs(v) for n, v in comb.items()}, inp["ids"], routes, a, inp["mask"],
                                       _abs(grad_out))
    if case.rms:
        rms_inputs = {**comb, "residual_x": inp["residual"], "gamma": inp["gamma"]}
        exp["rms"] = combine_grads(rms_inputs, inp["ids"], routes, a, inp["mask"], None, norm_eps=NORM_EPS,
                                   rms_grads=[(s["grad_y"], s["grad_rstd"], s["grad_x"]) for s in seeded])
    return exp


def assert_within(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, nterms: int, what: str) -> None:
    """``|got - want| <= nterms * 2^-23 * mag + 2^-23 * |want|`` (module docstring)."""
    assert got is not None, f"{what}: no gradient"
    assert got.dtype == FP32 and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}, want fp32" \
                                                          f"{tuple(want.shape)}"
    diff = (got.double() - want).abs()
    tol = nterms * 2 * U32 * mag + 2 * U32 * want.abs()
    bad = ~(diff <= tol)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {want.numel()} entries off, first at {idx}: got "
                             f"{got[idx].item()}, want {want[idx].item()} (tol {tol[idx].item():.3g})")


def assert_rms_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within 1e-5 of the largest entry plus 1e-5 relative (module docstring)."""
    assert got is not None and got.dtype == FP32 and got.shape == want.shape, f"{what}: bad gradient {got}"
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def _ids(cases):
    return [pytest.param(c, id=f"w{c.base.world}-{c.base.name}") for c in cases]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gc", _ids(ALL_CASES))
def test_dispatch_x_gradient(gc: GradCase):
    """grad x: every copy of a token (top-k, shared, TP peer) adds its expand_x row gradient."""
    case = gc.base
    exp = expected(case.name)
    nterms = case.k + case.attrs.n_sh_eff + 4
    for g, res in enumerate(results_for(case.world, case.name)):
        assert_within(res["x"], exp["x"][g], exp["x_mag"][g], nterms, f"{case.name} rank {g} grad x")


@pytest.mark.parametrize("gc", _ids(ALL_CASES))
def test_combine_gradients(gc: GradCase):
    """grad expand_x (weighted copies of the output gradient, zero padding), expert_scales (per-copy
    dot products; copy/const experts locally), shared_expert_x, ori_x and the const parameters."""
    case = gc.base
    exp = expected(case.name)
    nterms = case.h + case.k + case.attrs.n_sh_eff + 4
    for g, res in enumerate(results_for(case.world, case.name)):
        got = res["combine"]
        want = exp["combine"][g]
        assert set(got) == {n for n in COMBINE_LEAVES if want[n] is not None}, f"{case.name} rank {g}: {sorted(got)}"
        for name, value in got.items():
            assert_within(value, want[name], exp["combine_mag"][g][name], nterms, f"{case.name} rank {g} grad {name}")


@pytest.mark.parametrize("gc", _ids([c for c in ALL_CASES if c.base.rms]))
def test_combine_add_rms_norm_gradients(gc: GradCase):
    """The add + RMSNorm terms (residual_x, gamma) and, through them, the combine gradients."""
    case = gc.base
    exp = expected(case.name)
    for g, res in enumerate(results_for(case.world, case.name)):
        got, want = res["rms"], exp["rms"][g]
        assert set(got) == {n for n, v in want.items() if v is not None}, f"{case.name} rank {g}: {sorted(got)}"
        for name, value in got.items():
            assert_rms_close(value, want[name], f"{case.name} rank {g} add_rms_norm grad {name}")


def test_grid_covers_the_required_configurations():
    worlds = {c.base.world for c in ALL_CASES}
    attrs = [c.base.attrs for c in ALL_CASES]
    assert {2, 4} <= worlds
    assert any(a.tp == 2 for a in attrs) and any(a.tp == 1 for a in attrs)
    assert {a.n_sh_eff for a in attrs} >= {0, 1, 2}
    assert any(a.L_moe > 1 for a in attrs) and any(a.const_expert_num for a in attrs)
    assert any(0 in c.base.bs for c in ALL_CASES) and any(c.base.routing in ("skew", "no_expert0") for c in ALL_CASES)
    assert {c.base.mask for c in ALL_CASES} == {"none", "1d", "2d"} and any(c.dispatch_scales for c in ALL_CASES)
    assert {c.base.shared_x for c in ALL_CASES} == {0, 2, 3} and any(c.base.rms and c.base.attrs.tp == 2
                                                                      for c in ALL_CASES)


@pytest.mark.parametrize("name", list(REFUSALS))
def test_quant_modes_refuse_on_every_rank(name: str):
    """Every rank raises NotDifferentiableError naming the op and the argument (before any
    backward collective: the cases after it in the same spawn still ran)."""
    for g, message in enumerate(results_for(2, name)):
        assert isinstance(message, str), f"rank {g}: {message}"
        assert re.search(REFUSALS[name], message), f"rank {g}: {message}"
    assert results_for(2, CASES[2][0].base.name)   # the group still works after the refusals


def test_compiled_training_step_matches_eager():
    """dispatch -> tanh(expand_x @ w1) -> combine, compiled fullgraph with aot_eager: the same
    loss and the same gradients of x, expert_scales and w1 as eager, on 2 ranks, bit for bit
    (aot_eager runs the same kernels, the formulas' included, in the same order)."""
    for g, res in enumerate(results_for(2, "compiled_step")):
        eager, compiled = res["eager"], res["compiled"]
        for name in ("loss", "x", "w", "w1"):
            assert eager[name].abs().sum() > 0, f"rank {g}: eager {name} is zero"
            assert torch.equal(compiled[name], eager[name]), \
                f"rank {g} {name}: max difference {(compiled[name] - eager[name]).abs().max().item()}"


def test_gradient_oracle_by_hand():
    """The references on SPEC §3.4's smallest example, worked out by hand: W = 2, M = 2 (expert e
    on rank e), K = 1, A = 4. Rank 0 receives (src 0, token 1), (src 1, token 0), (src 1, token 1);
    rank 1 receives (src 0, token 0)."""
    from oracle_moe_distribute import MoeAttrs
    a = MoeAttrs(ep_world_size=2, moe_expert_num=2)
    xs = [torch.tensor([[1.0, 2], [3, 4]]), torch.tensor([[5.0, 6], [7, 8]])]
    ids = [torch.tensor([[1], [0]], dtype=torch.int32), torch.tensor([[0], [0]], dtype=torch.int32)]
    rows = [torch.arange(8.0).view(4, 2), 10 + torch.arange(8.0).view(4, 2)]
    grad_x = dispatch_x_grads(xs, ids, a, rows)         # each token gets the gradient of its one row
    assert grad_x[0].tolist() == [[10, 11], [0, 1]] and grad_x[1].tolist() == [[2, 3], [4, 5]]
    w = [torch.tensor([[0.5], [0.25]]), torch.tensor([[1.0], [2.0]])]
    grad_out = [torch.tensor([[1.0, -1], [2, 0]]), torch.tensor([[0.0, 1], [1, 1]])]
    got = combine_grads({"expand_x": rows, "expert_scales": w}, ids, dispatch_world(xs, ids, a), a, None, grad_out)
    # out0 = [0.5 y1[0], 0.25 y0[0]], out1 = [y0[1], 2 y0[2]]
    assert got[0]["expand_x"].tolist() == [[0.5, 0], [0, 1], [2, 2], [0, 0]]
    assert got[1]["expand_x"].tolist() == [[0.5, -0.5], [0, 0], [0, 0], [0, 0]]
    assert got[0]["expert_scales"].tolist() == [[-1], [0]]   # (1,-1).(10,11), (2,0).(0,1)
    assert got[1]["expert_scales"].tolist() == [[3], [9]]    # (0,1).(2,3), (1,1).(4,5)


@pytest.mark.parametrize("gc", _ids(ALL_CASES))
def test_gradient_oracle_forward_matches_the_forward_oracle(gc: GradCase):
    """The fp64 combine the gradients differentiate computes what ``oracle_moe_distribute``'s fp32
    combine (checked against the kernels by test_moe_distribute_ranks) computes, on every case (that
    one rounds each of its <= K + 3 fp32 additions of O(1) terms: within 1e-5)."""
    case, a = gc.base, gc.base.attrs
    inp = make_inputs(case)
    routes = dispatch_world(inp["x"], inp["ids"], a, x_active_masks=inp["mask"])
    rows = [seeded_tensors(gc, g)["expand_x"] for g in range(a.world)]
    floats = {"shared_expert_xs": inp["shared_x"], "ori_xs": inp["ori_x"], "const_expert_alpha_1": inp["alpha1"],
              "const_expert_alpha_2": inp["alpha2"], "const_expert_v": inp["v"]}
    want = combine_world(rows, inp["ids"], [r.assist_info_for_combine for r in routes],
                         [r.ep_recv_counts for r in routes], inp["w"], a, x_active_masks=inp["mask"],
                         tp_send_counts=[r.tp_recv_counts for r in routes], return_acc=True, **floats)
    got = combine_world64(_to64(rows), inp["ids"], _to64(inp["w"]), routes, a, x_active_masks=inp["mask"],
                          **{n: _to64(v) for n, v in floats.items()})
    for g in range(a.world):
        assert [t is None for t in got[g]] == [t is None for t in want[g]], f"rank {g}: processed tokens differ"
        for i, (gt, wt) in enumerate(zip(got[g], want[g])):
            if wt is not None:
                torch.testing.assert_close(gt, wt.double(), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"rank {g} token {i}: {m}")


def _to64(seq):
    return None if seq is None else [None if t is None else t.double() for t in seq]


# ----------------------------------------------------------------------------------------------
# In-process refusals (a world of one rank needs no process group)
# ----------------------------------------------------------------------------------------------

def _one_rank_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``(5, 16)``, ``expert_ids`` ``(5, 2)`` over 4 experts, ``expert_scales`` ``(5, 2)``; fp32."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(5)]).to(torch.int32)
    return torch.randn(5, 16, generator=gen), ids, torch.rand(5, 2, generator=gen)


def test_smooth_quant_scales_are_refused():
    import moe_fusion
    x, ids, _ = _one_rank_inputs(1)
    scales = torch.rand(4, 16, requires_grad=True)
    expand_x, dynamic_scales, *_ = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, 4, scales=scales,
                                                                             quant_mode=2)
    with pytest.raises(moe_fusion.NotDifferentiableError,
                       match="npu_moe_distribute_dispatch_v2: scales is not differentiable"):
        (expand_x.float() * dynamic_scales.unsqueeze(1)).sum().backward()


def test_dispatch_expert_scales_reach_only_expand_scales():
    """Unused, expand_scales gives expert_scales no gradient (there is no path) and x its usual
    one; used, the backward refuses expert_scales (implementation-defined metadata)."""
    import moe_fusion
    from oracle_moe_distribute import MoeAttrs
    x, ids, w = _one_rank_inputs(2)
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, 4, expert_scales=w)
    grad_expand = torch.randn(out[0].shape, generator=torch.Generator().manual_seed(3))
    gx, gw = torch.autograd.grad((out[0] * grad_expand).sum(), [x, w], allow_unused=True)
    assert gw is None
    want = dispatch_x_grads([x.detach()], [ids], MoeAttrs(ep_world_size=1, moe_expert_num=4), [grad_expand])[0]
    torch.testing.assert_close(gx.double(), want, rtol=1e-6, atol=1e-6)
    out = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, 4, expert_scales=w)
    with pytest.raises(moe_fusion.NotDifferentiableError,
                       match="npu_moe_distribute_dispatch_v2: expert_scales is not differentiable"):
        (out[0].sum() + out[6].sum()).backward()


def test_dispatch_backward_without_an_expand_x_gradient():
    """A loss that reaches dispatch only through quant_mode 0's dynamic_scales (a constant zero
    buffer): the backward still runs its combine (a collective) and x's gradient is zero."""
    import moe_fusion
    x, ids, _ = _one_rank_inputs(3)
    x = x.clone().requires_grad_()
    out = moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, 4)
    (gx,) = torch.autograd.grad(out[1].sum(), [x])
    assert gx.shape == x.shape and gx.dtype == x.dtype and not gx.any()


def test_combine_expand_scales_is_refused():
    import moe_fusion
    x, ids, w = _one_rank_inputs(4)
    expand_x, _, assist, _, ep_counts, tp_counts, expand_scales = moe_fusion.npu_moe_distribute_dispatch_v2(
        x, ids, "", 1, 0, 4, expert_scales=w)
    rows = expand_x.clone().requires_grad_()
    out = moe_fusion.npu_moe_distribute_combine_add_rms_norm(
        rows, ids, assist, ep_counts, w, torch.randn(5, 1, 16), torch.ones(16), "", 1, 0, 4,
        tp_send_counts=tp_counts, expand_scales=expand_scales.clone().requires_grad_())
    with pytest.raises(moe_fusion.NotDifferentiableError,
                       match="npu_moe_distribute_combine_add_rms_norm: expand_scales is not differentiable"):
        out[0].sum().backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_with_gradients(dtype):
    """Schema, autograd registration, fake kernels, and AOT dispatch with dynamic shapes (whose
    gradients torch compares with eager), on a world of one rank; fp64 is the portable target's."""
    import moe_fusion
    x, ids, w = _one_rank_inputs(5)
    x, w = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
    torch.library.opcheck(torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2.default, (x, ids, "", 1, 0, 4))
    expand_x, _, assist, _, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
        x.detach(), ids, "", 1, 0, 4)
    rows = torch.randn(expand_x.shape, generator=torch.Generator().manual_seed(6), dtype=dtype, requires_grad=True)
    head = (rows, ids, assist, ep_counts, w)
    torch.library.opcheck(torch.ops.moe_fusion.npu_moe_distribute_combine_v2.default, (*head, "", 1, 0, 4),
                          {"tp_send_counts": tp_counts})
    residual, gamma = torch.randn(5, 1, 16, dtype=dtype, requires_grad=True), torch.rand(16, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.moe_fusion.npu_moe_distribute_combine_add_rms_norm.default,
                          (*head, residual, gamma, "", 1, 0, 4), {"tp_send_counts": tp_counts})
