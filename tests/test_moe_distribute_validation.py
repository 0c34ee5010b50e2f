"""Every validation rule of SPEC §3.5 (dispatch_v2) and §4.4 (combine_v2, combine_add_rms_norm).

Each structural rule is checked for ``OpValidationError`` and its message in eager mode (real CPU
tensors: the structural checks run before any communication, so no process group is needed even
for ``ep_world_size`` 4) and under ``torch.compile(fullgraph=True, backend="aot_eager")``, where
the fake kernel raises at trace time and dynamo wraps our error (its message carries ours).
Value rules (ids, mask prefix, paired inputs) need tensor contents: they run in a world of one
rank, in eager and compiled (the kernel raises at run time). The group rules run on 2 gloo ranks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion import OpValidationError

BF16, FP16, FP32, I32 = torch.bfloat16, torch.float16, torch.float32, torch.int32
DISPATCH, COMBINE, RMS = ("npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2",
                          "npu_moe_distribute_combine_add_rms_norm")
POSITIONAL = {
    DISPATCH: ("x", "expert_ids", "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"),
    COMBINE: ("expand_x", "expert_ids", "assist_info_for_combine", "ep_send_counts", "expert_scales", "group_ep",
              "ep_world_size", "ep_rank_id", "moe_expert_num"),
    RMS: ("expand_x", "expert_ids", "expand_idx", "ep_send_counts", "expert_scales", "residual_x", "gamma",
          "group_ep", "ep_world_size", "ep_rank_id", "moe_expert_num"),
}
BS, K, H, W, M = 8, 2, 1024, 4, 8          # L = 2, A = BS * W * min(L, K) = 64


def ids(bs: int = BS, k: int = K, total: int = M) -> torch.Tensor:
    return (torch.arange(bs).unsqueeze(1) + torch.arange(k)).remainder(total).int()


def base(op: str, **over: Any) -> dict:
    """A call valid on every target (A3 limits included), with ``over`` applied; callables in
    ``over`` receive the call built so far (to size tensors from it)."""
    bs, h = over.pop("bs", BS), over.pop("h", H)
    k = over.pop("k", K)
    if op == DISPATCH:
        call = dict(x=torch.zeros(bs, h, dtype=BF16), expert_ids=ids(bs, k), group_ep="ep", ep_world_size=W,
                    ep_rank_id=1, moe_expert_num=M)
    else:
        a = bs * W * min(M // W, k)
        call = dict(expand_x=torch.zeros(a, h, dtype=BF16), expert_ids=ids(bs, k),
                    assist_info_for_combine=torch.zeros(a * 128, dtype=I32), ep_send_counts=torch.zeros(8, dtype=I32),
                    expert_scales=torch.zeros(bs, k), group_ep="ep", ep_world_size=W, ep_rank_id=1, moe_expert_num=M)
        if op == RMS:
            call["expand_idx"] = call.pop("assist_info_for_combine")
            call.update(residual_x=torch.zeros(bs, 1, h, dtype=BF16), gamma=torch.zeros(h, dtype=BF16))
    for name, value in over.items():
        call[name] = value(call) if callable(value) else value
    return call


def invoke(op: str, call: dict):
    args = [call[name] for name in POSITIONAL[op]]
    kwargs = {k: v for k, v in call.items() if k not in POSITIONAL[op]}
    return getattr(torch.ops.moe_fusion, op)(*args, **kwargs)


@dataclass
class Rule:
    id: str
    op: str
    message: str                          # regex
    over: dict = field(default_factory=dict)
    target: str = "A3"


def r(id: str, op: str, message: str, target: str = "A3", **over: Any) -> Rule:
    return Rule(id, op, message, over, target)


def _tp(call: dict) -> dict:
    return {"tp_world_size": 2, "group_tp": "tp"}


# ---- SPEC §3.5 (dispatch), A3 unless stated -------------------------------------------------------
DISPATCH_RULES = [
    r("x-2d", DISPATCH, r"x must be 2-D", x=torch.zeros(BS, H, 1, dtype=BF16)),
    r("x-dtype", DISPATCH, r"x dtype must be one of \(bfloat16, float16\), got float32", x=torch.zeros(BS, H)),
    r("x-dtype-portable", DISPATCH, r"x dtype must be one of \(bfloat16, float16, float32, float64\), got int8", "portable",
      x=torch.zeros(BS, H, dtype=torch.int8)),
    r("ids-2d", DISPATCH, r"expert_ids must be 2-D", expert_ids=torch.zeros(BS, dtype=I32)),
    r("ids-dtype", DISPATCH, r"expert_ids dtype must be one of \(int32\), got int64", expert_ids=ids().long()),
    r("ids-rows", DISPATCH, r"expert_ids must have BS = x.size\(0\) = 8 rows", expert_ids=ids(7)),
    r("bs-max", DISPATCH, r"BS must be in \[1, 512\] on A3, got BS=513", bs=513),
    r("bs-zero", DISPATCH, r"BS must be in \[1, 512\] on A3, got BS=0", bs=0),
    r("bs-max-v2", DISPATCH, r"BS must be in \[1, 256\] on A3, got BS=257", bs=257, comm_alg="fullmesh_v2"),
    r("h-min", DISPATCH, r"x hidden size H must be in \[1024, 8192\] on A3, got H=1023", h=1023),
    r("h-max", DISPATCH, r"x hidden size H must be in \[1024, 8192\] on A3, got H=8200", h=8200),
    r("h-zero-portable", DISPATCH, r"x must have hidden size H >= 1", "portable", h=0),
    r("k-max", DISPATCH, r"K must be <= 16 on A3, got K=17", k=17, moe_expert_num=20,
      expert_ids=lambda c: ids(BS, 17, 20)),
    r("k-max-v2", DISPATCH, r"K must be <= 12 on A3, got K=13", k=13, moe_expert_num=16, comm_alg="fullmesh_v2",
      expert_ids=lambda c: ids(BS, 13, 16)),
    r("k-zero", DISPATCH, r"expert_ids must have K >= 1 columns", "portable", expert_ids=torch.zeros(BS, 0, dtype=I32)),
    r("k-total", DISPATCH, r"K must be <= moe_expert_num \+ zero/copy/const_expert_num = 4, got K=5", "portable",
      moe_expert_num=4, expert_ids=ids(BS, 5, 5)),
    r("group-ep-empty", DISPATCH, r"group_ep length must be in \[1, 127\]", group_ep=""),
    r("group-ep-long", DISPATCH, r"group_ep length must be in \[1, 127\]", group_ep="g" * 128),
    r("group-ep-portable", DISPATCH, r"group_ep must name a process group when its world size is > 1", "portable",
      group_ep=""),
    r("group-tp-empty", DISPATCH, r"group_tp length must be in \[1, 127\]", moe_expert_num=W, tp_world_size=2),
    r("group-tp-same", DISPATCH, r"group_tp must differ from group_ep when tp_world_size > 1", moe_expert_num=W,
      tp_world_size=2, group_tp="ep"),
    r("world-min", DISPATCH, r"ep_world_size must be in \[2, 768\], got 1", ep_world_size=1, ep_rank_id=0),
    r("world-max", DISPATCH, r"ep_world_size must be in \[2, 768\], got 769", ep_world_size=769, moe_expert_num=769),
    r("world-portable", DISPATCH, r"ep_world_size must be >= 1, got 0", "portable", ep_world_size=0),
    r("rank-high", DISPATCH, r"ep_rank_id must be in \[0, 3\], got 4", ep_rank_id=4),
    r("rank-negative", DISPATCH, r"ep_rank_id must be in \[0, 3\], got -1", "portable", ep_rank_id=-1),
    r("tp-size", DISPATCH, r"tp_world_size must be one of \(0, 1, 2\), got 3", tp_world_size=3),
    r("tp-rank", DISPATCH, r"tp_rank_id must be in \[0, 1\], got 2", moe_expert_num=W, tp_world_size=2,
      group_tp="tp", tp_rank_id=2),
    r("tp-rank-no-tp", DISPATCH, r"tp_rank_id must be 0 when tp_world_size <= 1, got 1", tp_world_size=1,
      tp_rank_id=1),
    r("shard-type", DISPATCH, r"expert_shard_type must be one of \(0,\), got 1", "portable", expert_shard_type=1),
    r("shared-num-negative", DISPATCH, r"shared_expert_num must be >= 0, got -1", "portable", shared_expert_num=-1),
    r("shared-num-max", DISPATCH, r"shared_expert_num must be in \[0, 4\], got 5", ep_world_size=8, ep_rank_id=6,
      shared_expert_num=5, shared_expert_rank_num=5, moe_expert_num=3),
    r("shared-ranks-range", DISPATCH, r"shared_expert_rank_num must be in \[0, ep_world_size=4\), got 4",
      "portable", shared_expert_rank_num=4),
    r("shared-ranks-negative", DISPATCH, r"shared_expert_rank_num must be in \[0, ep_world_size=4\), got -1",
      "portable", shared_expert_rank_num=-1),
    r("shared-xor-1", DISPATCH, r"shared_expert_num and shared_expert_rank_num must both be 0 or both be > 0",
      "portable", shared_expert_num=0, shared_expert_rank_num=2, moe_expert_num=4),
    r("shared-xor-2", DISPATCH, r"shared_expert_num and shared_expert_rank_num must both be 0 or both be > 0",
      "portable", shared_expert_num=2),
    r("shared-divisible", DISPATCH, r"shared_expert_rank_num must be a multiple of shared_expert_num=2, got 3",
      "portable", ep_world_size=8, ep_rank_id=5, shared_expert_num=2, shared_expert_rank_num=3, moe_expert_num=5),
    r("experts-zero", DISPATCH, r"moe_expert_num must be > 0, got 0", "portable", moe_expert_num=0),
    r("experts-max", DISPATCH, r"moe_expert_num must be in \[1, 1024\], got 1028", moe_expert_num=1028),
    r("experts-divisible", DISPATCH, r"moe_expert_num must be a multiple of ep_world_size - shared_expert_rank_num "
      r"= 4, got 6", "portable", moe_expert_num=6),
    r("local-times-world", DISPATCH, r"local_expert_num \* ep_world_size must be <= 2048 on A3, got 3072",
      ep_world_size=768, ep_rank_id=600, shared_expert_rank_num=512, moe_expert_num=1024),
    r("tp-one-local-expert", DISPATCH, r"must give one expert per MoE rank .* when tp_world_size == 2, got 8 "
      r"\(2 per rank\)", "portable", tp_world_size=2, group_tp="tp"),
    r("tp-elastic", DISPATCH, r"elastic_info must be None when tp_world_size == 2", "portable", moe_expert_num=W,
      tp_world_size=2, group_tp="tp", elastic_info=torch.zeros(4 + 2 * W, dtype=I32)),
    r("quant-static", DISPATCH, r"quant_mode must be one of \(0, 2\), got 1", "portable", quant_mode=1),
    r("scales-without-quant", DISPATCH, r"scales must be None unless quant_mode == 2", "portable",
      scales=torch.zeros(M, H)),
    r("scales-shape", DISPATCH, r"scales must have shape \(8, 1024\), got shape \(9, 1024\)", "portable",
      quant_mode=2, scales=torch.zeros(M + 1, H)),
    r("scales-shape-shared", DISPATCH, r"scales must have shape \(7, 1024\), got shape \(8, 1024\)", "portable", quant_mode=2,
      scales=torch.zeros(M, H), shared_expert_rank_num=1, moe_expert_num=6),
    r("scales-dtype", DISPATCH, r"scales dtype must be one of \(float32\), got bfloat16", "portable", quant_mode=2,
      scales=torch.zeros(M, H, dtype=BF16)),
    r("token-nums-type", DISPATCH, r"expert_token_nums_type must be one of \(0, 1\), got 2", "portable",
      expert_token_nums_type=2),
    r("mask-dtype", DISPATCH, r"x_active_mask dtype must be one of \(bool\), got int32", "portable",
      x_active_mask=torch.ones(BS, dtype=I32)),
    r("mask-dim", DISPATCH, r"x_active_mask must be 1-D or 2-D", "portable",
      x_active_mask=torch.ones(BS, K, 1, dtype=torch.bool)),
    r("mask-rows", DISPATCH, r"x_active_mask must have shape \(8,\)", "portable",
      x_active_mask=torch.ones(BS + 1, dtype=torch.bool)),
    r("mask-cols", DISPATCH, r"x_active_mask must have shape \(8, 2\)", "portable",
      x_active_mask=torch.ones(BS, K + 1, dtype=torch.bool)),
    r("global-bs-small", DISPATCH, r"global_bs must be 0 or a multiple of ep_world_size=4 that is >= "
      r"BS \* ep_world_size = 32, got 28", "portable", global_bs=28),
    r("global-bs-multiple", DISPATCH, r"global_bs must be 0 or a multiple of ep_world_size=4", "portable",
      global_bs=34),
    r("global-bs-mask", DISPATCH, r"x_active_mask must be None when global_bs > BS \* ep_world_size",
      global_bs=64, x_active_mask=torch.ones(BS, dtype=torch.bool)),
    r("special-negative", DISPATCH, r"copy_expert_num must be >= 0, got -1", "portable", copy_expert_num=-1),
    r("special-int32", DISPATCH, r"moe_expert_num \+ zero/copy/const_expert_num must be <= 2147483647", "portable",
      zero_expert_num=2**31 - 8),
    r("comm-alg", DISPATCH, r"comm_alg must be one of \('', 'fullmesh_v1', 'fullmesh_v2'\), got hierarchy",
      comm_alg="hierarchy"),
    r("comm-alg-portable", DISPATCH, r"comm_alg must be one of .*, got bogus", "portable", comm_alg="bogus"),
    r("v2-elastic", DISPATCH, r"elastic_info is not supported with comm_alg 'fullmesh_v2'", comm_alg="fullmesh_v2",
      elastic_info=torch.zeros(4 + 2 * W, dtype=I32)),
    r("v2-mask", DISPATCH, r"x_active_mask is not supported with comm_alg 'fullmesh_v2'", comm_alg="fullmesh_v2",
      x_active_mask=torch.ones(BS, dtype=torch.bool)),
    r("v2-special", DISPATCH, r"zero_expert_num/copy_expert_num/const_expert_num is not supported with comm_alg "
      r"'fullmesh_v2'", comm_alg="fullmesh_v2", zero_expert_num=1),
    r("v2-tp", DISPATCH, r"tp_world_size is not supported with comm_alg 'fullmesh_v2'", comm_alg="fullmesh_v2",
      moe_expert_num=W, tp_world_size=2, group_tp="tp"),
    r("v2-global-bs", DISPATCH, r"global_bs must be 0 or BS \* ep_world_size with comm_alg 'fullmesh_v2'",
      comm_alg="fullmesh_v2", global_bs=64),
    r("elastic-dtype", DISPATCH, r"elastic_info dtype must be one of \(int32\)", "portable",
      elastic_info=torch.zeros(4 + 2 * W, dtype=torch.int64)),
    r("elastic-shape", DISPATCH, r"elastic_info must have shape \(12,\)", "portable",
      elastic_info=torch.zeros(4, dtype=I32)),
    r("perf-a3", DISPATCH, r"performance_info must be None on A3", performance_info=torch.zeros(W, dtype=torch.int64)),
    r("perf-shape", DISPATCH, r"performance_info must have shape \(4,\)", "portable",
      performance_info=torch.zeros(W + 1, dtype=torch.int64)),
    r("y-dtype", DISPATCH, r"y_dtype must be None \(fp8/fp4 variants are not supported\), got 290", "portable",
      y_dtype=290),
    r("x-dtype-arg", DISPATCH, r"x_dtype must be None", "portable", x_dtype=296),
    r("scales-dtype-arg", DISPATCH, r"scales_dtype must be None", "portable", scales_dtype=296),
    r("expert-scales-dtype", DISPATCH, r"expert_scales dtype must be one of \(float32\)", "portable",
      expert_scales=torch.zeros(BS, K, dtype=BF16)),
    r("expert-scales-shape", DISPATCH, r"expert_scales must have shape \(8, 2\)", "portable",
      expert_scales=torch.zeros(BS, K + 1)),
]

# ---- SPEC §3.5 "A2" list ----------------------------------------------------------------------------
A2 = dict(ep_world_size=16, ep_rank_id=3, moe_expert_num=32)
A2_RULES = [
    r("a2-world", DISPATCH, r"ep_world_size must be one of \(16, 32, 64, 128, 256\) on A2 \(fullmesh\), got 8", "A2",
      ep_world_size=8),
    r("a2-world-hierarchy", DISPATCH, r"ep_world_size must be one of \(16, 32, 64\) on A2 \(hierarchy\), got 128",
      "A2", **{**A2, "ep_world_size": 128, "moe_expert_num": 128}, comm_alg="hierarchy",
      expert_scales=torch.zeros(BS, K)),
    r("a2-tp", DISPATCH, r"tp_world_size must be 0 or 1 on A2", "A2", **{**A2, "moe_expert_num": 16},
      tp_world_size=2, group_tp="tp"),
    r("a2-shared", DISPATCH, r"shared_expert_rank_num must be 0 on A2", "A2", **A2, shared_expert_rank_num=8),
    r("a2-experts", DISPATCH, r"moe_expert_num must be in \[1, 512\], got 528", "A2", **{**A2, "moe_expert_num": 528}),
    r("a2-local", DISPATCH, r"moe_expert_num / ep_world_size must be <= 24 on A2 fullmesh, got 25", "A2",
      **{**A2, "moe_expert_num": 400}),
    r("a2-h-align", DISPATCH, r"hidden size H must be a multiple of 32 in \(0, 7168\] on A2", "A2", **A2, h=1040),
    r("a2-h-max", DISPATCH, r"hidden size H must be a multiple of 32 in \(0, 7168\] on A2", "A2", **A2, h=7200),
    r("a2-h-max-hierarchy", DISPATCH, r"in \(0, 10240\] on A2", "A2", **A2, h=10272, comm_alg="hierarchy",
      expert_scales=torch.zeros(BS, K)),
    r("a2-bs", DISPATCH, r"BS must be in \[1, 256\] on A2", "A2", **A2, bs=257),
    r("a2-k", DISPATCH, r"K must be <= 16 on A2", "A2", **A2, k=17, expert_ids=lambda c: ids(BS, 17, 32)),
    r("a2-mask-2d", DISPATCH, r"x_active_mask must be 1-D on A2", "A2", **A2,
      x_active_mask=torch.ones(BS, K, dtype=torch.bool)),
    r("a2-elastic", DISPATCH, r"elastic_info must be None on A2", "A2", **A2,
      elastic_info=torch.zeros(4 + 32, dtype=I32)),
    r("a2-special", DISPATCH, r"zero_expert_num/copy_expert_num/const_expert_num must be 0 on A2", "A2", **A2,
      copy_expert_num=1),
    r("a2-hierarchy-scales", DISPATCH, r"expert_scales is required with comm_alg 'hierarchy' on A2", "A2", **A2,
      comm_alg="hierarchy"),
    r("a2-comm-alg", DISPATCH, r"comm_alg must be one of \('', '0', 'fullmesh', 'hierarchy'\)", "A2", **A2,
      comm_alg="fullmesh_v1"),
    r("a2-x-dtype", DISPATCH, r"x dtype must be one of \(bfloat16, float16\)", "A2", **A2, x=torch.zeros(BS, H)),
    r("a2-x-float64", DISPATCH, r"x dtype must be one of \(bfloat16, float16\), got float64", "A2", **A2,
      x=torch.zeros(BS, H, dtype=torch.float64)),
    r("a2-global-bs-mask", DISPATCH, r"x_active_mask must be None when global_bs > BS \* ep_world_size", "A2", **A2,
      global_bs=256, x_active_mask=torch.ones(BS, dtype=torch.bool)),
    r("a2-combine-quant", COMBINE, r"comm_quant_mode must be 0 on A2 unless comm_alg is 'hierarchy'", "A2",
      **{**A2, "moe_expert_num": 16}, comm_quant_mode=2, expand_x=torch.zeros(128, H, dtype=BF16),
      assist_info_for_combine=torch.zeros(128 * 128, dtype=I32), ep_send_counts=torch.zeros(16, dtype=I32)),
    r("a2-combine-expand-scales", COMBINE, r"expand_scales is required with comm_alg 'hierarchy' on A2", "A2",
      **{**A2, "moe_expert_num": 16}, comm_alg="hierarchy", expand_x=torch.zeros(128, H, dtype=BF16),
      assist_info_for_combine=torch.zeros(128 * 128, dtype=I32), ep_send_counts=torch.zeros(16, dtype=I32)),
    r("a2-rms-target", RMS, r"target must be one of \('A3', 'portable'\)", "A2"),
]

# ---- SPEC §4.4 (combine_v2 and combine_add_rms_norm) ----------------------------------------------
COMBINE_RULES = [
    r("expand-x-2d", COMBINE, r"expand_x must be 2-D", expand_x=torch.zeros(64, H, 1, dtype=BF16)),
    r("expand-x-int32", COMBINE, r"expand_x dtype must be one of \(bfloat16, float16\), got int32",
      expand_x=torch.zeros(64, H, dtype=I32)),
    r("rms-expand-x-fp16", RMS, r"expand_x dtype must be one of \(bfloat16\), got float16",
      expand_x=torch.zeros(64, H, dtype=FP16), residual_x=torch.zeros(BS, 1, H, dtype=FP16),
      gamma=torch.zeros(H, dtype=FP16)),
    r("ids-dtype", COMBINE, r"expert_ids dtype must be one of \(int32\)", expert_ids=ids().long()),
    r("ids-2d", RMS, r"expert_ids must be 2-D", expert_ids=torch.zeros(BS, dtype=I32)),
    r("assist-1d", COMBINE, r"assist_info_for_combine must be 1-D",
      assist_info_for_combine=torch.zeros(64, 128, dtype=I32)),
    r("assist-dtype", RMS, r"expand_idx dtype must be one of \(int32\)", expand_idx=torch.zeros(64 * 128)),
    r("counts-1d", COMBINE, r"ep_send_counts must be 1-D", ep_send_counts=torch.zeros(2, 4, dtype=I32)),
    r("counts-dtype", COMBINE, r"ep_send_counts dtype must be one of \(int32\)",
      ep_send_counts=torch.zeros(8, dtype=torch.int64)),
    r("scales-dtype", COMBINE, r"expert_scales dtype must be one of \(float32\)",
      expert_scales=torch.zeros(BS, K, dtype=BF16)),
    r("scales-shape", RMS, r"expert_scales must have shape \(8, 2\)", expert_scales=torch.zeros(BS, K + 1)),
    r("bs-max", COMBINE, r"BS must be in \[1, 512\] on A3, got BS=513", bs=513),
    r("h-range", RMS, r"expand_x hidden size H must be in \[1024, 8192\] on A3, got H=512", h=512),
    r("k-max", COMBINE, r"K must be <= 16 on A3", k=17, moe_expert_num=20, expert_ids=lambda c: ids(BS, 17, 20),
      expand_x=torch.zeros(BS * W * 5, H, dtype=BF16), assist_info_for_combine=torch.zeros(BS * W * 5 * 128, dtype=I32),
      ep_send_counts=torch.zeros(20, dtype=I32)),
    r("k-total", COMBINE, r"K must be <= moe_expert_num \+ zero/copy/const_expert_num = 4", "portable",
      moe_expert_num=4, expert_ids=ids(BS, 5, 5), expert_scales=torch.zeros(BS, 5)),
    r("expand-x-rows", COMBINE, r"expand_x must have at least max\(T, 1\) \* A = 64 rows, got shape \(63, 1024\)",
      expand_x=torch.zeros(63, H, dtype=BF16)),
    r("expand-x-rows-tp", COMBINE, r"expand_x must have at least max\(T, 1\) \* A = 64 rows, got shape \(32, 1024\)",
      moe_expert_num=W, tp_world_size=2, group_tp="tp", tp_send_counts=torch.zeros(2, dtype=I32),
      expand_x=torch.zeros(32, H, dtype=BF16), ep_send_counts=torch.zeros(8, dtype=I32)),
    r("assist-len", RMS, r"expand_idx must have at least A \* 128 = 8192 entries", expand_idx=torch.zeros(8191, dtype=I32)),
    r("counts-len", COMBINE, r"ep_send_counts must have at least 8 entries \(W \* L\)", "portable",
      ep_send_counts=torch.zeros(7, dtype=I32)),
    r("counts-len-tp", COMBINE, r"ep_send_counts must have at least 8 entries, got shape \(4,\)", moe_expert_num=W,
      tp_world_size=2, group_tp="tp", tp_send_counts=torch.zeros(2, dtype=I32),
      expand_x=torch.zeros(64, H, dtype=BF16), ep_send_counts=torch.zeros(4, dtype=I32)),
    r("tp-counts-required", COMBINE, r"tp_send_counts is required when tp_world_size == 2", moe_expert_num=W,
      tp_world_size=2, group_tp="tp"),
    r("tp-counts-shape", RMS, r"tp_send_counts must have shape \(2,\)", moe_expert_num=W, tp_world_size=2,
      group_tp="tp", tp_send_counts=torch.zeros(1, dtype=I32)),
    r("tp-counts-dtype", COMBINE, r"tp_send_counts dtype must be one of \(int32\)", "portable",
      tp_send_counts=torch.zeros(0, dtype=torch.int64)),
    r("mask-shape", COMBINE, r"x_active_mask must have shape \(8, 2\)", "portable",
      x_active_mask=torch.ones(BS, 3, dtype=torch.bool)),
    r("mask-global-bs", RMS, r"x_active_mask must be None when global_bs > BS \* ep_world_size", global_bs=64,
      x_active_mask=torch.ones(BS, dtype=torch.bool), expand_x=torch.zeros(128, H, dtype=BF16),
      expand_idx=torch.zeros(128 * 128, dtype=I32)),
    r("activation-scale", RMS, r"activation_scale must be None \(reserved\)", "portable",
      activation_scale=torch.zeros(1)),
    r("weight-scale", RMS, r"weight_scale must be None \(reserved\)", "portable", weight_scale=torch.zeros(1)),
    r("group-list", RMS, r"group_list must be None \(reserved\)", "portable",
      group_list=torch.zeros(1, dtype=torch.int64)),
    r("out-dtype", RMS, r"out_dtype must be 0 \(reserved\), got 1", "portable", out_dtype=1),
    r("group-list-type", RMS, r"group_list_type must be 0 \(reserved\), got 1", "portable", group_list_type=1),
    r("shared-x-with-shared-ranks", COMBINE, r"shared_expert_x must be None when shared_expert_rank_num > 0",
      ep_rank_id=2, shared_expert_rank_num=2, moe_expert_num=4, shared_expert_x=torch.zeros(BS, H, dtype=BF16)),
    r("shared-x-shape", COMBINE, r"shared_expert_x must have shape \(8, 1024\) or \(a, b, 1024\) with a \* b = 8",
      "portable", shared_expert_x=torch.zeros(3, 3, H, dtype=BF16)),
    r("shared-x-dtype", RMS, r"shared_expert_x dtype must equal expand_x's \(bfloat16\), got float32",
      shared_expert_x=torch.zeros(BS, H)),
    r("ori-x-required", COMBINE, r"ori_x is required when copy_expert_num or const_expert_num > 0, got "
      r"copy_expert_num=1", "portable", copy_expert_num=1),
    r("ori-x-shape", RMS, r"ori_x must have shape \(8, 1024\)", "portable", ori_x=torch.zeros(BS, H + 1, dtype=BF16)),
    r("ori-x-dtype", COMBINE, r"ori_x dtype must equal expand_x's", "portable", ori_x=torch.zeros(BS, H, dtype=FP16)),
    r("const-required", COMBINE, r"const_expert_alpha_1 is required when const_expert_num > 0", "portable",
      const_expert_num=1, ori_x=torch.zeros(BS, H, dtype=BF16)),
    r("const-alpha-shape", RMS, r"const_expert_alpha_2 must have shape \(1,\) or \(1, 1024\)", "portable",
      const_expert_num=1, ori_x=torch.zeros(BS, H, dtype=BF16), const_expert_alpha_1=torch.zeros(1, dtype=BF16),
      const_expert_alpha_2=torch.zeros(2, dtype=BF16), const_expert_v=torch.zeros(1, H, dtype=BF16)),
    r("const-v-shape", COMBINE, r"const_expert_v must have shape \(1, 1024\), got shape \(1,\)", "portable",
      const_expert_num=1, ori_x=torch.zeros(BS, H, dtype=BF16), const_expert_alpha_1=torch.zeros(1, dtype=BF16),
      const_expert_alpha_2=torch.zeros(1, dtype=BF16), const_expert_v=torch.zeros(1, dtype=BF16)),
    r("const-dtype", COMBINE, r"const_expert_v dtype must equal expand_x's", "portable", const_expert_num=1,
      ori_x=torch.zeros(BS, H, dtype=BF16), const_expert_alpha_1=torch.zeros(1, dtype=BF16),
      const_expert_alpha_2=torch.zeros(1, dtype=BF16), const_expert_v=torch.zeros(1, H)),
    r("comm-quant", COMBINE, r"comm_quant_mode must be one of \(0, 2\), got 1", comm_quant_mode=1),
    r("comm-quant-tp", RMS, r"comm_quant_mode must be 0 when tp_world_size == 2", "portable", moe_expert_num=W,
      tp_world_size=2, group_tp="tp", tp_send_counts=torch.zeros(2, dtype=I32), comm_quant_mode=2),
    r("expand-scales", COMBINE, r"expand_scales dtype must be one of \(float32\)", "portable",
      expand_scales=torch.zeros(64, dtype=BF16)),
    r("perf-a3", COMBINE, r"performance_info must be None on A3", performance_info=torch.zeros(W, dtype=torch.int64)),
    r("residual-shape", RMS, r"residual_x must have shape \(8, 1, 1024\), got shape \(8, 1024\)",
      residual_x=torch.zeros(BS, H, dtype=BF16)),
    r("residual-dtype", RMS, r"residual_x dtype must equal expand_x's", residual_x=torch.zeros(BS, 1, H)),
    r("gamma-shape", RMS, r"gamma must have shape \(1024,\)", gamma=torch.zeros(H + 1, dtype=BF16)),
    r("gamma-dtype", RMS, r"gamma dtype must equal expand_x's", gamma=torch.zeros(H, dtype=FP16)),
    # The attribute rules shared with dispatch (§4.4 "Attrs: as dispatch").
    r("world", COMBINE, r"ep_world_size must be in \[2, 768\], got 1", ep_world_size=1, ep_rank_id=0),
    r("rank", RMS, r"ep_rank_id must be in \[0, 3\], got 4", ep_rank_id=4),
    r("tp-size", COMBINE, r"tp_world_size must be one of \(0, 1, 2\)", tp_world_size=3),
    r("tp-rank", RMS, r"tp_rank_id must be 0 when tp_world_size <= 1", tp_rank_id=1),
    r("shard-type", COMBINE, r"expert_shard_type must be one of \(0,\)", expert_shard_type=1),
    r("shared-xor", RMS, r"shared_expert_num and shared_expert_rank_num must both be 0 or both be > 0",
      shared_expert_num=0, shared_expert_rank_num=2, moe_expert_num=4),
    r("experts-divisible", COMBINE, r"moe_expert_num must be a multiple of", moe_expert_num=6),
    r("tp-one-local-expert", RMS, r"must give one expert per MoE rank", tp_world_size=2, group_tp="tp",
      tp_send_counts=torch.zeros(2, dtype=I32)),
    r("tp-elastic", COMBINE, r"elastic_info must be None when tp_world_size == 2", moe_expert_num=W, tp_world_size=2,
      group_tp="tp", tp_send_counts=torch.zeros(2, dtype=I32), elastic_info=torch.zeros(4 + 2 * W, dtype=I32)),
    r("global-bs", RMS, r"global_bs must be 0 or a multiple of ep_world_size=4", global_bs=30),
    r("special-negative", COMBINE, r"zero_expert_num must be >= 0", zero_expert_num=-1),
    r("comm-alg", RMS, r"comm_alg must be one of", comm_alg="fullmesh"),
    r("group-ep", COMBINE, r"group_ep length must be in \[1, 127\]", group_ep=""),
    r("group-tp-same", RMS, r"group_tp must differ from group_ep", moe_expert_num=W, tp_world_size=2, group_tp="ep",
      tp_send_counts=torch.zeros(2, dtype=I32)),
]
STRUCTURAL = DISPATCH_RULES + A2_RULES + COMBINE_RULES


def _ids_of(rules):
    return [pytest.param(rule, id=f"{rule.op.split('_', 3)[-1]}-{rule.target}-{rule.id}") for rule in rules]


def _expect(fn: Callable[[], Any], message: str) -> None:
    with pytest.raises(Exception) as info:
        fn()
    error = info.value
    # At trace time dynamo wraps our error in TorchRuntimeError ("... got OpValidationError(...)");
    # at run time (value rules) ours propagates as is.
    wrapped = isinstance(error, torch._dynamo.exc.TorchRuntimeError) and "OpValidationError" in str(error)
    assert isinstance(error, OpValidationError) or wrapped, f"not an OpValidationError: {type(error).__name__}: {error}"
    assert re.search(message, str(error)), f"{str(error)!r} does not match {message!r}"


def test_rule_ids_are_unique():
    keys = [(rule.op, rule.target, rule.id) for rule in STRUCTURAL]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("rule", _ids_of(STRUCTURAL))
def test_rule_eager(rule: Rule):
    call = base(rule.op, **rule.over)
    with moe_fusion.target(rule.target):
        with pytest.raises(OpValidationError, match=rule.message):
            invoke(rule.op, call)


@pytest.mark.parametrize("rule", _ids_of(STRUCTURAL))
def test_rule_compiled(rule: Rule):
    call = base(rule.op, **rule.over)
    tensors = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
    consts = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}

    @torch.compile(fullgraph=True, backend="aot_eager", dynamic=False)
    def fn(tensors):
        return invoke(rule.op, {**consts, **tensors})

    with moe_fusion.target(rule.target):
        _expect(lambda: fn(tensors), rule.message)


def test_every_rule_passes_once_fixed():
    """The base calls themselves are valid on every target where the op exists (so each rule's
    error comes from its own change), checked on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for op in (DISPATCH, COMBINE, RMS):
        for target in ("portable", "A3") if op == RMS else ("portable", "A2", "A3"):
            over = A2 if target == "A2" else {}
            if target == "A2" and op != DISPATCH:
                over = {**A2, "moe_expert_num": 16, "expand_x": torch.zeros(128, H, dtype=BF16),
                        "assist_info_for_combine": torch.zeros(128 * 128, dtype=I32),
                        "ep_send_counts": torch.zeros(16, dtype=I32)}
            with FakeTensorMode(allow_non_fake_inputs=True), moe_fusion.target(target):
                invoke(op, base(op, **over))


# ---- value rules: world of one rank, eager and compiled -------------------------------------------

def _world_of_one(op: str, mutate: Callable[[dict], None]) -> dict:
    """A valid world-of-one call (portable), fed by a real dispatch for the combines, then mutated."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 16, generator=g).to(BF16)
    expert_ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(6)]).int()
    dispatch = dict(x=x, expert_ids=expert_ids, group_ep="", ep_world_size=1, ep_rank_id=0, moe_expert_num=4)
    if op == DISPATCH:
        call = dispatch
    else:
        expand_x, _, assist, _, counts, tp_counts, _ = invoke(DISPATCH, dispatch)
        call = dict(expand_x=expand_x, expert_ids=expert_ids, assist_info_for_combine=assist, ep_send_counts=counts,
                    expert_scales=torch.rand(6, 2, generator=g), group_ep="", ep_world_size=1, ep_rank_id=0,
                    moe_expert_num=4, tp_send_counts=tp_counts)
        if op == RMS:
            call["expand_idx"] = call.pop("assist_info_for_combine")
            call.update(residual_x=torch.zeros(6, 1, 16, dtype=BF16), gamma=torch.ones(16, dtype=BF16))
    mutate(call)
    return call


def _set(**values):
    return lambda call: call.update(values)


def _bad_id(value):
    def mutate(call):
        call["expert_ids"] = call["expert_ids"].clone()
        call["expert_ids"][2, 1] = value
    return mutate


def _assist_rank(call):
    name = "assist_info_for_combine" if "assist_info_for_combine" in call else "expand_idx"
    call[name] = call[name].clone()
    call[name][3] = 5                                 # row 1's source rank, in a world of one


VALUE_RULES = [
    (DISPATCH, "ids-range", _bad_id(4), r"expert_ids values must be in \[0, 4\), got 4"),
    (DISPATCH, "ids-negative", _bad_id(-1), r"expert_ids values must be in \[0, 4\), got -1"),
    (COMBINE, "ids-range", _bad_id(9), r"expert_ids values must be in \[0, 4\), got 9"),
    (DISPATCH, "ids-unique", lambda c: c["expert_ids"].__setitem__((2, 1), int(c["expert_ids"][2, 0])),
     r"expert_ids values must be unique within a row, got row 2"),
    (RMS, "ids-unique", lambda c: c.update(expert_ids=c["expert_ids"][:, :1].repeat(1, 2).contiguous()),
     r"expert_ids values must be unique within a row"),
    (DISPATCH, "mask-prefix", _set(x_active_mask=torch.tensor([True, False, True, True, False, False])),
     r"x_active_mask must be a True-prefix when 1-D .*, got \[1, 0, 1, 1, 0, 0\]"),
    (COMBINE, "mask-prefix", _set(x_active_mask=torch.tensor([False, True, True, True, True, True])),
     r"x_active_mask must be a True-prefix"),
    (DISPATCH, "elastic-scale-down", _set(elastic_info=torch.tensor([1, 1, 0, 4, 0, 0], dtype=I32)),
     r"elastic_info must not request a scale-down .*, got 1"),
    (COMBINE, "counts-beyond-rows", lambda c: c.update(ep_send_counts=c["ep_send_counts"] + 1000),
     r"ep_send_counts must count at most expand_x.size\(0\) = \d+ rows"),
    (COMBINE, "assist-rank", _assist_rank, r"assist_info_for_combine source ranks must be in \[0, 1\)"),
    (RMS, "assist-rank", _assist_rank, r"expand_idx source ranks must be in \[0, 1\)"),
    (COMBINE, "not-paired", _set(x_active_mask=torch.ones(6, 2, dtype=torch.bool).index_fill(1, torch.tensor([1]), False)),
     r"assist_info_for_combine and ep_send_counts must come from the paired dispatch"),
    (RMS, "not-paired", lambda c: c.update(x_active_mask=torch.tensor([True, True, True, False, False, False])),
     r"expand_idx and ep_send_counts must come from the paired dispatch"),
]


@pytest.mark.parametrize("op,name,mutate,message", [pytest.param(*v, id=f"{v[0].split('_', 3)[-1]}-{v[1]}")
                                                   for v in VALUE_RULES])
def test_value_rule(op, name, mutate, message):
    call = _world_of_one(op, mutate)
    with pytest.raises(OpValidationError, match=message):
        invoke(op, call)
    tensors = {k: v for k, v in call.items() if isinstance(v, torch.Tensor)}
    consts = {k: v for k, v in call.items() if not isinstance(v, torch.Tensor)}
    compiled = torch.compile(lambda t: invoke(op, {**consts, **t}), fullgraph=True, backend="aot_eager")
    _expect(lambda: compiled(tensors), message)


# ---- group rules: 2 gloo ranks ----------------------------------------------------------------------

def _group_rules(rank: int, world: int) -> dict:
    """Each case's error message on this rank ('' when it unexpectedly passed)."""
    import torch.distributed as dist

    singles = [dist.new_group([r]) for r in range(world)]
    ep = dist.group.WORLD.group_name
    x = torch.zeros(4, 16, dtype=BF16)
    good_ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=I32)
    cases = {
        "unknown-group": lambda: invoke(DISPATCH, dict(x=x, expert_ids=good_ids, group_ep="no-such-group",
                                                       ep_world_size=2, ep_rank_id=rank, moe_expert_num=2)),
        "group-size": lambda: invoke(DISPATCH, dict(x=x, expert_ids=good_ids, group_ep=singles[rank].group_name,
                                                    ep_world_size=2, ep_rank_id=rank, moe_expert_num=2)),
        "group-rank": lambda: invoke(DISPATCH, dict(x=x, expert_ids=good_ids, group_ep=ep, ep_world_size=2,
                                                    ep_rank_id=1 - rank, moe_expert_num=2)),
        "ep-equals-tp": lambda: invoke(DISPATCH, dict(x=x, expert_ids=good_ids[:, :1].contiguous(), group_ep=ep,
                                                      ep_world_size=2, ep_rank_id=rank, moe_expert_num=2,
                                                      tp_world_size=2, tp_rank_id=rank, group_tp=ep)),
        # Rank 1 sends bad ids: both ranks stop (rank 0 names the rejection), nobody waits forever.
        "peer-error": lambda: invoke(DISPATCH, dict(x=x, expert_ids=good_ids + 5 * rank, group_ep=ep, ep_world_size=2,
                                                    ep_rank_id=rank, moe_expert_num=2)),
        "peer-mismatch": lambda: invoke(DISPATCH, dict(x=torch.zeros(4, 16 + 8 * rank, dtype=BF16),
                                                       expert_ids=good_ids, group_ep=ep, ep_world_size=2,
                                                       ep_rank_id=rank, moe_expert_num=2)),
        "combine-unknown-group": lambda: invoke(COMBINE, dict(
            expand_x=torch.zeros(8, 16, dtype=BF16), expert_ids=good_ids, assist_info_for_combine=torch.zeros(1024, dtype=I32),
            ep_send_counts=torch.zeros(2, dtype=I32), expert_scales=torch.ones(4, 2), group_ep="nope",
            ep_world_size=2, ep_rank_id=rank, moe_expert_num=2)),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = ""
        except OpValidationError as error:
            out[name] = str(error)
    return out


GROUP_MESSAGES = {
    "unknown-group": r"group_ep must name a registered process group .*, got 'no-such-group'",
    "group-size": r"group_ep must have 2 ranks \(the world size argument\), got group .* of size 1",
    "group-rank": r"group_ep must hold this process at rank \d \(the rank argument\)",
    "ep-equals-tp": r"group_tp must differ from group_ep when tp_world_size > 1",
    "peer-mismatch": r"x \(hidden size H\) must be the same on every rank of group_ep, got (16|24) on this rank, (24|16) on rank",
    "combine-unknown-group": r"npu_moe_distribute_combine_v2: group_ep must name a registered process group",
}


def test_group_rules_on_two_ranks():
    results = run_ranks(2, _group_rules, timeout=120)
    for rank, messages in enumerate(results):
        for name, pattern in GROUP_MESSAGES.items():
            assert re.search(pattern, messages[name]), (rank, name, messages[name])
    assert re.search(r"ranks must all accept their inputs, got a rejection by rank 1", results[0]["peer-error"])
    assert re.search(r"expert_ids values must be in \[0, 2\), got 5", results[1]["peer-error"])
