"""``moe_fusion.onnx.export``: fusion before export, dynamic batch, the CLI, and the DeepSpeed-style
demo layer in a world of one rank."""
from __future__ import annotations

import onnx
import pytest
import torch
from onnx_support import Mlp, custom_nodes, eager, export_fn, node_attrs, run_ort, run_reference, assert_outputs

import moe_fusion.onnx as mo
from moe_fusion.demo.deepspeed_layer import DeepSpeedMoE
from moe_fusion.__main__ import main as moe_fusion_main
from moe_fusion.passes import FusionReport


def test_unfused_model_exports_with_fused_node():
    torch.manual_seed(0)
    model, x = Mlp().eval(), torch.randn(6, 8)
    fused = mo.export(model, (x,))
    onnx.checker.check_model(fused, full_check=True)
    assert [n.op_type for n in custom_nodes(fused)] == ["FFN"]
    assert node_attrs(custom_nodes(fused)[0])["activation"] == "relu"
    assert_outputs(run_ort(fused, (x,)), eager(model, (x,)))
    assert not custom_nodes(mo.export(model, (x,), fuse=False))


def test_dynamic_batch():
    """One export, run at several batch sizes (FFN without experts and update_expert take any BS)."""
    torch.manual_seed(0)
    table = torch.tensor([[2, 1, 0], [1, 2, 0]], dtype=torch.int32)
    fn = lambda x, w1, w2, ids: (torch.ops.moe_fusion.npu_ffn(x, w1, w2, "silu"),  # noqa: E731
                                 *torch.ops.moe_fusion.npu_moe_update_expert(ids, table, balance_mode=1))
    w1, w2 = torch.randn(8, 16) / 3, torch.randn(16, 8) / 4
    batch = torch.export.Dim("batch", min=2, max=64)
    model = export_fn(fn, (torch.randn(5, 8), w1, w2, torch.randint(0, 2, (5, 2), dtype=torch.int32)),
                      dynamic_shapes=(({0: batch}, None, None, {0: batch}),))
    onnx.checker.check_model(model, full_check=True)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for rows in (3, 17):
        args = (torch.randn(rows, 8), w1, w2, torch.randint(0, 2, (rows, 2), dtype=torch.int32))
        assert_outputs(run_ort(model, args), eager(fn, args))


def test_cli(tmp_path):
    """``python -m moe_fusion export module:factory out.onnx``."""
    out = tmp_path / "mlp.onnx"
    assert moe_fusion_main(["export", "onnx_support:mlp_factory", str(out)]) == 0
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in custom_nodes(model)] == ["FFN"]


@pytest.mark.parametrize("shard", ["capacity", "hidden"])
def test_deepspeed_layer_world_of_one(shard):
    """No groups: the layer has no collectives and nothing to fuse; the export runs in
    onnxruntime and in the reference evaluator and matches eager."""
    torch.manual_seed(0)
    layer = DeepSpeedMoE(16, 32, 4, ep_group=None, tp_group=None, activation="relu", shard=shard).eval()
    x = torch.randn(8, 16)
    report = FusionReport()
    model = mo.export(layer, (x,), report=report)
    onnx.checker.check_model(model, full_check=True)
    expected = eager(layer, (x,))
    assert_outputs(run_ort(model, (x,)), expected, atol=1e-5, rtol=1e-4)
    assert_outputs(run_reference(model, (x,)), expected, atol=1e-5, rtol=1e-4)


@pytest.fixture
def gloo_world_of_one():
    """A real one-rank gloo world on loopback: collectives on it are identities that execute."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield dist.new_group([0]), dist.new_group([0])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("shard", ["capacity", "hidden"])
def test_deepspeed_layer_groups_of_one_export_fused(gloo_world_of_one, shard):
    """EP and TP groups of one rank: the layer still issues its collectives (as DeepSpeed code
    does), the passes fuse them into the BMM pair, and the export runs and matches eager."""
    ep_group, tp_group = gloo_world_of_one
    torch.manual_seed(0)
    layer = DeepSpeedMoE(16, 32, 4, ep_group=ep_group, tp_group=tp_group, activation="relu", shard=shard).eval()
    x = torch.randn(8, 16)
    model = mo.export(layer, (x,))
    onnx.checker.check_model(model, full_check=True)
    assert {n.op_type for n in custom_nodes(model)} >= {"AlltoAllAllGatherBatchMatMul",
                                                         "BatchMatMulReduceScatterAlltoAll"}
    expected = eager(layer, (x,))
    assert_outputs(run_ort(model, (x,)), expected, atol=1e-5, rtol=1e-4)
    assert_outputs(run_reference(model, (x,)), expected, atol=1e-5, rtol=1e-4)


class _Collectives(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        group = dist.group.WORLD
        y = funcol.all_to_all_single(x, None, None, group)
        y = funcol.all_gather_tensor(y * 2, 0, group)
        return funcol.all_reduce(y, "sum", group) + 1


@pytest.mark.parametrize("world", [1, 2])
def test_collectives_of_one_rank_are_identities(world):
    """Collectives of a one-rank group export as identities; a larger group is an error."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        x = torch.randn(4, 3)
        if world == 2:
            with pytest.raises(ValueError, match="all_to_all on group .* of 2 ranks has no ONNX form"):
                mo.export(_Collectives(), (x,), fuse=False)
            return
        model = mo.export(_Collectives(), (x,), fuse=False)
        assert [n.op_type for n in model.graph.node] == ["Mul", "Add"]
        torch.testing.assert_close(run_ort(model, (x,))[0], x * 2 + 1)
    finally:
        dist.destroy_process_group()
