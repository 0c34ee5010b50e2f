"""Matcher tier of the dispatch/combine passes (``moe_allgather_ep``, ``moe_capacity_a2a``): the demo
layers' post-grad graphs (dynamo + AOT with inductor's decompositions, as the passes see them), in one
process with PyTorch's fake process group (world of 4, rank 1). Checks the op sets before and after,
that every refusal leaves the graph as it was and states its reason, target limits, and ``explain``.
Numerics are in ``test_moe_dispatch_combine_ranks.py`` (real gloo ranks)."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._inductor.decomposition import select_decomp_table
from torch.testing._internal.distributed.fake_pg import FakeStore

import moe_fusion
from moe_dispatch_combine_variants import LAYERS
from moe_fusion.passes import run_fusion_passes
from moe_fusion.passes.context import count_ops

AG, RS, A2A = (f"_c10d_functional.{op}.default" for op in ("all_gather_into_tensor", "reduce_scatter_tensor",
                                                           "all_to_all_single"))
DISPATCH, FFN, COMBINE = (f"moe_fusion.{op}.default" for op in ("npu_moe_distribute_dispatch_v2", "npu_ffn_grouped",
                                                               "npu_moe_distribute_combine_v2"))
PASSES = ["moe_allgather_ep", "moe_capacity_a2a"]
WORLD, RANK, TOKENS = 4, 1, 8


@pytest.fixture(scope="module")
def group():
    """The fake default group is process-global, so it lives for this module only."""
    assert not dist.is_initialized(), "another test left a default process group"
    dist.init_process_group("fake", store=FakeStore(), rank=RANK, world_size=WORLD)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def post_grad(layer: torch.nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The forward graph the passes run on (the run itself uses the fake group's made-up values)."""
    graphs = []

    def capture(gm: fx.GraphModule, example_inputs: list):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(layer, backend=aot_autograd(fw_compiler=capture, decompositions=select_decomp_table()),
                      fullgraph=True, dynamic=False)(x)
    return graphs[0]


def fuse(layer_name: str, *, hidden: int = 16, dtype=torch.float32, target: str = "portable", **options):
    """``(ops before, ops after, report)`` of the two passes on the layer's graph."""
    layer = LAYERS[layer_name](hidden, 24, 2 * WORLD, 2, ep_group=dist.group.WORLD, dtype=dtype, seed=5, **options)
    gm = post_grad(layer, torch.randn(TOKENS, hidden).to(dtype))
    before = count_ops(gm.graph)
    report = run_fusion_passes(gm.graph, target=target, passes=PASSES)
    return before, count_ops(gm.graph), report


def assert_unchanged(before: collections.Counter, after: collections.Counter) -> None:
    assert after == before
    assert not after[DISPATCH] and not after[COMBINE] and not after[FFN]


@pytest.mark.parametrize("layer", ["allgather", "funcol-allgather"])
@pytest.mark.parametrize("shared", [False, True])
def test_allgather_ep_fused(group, layer, shared):
    before, after, report = fuse(layer, shared_expert=shared)
    assert [e.pattern for e in report.fused()] == ["moe_allgather_ep"] and not report.refused()
    assert (before[AG], before[RS]) == (3, 1) and not after[AG] and not after[RS]
    assert after[DISPATCH] == after[FFN] == after[COMBINE] == 1
    # The local experts' 2 x 2 matmuls are gone; the gate's and the shared expert's 2 stay.
    assert before["aten.mm.default"] == 5 + 2 * shared and after["aten.mm.default"] == 1 + 2 * shared
    # The weighted sum's adds and the shared-expert add are gone; only the shared FFN's silu keeps its add.
    assert after["aten.eq.Scalar"] == 0 and after["aten.add.Tensor"] == shared
    assert "shared_expert_x" in report.fused()[0].detail if shared else "shared" not in report.fused()[0].detail


@pytest.mark.parametrize("layer", ["capacity", "funcol-capacity"])
@pytest.mark.parametrize("shared", [False, True])
def test_capacity_a2a_fused(group, layer, shared):
    before, after, report = fuse(layer, shared_expert=shared)
    assert [e.pattern for e in report.fused()] == ["moe_capacity_a2a"] and not report.refused()
    assert before[A2A] == 2 and not after[A2A]
    assert after[DISPATCH] == after[FFN] == after[COMBINE] == 1
    # Dispatch and combine einsums are gone; the gating's own einsum stays (the combine weights).
    assert before["aten.bmm.default"] == 3 and after["aten.bmm.default"] == 1
    assert after["aten.topk.default"] == 1 and after["aten.gather.default"] == 1


def test_capacity_block_with_erf_gelu_experts_is_refused_with_the_reason(group, monkeypatch):
    """Experts whose FFN the op cannot compute (erf GELU: npu_ffn_grouped's gelu is the tanh form)
    are no FFN form, so the block used to be no candidate at all, and the report was silent about it."""
    import torch.nn.functional as F
    from moe_fusion.demo import moe_layers

    monkeypatch.setitem(moe_layers.ACTIVATIONS, "gelu", F.gelu)       # the exact (erf) GELU
    before, after, report = fuse("capacity", activation="gelu")
    assert_unchanged(before, after)
    reasons = [e.detail for e in report.refused("moe_capacity_a2a")]
    assert len(reasons) == 1, report.format()       # the dispatch all_to_all; the return one is no candidate
    assert "an expert FFN the fused ops cannot compute" in reasons[0] and "erf" in reasons[0], reasons


def test_glu_experts_fused(group):
    _, after, report = fuse("capacity", activation="swiglu")
    assert report.fused("moe_capacity_a2a") and after[FFN] == 1
    assert "swiglu" in report.fused()[0].detail


@pytest.mark.parametrize("layer, options, reason", [
    ("capacity", dict(capacity_factor=1.0), "capacity C=2 < tokens per rank S=8"),
    ("capacity", dict(capacity_factor=2.0), "capacity C=4 < tokens per rank S=8"),
    ("strided", {}, f"rank {RANK} of {WORLD} holds experts [1, 5], not the contiguous block [2, 4)"),
    ("two-groups", {}, "the gathered x is all-gathered over group"),
    ("unweighted", {}, "is not sum(gathered_topk_weights * (gathered_topk_ids == e), -1)"),
    ("squared-weight", {}, "is not sum(gathered_topk_weights * (gathered_topk_ids == e), -1)"),
])
def test_refused_with_reason(group, layer, options, reason):
    before, after, report = fuse(layer, **options)
    assert_unchanged(before, after)
    details = [e.detail for e in report.refused()]
    assert len(details) == 1 and reason in details[0], details


@pytest.mark.parametrize("layer", ["allgather", "capacity"])
def test_target_limits_refuse(group, layer):
    """fp32 and H = 16 run on the portable target only: A3 refuses with the ops' own messages."""
    before, after, report = fuse(layer, target="A3")
    assert_unchanged(before, after)
    (detail,) = [e.detail for e in report.refused()]
    assert "invalid on target A3" in detail and "npu_moe_distribute_dispatch_v2: x dtype must be one of" in detail
    before, after, report = fuse(layer, dtype=torch.bfloat16, target="A3")
    (detail,) = [e.detail for e in report.refused()]
    assert "hidden size H must be in [1024, 8192] on A3, got H=16" in detail
    assert_unchanged(before, after)


def test_a3_accepts_device_shapes(group):
    _, after, report = fuse("allgather", hidden=1024, dtype=torch.bfloat16, target="A3", activation="gelu")
    assert report.fused("moe_allgather_ep") and after[COMBINE] == 1


def test_explain_shows_refusal(group, capsys):
    layer = LAYERS["capacity"](16, 24, 2 * WORLD, 2, ep_group=group, seed=5, capacity_factor=1.0)
    torch._dynamo.reset()
    with torch.no_grad():
        report = moe_fusion.passes.explain(layer, torch.randn(TOKENS, 16), passes=PASSES)
    assert not report.fused()
    printed = capsys.readouterr().out
    assert "REFUSED moe_capacity_a2a" in printed and "capacity C=2 < tokens per rank S=8" in printed
