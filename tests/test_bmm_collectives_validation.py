"""Every SPEC §6.4 rule of the two BMM collective ops, in eager mode and under
``torch.compile(fullgraph=True, backend="aot_eager")``: same error, same message.

Calls are built so that validation fails before any group lookup (a kernel looks groups up only
after validating), so no process group is needed; group-name lookups are tested on real ranks
in ``test_bmm_collectives.py``.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import moe_fusion

AG, RS = "npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall"
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


def t(*shape: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def ag(x, w, ep=1, tp=1, group_ep="ep", group_tp="tp", **kw) -> Callable[[], Any]:
    return lambda: moe_fusion.npu_alltoall_allgather_bmm(x, w, group_ep, ep, group_tp, tp, **kw)


def rs(x, w, ep=1, tp=1, group_ep="ep", group_tp="tp", **kw) -> Callable[[], Any]:
    return lambda: moe_fusion.npu_bmm_reducescatter_alltoall(x, w, group_ep, ep, group_tp, tp, **kw)


# (id, target, factory of a call, expected message). Valid baselines: ag(t(4,3,8), t(4,8,5)) and
# rs(t(4,3,5), t(4,5,8)) in a world of one; with ep=tp=2 on A3: ag(t(4,3,4,bf16), t(2,8,5,bf16)).
RULES: list[tuple[str, str, Callable[[], Callable[[], Any]], str]] = [
    # -- shared rules (forward op) --
    ("ag-x-rank", "portable", lambda: ag(t(4, 8), t(4, 8, 5)), f"{AG}: x must be 3-D, got shape (4, 8)"),
    ("ag-weight-rank", "portable", lambda: ag(t(4, 3, 8), t(8, 5)), f"{AG}: weight must be 3-D, got shape (8, 5)"),
    ("ag-x-dtype", "portable", lambda: ag(t(4, 3, 8, dtype=torch.int32), t(4, 8, 5, dtype=torch.int32)),
     f"{AG}: x dtype must be one of (float16, bfloat16, float32, float64), got int32"),
    ("ag-x-fp32-on-A3", "A3", lambda: ag(t(4, 3, 4), t(2, 8, 5), 2, 2),
     f"{AG}: x dtype must be one of (float16, bfloat16), got float32"),
    ("ag-weight-dtype", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5, dtype=BF16)),
     f"{AG}: weight dtype must equal x's (float32), got bfloat16"),
    ("ag-group-empty", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), group_ep=""),
     f"{AG}: group_ep must be a group name of 1 to 127 characters, got ''"),
    ("ag-group-too-long", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), group_tp="g" * 128),
     f"{AG}: group_tp must be a group name of 1 to 127 characters, got '{'g' * 128}'"),
    ("ag-groups-equal", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), group_ep="g", group_tp="g"),
     f"{AG}: group_tp must differ from group_ep, got 'g'"),
    ("ag-ep-size-portable", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), ep=0),
     f"{AG}: group_ep_worldsize must be >= 1, got 0"),
    ("ag-ep-size-A3", "A3", lambda: ag(t(4, 3, 8, dtype=BF16), t(4, 16, 5, dtype=BF16), 1, 2),
     f"{AG}: group_ep_worldsize must be one of (2, 4, 8, 16, 32) on A3, got 1"),
    ("ag-tp-size-A3", "A3", lambda: ag(t(4, 3, 8, dtype=BF16), t(2, 24, 5, dtype=BF16), 2, 3),
     f"{AG}: group_tp_worldsize must be one of (2, 4, 8, 16, 32) on A3, got 3"),
    ("ag-shard-type", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), shard_type=2),
     f"{AG}: shard_type must be one of (0, 1), got 2"),
    ("ag-zero-dim", "portable", lambda: ag(t(4, 0, 8), t(4, 8, 5)), f"{AG}: x must have no zero-size dim, got shape (4, 0, 8)"),
    ("ag-zero-dim-weight", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 0)),
     f"{AG}: weight must have no zero-size dim, got shape (4, 8, 0)"),
    ("ag-float64-A3", "A3", lambda: ag(t(4, 3, 8, dtype=torch.float64), t(2, 16, 5, dtype=torch.float64), 2, 2),
     f"{AG}: x dtype must be one of (float16, bfloat16), got float64"),
    ("ag-A2", "A2", lambda: ag(t(4, 3, 4, dtype=BF16), t(2, 8, 5, dtype=BF16), 2, 2),
     f"{AG}: target must be one of ('A3', 'portable') (the op does not exist on A2), got A2"),
    # -- forward-only rules --
    ("ag-act-type", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), act_type=5), f"{AG}: act_type must be one of (0, 1, 2, 3, 4), got 5"),
    ("ag-act-name", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), act_type="tanh"),
     f"{AG}: act_type must be one of ('None', 'GeLu', 'SiLu', 'ReLu', 'FastGeLu') (case-insensitive) or 0..4, got 'tanh'"),
    ("ag-y3-without-act", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), need_activation_feature=True),
     f"{AG}: need_activation_feature must be False when act_type is 0 (no activation), got True"),
    ("ag-E-mod-ep", "portable", lambda: ag(t(5, 3, 8), t(2, 8, 5), ep=2),
     f"{AG}: weight must have E/ep = x.size(0) / 2 experts in dim 0 (x has E=5), got shape (2, 8, 5)"),
    ("ag-E-max-A3", "A3", lambda: ag(t(514, 1, 1, dtype=BF16), t(257, 2, 1, dtype=BF16), 2, 2),
     f"{AG}: x expert count E must be in [2, 512] on A3, got E=514"),
    ("ag-local-E-max-A3", "A3", lambda: ag(t(66, 1, 1, dtype=BF16), t(33, 2, 1, dtype=BF16), 2, 2),
     f"{AG}: weight local expert count E/ep must be <= 32 on A3, got E/ep=33"),
    ("ag-H-shard0", "portable", lambda: ag(t(4, 3, 8), t(2, 8, 5), 2, 2),
     f"{AG}: weight dim 1 must be H = x.size(2) * tp = 16 (shard_type 0 gathers H), got shape (2, 8, 5)"),
    ("ag-H-shard1", "portable", lambda: ag(t(4, 3, 8), t(2, 16, 5), 2, 2, shard_type=1),
     f"{AG}: weight dim 1 must be H = x.size(2) = 8 (shard_type 1 gathers C), got shape (2, 16, 5)"),
    ("ag-H-max-A3", "A3", lambda: ag(t(4, 1, 32768, dtype=BF16), t(2, 65536, 1, dtype=BF16), 2, 2),
     f"{AG}: weight H (dim 1) must be <= 65535 on A3, got 65536"),
    ("ag-M-max-A3", "A3", lambda: ag(t(4, 1, 1, dtype=BF16), t(2, 2, 65536, dtype=BF16), 2, 2),
     f"{AG}: weight M/tp (dim 2) must be <= 65535 on A3, got 65536"),
    ("ag-bias-rank", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), bias=t(5)), f"{AG}: bias must be 2-D or 3-D, got shape (5,)"),
    ("ag-bias-bf16", "portable", lambda: ag(t(4, 3, 8, dtype=BF16), t(4, 8, 5, dtype=BF16), bias=t(4, 5, dtype=BF16)),
     f"{AG}: bias dtype must be float32 for bfloat16 x, got bfloat16"),
    ("ag-bias-fp16", "portable", lambda: ag(t(4, 3, 8, dtype=F16), t(4, 8, 5, dtype=F16), bias=t(4, 5)),
     f"{AG}: bias dtype must be float16 for float16 x, got float32"),
    ("ag-bias-shape-3d", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), bias=t(4, 2, 5)),
     f"{AG}: bias must have shape (4, 1, 5), got shape (4, 2, 5)"),
    ("ag-bias-shape-2d", "portable", lambda: ag(t(4, 3, 8), t(4, 8, 5), bias=t(4, 6)),
     f"{AG}: bias must have shape (4, 5), got shape (4, 6)"),
    # -- reverse op: shared rules it runs too, then its own --
    ("rs-x-rank", "portable", lambda: rs(t(3, 5), t(4, 5, 8)), f"{RS}: x must be 3-D, got shape (3, 5)"),
    ("rs-weight-dtype", "portable", lambda: rs(t(4, 3, 5), t(4, 5, 8, dtype=F16)),
     f"{RS}: weight dtype must equal x's (float32), got float16"),
    ("rs-groups-equal", "portable", lambda: rs(t(4, 3, 5), t(4, 5, 8), group_ep="g", group_tp="g"),
     f"{RS}: group_tp must differ from group_ep, got 'g'"),
    ("rs-tp-size-A3", "A3", lambda: rs(t(2, 8, 5, dtype=BF16), t(2, 5, 8, dtype=BF16), 2, 64),
     f"{RS}: group_tp_worldsize must be one of (2, 4, 8, 16, 32) on A3, got 64"),
    ("rs-shard-type", "portable", lambda: rs(t(4, 3, 5), t(4, 5, 8), shard_type=-1), f"{RS}: shard_type must be one of (0, 1), got -1"),
    ("rs-zero-dim", "portable", lambda: rs(t(0, 3, 5), t(0, 5, 8)), f"{RS}: x must have no zero-size dim, got shape (0, 3, 5)"),
    ("rs-A2", "A2", lambda: rs(t(2, 8, 5, dtype=BF16), t(2, 5, 8, dtype=BF16), 2, 2),
     f"{RS}: target must be one of ('A3', 'portable') (the op does not exist on A2), got A2"),
    ("rs-local-E", "portable", lambda: rs(t(4, 3, 5), t(3, 5, 8)),
     f"{RS}: weight must have E/ep = x.size(0) = 4 experts in dim 0, got shape (3, 5, 8)"),
    ("rs-E-max-A3", "A3", lambda: rs(t(32, 2, 1, dtype=BF16), t(32, 1, 2, dtype=BF16), 32, 2),
     f"{RS}: x expert count E must be in [2, 512] on A3, got E=1024"),
    ("rs-local-E-max-A3", "A3", lambda: rs(t(33, 2, 1, dtype=BF16), t(33, 1, 2, dtype=BF16), 2, 2),
     f"{RS}: weight local expert count E/ep must be <= 32 on A3, got E/ep=33"),
    ("rs-M", "portable", lambda: rs(t(4, 3, 5), t(4, 6, 8)), f"{RS}: weight dim 1 must be M/tp = x.size(2) = 5, got shape (4, 6, 8)"),
    ("rs-M-max-A3", "A3", lambda: rs(t(2, 2, 65536, dtype=BF16), t(2, 65536, 2, dtype=BF16), 2, 2),
     f"{RS}: weight M/tp (dim 1) must be <= 65535 on A3, got 65536"),
    ("rs-H-max-A3", "A3", lambda: rs(t(2, 2, 1, dtype=BF16), t(2, 1, 65536, dtype=BF16), 2, 2),
     f"{RS}: weight H (dim 2) must be <= 65535 on A3, got 65536"),
    ("rs-H-mod-tp", "portable", lambda: rs(t(4, 3, 5), t(4, 5, 9), tp=2),
     f"{RS}: weight dim 2 (H) must be a multiple of tp=2 (shard_type 0 scatters H), got shape (4, 5, 9)"),
    ("rs-rows-mod-ep", "portable", lambda: rs(t(4, 3, 5), t(4, 5, 8), ep=2),
     f"{RS}: x dim 1 must be ep*C, a multiple of ep=2, got shape (4, 3, 5)"),
    ("rs-rows-mod-ep-tp", "portable", lambda: rs(t(4, 6, 5), t(4, 5, 8), ep=2, tp=2, shard_type=1),
     f"{RS}: x dim 1 must be ep*C with C % tp == 0, a multiple of ep*tp=4 (shard_type 1 scatters C), got shape (4, 6, 5)"),
    ("rs-bias-shard0", "portable", lambda: rs(t(4, 4, 5), t(4, 5, 8), tp=2, bias=t(4, 1, 8)),
     f"{RS}: bias must have shape (4, 1, 4), got shape (4, 1, 8)"),
    ("rs-bias-shard1", "portable", lambda: rs(t(4, 4, 5), t(4, 5, 8), tp=2, shard_type=1, bias=t(4, 4)),
     f"{RS}: bias must have shape (4, 8), got shape (4, 4)"),
    ("rs-bias-dtype", "portable", lambda: rs(t(4, 3, 5, dtype=F16), t(4, 5, 8, dtype=F16), bias=t(4, 8, dtype=BF16)),
     f"{RS}: bias dtype must be float16 for float16 x, got bfloat16"),
]
IDS = [rule[0] for rule in RULES]


@pytest.mark.parametrize("name,target,make,message", RULES, ids=IDS)
def test_eager_error(name: str, target: str, make: Callable, message: str) -> None:
    with moe_fusion.target(target), pytest.raises(moe_fusion.OpValidationError) as info:
        make()()
    assert str(info.value) == message


@pytest.mark.parametrize("name,target,make,message", RULES, ids=IDS)
def test_compile_error(name: str, target: str, make: Callable, message: str) -> None:
    torch._dynamo.reset()
    call = torch.compile(make(), fullgraph=True, backend="aot_eager")
    with moe_fusion.target(target), pytest.raises(Exception) as info:
        call()
    assert message in str(info.value)


def test_every_valid_baseline_passes() -> None:
    """The baselines the rules above perturb are valid, so each case fails for its own rule."""
    moe_fusion.npu_alltoall_allgather_bmm(t(4, 3, 8), t(4, 8, 5), "ep", 1, "tp", 1)
    moe_fusion.npu_bmm_reducescatter_alltoall(t(4, 3, 5), t(4, 5, 8), "ep", 1, "tp", 1)
    meta = dict(device="meta", dtype=BF16)
    with moe_fusion.target("A3"):
        moe_fusion.npu_alltoall_allgather_bmm(torch.empty(4, 3, 4, **meta), torch.empty(2, 8, 5, **meta), "ep", 2, "tp", 2)
        moe_fusion.npu_bmm_reducescatter_alltoall(torch.empty(2, 8, 5, **meta), torch.empty(2, 5, 8, **meta), "ep", 2, "tp", 2)
