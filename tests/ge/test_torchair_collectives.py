"""torchair's collective forms (``torch.ops.npu_define.*``) are recognized as the collectives they
are (``moe_fusion.passes.torchair_collectives``), and the BMM passes fuse chains written with
them for target A3. Graphs from ``make_fx`` (fake tensors) in the fake process group, rank 0 of
EP=2 x TP=2; torchair defines the ``npu_define`` ops (``npu_define_ops``)."""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _get_group_tag
from torch.fx.experimental.proxy_tensor import make_fx

import moe_fusion.ge_plugin.backend  # noqa: F401  (the backend registers the torchair recognizers)
from moe_fusion.passes import run_fusion_passes
from moe_fusion.passes.collectives import as_collective

Tensor = torch.Tensor
LOCAL, C, H, M = 2, 4, 16, 32            # per rank: x (ep*LOCAL, C, H)


def tag_ranks(group: dist.ProcessGroup) -> tuple[str, list[int], int]:
    """torchair's designation of a group: ``(tag, ranks, size)``."""
    ranks = dist.get_process_group_ranks(group)
    return _get_group_tag(group), ranks, len(ranks)


def all_to_all(x: Tensor, group: dist.ProcessGroup, rows: tuple[int, int] = (0, 0), wait: bool = True) -> Tensor:
    """``npu_define.all_to_all_single_npu`` as torchair's decomposition of
    ``_c10d_functional.all_to_all_single`` emits it (``rows``: uneven splits to send/receive)."""
    row = math.prod(x.shape[1:])
    send = [r * row for r in rows] if any(rows) else [x.numel() // 2] * 2
    recv = send[::-1] if any(rows) else send
    out = torch.ops.npu_define.all_to_all_single_npu(x, send, [0, send[0]], recv, [0, recv[0]], *tag_ranks(group))
    return torch.ops._c10d_functional.wait_tensor(out) if wait else out


FORMS: dict[str, tuple[Callable[[Tensor, dist.ProcessGroup], Tensor], str, dict[str, Any]]] = {
    "all_to_all_single_npu+wait": (all_to_all, "all_to_all", {"equal_splits": True}),
    "all_to_all_single_npu": (lambda x, g: all_to_all(x, g, wait=False), "all_to_all", {"equal_splits": True}),
    "all_to_all_single_npu uneven": (lambda x, g: all_to_all(x, g, rows=(1, 3)), "all_to_all",
                                     {"equal_splits": False, "input_split_sizes": (1, 3),
                                      "output_split_sizes": (3, 1)}),
    "_allgather_in_tensor_shape": (lambda x, g: torch.ops.npu_define._allgather_in_tensor_shape(
        x, [2 * x.size(0), *x.shape[1:]], *tag_ranks(g)), "all_gather", {}),
    "allgather_in_tensor": (lambda x, g: torch.ops.npu_define.allgather_in_tensor(
        torch.cat([x, x]), x, *tag_ranks(g)), "all_gather", {}),
    "allgather_in_tensor_uneven": (lambda x, g: torch.ops.npu_define.allgather_in_tensor_uneven(
        x, x.size(0), [x.size(0)] * 2, *tag_ranks(g), []), "all_gather", {}),
    "reduce_scatter_tensor_uneven": (lambda x, g: torch.ops.npu_define.reduce_scatter_tensor_uneven(
        x, [x.size(0) // 2] * 2, x.size(0) // 2, "sum", *tag_ranks(g), []), "reduce_scatter", {"reduce_op": "sum"}),
}

NOT_COLLECTIVES = {   # forms whose data movement no plain collective has
    "all_to_all_single_npu, counts not whole rows": lambda x, g: torch.ops.npu_define.all_to_all_single_npu(
        x, [1, x.numel() - 1], [0, 1], [1, x.numel() - 1], [0, 1], *tag_ranks(g)),
    "allgather_in_tensor_uneven, uneven": lambda x, g: torch.ops.npu_define.allgather_in_tensor_uneven(
        x, x.size(0), [x.size(0), 1], *tag_ranks(g), []),
    "reduce_scatter_tensor_uneven, uneven": lambda x, g: torch.ops.npu_define.reduce_scatter_tensor_uneven(
        x, [3, 1], 3, "sum", *tag_ranks(g), []),
}


@pytest.fixture(scope="module", autouse=True)
def npu_define_ops(torchair) -> None:
    """Define every ``npu_define`` collective: torchair does so when it imports their converters
    (``patch_for_hcom()``, torch_npu's uneven collectives)."""
    from torchair._ge_concrete_graph.ge_converter.experimental import (hcom_allgather,  # noqa: F401
                                                                         hcom_alltoall, hcom_reducescatter)


def npu_define_node(fn: Callable[[Tensor], Any], x: Tensor) -> torch.fx.Node:
    gm = make_fx(fn, tracing_mode="fake")(x)
    return next(n for n in gm.graph.nodes if str(n.target).startswith("npu_define."))


@pytest.mark.parametrize("form", FORMS)
def test_torchair_form_is_recognized(fake_world, form):
    ep_group, _ = fake_world
    build, kind, fields = FORMS[form]
    issue = npu_define_node(lambda x: build(x, ep_group), torch.randn(4, C, H).bfloat16())
    found = as_collective(issue)
    assert found is not None, form
    assert (found.kind, found.group_name, found.group_size, found.input.op) == (kind, ep_group.group_name, 2,
                                                                                 "placeholder")
    waits = [u for u in issue.users if u.target is torch.ops._c10d_functional.wait_tensor.default]
    assert found.result is (waits[0] if waits else issue) and found.nodes[-1] is found.result
    assert {name: getattr(found, name) for name in fields} == fields


@pytest.mark.parametrize("form", NOT_COLLECTIVES)
def test_other_torchair_movements_are_not_collectives(fake_world, form):
    ep_group, _ = fake_world
    issue = npu_define_node(lambda x: NOT_COLLECTIVES[form](x, ep_group), torch.randn(4, C, H).bfloat16())
    assert as_collective(issue) is None


def forward_chain(x: Tensor, w: Tensor, ep_group: dist.ProcessGroup, tp_group: dist.ProcessGroup) -> Tensor:
    """all_to_all_single_npu (EP) -> _allgather_in_tensor_shape (TP) -> permute/reshape -> bmm -> gelu."""
    received = all_to_all(x, ep_group).view(2, LOCAL, C, H).permute(1, 0, 2, 3).contiguous()
    gathered = torch.ops.npu_define._allgather_in_tensor_shape(received, [2 * LOCAL, 2, C, H], *tag_ranks(tp_group))
    y2 = gathered.view(2, LOCAL, 2, C, H).permute(1, 2, 0, 3, 4).reshape(LOCAL, 4 * C, H)
    return torch.nn.functional.gelu(torch.bmm(y2, w))


def reverse_chain(x: Tensor, w: Tensor, ep_group: dist.ProcessGroup, tp_group: dist.ProcessGroup) -> Tensor:
    """bmm -> reduce_scatter_tensor_uneven (TP, even) -> all_to_all_single_npu (EP)."""
    send = torch.bmm(x, w).view(LOCAL, 2, 2, C, H).permute(2, 0, 1, 3, 4).contiguous().view(2 * LOCAL, 2, C, H)
    reduced = torch.ops.npu_define.reduce_scatter_tensor_uneven(send, [LOCAL, LOCAL], LOCAL, "sum",
                                                                *tag_ranks(tp_group), [])
    return all_to_all(reduced.permute(1, 0, 2, 3).contiguous(), ep_group).view(2 * LOCAL, C, H)


@pytest.mark.parametrize("chain,op,x_shape,w_shape", [
    (forward_chain, torch.ops.moe_fusion.npu_alltoall_allgather_bmm.default, (2 * LOCAL, C, H), (LOCAL, H, M)),
    (reverse_chain, torch.ops.moe_fusion.npu_bmm_reducescatter_alltoall.default, (LOCAL, 4 * C, M), (LOCAL, M, H)),
], ids=["alltoall_allgather_bmm", "bmm_reducescatter_alltoall"])
def test_bmm_passes_fuse_torchair_forms(fake_world, chain, op, x_shape, w_shape):
    ep_group, tp_group = fake_world
    gm = make_fx(lambda x, w: chain(x, w, ep_group, tp_group), tracing_mode="fake")(
        torch.randn(x_shape).bfloat16(), torch.randn(w_shape).bfloat16())
    report = run_fusion_passes(gm.graph, target="A3")
    assert not report.refused() and len(report.fused()) == 1
    fused = [n for n in gm.graph.nodes if n.target is op]
    assert len(fused) == 1 and fused[0].args[2:6] == (ep_group.group_name, 2, tp_group.group_name, 2)
    assert fused[0].kwargs["shard_type"] == 1
    left = [str(n.target) for n in gm.graph.nodes if "npu_define" in str(n.target) or "c10d" in str(n.target)]
    assert left == []
