"""Single-op models for every operator and its main modes: exported with the translation table,
checked (``full_check``), one ``ai.moe_fusion`` node with the GE op type and attrs, and run in
onnxruntime (local ops, through their function bodies) and/or the reference evaluator (every op,
world of one rank), compared with eager PyTorch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
import pytest
import torch
from cases.npu_ffn import FfnCase, make_call
from onnx_support import assert_outputs, custom_nodes, eager, export_fn, node_attrs, run_ort, run_reference

from moe_fusion.onnx import DOMAIN
from moe_fusion.onnx._bodies import BODIES
from moe_fusion.onnx._output_types import RULES
from moe_fusion.onnx.translation import translation_table
from moe_fusion.op_protos import PROTOS
from moe_fusion.op_protos.ge_mapping import GE_MAPPINGS

ops = torch.ops.moe_fusion


@dataclass
class Case:
    fn: Callable[..., Any]
    args: tuple
    ge_type: str
    attrs: dict = field(default_factory=dict)     # expected attr values (a subset)
    ort: bool = True                               # has a function body, runs in onnxruntime
    tol: float = 1e-5
    op: str = ""                                   # the torch op, when not the first of its GE type


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ffn_case(case: FfnCase, attrs: dict, ort: bool = True, tol: float = 1e-5) -> Case:
    (x, w1, w2, act), kwargs = make_call(case)
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    static = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    names = list(tensors)
    fn = lambda x, w1, w2, *t: ops.npu_ffn(x, w1, w2, act, **dict(zip(names, t)), **static)  # noqa: E731
    return Case(fn, (x, w1, w2, *tensors.values()), "FFN", attrs, ort, tol)


def _counts(dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([[1, 0, 2], [2, 1, 0]], dtype=dtype)


TABLE = torch.tensor([[2, 5, 6], [1, 3, 0], [2, 1, 2], [1, 4, 0]], dtype=torch.int32)


def _dispatch(x, ids, **kw):
    return ops.npu_moe_distribute_dispatch_v2(x, ids, "ep", 1, 0, 4, **kw)


def _ids(bs=5, k=2, seed=0) -> torch.Tensor:
    g = _g(seed)
    return torch.stack([torch.randperm(4, generator=g)[:k] for _ in range(bs)]).int()


def _combine(x, ids, scales):
    expand_x, _, assist, _, ep_counts, tp_counts, _ = _dispatch(x, ids)
    return ops.npu_moe_distribute_combine_v2(expand_x * 2, ids, assist, ep_counts, scales, "ep", 1, 0, 4,
                                             tp_send_counts=tp_counts)


def _combine_add_rms_norm(x, ids, scales, gamma):
    expand_x, _, assist, _, ep_counts, _, _ = _dispatch(x, ids)
    return ops.npu_moe_distribute_combine_add_rms_norm(expand_x, ids, assist, ep_counts, scales, x.unsqueeze(1), gamma,
                                                       "ep", 1, 0, 4, norm_eps=1e-5)


CASES = {
    "re_routing": Case(lambda t, c: ops.npu_moe_re_routing(t, c), (torch.randn(6, 4, generator=_g()), _counts()),
                       "MoeReRouting", {"expert_token_num_type": 1, "idx_type": 0}),
    "re_routing_scales_fp16": Case(
        lambda t, c, s: ops.npu_moe_re_routing(t, c, per_token_scales=s),
        (torch.randn(6, 4, generator=_g(1)).half(), _counts(torch.int64), torch.rand(6, generator=_g(1))),
        "MoeReRouting"),
    "update_expert_mode0": Case(
        lambda ids, table: ops.npu_moe_update_expert(ids, table, local_rank_id=3, world_size=4),
        (torch.randint(0, 4, (5, 2), generator=_g(), dtype=torch.int32), TABLE), "MoeUpdateExpert",
        {"local_rank_id": 3, "world_size": 4, "balance_mode": 0}),
    "update_expert_mode1_pruning": Case(
        lambda ids, table, s, thr, m: ops.npu_moe_update_expert(ids, table, expert_scales=s, pruning_threshold=thr,
                                                                active_mask=m, balance_mode=1),
        (torch.randint(0, 4, (5, 2), generator=_g(2)), TABLE, torch.rand(5, 2, generator=_g(2)).half(),
         torch.tensor([[0.1, 0.4]]), torch.tensor([True, True, False, True, True])), "MoeUpdateExpert",
        {"balance_mode": 1}),
    "ffn_relu": _ffn_case(FfnCase(activation="relu"),
                          {"activation": "relu", "tokens_index_flag": 0, "output_dtype": -1}),
    "ffn_swiglu_experts": _ffn_case(FfnCase(activation="swiglu", lead=(2, 3), counts=(2, 0, 4), seed=1),
                                    {"activation": "swiglu"}),
    "ffn_gelu_fp16_index": _ffn_case(
        FfnCase(dtype=torch.float16, activation="gelu", lead=(4,), counts=(1, 3), index_form=True, inner_precise=1),
        {"tokens_index_flag": 1, "inner_precise": 1}, tol=2e-3),
    "ffn_fastgelu_bf16": _ffn_case(FfnCase(dtype=torch.bfloat16, activation="FastGelu", counts=(4, 2), bias=False,
                                           seed=3), {"activation": "FastGelu"}, tol=2e-2),
    "ffn_antiquant_int8": _ffn_case(FfnCase(mode="antiquant", dtype=torch.float16, activation="silu", seed=7), {},
                                    tol=2e-3),
    "ffn_antiquant_int4_groups": _ffn_case(FfnCase(mode="antiquant", dtype=torch.float16, activation="relu",
                                                   weight_dtype="int4", groups=2, counts=(3, 3), seed=8), {},
                                           tol=2e-3),
    "ffn_quant": _ffn_case(FfnCase(mode="quant", dtype=torch.float16, activation="relu", seed=5), {"output_dtype": 0},
                           ort=False),
    "ffn_grouped_partial_counts": Case(
        lambda x, w1, w2, c: ops.npu_ffn_grouped(x, w1, w2, "relu", expert_tokens=c),
        (torch.randn(8, 8, generator=_g()), torch.randn(2, 8, 16, generator=_g(1)) / 3,
         torch.randn(2, 16, 8, generator=_g(2)) / 4, torch.tensor([3, 2])),
        "FFN", {"output_dtype": -1, "tokens_index_flag": 0}, op="npu_ffn_grouped"),
    "alltoall_allgather_bmm": Case(
        lambda x, w, b: ops.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, bias=b, shard_type=1, act_type=2,
                                                       need_allgather_out=True, need_activation_feature=True),
        (torch.randn(4, 3, 8, generator=_g()), torch.randn(4, 8, 6, generator=_g(1)), torch.randn(4, 1, 6)),
        "AlltoAllAllGatherBatchMatMul",
        {"group_ep": "ep", "group_tp": "tp", "ep_world_size": 1, "tp_world_size": 1, "x_shard_type": 1, "act_type": 2,
         "transpose_weight": 0, "output_y2_flag": 1, "output_y3_flag": 1}),
    "alltoall_allgather_bmm_gelu_fp16": Case(
        lambda x, w: ops.npu_alltoall_allgather_bmm(x, w, "ep", 1, "tp", 1, act_type=1),
        (torch.randn(2, 3, 8, generator=_g()).half(), torch.randn(2, 8, 6, generator=_g(1)).half()),
        "AlltoAllAllGatherBatchMatMul", {"act_type": 1, "output_y2_flag": 0}, tol=2e-3),
    "bmm_reducescatter_alltoall": Case(
        lambda x, w, b: ops.npu_bmm_reducescatter_alltoall(x, w, "ep", 1, "tp", 1, bias=b, shard_type=1),
        (torch.randn(4, 3, 6, generator=_g()), torch.randn(4, 6, 8, generator=_g(1)), torch.randn(4, 8)),
        "BatchMatMulReduceScatterAlltoAll", {"y_shard_type": 1, "transpose_weight": 0}),
    "dispatch_v2": Case(lambda x, ids: _dispatch(x, ids), (torch.randn(5, 16, generator=_g()), _ids()),
                        "MoeDistributeDispatchV2",
                        {"group_ep": "ep", "ep_world_size": 1, "moe_expert_num": 4, "quant_mode": 0, "y_dtype": 0},
                        ort=False),
    "dispatch_v2_quant_fp16": Case(
        lambda x, ids, m: _dispatch(x, ids, quant_mode=2, x_active_mask=m),
        (torch.randn(5, 16, generator=_g(1)).half(), _ids(seed=1), torch.tensor([True] * 3 + [False] * 2)),
        "MoeDistributeDispatchV2", {"quant_mode": 2, "y_dtype": 2}, ort=False),
    "combine_v2": Case(_combine, (torch.randn(5, 16, generator=_g()), _ids(), torch.rand(5, 2, generator=_g())),
                       "MoeDistributeCombineV2", {"out_dtype": 0, "group_list_type": 0}, ort=False),
    "combine_add_rms_norm_bf16": Case(
        _combine_add_rms_norm, (torch.randn(5, 16, generator=_g()).bfloat16(), _ids(), torch.rand(5, 2, generator=_g()),
                                torch.rand(16, generator=_g()).bfloat16()),
        "MoeDistributeCombineAddRmsNorm", {"norm_eps": pytest.approx(1e-5)}, ort=False, tol=1e-2),
}


def test_every_op_has_a_translation_schema_and_runtime():
    """Iterates the registry: an op without any piece of the ONNX contract fails here."""
    table = translation_table()
    first_of_type = {}
    for proto in PROTOS.values():
        first_of_type.setdefault(proto.ge_type, proto.name)
    covered = {case.op or first_of_type[case.ge_type] for case in CASES.values()}
    for name, proto in PROTOS.items():
        assert getattr(torch.ops.moe_fusion, name).default in table, name
        assert onnx.defs.has(proto.ge_type, 1, DOMAIN), name
        assert name in GE_MAPPINGS and name in RULES, name
        assert proto.ge_type in BODIES or proto.communicates, f"{name}: local op without a function body"
        assert name in covered, f"{name}: no single-op ONNX test"


@pytest.mark.parametrize("name", list(CASES))
def test_single_op_export_and_run(name):
    case = CASES[name]
    model = export_fn(case.fn, case.args)
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in custom_nodes(model) if n.op_type == case.ge_type]
    assert len(nodes) == 1 and nodes[0].domain == DOMAIN
    assert len(nodes[0].output) == len(next(p for p in PROTOS.values() if p.ge_type == case.ge_type).ge_outputs)
    attrs = node_attrs(nodes[0])
    assert {k: attrs[k] for k in case.attrs} == case.attrs
    expected = eager(case.fn, case.args)
    assert_outputs(run_reference(model, case.args), expected, atol=case.tol, rtol=case.tol)
    assert bool(nodes[0].overload) == case.ort, "a function body exactly where onnxruntime is expected to run"
    if case.ort and not any(a.dtype == torch.bfloat16 for a in case.args):   # ORT's Python feeds lack bf16
        assert_outputs(run_ort(model, case.args), expected, atol=case.tol, rtol=case.tol)
