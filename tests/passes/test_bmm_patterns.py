"""Matcher tests of the BMM passes (``alltoall_allgather_bmm``, ``bmm_reducescatter_alltoall``) on
post-grad-like graphs, in one process with PyTorch's fake process group (world of 4, rank 0 in
an EP group and a TP group of 2 each).

Every form the passes accept (functional collectives or ``dist.*`` traced by dynamo, view or
reshape, permute or transpose, shard types 0/1, every activation, y2/y3 wiring, bias or not) is
rewritten with the right op arguments and no collective left; every look-alike that would change
semantics is left alone with its refusal reason asserted. The fake group returns made-up values,
so numerics are checked on real gloo ranks (``test_bmm_fusion_ranks.py``).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import bmm_forms
from moe_fusion.passes import FusionReport, backend
from pass_helpers import calls, fuse, refusals

c10d = torch.ops._c10d_functional
AG_BMM = torch.ops.moe_fusion.npu_alltoall_allgather_bmm
BMM_RS = torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall
A, B = "alltoall_allgather_bmm", "bmm_reducescatter_alltoall"
EP = TP = 2
LOCAL, C, H, M = 2, 4, 6, 5


@pytest.fixture(scope="module")
def groups():
    """(ep_group, tp_group, other_group) of 2 ranks each; the fake default group is process-global,
    so it lives for this module only."""
    assert not dist.is_initialized(), "another test left a default process group"
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield dist.new_group([0, 2]), dist.new_group([0, 1]), dist.new_group([0, 3])
    finally:
        dist.destroy_process_group()


def forward_inputs(shard: int, bias: bool = True, dtype=torch.float32):
    h = H // TP if shard == 0 else H
    x = torch.randn(EP * LOCAL, C, h).to(dtype)
    w = torch.randn(LOCAL, H, M).to(dtype)
    b = torch.randn(LOCAL, 1, M).to(dtype) if bias else None
    return x, w, b


def reverse_inputs(shard: int, bias: bool = True, bias_cols: int = 0, dtype=torch.float32):
    rows = EP * C if shard == 0 else EP * TP * C
    x = torch.randn(LOCAL, rows, M).to(dtype)
    w = torch.randn(LOCAL, M, H).to(dtype)
    cols = bias_cols or (H // TP if shard == 0 else H)
    b = torch.randn(LOCAL, 1, cols).to(dtype) if bias else None
    return x, w, b


def run(form, inputs, groups, passes, target="portable", **options):
    ep_group, tp_group, _ = groups
    fn = functools.partial(form, ep_group=ep_group, tp_group=tp_group, **options)
    return fuse(lambda x, w, b: fn(x, w, b), *inputs, passes=passes, target=target)


def collectives(gm):
    return calls(gm, c10d.all_to_all_single, c10d.all_gather_into_tensor, c10d.reduce_scatter_tensor, c10d.wait_tensor)


def fused_node(gm, op):
    (node,) = calls(gm, op)
    return node


# -- pattern a: forms that fuse ------------------------------------------------------------------

@pytest.mark.parametrize("shard", [0, 1])
@pytest.mark.parametrize("act,act_type", [("gelu", 1), ("silu", 2), ("relu", 3), ("fastgelu", 4), ("none", 0)])
def test_forward_fuses_every_activation(groups, shard, act, act_type):
    gm, report = run(bmm_forms.forward, forward_inputs(shard), groups, [A], shard=shard, act=act)
    node = fused_node(gm, AG_BMM)
    assert node.args[2:] == (groups[0].group_name, EP, groups[1].group_name, TP)
    assert node.kwargs["shard_type"] == shard and node.kwargs["act_type"] == act_type
    assert node.kwargs["bias"] is not None
    assert not node.kwargs["need_allgather_out"] and not node.kwargs["need_activation_feature"]
    assert not collectives(gm) and not calls(gm, torch.ops.aten.bmm, torch.ops.aten.erf), gm.graph
    assert len(report.fused(A)) == 1 and not report.refused(A)


@pytest.mark.parametrize("shard", [0, 1])
@pytest.mark.parametrize("transpose,reshape", [(True, False), (False, True), (True, True)])
def test_forward_fuses_transpose_and_reshape_forms(groups, shard, transpose, reshape):
    gm, _ = run(bmm_forms.forward, forward_inputs(shard, bias=False), groups, [A], shard=shard,
                transpose=transpose, reshape=reshape)
    node = fused_node(gm, AG_BMM)
    assert node.kwargs["shard_type"] == shard and node.kwargs["bias"] is None
    assert not collectives(gm)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_low_precision_bias_and_activation(groups, dtype):
    """bf16 bias becomes fp32 (the op's bias dtype, exact); the upcast activation is fused."""
    gm, _ = run(bmm_forms.forward, forward_inputs(1, dtype=dtype), groups, [A], target="A3", act="silu")
    node = fused_node(gm, AG_BMM)
    assert node.kwargs["act_type"] == 2
    assert node.kwargs["bias"].meta["val"].dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float16)
    assert node.meta["val"][0].dtype == dtype


def test_forward_wires_y2_and_y3(groups):
    gm, _ = run(bmm_forms.forward, forward_inputs(0), groups, [A], shard=0, outputs="y2")
    node = fused_node(gm, AG_BMM)
    assert node.kwargs["need_allgather_out"] and not node.kwargs["need_activation_feature"]
    getitems = {user.args[1] for user in node.users}
    assert getitems == {0, 1}
    gm, _ = run(bmm_forms.forward, forward_inputs(1), groups, [A], shard=1, outputs="y3")
    node = fused_node(gm, AG_BMM)
    assert node.kwargs["need_activation_feature"] and not node.kwargs["need_allgather_out"]
    assert {user.args[1] for user in node.users} == {0, 2}
    (output,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert all(arg.target.__name__ == "getitem" for arg in output.args[0])


def test_forward_without_all_gather_is_tp_1(groups):
    """A TP group of one rank gathers nothing: all-to-all -> bmm is the op with tp = 1 (portable only)."""
    ep_group = groups[0]

    def no_gather(x, w):
        received = torch.distributed._functional_collectives.all_to_all_single(x, None, None, ep_group)
        y2 = received.view(EP, LOCAL, C, H).transpose(0, 1).reshape(LOCAL, EP * C, H)
        return torch.relu(torch.bmm(y2, w))

    inputs = (torch.randn(EP * LOCAL, C, H), torch.randn(LOCAL, H, M))
    gm, _ = fuse(no_gather, *inputs, passes=[A])
    node = fused_node(gm, AG_BMM)
    assert node.args[4:] == ("moe_fusion.solo_tp", 1) and node.kwargs["act_type"] == 3
    assert not collectives(gm)
    _, report = fuse(no_gather, *(t.bfloat16() for t in inputs), passes=[A], target="A3")
    assert any("group_tp_worldsize must be one of (2, 4, 8, 16, 32)" in r for r in refusals(report, A)), \
        refusals(report, A)


def _compile_report(fn, inputs, passes):
    report = FusionReport()
    compiled = torch.compile(fn, backend=backend(passes=passes, report=report, compiler="eager"), fullgraph=True,
                             dynamic=False)
    compiled(*inputs)
    return report


@pytest.mark.parametrize("shard", [0, 1])
def test_forward_dist_out_form_traced_by_dynamo(groups, shard):
    ep_group, tp_group, _ = groups
    report = _compile_report(functools.partial(bmm_forms.forward_dist, ep_group=ep_group, tp_group=tp_group,
                                               shard=shard), forward_inputs(shard), [A])
    (event,) = report.fused(A)
    assert f"shard_type={shard}, act_type=1" in event.detail
    after = report.ops_after
    assert after["moe_fusion.npu_alltoall_allgather_bmm.default"] == 1
    assert after["_c10d_functional.all_to_all_single.default"] == 0
    assert after["_c10d_functional.all_gather_into_tensor.default"] == 0
    assert after["aten.copy.default"] == 0 and after["aten.empty.memory_format"] == 0


# -- pattern a: look-alikes that must stay unfused -----------------------------------------------

FORWARD_REFUSALS = {
    "same group": (dict(gather_group="ep"), "different groups needed"),
    "peers swapped": (dict(swap_peers=True), "does not reproduce the op's layout"),
    "gathered used elsewhere": (dict(outputs="gathered"), "extra users change semantics"),
}


@pytest.mark.parametrize("shard", [0, 1])
def test_forward_fuses_the_prefix_before_an_activation_the_op_lacks(groups, shard):
    """tanh GELU (the op's GELU is erf): all-to-all, all-gather, bmm and bias fuse with act_type 0;
    the GELU stays after the fused op's y1 and the report says so."""
    gm, report = run(bmm_forms.forward, forward_inputs(shard), groups, [A], shard=shard, act="gelu_tanh")
    node = fused_node(gm, AG_BMM)
    assert node.kwargs["act_type"] == 0 and node.kwargs["bias"] is not None
    assert not collectives(gm) and not calls(gm, torch.ops.aten.bmm)
    (y1,) = [user for user in node.users if user.args[1] == 0]
    assert calls(gm, torch.ops.aten.tanh) and any(_reads(n, y1) for n in calls(gm, torch.ops.aten.mul))
    (event,) = report.fused(A)
    assert "left out: the gelu_tanh activation after the bmm stays unfused" in event.detail


def _reads(node, source) -> bool:
    return source in node.all_input_nodes


@pytest.mark.parametrize("case", sorted(FORWARD_REFUSALS))
def test_forward_refuses_look_alikes(groups, case):
    options, reason = FORWARD_REFUSALS[case]
    if options.get("gather_group") == "ep":
        options = dict(options, gather_group=groups[0])
    gm, report = run(bmm_forms.forward, forward_inputs(1), groups, [A], shard=1, **options)
    assert not calls(gm, AG_BMM)
    assert calls(gm, c10d.all_to_all_single) and calls(gm, torch.ops.aten.bmm)
    assert any(reason in r for r in refusals(report, A)), refusals(report, A)


def test_forward_refuses_uneven_splits(groups):
    ep_group, tp_group, _ = groups

    def uneven(x, w):
        received = torch.distributed._functional_collectives.all_to_all_single(x, [3, 1], [3, 1], ep_group)
        return torch.bmm(received.view(1, 4 * C, H), w)

    gm, report = fuse(uneven, torch.randn(4, C, H), torch.randn(1, H, M), passes=[A])
    assert not calls(gm, AG_BMM)
    assert any("uneven splits" in r for r in refusals(report, A)), refusals(report, A)


def test_forward_refuses_inconsistent_group_size(groups):
    """The graph splits over 4 peers on a group of 2 ranks."""
    ep_group = groups[0]

    def wrong_size(x, w):
        received = torch.distributed._functional_collectives.all_to_all_single(x, [1] * 4, [1] * 4, ep_group)
        return torch.bmm(received.view(1, 4 * C, H), w)

    gm, report = fuse(wrong_size, torch.randn(4, C, H), torch.randn(1, H, M), passes=[A])
    assert not calls(gm, AG_BMM)
    assert any("group sizes inconsistent" in r for r in refusals(report, A)), refusals(report, A)


def test_forward_refuses_what_the_target_rejects(groups):
    """A3 has no fp32 kernel: the proto's check refuses with its own message."""
    gm, report = run(bmm_forms.forward, forward_inputs(1), groups, [A], target="A3", shard=1)
    assert not calls(gm, AG_BMM)
    assert any("npu_alltoall_allgather_bmm: x dtype must be one of (float16, bfloat16)" in r
               for r in refusals(report, A)), refusals(report, A)


# -- pattern b: forms that fuse ------------------------------------------------------------------

@pytest.mark.parametrize("shard", [0, 1])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_reverse_fuses(groups, shard, transpose, bias):
    gm, report = run(bmm_forms.reverse, reverse_inputs(shard, bias), groups, [B], shard=shard, transpose=transpose)
    node = fused_node(gm, BMM_RS)
    assert node.args[2:] == (groups[0].group_name, EP, groups[1].group_name, TP)
    assert node.kwargs["shard_type"] == shard
    cols = H // TP if shard == 0 else H
    assert (node.kwargs["bias"] is not None) == bias
    if bias:
        assert tuple(node.kwargs["bias"].meta["val"].shape) == (LOCAL, 1, cols)
    assert not collectives(gm) and not calls(gm, torch.ops.aten.bmm) and not calls(gm, torch.ops.aten.add)
    assert len(report.fused(B)) == 1 and not report.refused(B)


def test_reverse_bf16_bias_becomes_fp32(groups):
    gm, _ = run(bmm_forms.reverse, reverse_inputs(1, dtype=torch.bfloat16), groups, [B], target="A3", shard=1)
    node = fused_node(gm, BMM_RS)
    assert node.kwargs["bias"].meta["val"].dtype == torch.float32
    assert node.meta["val"].dtype == torch.bfloat16


# -- pattern b: look-alikes that must stay unfused -----------------------------------------------

def test_reverse_refuses_bias_before_reduce_scatter(groups):
    gm, report = run(bmm_forms.reverse, reverse_inputs(1, bias_cols=H), groups, [B], shard=1, bias_before=True)
    assert not calls(gm, BMM_RS)
    reasons = refusals(report, B)
    assert any("bias before the reduce-scatter" in r and "2 times" in r for r in reasons), reasons


REVERSE_REFUSALS = {
    "same group": (dict(scatter_group="ep"), "different groups needed"),
    "avg": (dict(reduce_op="avg"), "the reduce-scatter computes 'avg'; the op sums"),
    "reduced used elsewhere": (dict(outputs="reduced"), "extra users change semantics"),
    "shared bias": (dict(shared_bias=True), "is not indexed by (local expert, output column)"),
}


@pytest.mark.parametrize("case", sorted(REVERSE_REFUSALS))
def test_reverse_refuses_look_alikes(groups, case):
    options, reason = REVERSE_REFUSALS[case]
    if options.get("scatter_group") == "ep":
        options = dict(options, scatter_group=groups[0])
    inputs = reverse_inputs(1)
    if options.get("shared_bias"):
        inputs = inputs[:2] + (torch.randn(H),)
    gm, report = run(bmm_forms.reverse, inputs, groups, [B], shard=1, **options)
    assert not calls(gm, BMM_RS)
    assert calls(gm, c10d.reduce_scatter_tensor) and calls(gm, torch.ops.aten.bmm)
    assert any(reason in r for r in refusals(report, B)), refusals(report, B)


def test_reverse_refuses_scatter_on_the_wrong_chunk(groups):
    """Reduce-scatter chunks taken over the EP digit of the rows: not the op's TP chunk."""
    ep_group, tp_group, _ = groups

    def wrong_chunk(x, w):
        t1 = torch.bmm(x, w).view(LOCAL, EP, TP, C, H).permute(1, 0, 2, 3, 4).contiguous()   # (ep, local, tp, c, H)
        reduced = torch.distributed._functional_collectives.reduce_scatter_tensor(
            t1.view(EP * LOCAL, TP, C, H), "sum", 0, tp_group)                                 # (local, tp, c, H)
        outgoing = reduced.permute(1, 0, 2, 3).contiguous()
        return torch.distributed._functional_collectives.all_to_all_single(outgoing, None, None, ep_group)

    gm, report = fuse(wrong_chunk, *reverse_inputs(1)[:2], passes=[B])
    assert not calls(gm, BMM_RS)
    assert any("does not reproduce the op's layout" in r for r in refusals(report, B)), refusals(report, B)


def test_layer_graph_fuses_both_patterns_in_pipeline_order(groups):
    """The demo layer through the whole pipeline: both halves fused, nothing refused."""
    from moe_fusion.demo.deepspeed_layer import DeepSpeedMoE

    ep_group, tp_group, _ = groups
    layer = DeepSpeedMoE(8, 12, 4, ep_group=ep_group, tp_group=tp_group, shard="hidden")
    report = FusionReport()
    with torch.no_grad():
        torch.compile(layer, backend=backend(report=report, compiler="eager"), fullgraph=True)(torch.randn(16, 8))
    assert [e.pattern for e in report.fused()] == [A, B] and not report.refused(A) and not report.refused(B)
    assert report.ops_after["_c10d_functional.reduce_scatter_tensor.default"] == 0
    assert report.ops_after["_c10d_functional.all_to_all_single.default"] == 0
