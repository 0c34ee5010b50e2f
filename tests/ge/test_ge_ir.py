"""The GE IR definitions derived from the protos equal CANN's prototypes: torchair's raw-op
builders for the ops CANN ships, SPEC §6.1's REG_OP for the BMM pair (no raw op in torchair).
Also: the stub serves them in the format torchair's own parser consumes."""
from __future__ import annotations

import pytest
from ge_reference import spec_ir_def, torchair_ir_def

from moe_fusion.ge_plugin.ir import IR_DEFS
from moe_fusion.op_protos import PROTOS

SPEC_ONLY = ("AlltoAllAllGatherBatchMatMul", "BatchMatMulReduceScatterAlltoAll")
CANN_OPS = tuple(t for t in IR_DEFS if t not in SPEC_ONLY)


def _assert_same(ours, reference):
    assert ours.inputs == reference.inputs, "input names/order/kinds"
    assert ours.outputs == reference.outputs, "output names/order"
    assert [a.name for a in ours.attrs] == [a.name for a in reference.attrs], "attr names/order"
    for mine, theirs in zip(ours.attrs, reference.attrs):
        assert (mine.type, mine.required, mine.default) == (theirs.type, theirs.required, theirs.default), mine.name


def test_every_op_has_an_ir_definition():
    assert set(IR_DEFS) == {p.ge_type for p in PROTOS.values()}


@pytest.mark.parametrize("op_type", CANN_OPS)
def test_ir_equals_torchair_raw_op(torchair, op_type):
    _assert_same(IR_DEFS[op_type], torchair_ir_def(op_type))


@pytest.mark.parametrize("op_type", SPEC_ONLY)
def test_bmm_pair_ir_equals_spec_reg_op(torchair, op_type):
    from torchair._ge_concrete_graph import auto_generated_ge_raw_ops, ge_apis

    assert not hasattr(auto_generated_ge_raw_ops, op_type) and not hasattr(ge_apis, op_type)
    _assert_same(IR_DEFS[op_type], spec_ir_def(op_type))


def test_stub_serves_ir_defs(torchair):
    from torchair.core import _torchair

    status, inputs, outputs, attrs = _torchair.get_registered_ir_def("MoeReRouting")
    assert status == "SUCCESS"
    assert inputs == [("tokens", "required"), ("expert_token_num_per_rank", "required"),
                      ("per_token_scales", "optional")]
    assert outputs == [("permute_tokens", "required"), ("permute_per_token_scales", "required"),
                       ("permute_token_idx", "required"), ("expert_token_num", "required")]
    assert attrs == [("expert_token_num_type", "VT_INT"), ("idx_type", "VT_INT")]
    assert _torchair.get_registered_ir_def("NoSuchOp") == ("ERROR", [], [], [])


def test_torchair_positional_custom_op_reads_the_stub_format(torchair):
    """``ge.custom_op(type, *args)`` maps positional arguments to inputs and typed attrs by the
    registered IR definition: our format drives torchair's own parser."""
    from torchair.ge._ge_graph import Data, DataType, GeGraph

    with GeGraph() as graph:
        tokens = Data(index=0, dtype=DataType.DT_FLOAT16, shape=[4, 8], placement="NPU")
        counts = Data(index=1, dtype=DataType.DT_INT32, shape=[2, 2], placement="NPU")
        torchair.ge.custom_op("MoeReRouting", tokens, counts, None, 0, 1)
        op = graph.op[-1]
    assert [d.name for d in op.input_desc] == ["tokens", "expert_token_num_per_rank", "per_token_scales"]
    assert list(op.input) == [tokens.tensor, counts.tensor, ""]
    assert (op.attr["expert_token_num_type"].i, op.attr["idx_type"].i) == (0, 1)
    assert [d.name for d in op.output_desc] == list(IR_DEFS["MoeReRouting"].outputs)
