"""Adversarial sizes and counts (issue 12 items 2 and 5): every bad input is one clear
``OpValidationError`` naming the op, the argument, the rule and the value, in eager mode and under
``torch.compile(fullgraph=True)`` (static and ``dynamic=True``); never a crash, a wrapped sum, an
overflow inside the shape arithmetic or a multi-GB allocation.

Structural cases (attributes and shapes) fail at trace time; value cases (counts and ids) fail inside
the kernel, at run time of the compiled graph, with the same message. Tensors that would be huge
are zero-size or stride-0 views, so no case allocates more than a few MB. The issue's segfaulting
calls also run in a child process, whose exit code and stderr are checked.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import moe_fusion
from moe_fusion.errors import OpValidationError

from compile_support import call_compiled

I32, I64, BF16 = torch.int32, torch.int64, torch.bfloat16
INT32_MAX, INT64_MAX, INT64_MIN = 2**31 - 1, 2**63 - 1, -2**63

RE_ROUTING = "npu_moe_re_routing"
UPDATE = "npu_moe_update_expert"
DISPATCH = "npu_moe_distribute_dispatch_v2"
COMBINE = "npu_moe_distribute_combine_v2"
AG_BMM = "npu_alltoall_allgather_bmm"
RS_BMM = "npu_bmm_reducescatter_alltoall"
FFN = "npu_ffn"
FFN_GROUPED = "npu_ffn_grouped"


@dataclass(frozen=True)
class Case:
    """One bad call: ``op(*args, **kwargs)`` must raise ``"<op>: <arg> ...<rule>..., got <seen>"``.
    ``values`` marks a rule on tensor contents (checked by the kernel, at run time when compiled)."""

    id: str
    op: str
    args: tuple
    kwargs: dict
    arg: str
    rule: str
    seen: str
    values: bool = False
    dynamic: bool = field(default=True)

    def call(self) -> Callable[..., Any]:
        return getattr(moe_fusion, self.op)


def counts(rows: list[list[int]], dtype: torch.dtype = I64) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype)


def tokens(a: int, h: int = 4) -> torch.Tensor:
    return torch.zeros(a, h, dtype=torch.float16)


def rr(case_id: str, toks: torch.Tensor, cnts: torch.Tensor, arg: str, rule: str, seen: str,
       values: bool = True) -> Case:
    return Case(case_id, RE_ROUTING, (toks, cnts), {}, arg, rule, seen, values)


RE_ROUTING_CASES = [
    # The issue: the int64 sum wraps to 2 == A.
    rr("issue_wrapped_sum_equals_A", tokens(2), counts([[2**62, 2**62, 2**62, 2**62 + 2]]),
       "expert_token_num_per_rank", "entries must be <= tokens.size(0)=2", str(2**62 + 2)),
    rr("issue_zero_tokens", tokens(0), counts([[2**62] * 2] * 2),
       "expert_token_num_per_rank", "entries must be <= tokens.size(0)=0", str(2**62)),
    # int32 counts whose int32 sum would wrap to A = 2.
    rr("int32_wrap", tokens(2), counts([[INT32_MAX, INT32_MAX, 4]], I32),
       "expert_token_num_per_rank", "entries must be <= tokens.size(0)=2", str(INT32_MAX)),
    # A negative entry cancelling a huge one: the sum is exactly A.
    rr("negative_cancels_huge", tokens(2), counts([[INT64_MAX, INT64_MIN + 3]]),
       "expert_token_num_per_rank", "entries must be >= 0", str(INT64_MIN + 3)),
    rr("int64_min", tokens(2), counts([[INT64_MIN, 2]]), "expert_token_num_per_rank", "entries must be >= 0",
       str(INT64_MIN)),
    rr("two_int64_max_wrap", tokens(2), counts([[INT64_MAX, INT64_MAX, 4]]),
       "expert_token_num_per_rank", "entries must be <= tokens.size(0)=2", str(INT64_MAX)),
    rr("stride0_counts_equal_A_each", tokens(3), torch.full((1, 1), 3, dtype=I64).expand(4, 5),
       "expert_token_num_per_rank", "must sum to tokens.size(0)=3", "sum 60"),
    # Structural: sizes that would overflow int32 indices (zero-size or stride-0 tensors).
    rr("A_above_int32", torch.empty(2**31, 0, dtype=torch.float16), counts([[0]]), "tokens",
       "must have A <= 2147483647 rows (permute_token_idx is int32)", "A=2147483648", values=False),
    rr("counts_2pow32_entries", tokens(0), torch.zeros(1, 1, dtype=I64).expand(2**16, 2**16),
       "expert_token_num_per_rank", "must have N * E <= 2147483647 entries", "shape (65536, 65536)", values=False),
]


def ue(case_id: str, arg: str, rule: str, seen: str, *, ids: torch.Tensor | None = None,
       table: torch.Tensor | None = None, values: bool = False, **kwargs: int) -> Case:
    ids = torch.zeros(2, 2, dtype=I32) if ids is None else ids
    table = torch.tensor([[2, 0, 1], [1, 2, 0], [1, 1, 0]], dtype=I32) if table is None else table
    kwargs = {"world_size": 2, "local_rank_id": 0, **kwargs}
    return Case(case_id, UPDATE, (ids, table), kwargs, arg, rule, seen, values)


WORLD_RULE = "must be <= 65536 when balance_mode == 0 (int32 replica arithmetic)"
UPDATE_CASES = [
    ue("issue_world_2pow40", "world_size", WORLD_RULE, str(2**40), world_size=2**40),
    ue("issue_world_int32_max", "world_size", WORLD_RULE, str(INT32_MAX), world_size=INT32_MAX,
       local_rank_id=INT32_MAX - 1),
    ue("world_int64_max", "world_size", WORLD_RULE, str(INT64_MAX), world_size=INT64_MAX, local_rank_id=INT64_MAX - 1),
    ue("world_65537", "world_size", WORLD_RULE, "65537", world_size=65537),
    ue("world_int64_min", "world_size", "must be >= 1 when balance_mode == 0", str(INT64_MIN), world_size=INT64_MIN),
    ue("rank_int64_min", "local_rank_id", "must be in [0, 1]", str(INT64_MIN), local_rank_id=INT64_MIN),
    ue("rank_int64_max", "local_rank_id", "must be in [0, 1]", str(INT64_MAX), local_rank_id=INT64_MAX),
    ue("balance_mode_huge", "balance_mode", "must be one of (0, 1)", str(2**40), balance_mode=2**40),
    # A stride-0 table 2**31 columns wide: world_size + F - 2 leaves int32.
    ue("table_F_2pow31", "eplb_table", "must have F <= 2147483647 columns when balance_mode == 0",
       "shape (3, 2147483648)", table=torch.ones(1, 1, dtype=I32).expand(3, 2**31)),
    ue("ids_int64_huge", "expert_ids", "values must be in [0, 3)", str(2**62), values=True,
       ids=torch.tensor([[0, 2**62], [1, 2]], dtype=I64)),
    ue("ids_int64_min", "expert_ids", "values must be in [0, 3)", str(INT64_MIN), values=True,
       ids=torch.tensor([[0, INT64_MIN], [1, 2]], dtype=I64)),
    ue("used_count_int32_max", "eplb_table", "replica counts (column 0) of used experts must be in [1, 2]",
       str(INT32_MAX), values=True, table=torch.tensor([[INT32_MAX, 0, 1], [1, 2, 0], [1, 1, 0]], dtype=I32)),
    ue("used_count_int32_min", "eplb_table", "replica counts (column 0) of used experts must be in [1, 2]",
       str(-2**31), values=True, table=torch.tensor([[-2**31, 0, 1], [1, 2, 0], [1, 1, 0]], dtype=I32)),
]


def dispatch(case_id: str, arg: str, rule: str, seen: str, *, bs: int = 4, k: int = 2, h: int = 8,
             ids: torch.Tensor | None = None, **kwargs: Any) -> Case:
    ids = torch.zeros(1, 1, dtype=I32).expand(bs, k) if ids is None else ids
    kwargs = {"ep_world_size": 4, "ep_rank_id": 0, "moe_expert_num": 8, **kwargs}
    positional = (torch.zeros(bs, h, dtype=BF16), ids, "ep", kwargs.pop("ep_world_size"), kwargs.pop("ep_rank_id"),
                  kwargs.pop("moe_expert_num"))
    return Case(case_id, DISPATCH, positional, kwargs, arg, rule, seen)


def combine(case_id: str, arg: str, rule: str, seen: str, **kwargs: Any) -> Case:
    bs, k, h = 4, 2, 8
    kwargs = {"ep_world_size": 4, "ep_rank_id": 0, "moe_expert_num": 8, **kwargs}
    positional = (torch.zeros(64, h, dtype=BF16), torch.zeros(bs, k, dtype=I32), torch.zeros(64 * 128, dtype=I32),
                  torch.zeros(64, dtype=I32), torch.zeros(bs, k), "ep", kwargs.pop("ep_world_size"),
                  kwargs.pop("ep_rank_id"), kwargs.pop("moe_expert_num"))
    return Case(case_id, COMBINE, positional, kwargs, arg, rule, seen)


GBS_RULE_W2 = "must be <= ep_world_size * 512 = 1024 (global_bs / ep_world_size is the largest BS of any rank)"
CAPACITY_RULE = "must keep the receive capacity A = global_bs_real * min(L, K)"
DIST_CASES = [
    dispatch("issue_moe_expert_num_int32_max", "moe_expert_num", "must be <= 1024", str(INT32_MAX),
             ep_world_size=1, moe_expert_num=INT32_MAX),
    dispatch("moe_expert_num_1025", "moe_expert_num", "must be <= 1024", "1025", ep_world_size=1, moe_expert_num=1025),
    dispatch("moe_expert_num_int64_min", "moe_expert_num", "must be > 0", str(INT64_MIN), moe_expert_num=INT64_MIN),
    dispatch("issue_global_bs_int32_max_minus_1", "global_bs", GBS_RULE_W2, str(INT32_MAX - 1), ep_world_size=2,
             global_bs=INT32_MAX - 1),
    dispatch("issue_global_bs_2pow62", "global_bs", GBS_RULE_W2, str(2**62), ep_world_size=2, global_bs=2**62),
    # World of one: without the bound the kernel itself would run and zero-fill GiBs.
    dispatch("issue_global_bs_2pow22_world1", "global_bs", "must be <= ep_world_size * 512 = 512", str(2**22),
             ep_world_size=1, global_bs=2**22),
    dispatch("global_bs_negative", "global_bs", "must be 0 or a multiple of ep_world_size=4", "-4", global_bs=-4),
    dispatch("ep_world_int32_max", "ep_world_size", "must be <= 768", str(INT32_MAX), ep_world_size=INT32_MAX),
    dispatch("ep_world_769", "ep_world_size", "must be <= 768", "769", ep_world_size=769),
    dispatch("ep_world_int64_min", "ep_world_size", "must be >= 1", str(INT64_MIN), ep_world_size=INT64_MIN),
    dispatch("ep_rank_2pow62", "ep_rank_id", "must be in [0, 3]", str(2**62), ep_rank_id=2**62),
    dispatch("tp_world_2pow40", "tp_world_size", "must be one of (0, 1, 2)", str(2**40), tp_world_size=2**40),
    dispatch("tp_rank_negative", "tp_rank_id", "must be 0 when tp_world_size <= 1", "-1", tp_rank_id=-1),
    dispatch("shared_num_2pow62", "shared_expert_rank_num", "must be a multiple of shared_expert_num", "2",
             shared_expert_num=2**62, shared_expert_rank_num=2),
    dispatch("shared_ranks_2pow62", "shared_expert_rank_num", "must be in [0, ep_world_size=4)", str(2**62),
             shared_expert_rank_num=2**62),
    dispatch("zero_expert_int32_max", "moe_expert_num",
             "+ zero/copy/const_expert_num must be <= 2147483647 (ids are int32)", str(8 + INT32_MAX),
             zero_expert_num=INT32_MAX),
    dispatch("copy_expert_negative", "copy_expert_num", "must be >= 0", "-1", copy_expert_num=-1),
    dispatch("const_expert_int64_min", "const_expert_num", "must be >= 0", str(INT64_MIN), const_expert_num=INT64_MIN),
    dispatch("quant_mode_2pow40", "quant_mode", "must be one of (0, 2)", str(2**40), quant_mode=2**40),
    dispatch("token_nums_type_negative", "expert_token_nums_type", "must be one of (0, 1)", "-1",
             expert_token_nums_type=-1),
    dispatch("shard_type_huge", "expert_shard_type", "must be one of (0,)", str(2**40), expert_shard_type=2**40),
    # Receive capacity A = 16384 * min(1024, 1024) = 2**24 rows: assist_info would be 2**31 entries.
    dispatch("capacity_2pow24", "expert_ids", CAPACITY_RULE, "A=16777216", bs=16384, k=1024, h=1, ep_world_size=1,
             moe_expert_num=1024),
    dispatch("capacity_via_global_bs", "global_bs", CAPACITY_RULE, "A=16777216", bs=8192, k=1024, h=1,
             ep_world_size=2, ep_rank_id=1, moe_expert_num=1024, shared_expert_rank_num=1, shared_expert_num=1,
             global_bs=2 * 8192),
    # ep_recv_counts with expert_scales: 768 * 1 + 393216 * 2 * 32 * 96 entries.
    dispatch("ep_recv_counts_above_int32", "expert_scales", "must keep ep_recv_counts", "2415919872 entries",
             bs=512, k=32, h=1, ep_world_size=768, moe_expert_num=768, expert_scales=torch.zeros(512, 32)),
    combine("combine_moe_expert_num_int32_max", "moe_expert_num", "must be <= 1024", str(INT32_MAX),
            ep_world_size=1, moe_expert_num=INT32_MAX),
    combine("combine_global_bs_2pow62", "global_bs", "must be <= ep_world_size * 512 = 2048", str(2**62),
            global_bs=2**62),
    combine("combine_ep_world_int32_max", "ep_world_size", "must be <= 768", str(INT32_MAX), ep_world_size=INT32_MAX),
]


def bmm(case_id: str, op: str, arg: str, rule: str, seen: str, *, ep: int = 2, tp: int = 2, **kwargs: Any) -> Case:
    x = torch.zeros(4, 2, 4) if op == AG_BMM else torch.zeros(2, 4, 4)
    weight = torch.zeros(2, 8, 4) if op == AG_BMM else torch.zeros(2, 4, 8)
    return Case(case_id, op, (x, weight, "ep", ep, "tp", tp), kwargs, arg, rule, seen)


BMM_CASES = [
    bmm("ag_tp_2pow40_shard1", AG_BMM, "group_tp_worldsize", "must be <= 32", str(2**40), tp=2**40, shard_type=1),
    bmm("ag_ep_int32_max", AG_BMM, "group_ep_worldsize", "must be <= 32", str(INT32_MAX), ep=INT32_MAX),
    bmm("ag_tp_33", AG_BMM, "group_tp_worldsize", "must be <= 32", "33", tp=33),
    bmm("ag_ep_int64_min", AG_BMM, "group_ep_worldsize", "must be >= 1", str(INT64_MIN), ep=INT64_MIN),
    bmm("ag_act_type_huge", AG_BMM, "act_type", "must be one of (0, 1, 2, 3, 4)", str(2**40), act_type=2**40),
    bmm("ag_shard_type_negative", AG_BMM, "shard_type", "must be one of (0, 1)", "-1", shard_type=-1),
    bmm("rs_tp_2pow40", RS_BMM, "group_tp_worldsize", "must be <= 32", str(2**40), tp=2**40),
    bmm("rs_ep_int64_max", RS_BMM, "group_ep_worldsize", "must be <= 32", str(INT64_MAX), ep=INT64_MAX),
]


def ffn(case_id: str, arg: str, rule: str, seen: str, **kwargs: Any) -> Case:
    x, w1, w2 = torch.zeros(4, 8), torch.zeros(2, 8, 16), torch.zeros(2, 16, 8)
    return Case(case_id, FFN, (x, w1, w2, "relu"), kwargs, arg, rule, seen, dynamic=False)


FFN_CASES = [
    # Python sums are exact: the four counts add up to 2**64 + 4, not 4.
    ffn("counts_sum_2pow64_plus_M", "expert_tokens", "must cover all M=4 rows of x",
        str([2**62, 2**62, 2**62, 2**62 + 4]), expert_tokens=[2**62, 2**62, 2**62, 2**62 + 4]),
    ffn("counts_negative_cancels", "expert_tokens", "entries must be >= 0", str([INT64_MAX, INT64_MIN + 5]),
        expert_tokens=[INT64_MAX, INT64_MIN + 5]),
    ffn("index_negative", "expert_tokens_index", "entries must be >= 0", str([-1, 4]), expert_tokens_index=[-1, 4]),
    ffn("index_decreasing_huge", "expert_tokens_index", "must be non-decreasing", str([INT64_MAX, 4]),
        expert_tokens_index=[INT64_MAX, 4]),
    Case("grouped_M_above_int32", FFN_GROUPED, (torch.empty(2**31, 0), torch.zeros(1, 0, 4), torch.zeros(1, 4, 0),
                                                "relu"),
         {"expert_tokens": torch.zeros(1, dtype=I64)}, "x", "must have M <= 2147483647 rows (int32 segment ends)",
         "shape (2147483648, 0)"),
    Case("grouped_counts_huge", FFN_GROUPED, (torch.zeros(4, 8), torch.zeros(2, 8, 16), torch.zeros(2, 16, 8), "relu"),
         {"expert_tokens": torch.tensor([INT64_MAX, INT64_MIN + 5])}, "expert_tokens", "entries must be >= 0",
         str([INT64_MAX, INT64_MIN + 5]), values=True),
]

# What TorchRuntimeError says when the fake kernel raised: "... got OpValidationError('<message>')".
WRAPPED = re.compile(r"""got OpValidationError\((?P<message>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\)""")
CASES = RE_ROUTING_CASES + UPDATE_CASES + DIST_CASES + BMM_CASES + FFN_CASES
IDS = [c.id for c in CASES]


def assert_clear_error(case: Case, error: OpValidationError) -> None:
    """``"<op>: <arg> <rule>..., got <seen>"``, the op and argument first."""
    message = str(error)
    assert message.startswith(f"{case.op}: {case.arg} "), message
    assert case.rule in message, message
    assert message.endswith(f", got {case.seen}") or f", got {case.seen}" in message, message


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_eager(case: Case) -> None:
    with pytest.raises(OpValidationError) as info:
        case.call()(*case.args, **case.kwargs)
    assert_clear_error(case, info.value)


# npu_ffn's int[] expert lists are graph constants: dynamic shapes add nothing there.
COMPILED = [(c, False) for c in CASES] + [(c, True) for c in CASES if c.dynamic]


@pytest.mark.parametrize("case,dynamic", COMPILED, ids=[f"{c.id}-{'dynamic' if d else 'static'}" for c, d in COMPILED])
def test_compiled(case: Case, dynamic: bool) -> None:
    """Structural rules fail while tracing, value rules inside the compiled graph's kernel; same message."""
    with pytest.raises(Exception) as info:
        call_compiled(case.call(), (case.args, dict(case.kwargs)), dynamic=dynamic)
    error = info.value
    if case.values:
        assert isinstance(error, OpValidationError), repr(error)          # raised by the kernel, as is
    else:
        # Dynamo wraps what the fake kernel raised while tracing (its repr, no __cause__); nothing ran.
        assert isinstance(error, torch._dynamo.exc.TorchRuntimeError), repr(error)
        wrapped = WRAPPED.search(str(error))
        assert wrapped, str(error)
        error = OpValidationError(ast.literal_eval(wrapped.group("message")))
    assert_clear_error(case, error)


def test_limits_still_accepted() -> None:
    """The new bounds sit above what the device accepts: each op runs at its bound."""
    ids, table = torch.zeros(2, 2, dtype=I32), torch.tensor([[2, 0, 1], [1, 2, 0]], dtype=I32)
    balanced, _ = moe_fusion.npu_moe_update_expert(ids, table, world_size=2**16, local_rank_id=2**16 - 1)
    assert balanced.tolist() == [[1, 1], [1, 1]]                   # last rank's half -> replica 2
    balanced, _ = moe_fusion.npu_moe_update_expert(ids, table, world_size=2**16, local_rank_id=2**15 - 1)
    assert balanced.tolist() == [[0, 0], [0, 0]]
    toks = torch.arange(6, dtype=torch.float16).reshape(3, 2)
    out, _, idx, per_expert = moe_fusion.npu_moe_re_routing(toks, counts([[0, 3], [0, 0]], I32))
    assert idx.tolist() == [0, 1, 2] and per_expert.tolist() == [0, 3] and torch.equal(out, toks)
    x, expert_ids = torch.randn(4, 8, dtype=BF16), torch.tensor([[0, 1]] * 4, dtype=I32)
    outs = moe_fusion.npu_moe_distribute_dispatch_v2(x, expert_ids, "", 1, 0, 1024, global_bs=512)
    assert outs[0].shape == (512 * 2, 8)                            # A = global_bs * min(L, K)


SEGFAULT_CALLS = {
    "wrapped_sum": "moe_fusion.npu_moe_re_routing(torch.zeros(2, 4, dtype=torch.float16), "
                   "torch.tensor([[2**62, 2**62, 2**62, 2**62 + 2]]))",
    "zero_tokens": "moe_fusion.npu_moe_re_routing(torch.zeros(0, 4, dtype=torch.float16), "
                   "torch.tensor([[2**62] * 2] * 2))",
    "int32_wrap": "moe_fusion.npu_moe_re_routing(torch.zeros(2, 4, dtype=torch.float16), "
                  "torch.tensor([[2**31 - 1, 2**31 - 1, 4]], dtype=torch.int32))",
}


@pytest.mark.parametrize("name", sorted(SEGFAULT_CALLS))
def test_former_segfaults_in_a_child_process(name: str) -> None:
    """The calls that crashed the interpreter now exit with the Python error (exit code 1, not -11)."""
    script = textwrap.dedent(f"""
        import torch, moe_fusion
        {SEGFAULT_CALLS[name]}
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("moe_fusion.errors.OpValidationError: npu_moe_re_routing: expert_token_num_per_rank "
                           "entries must be <= tokens.size(0)="), last
