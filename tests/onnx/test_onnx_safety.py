"""Models from untrusted files: malformed attrs and shapes fail with an ``OpValidationError`` naming
the op, the attr (or input) and the value, before anything is allocated from an attr."""
from __future__ import annotations

import re

import onnx
import pytest
import torch
from onnx import helper
from onnx_support import custom_nodes, export_fn, run_reference

from moe_fusion import OpValidationError
from moe_fusion.onnx import attach_functions

ops = torch.ops.moe_fusion


def _set_attr(model: onnx.ModelProto, name: str, value) -> onnx.ModelProto:
    node = custom_nodes(model)[0]
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept + [helper.make_attribute(name, value)])
    return model


@pytest.fixture(scope="module")
def dispatch_model():
    x, ids = torch.randn(4, 8), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0]], dtype=torch.int32)
    fn = lambda x, ids: ops.npu_moe_distribute_dispatch_v2(x, ids, "ep", 1, 0, 4)  # noqa: E731
    return export_fn(fn, (x, ids)), (x, ids)


@pytest.mark.parametrize("attr, value, message", [
    ("ep_world_size", 8, "MoeDistributeDispatchV2: ep_world_size must be 1"),
    ("global_bs", 2 ** 40, "MoeDistributeDispatchV2: global_bs must be 0 or BS = 4"),
    ("moe_expert_num", 2 ** 30, "MoeDistributeDispatchV2: moe_expert_num must be in [1, 1024]"),
    ("group_ep", 3, "MoeDistributeDispatchV2: group_ep must be a Str attr"),
    ("expert_token_nums_type", 5, "npu_moe_distribute_dispatch_v2: expert_token_nums_type must be one of (0, 1)"),
    ("y_dtype", 27, "MoeDistributeDispatchV2: y_dtype must be 0"),
])
def test_reference_rejects_bad_attrs(dispatch_model, attr, value, message):
    model, args = dispatch_model
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    with pytest.raises(OpValidationError, match=re.escape(message)):
        run_reference(_set_attr(bad, attr, value), args)


def test_reference_rejects_bad_shapes():
    """Counts that do not cover the tokens: the value rule of the op, not an out-of-bounds read."""
    model = export_fn(lambda t, c: ops.npu_moe_re_routing(t, c),
                      (torch.randn(6, 4), torch.tensor([[1, 2], [2, 1]], dtype=torch.int32)))
    with pytest.raises(OpValidationError, match="npu_moe_re_routing: expert_token_num_per_rank must sum to"):
        run_reference(model, (torch.randn(6, 4), torch.tensor([[1, 2], [2, 3]], dtype=torch.int32)))


@pytest.mark.parametrize("attr, value, message", [
    ("activation", "tanh", "npu_ffn: activation must be one of"),
    ("tokens_index_flag", 5, r"FFN: tokens_index_flag must be one of \(0, 1\), got 5"),
])
def test_function_bodies_reject_bad_attrs(attr, value, message):
    fn = lambda x, w1, w2: ops.npu_ffn(x, w1, w2, "relu")  # noqa: E731
    model = export_fn(fn, (torch.randn(4, 8), torch.randn(8, 16), torch.randn(16, 8)), functions=False)
    with pytest.raises(OpValidationError, match=message):
        attach_functions(_set_attr(model, attr, value))


def test_update_expert_body_rejects_bad_mode():
    model = export_fn(lambda ids, t: ops.npu_moe_update_expert(ids, t, local_rank_id=0, world_size=2),
                      (torch.zeros(2, 1, dtype=torch.int32), torch.tensor([[1, 0]], dtype=torch.int32)),
                      functions=False)
    with pytest.raises(OpValidationError, match=r"npu_moe_update_expert: balance_mode must be one of \(0, 1\), got 7"):
        attach_functions(_set_attr(model, "balance_mode", 7))
