"""torchtitan 0.3.0's MoE (``torchtitan.models.common.moe.MoE``: top-k router, local token dispatcher,
``GroupedExperts`` with three ``torch._grouped_mm`` over ``offs``, shared SwiGLU expert), as
installed from PyPI, unmodified, single rank, under ``moe_fusion.compile``: the routed experts
become one ``npu_ffn_grouped`` (in bf16, the dtype torchtitan's experts compute in) and the shared
expert an ``npu_ffn``, in inference and training. The oracle is the eager module. Tolerances are
bf16's: torchtitan rounds each grouped matmul's output to bf16, the fused op keeps the hidden
activations in fp32 (SPEC's precision), so the two differ by bf16 roundings of ``h``.

With expert parallelism (torchtitan's own ``parallelize`` on real gloo ranks, its
``AllToAllTokenDispatcher``: ``all_to_all_single`` with split sizes exchanged at run time, its
``_permute`` index arithmetic, grouped experts over ``offs``, ``deterministic_scatter_add``), the whole
block becomes ``dispatch_v2 -> npu_ffn_grouped -> combine_v2`` (``moe_split_a2a``), in inference and
training, eager and inductor, with and without the shared expert.

Under inductor on a CPU that multiplies bf16 natively (AMX, AVX512-BF16) the cost gate leaves these
bf16 experts unfused (the fused FFN would multiply in fp32, ``moe_fusion.passes.cost``): the
inductor cases that check the fused code pass ``cost_gate=False``, and the gated cases set the CPU's
capability flags so that the outcome does not depend on the machine.

Not fused yet on one rank: the local dispatcher's sort and scatter-add (no all-to-all to anchor a
block on; ``npu_moe_re_routing``'s computation written as index arithmetic).
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

import moe_fusion
from moe_fusion.passes import FusionReport
from step_results import step_results

pytest.importorskip("torchtitan")
from integration import torchtitan_shims  # noqa: E402

torchtitan_shims.install()
from torchtitan.models.common.feed_forward import FeedForward  # noqa: E402
from torchtitan.models.common.linear import Linear  # noqa: E402
from torchtitan.models.common.moe import MoE, GroupedExperts, RoutedExperts, TokenChoiceTopKRouter  # noqa: E402
from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher  # noqa: E402

EXPERTS, DIM, HIDDEN, TOP_K = 4, 32, 64, 2


def _linear(i: int, o: int) -> Linear.Config:
    return Linear.Config(in_features=i, out_features=o)


def _moe_config(experts: int, shared: bool, dispatcher: LocalTokenDispatcher.Config, dim: int = DIM,
                hidden: int = HIDDEN) -> MoE.Config:
    """torchtitan's MoE config with softmax top-2 routing and ``dispatcher``."""
    return MoE.Config(
        num_experts=experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=dim, hidden_dim=hidden, num_experts=experts),
            token_dispatcher=dispatcher),
        router=TokenChoiceTopKRouter.Config(num_experts=experts, gate=_linear(dim, experts), top_k=TOP_K,
                                            score_func="softmax"),
        shared_experts=FeedForward.Config(w1=_linear(dim, hidden), w2=_linear(hidden, dim), w3=_linear(dim, hidden))
        if shared else None)


def _built(config: MoE.Config) -> torch.nn.Module:
    """The module of ``config``, weights drawn here (std 0.2, the same on every rank)."""
    moe = config.build()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return moe


def make_moe(shared: bool = True) -> torch.nn.Module:
    """torchtitan's MoE on one rank (local token dispatcher)."""
    return _built(_moe_config(EXPERTS, shared, LocalTokenDispatcher.Config(num_experts=EXPERTS, top_k=TOP_K)))


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared-expert", "routed-only"])
def test_moe_experts_fuse(shared, train):
    moe = make_moe(shared)
    x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(1))
    want = step_results(moe, moe, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    got = step_results(moe, moe_fusion.compile(moe, report=report, compiler="eager"), x, train)
    details = [e.detail for e in report.fused("ffn")]
    assert any(d.startswith("npu_ffn_grouped(swiglu, GLU, no bias1, torch.bfloat16)") for d in details), report.format()
    assert any(d.startswith("npu_ffn(swiglu, GLU") for d in details) == shared, report.format()
    assert len(got) == len(want) and (not train or len(got) > 4)
    for g, w in zip(got, want):
        scale = w.abs().max().item()
        assert (g - w).abs().max().item() <= 1e-2 * scale + 1e-3, (g - w).abs().max()


@pytest.mark.parametrize("gated", [False, True], ids=["cost_gate=False", "gated-on-a-native-bf16-cpu"])
def test_inductor_inference(gated, monkeypatch):
    moe = make_moe()
    x = torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(1))
    report = FusionReport()
    torch._dynamo.reset()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    (got,) = step_results(moe, moe_fusion.compile(moe, report=report, cost_gate=gated), x, False)
    (want,) = step_results(moe, moe, x, False)
    fused = [e.detail for e in report.fused("ffn")]
    if gated:       # the routed experts compute in bf16, the shared expert in fp32
        assert [d.split(",")[0] for d in fused] == ["npu_ffn(swiglu"], report.format()
        assert "natively (AMX)" in report.refused("ffn")[0].detail, report.format()
    else:
        assert len(fused) == 2, report.format()
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item() + 1e-3


# Expert parallel: torchtitan's own parallelize (ParallelDims, DeviceMesh, DTensor expert weights)
# with its AllToAllTokenDispatcher on real gloo ranks, under its "partial_dtensor" SPMD backend: the
# default "spmd_types" backend exchanges rows with a list all_to_all, which gloo runs only with
# equal chunks. The whole block becomes dispatch_v2 -> npu_ffn_grouped -> combine_v2 (moe_split_a2a).
EP_CASES = {  # name -> (world, compiler, shared expert, training); "gated": inductor with the cost gate
    "ep2": (2, "eager", False, False),
    "ep2-shared-train": (2, "eager", True, True),
    "ep2-inductor": (2, "inductor", True, False),
    "ep2-inductor-train": (2, "inductor", False, True),
    "ep2-gated": (2, "gated", True, False),
    "ep4": (4, "eager", True, False),
}
EP_EXPERTS = 8


def expert_parallel_dims(world: int) -> Any:
    """torchtitan's ``ParallelDims`` with EP over all ``world`` ranks and its meshes built, under the
    ``partial_dtensor`` SPMD backend (see above)."""
    from torchtitan.distributed import utils as dist_utils
    from torchtitan.distributed.parallel_dims import ParallelDims

    dist_utils.set_spmd_backend("partial_dtensor")
    dims = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=world, world_size=world,
                        spmd_backend="partial_dtensor")
    dims.build_mesh()
    return dims


def make_ep_moe(dims: Any, experts: int, shared: bool, dim: int = DIM, hidden: int = HIDDEN) -> torch.nn.Module:
    """torchtitan's MoE with the all-to-all token dispatcher, parallelized by its own ``parallelize``
    over ``dims`` (the expert weights become DTensors sharded over EP)."""
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config
    from torchtitan.models.common.token_dispatcher import AllToAllTokenDispatcher
    import spmd_types

    config = _moe_config(experts, shared, AllToAllTokenDispatcher.Config(num_experts=experts, top_k=TOP_K),
                         dim, hidden)
    set_moe_sharding_config(config, enable_ep=True, enable_sp=False, expert_param_layout={
        "w1_EFD": spmd_types.Shard(1), "w2_EDF": spmd_types.Shard(2), "w3_EFD": spmd_types.Shard(1)})
    moe = _built(config)
    moe.parallelize(dims)
    return moe


def _run_ep(rank: int, world: int, names: list[str]) -> dict[str, dict]:
    from integration.ranked_cases import eager_and_fused

    dims = expert_parallel_dims(world)
    torch.cpu._is_amx_tile_supported = lambda: True     # a CPU with native bf16 matmuls (this process only)
    results = {}
    for name in names:
        _, compiler, shared, train = EP_CASES[name]
        moe = make_ep_moe(dims, EP_EXPERTS, shared).train(train)
        x = torch.randn(2, 8, DIM, generator=torch.Generator().manual_seed(10 + rank))
        options = {"compiler": "inductor"} if compiler == "gated" else {"compiler": compiler, "cost_gate": False}
        results[name] = eager_and_fused(moe, x, train, **options)
    return results


@pytest.fixture(scope="module")
def ep_ranks() -> dict[int, list[dict]]:
    from integration.ranked_cases import run_by_world

    return run_by_world(EP_CASES, _run_ep)


@pytest.mark.parametrize("name", list(EP_CASES))
def test_expert_parallel_block_fuses(ep_ranks, name):
    from integration.ranked_cases import COMBINE, DISPATCH

    world, compiler, shared, train = EP_CASES[name]
    for rank, results in enumerate(ep_ranks[world]):
        case = results[name]
        ops = case["ops"]
        if compiler == "gated":     # left unfused with the reason: the graph keeps its all-to-alls
            refused = [d for p, ok, d in case["events"] if p == "moe_split_a2a" and not ok]
            assert refused and "natively (AMX)" in refused[0], (rank, case["events"])
            # the fp32 shared expert alone fuses (npu_ffn)
            assert [p for p, ok, _ in case["events"] if ok] == ["ffn"], (rank, case["events"])
            assert ops.get(DISPATCH, 0) == 0 and any("all_to_all" in k for k in ops), ops
        else:
            fused = [d for p, ok, d in case["events"] if p == "moe_split_a2a" and ok]
            assert len(fused) == 1 and f"W={world}, E={EP_EXPERTS}, K={TOP_K}" in fused[0], (rank, case["events"])
            assert ("shared expert" in fused[0]) == shared, fused[0]
            assert ops.get(DISPATCH, 0) >= 1 and ops.get(COMBINE, 0) >= 1 and not any("all_to_all" in k for k in ops), \
                ops
        got, want = case["fused"], case["eager"]
        assert len(got) == len(want) and (not train or len(want) > 4)
        for g, w in zip(got, want):   # bf16 experts: see the module docstring
            assert (g - w).abs().max().item() <= 1e-2 * w.abs().max().item() + 1e-3, (rank, (g - w).abs().max())
