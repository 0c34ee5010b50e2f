"""Converter tier: each op traced with ``make_fx`` (fake tensors) and converted by torchair's FX→GE
compiler yields the GE node SPEC describes: type, input wiring (empty optional inputs), attrs,
output dtypes, and a node that checks out against the registered IR definition.

Every opcheck case is checked against the torch<->GE table (``op_protos.ge_mapping``): arguments
pass through under their GE names, fixed attrs hold their value. The per-op tests below hold
hand-written expectations from SPEC and torchair's converters, derived attrs included.
"""
from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest
import torch
from ge_graphs import attrs, node, output_dtypes, trace_ge_graph, wiring

from moe_fusion.ge_plugin.ir import IR_DEFS, check_op_def
from moe_fusion.op_protos import PROTOS
from moe_fusion.op_protos.ge_mapping import GE_MAPPINGS

DT = {torch.float32: "DT_FLOAT", torch.float16: "DT_FLOAT16", torch.bfloat16: "DT_BF16", torch.int8: "DT_INT8",
      torch.int32: "DT_INT32", torch.int64: "DT_INT64", torch.bool: "DT_BOOL", torch.uint8: "DT_UINT8"}


def _op(name: str):
    return getattr(torch.ops.moe_fusion, name).default


def build(torchair, name: str, args: tuple, kwargs: dict) -> tuple[Any, list[str]]:
    """The GE graph of one call of op ``name`` and the names of its tensor arguments, in the order
    of the graph inputs (``arg<i>_1``)."""
    schema = _op(name)._schema
    bound = {a.name: v for a, v in zip(schema.arguments, args)} | kwargs
    tensor_names = [a.name for a in schema.arguments if isinstance(bound.get(a.name), torch.Tensor)]

    def call(*tensors: torch.Tensor):
        return _op(name)(**{**bound, **dict(zip(tensor_names, tensors))})

    return trace_ge_graph(torchair, call, [bound[n] for n in tensor_names]), tensor_names


def _cases() -> list:
    """Every opcheck case of every op; an op without ``tests/cases/<op>.py`` gets one failing case."""
    params = []
    for name in PROTOS:
        try:
            module = importlib.import_module(f"cases.{name}")
        except ModuleNotFoundError:
            params.append(pytest.param(name, None, None, id=f"{name}-no-cases"))
            continue
        params += [pytest.param(name, args, kwargs, id=f"{name}-{i}")
                   for i, (args, kwargs) in enumerate(module.opcheck_cases())]
    return params


def test_every_op_has_a_registered_converter(torchair):
    from moe_fusion.ge_plugin.converters import CONVERTERS

    assert set(PROTOS) <= set(CONVERTERS)
    for name in PROTOS:
        assert _op(name)._ge_converter is not None, name


@pytest.mark.parametrize("name,args,kwargs", _cases())
def test_converter_on_every_opcheck_case(torchair, name, args, kwargs):
    """Every representative call: one GE node of the op's type that checks out against the IR
    the native module serves, its tensor arguments wired to the graph inputs under their GE names,
    every absent optional input empty, every attribute argument passed through (or its GE default
    for None) unless the table derives it, the table's fixed attrs, output dtypes of the fake kernel."""
    from torchair.core import _torchair

    assert args is not None, f"tests/cases/{name}.py is missing"
    proto, mapping = PROTOS[name], GE_MAPPINGS[name]
    graph, tensor_names = build(torchair, name, args, kwargs)
    op = node(graph, proto.ge_type)
    check_op_def(op, _torchair.get_registered_ir_def(proto.ge_type))

    def ge_name(torch_name: str) -> str:
        return mapping.renames.get(torch_name, torch_name)

    schema = _op(name)._schema
    bound = {a.name: v for a, v in zip(schema.arguments, args)} | kwargs
    expected_wiring = {n: "" for n, kind in IR_DEFS[proto.ge_type].inputs if kind == "optional"}
    for i, tensor_name in enumerate(tensor_names):
        expected_wiring[ge_name(tensor_name)] = f"arg{i}_1:0"
    got = wiring(op)
    if name == "npu_ffn":  # the int lists become a Const node (test_ffn_expert_tokens_become_an_int64_const)
        got["expert_tokens"] = got["expert_tokens"] and "<const>"
        expected_wiring["expert_tokens"] = "<const>" if bound.get("expert_tokens") or bound.get(
            "expert_tokens_index") else ""
    assert got == expected_wiring

    node_attrs = attrs(op)
    ir_attrs = {a.name for a in IR_DEFS[proto.ge_type].attrs}
    not_passed = set(mapping.torch_only) | set(mapping.derived.consumes if mapping.derived else ())
    for arg in schema.arguments:
        if isinstance(arg.type, torch.TensorType) or ge_name(arg.name) not in ir_attrs or arg.name in not_passed:
            continue
        value = bound.get(arg.name, arg.default_value)
        expected = IR_DEFS[proto.ge_type].attr(ge_name(arg.name)).default if value is None else value
        assert node_attrs[ge_name(arg.name)] == pytest.approx(expected), arg.name
    assert {k: node_attrs[k] for k in mapping.fixed_attrs} == mapping.fixed_attrs

    assert output_dtypes(op) == [DT[spec.dtype] for spec in proto.infer_shape(proto.check(*args, **kwargs))]


# ------------------------------------------------------------------------------------------------
# One test per special rule of SPEC's converters.
# ------------------------------------------------------------------------------------------------

def test_re_routing_pass_through(torchair):
    tokens, counts = torch.randn(8, 16).half(), torch.tensor([[1, 2, 0], [3, 0, 2]], dtype=torch.int32)
    graph, _ = build(torchair, "npu_moe_re_routing", (tokens, counts), {"expert_token_num_type": 1, "idx_type": 0})
    op = node(graph, "MoeReRouting")
    assert wiring(op) == {"tokens": "arg0_1:0", "expert_token_num_per_rank": "arg1_1:0", "per_token_scales": ""}
    assert attrs(op) == {"expert_token_num_type": 1, "idx_type": 0}
    assert output_dtypes(op) == ["DT_FLOAT16", "DT_FLOAT", "DT_INT32", "DT_INT32"]


def test_update_expert_pass_through(torchair):
    ids, table = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[1, 4, 0], [1, 5, 0], [2, 6, 7], [1, 8, 0]],
                                                               dtype=torch.int32)
    scales, threshold = torch.rand(2, 2), torch.full((2,), 0.1)
    graph, _ = build(torchair, "npu_moe_update_expert", (ids, table),
                     {"expert_scales": scales, "pruning_threshold": threshold, "local_rank_id": 1, "world_size": 4})
    op = node(graph, "MoeUpdateExpert")
    assert wiring(op) == {"expert_ids": "arg0_1:0", "eplb_table": "arg1_1:0", "expert_scales": "arg2_1:0",
                          "pruning_threshold": "arg3_1:0", "active_mask": ""}
    assert attrs(op) == {"local_rank_id": 1, "world_size": 4, "balance_mode": 0}
    assert output_dtypes(op) == ["DT_INT64", "DT_BOOL"]


def _const_values(graph, source: str) -> list[int]:
    const = next(op for op in graph.op if op.name == source.split(":")[0])
    assert const.type == "Const"
    tensor = const.attr["value"].t
    assert tensor.desc.dtype == 8  # ge_ir DataType DT_INT64
    return np.frombuffer(tensor.data, dtype=np.int64).tolist()


@pytest.mark.parametrize("index_form", [False, True])
def test_ffn_expert_tokens_become_an_int64_const(torchair, index_form):
    x, w1, w2 = torch.randn(6, 8).half(), torch.randn(2, 8, 4).half(), torch.randn(2, 4, 8).half()
    kwargs = {"expert_tokens_index": [2, 6]} if index_form else {"expert_tokens": [2, 4]}
    graph, _ = build(torchair, "npu_ffn", (x, w1, w2, "relu"), kwargs)
    op = node(graph, "FFN")
    assert _const_values(graph, wiring(op)["expert_tokens"]) == ([2, 6] if index_form else [2, 4])
    assert attrs(op) == {"activation": "relu", "inner_precise": 0, "output_dtype": -1,
                         "tokens_index_flag": index_form}
    assert output_dtypes(op) == ["DT_FLOAT16"]


@pytest.mark.parametrize("output_dtype,attr,dtype", [(None, -1, "DT_FLOAT16"), (torch.float16, 0, "DT_FLOAT16"),
                                                     (torch.bfloat16, 1, "DT_BF16")])
def test_ffn_output_dtype_attr_for_int8_x(torchair, output_dtype, attr, dtype):
    from cases.npu_ffn import FfnCase, make_call

    out = torch.bfloat16 if output_dtype == torch.bfloat16 else torch.float16
    args, kwargs = make_call(FfnCase(mode="quant", dtype=out, output_dtype_arg=output_dtype is not None))
    graph, _ = build(torchair, "npu_ffn", args, kwargs)
    op = node(graph, "FFN")
    assert attrs(op)["output_dtype"] == attr
    assert output_dtypes(op) == [dtype]


def test_ffn_output_dtype_ignored_for_float_x(torchair):
    x, w1, w2 = torch.randn(6, 8).bfloat16(), torch.randn(8, 4).bfloat16(), torch.randn(4, 8).bfloat16()
    graph, _ = build(torchair, "npu_ffn", (x, w1, w2, "gelu"), {"output_dtype": torch.float16, "inner_precise": 1})
    op = node(graph, "FFN")
    assert attrs(op) == {"activation": "gelu", "inner_precise": 1, "output_dtype": -1, "tokens_index_flag": False}
    assert output_dtypes(op) == ["DT_BF16"]


def test_ffn_grouped_feeds_the_counts_tensor(torchair):
    x, w1, w2 = torch.randn(6, 8).bfloat16(), torch.randn(2, 8, 4).bfloat16(), torch.randn(2, 4, 8).bfloat16()
    graph, names = build(torchair, "npu_ffn_grouped", (x, w1, w2, "relu"),
                         {"expert_tokens": torch.tensor([2, 5]), "tokens_index_flag": True})
    op = node(graph, "FFN")
    assert names == ["x", "weight1", "weight2", "expert_tokens"]
    assert {k: v for k, v in wiring(op).items() if v} == {n: f"arg{i}_1:0" for i, n in enumerate(names)}
    assert attrs(op) == {"activation": "relu", "inner_precise": 0, "output_dtype": -1, "tokens_index_flag": True}
    assert output_dtypes(op) == ["DT_BF16"]


@pytest.mark.parametrize("quant_mode,x_dtype,y_dtype,expand_x", [
    (0, torch.bfloat16, "DT_BF16", "DT_BF16"), (0, torch.float16, "DT_FLOAT16", "DT_FLOAT16"),
    (2, torch.bfloat16, "DT_INT8", "DT_INT8")])
def test_dispatch_y_dtype_attr(torchair, quant_mode, x_dtype, y_dtype, expand_x):
    from cases.npu_moe_distribute_dispatch_v2 import M
    from torchair.ge import DataType

    x, ids = torch.randn(5, 16).to(x_dtype), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2]], dtype=torch.int32)
    graph, _ = build(torchair, "npu_moe_distribute_dispatch_v2", (x, ids, "ep", 1, 0, M),
                     {"quant_mode": quant_mode, "group_tp": "tp", "global_bs": 5})
    op = node(graph, "MoeDistributeDispatchV2")
    node_attrs = attrs(op)
    assert node_attrs["y_dtype"] == getattr(DataType, y_dtype)   # a GE (not ge_ir proto) DataType value
    assert {k: node_attrs[k] for k in ("group_ep", "ep_world_size", "moe_expert_num", "quant_mode", "group_tp",
                                       "global_bs", "expert_token_nums_type")} == {
        "group_ep": "ep", "ep_world_size": 1, "moe_expert_num": M, "quant_mode": quant_mode, "group_tp": "tp",
        "global_bs": 5, "expert_token_nums_type": 1}
    assert wiring(op) == {"x": "arg0_1:0", "expert_ids": "arg1_1:0", "scales": "", "x_active_mask": "",
                          "expert_scales": "", "elastic_info": "", "performance_info": ""}
    assert output_dtypes(op) == [expand_x, "DT_FLOAT", "DT_INT32", "DT_INT64", "DT_INT32", "DT_INT32", "DT_FLOAT"]


def test_combine_v2_fills_the_v1_placeholders(torchair):
    from cases.npu_moe_distribute_combine_v2 import _case

    args, kwargs = _case(0)
    graph, names = build(torchair, "npu_moe_distribute_combine_v2", args, kwargs)
    op = node(graph, "MoeDistributeCombineV2")
    wired = wiring(op)
    assert names == ["expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales",
                     "tp_send_counts"]
    assert [wired[n] for n in names] == [f"arg{i}_1:0" for i in range(6)]
    assert wired["activation_scale"] == wired["weight_scale"] == wired["group_list"] == ""
    assert attrs(op) == {"group_ep": "ep", "ep_world_size": 1, "ep_rank_id": 0, "moe_expert_num": 4, "group_tp": "",
                         "tp_world_size": 0, "tp_rank_id": 0, "expert_shard_type": 0, "shared_expert_num": 1,
                         "shared_expert_rank_num": 0, "global_bs": 0, "out_dtype": 0, "comm_quant_mode": 0,
                         "group_list_type": 0, "comm_alg": "", "zero_expert_num": 0, "copy_expert_num": 0,
                         "const_expert_num": 0}
    assert output_dtypes(op) == ["DT_BF16"]


def test_combine_add_rms_norm_maps_expand_idx_to_assist_info(torchair):
    from cases.npu_moe_distribute_combine_add_rms_norm import _case

    args, kwargs = _case(1, x_active_mask=None, norm_eps=1e-5)
    graph, names = build(torchair, "npu_moe_distribute_combine_add_rms_norm", args, kwargs)
    op = node(graph, "MoeDistributeCombineAddRmsNorm")
    assert wiring(op)["assist_info"] == f"arg{names.index('expand_idx')}_1:0"
    assert attrs(op) == {"group_ep": "ep", "ep_world_size": 1, "ep_rank_id": 0, "moe_expert_num": 4, "group_tp": "",
                         "tp_world_size": 0, "tp_rank_id": 0, "expert_shard_type": 0, "shared_expert_num": 1,
                         "shared_expert_rank_num": 0, "global_bs": 0, "out_dtype": 0, "comm_quant_mode": 0,
                         "group_list_type": 0, "comm_alg": "", "norm_eps": pytest.approx(1e-5),
                         "zero_expert_num": 0, "copy_expert_num": 0, "const_expert_num": 0}
    assert output_dtypes(op) == ["DT_BF16", "DT_FLOAT", "DT_BF16"]


@pytest.mark.parametrize("y2,y3", [(False, False), (True, False), (False, True), (True, True)])
def test_alltoall_allgather_bmm_output_flags(torchair, y2, y3):
    x, w, bias = torch.randn(3, 4, 8).bfloat16(), torch.randn(3, 8, 5).bfloat16(), torch.randn(3, 5)
    graph, _ = build(torchair, "npu_alltoall_allgather_bmm", (x, w, "ep", 1, "tp", 1),
                     {"bias": bias, "shard_type": 1, "act_type": 1, "need_allgather_out": y2,
                      "need_activation_feature": y3})
    op = node(graph, "AlltoAllAllGatherBatchMatMul")
    assert wiring(op) == {"x": "arg0_1:0", "weight": "arg1_1:0", "bias": "arg2_1:0"}
    assert attrs(op) == {"group_ep": "ep", "group_tp": "tp", "ep_world_size": 1, "tp_world_size": 1,
                         "x_shard_type": 1, "act_type": 1, "transpose_weight": False, "output_y2_flag": y2,
                         "output_y3_flag": y3}
    assert output_dtypes(op) == ["DT_BF16"] * 3


def test_bmm_reducescatter_alltoall(torchair):
    x, w = torch.randn(3, 4, 5).half(), torch.randn(3, 5, 8).half()
    graph, _ = build(torchair, "npu_bmm_reducescatter_alltoall", (x, w, "ep", 1, "tp", 1), {"shard_type": 1})
    op = node(graph, "BatchMatMulReduceScatterAlltoAll")
    assert wiring(op) == {"x": "arg0_1:0", "weight": "arg1_1:0", "bias": ""}
    assert attrs(op) == {"group_ep": "ep", "group_tp": "tp", "ep_world_size": 1, "tp_world_size": 1,
                         "y_shard_type": 1, "transpose_weight": False}
    assert output_dtypes(op) == ["DT_FLOAT16"]


# ------------------------------------------------------------------------------------------------
# Names checked against the IR definition.
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def ge_inputs(torchair):
    from torchair.ge._ge_graph import Data, DataType, GeGraph

    with GeGraph() as graph:
        yield graph, [Data(index=i, dtype=DataType.DT_FLOAT16, shape=[4, 4], placement="NPU") for i in range(2)]


@pytest.mark.parametrize("inputs,attr_values,error", [
    ({"tokenz": 0, "expert_token_num_per_rank": 1}, {}, r"no input\(s\) \['tokenz'\]"),
    ({"tokens": 0, "expert_token_num_per_rank": 1}, {"idx_typ": 0}, r"attr\(s\) \['idx_typ'\]"),
    ({"tokens": 0}, {}, "required input 'expert_token_num_per_rank' is missing"),
])
def test_emit_rejects_names_the_ir_lacks(ge_inputs, inputs, attr_values, error):
    from moe_fusion.ge_plugin.converters import emit

    _, tensors = ge_inputs
    with pytest.raises(ValueError, match=error):
        emit("MoeReRouting", inputs={k: tensors[v] for k, v in inputs.items()}, attrs=attr_values)


def test_emit_rejects_unregistered_op_types(ge_inputs):
    from moe_fusion.ge_plugin.converters import emit

    with pytest.raises(RuntimeError, match="not registered"):
        emit("MoeReRoutingV9", inputs={}, attrs={})


def test_check_op_def_catches_wrong_nodes(ge_inputs):
    from moe_fusion.ge_plugin.converters import emit

    graph, (tokens, counts) = ge_inputs
    emit("MoeReRouting", inputs={"tokens": tokens, "expert_token_num_per_rank": counts}, attrs={"idx_type": 0})
    good = graph.op[-1]
    check_op_def(good)
    for corrupt, error in [
        (lambda op: setattr(op.input_desc[2], "name", "scales"), "do not match the IR inputs"),
        (lambda op: op.attr["idx_typ"].CopyFrom(op.attr["idx_type"]), "'idx_typ' is not in the IR attrs"),
        (lambda op: setattr(op.attr["idx_type"], "s", b"0"), "holds a 's' value"),
        (lambda op: op.input.__setitem__(0, ""), "required input 'tokens' is not connected"),
        (lambda op: setattr(op.output_desc[3], "name", "counts"), "do not match the IR outputs"),
    ]:
        bad = type(good)()
        bad.CopyFrom(good)
        corrupt(bad)
        with pytest.raises(ValueError, match=error):
            check_op_def(bad)


def test_float64_is_refused_on_ge(torchair):
    """float64 passes the portable target (gradient checks) but CANN's ops have no DT_DOUBLE: the
    converter says so instead of building a graph no device runs."""
    from moe_fusion.errors import OpValidationError

    x, w1, w2 = (torch.randn(shape, dtype=torch.float64) for shape in ((4, 8), (8, 16), (16, 8)))
    with pytest.raises(OpValidationError, match=r"npu_ffn: x must not be float64 on GE \(CANN's ops have no "
                                                r"float64\), got float64"):
        trace_ge_graph(torchair, lambda *t: torch.ops.moe_fusion.npu_ffn(*t, "gelu"), (x, w1, w2))
