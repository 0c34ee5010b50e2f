"""``npu_moe_update_expert`` (SPEC §2): kernel vs the loop oracle, validation in eager and compiled
graphs, compile vs eager."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import moe_fusion
from compile_support import call_compiled, compiled
from moe_fusion import OpValidationError
from oracles_local import update_expert_oracle

OP = torch.ops.moe_fusion.npu_moe_update_expert.default
NAME = "npu_moe_update_expert"
ID_DTYPES = [torch.int32, torch.int64]
SCALE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_table(n_logical, width, gen):
    """``(n_logical, width)`` int32 rows ``[count, inst...]`` with counts in ``[1, width - 1]`` and
    distinct instance ids; columns past the count hold ids the op must not read."""
    counts = torch.randint(1, width, (n_logical, 1), generator=gen)
    instances = torch.randperm(n_logical * (width - 1) + 50, generator=gen)[: n_logical * (width - 1)] + 100
    return torch.cat([counts, instances.reshape(n_logical, width - 1)], 1).to(torch.int32)


# Fraction bits of scales in [0, 1) that the dtype holds exactly and whose fp32 sum over K <= 16
# is exact in any order (20 + 4 <= 24 bits): the device's sum order (SPEC §10.1) cannot matter.
EXACT_SUM_BITS = {torch.float32: 20, torch.float16: 10, torch.bfloat16: 8}


def exact_sum_scales(bs, k, dtype, gen):
    """``(bs, k)`` scales ``m / 2**b`` in ``[0, 1)``, ``b = EXACT_SUM_BITS[dtype]``."""
    one = 2 ** EXACT_SUM_BITS[dtype]
    return (torch.randint(0, one, (bs, k), generator=gen, dtype=torch.float64) / one).to(dtype)


def dyadic_threshold(k, shape, gen):
    thr = torch.randint(0, 64, (k,), generator=gen) / 256
    return thr if shape == "K" else thr.reshape(1, k)


def assert_outputs_equal(got, want):
    assert len(got) == len(want) == 2
    for name, g, w in zip(("balanced_expert_ids", "balanced_active_mask"), got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(g, w), f"{name} differs:\n{g}\n{w}"


def check_against_oracle(expert_ids, eplb_table, **kwargs):
    got = moe_fusion.npu_moe_update_expert(expert_ids, eplb_table, **kwargs)
    assert_outputs_equal(got, update_expert_oracle(expert_ids, eplb_table, **kwargs))
    assert got[0].is_contiguous() and got[1].is_contiguous()
    return got


# ---------------------------------------------------------------------------------------------
# Kernel vs oracle
# ---------------------------------------------------------------------------------------------

def test_hand_computed_mapping():
    """Mode 0 with W = 4: count 2 -> ranks {0,1} use inst0, {2,3} inst1; count 3 -> ceil(4/3) = 2,
    the same blocks (inst2 unused); count 1 -> inst0. Mode 1: token i uses inst (i % count)."""
    table = torch.tensor([[2, 10, 11, -1], [3, 20, 21, 22], [1, 30, -1, -1]], dtype=torch.int32)
    ids = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 2, 1]])
    for rank, inst in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        got_ids, mask = moe_fusion.npu_moe_update_expert(ids, table, local_rank_id=rank, world_size=4)
        expected = [[{0: [10, 11][inst], 1: [20, 21][inst], 2: 30}[e] for e in row] for row in ids.tolist()]
        assert got_ids.tolist() == expected and got_ids.dtype == torch.int64
        assert mask.all()  # no pruning: all True, the documented choice (README)
    got_ids, _ = moe_fusion.npu_moe_update_expert(ids.int(), table, balance_mode=1)
    assert got_ids.dtype == torch.int32
    assert got_ids.tolist() == [[10, 20, 30], [21, 11, 30], [30, 22, 10], [11, 30, 20]]


def test_pruning_ties_are_kept():
    """SPEC §9 #1: keep iff scale >= threshold * sum (the kernel's GE), so a tie is kept."""
    ids = torch.zeros(3, 4, dtype=torch.int64)
    table = torch.tensor([[1, 7]], dtype=torch.int32)
    scales = torch.tensor([[0.5, 0.25, 0.125, 0.125], [0.5, 0.25, 0.125, 0.125], [0.4, 0.3, 0.2, 0.1]])
    tie = torch.tensor([0.5, 0.25, 0.125, 0.125])                       # sum of rows 0, 1 is exactly 1
    above = torch.nextafter(tie, torch.tensor(1.0))
    kw = dict(local_rank_id=0, world_size=2)
    _, mask = moe_fusion.npu_moe_update_expert(ids, table, expert_scales=scales, pruning_threshold=tie, **kw)
    assert mask[:2].all()
    _, mask = moe_fusion.npu_moe_update_expert(ids, table, expert_scales=scales, pruning_threshold=above, **kw)
    assert not mask[:2].any()
    active = torch.tensor([True, False, True])
    _, mask = moe_fusion.npu_moe_update_expert(ids, table, expert_scales=scales, pruning_threshold=tie.reshape(1, 4),
                                               active_mask=active, **kw)
    assert mask[0].all() and not mask[1].any()
    assert_outputs_equal(
        moe_fusion.npu_moe_update_expert(ids, table, expert_scales=scales, pruning_threshold=tie, active_mask=active, **kw),
        update_expert_oracle(ids, table, expert_scales=scales, pruning_threshold=tie, active_mask=active, **kw))


PRUNING = {
    "none": None,
    "fp32-K": (torch.float32, "K", False),
    "fp16-1K": (torch.float16, "1K", False),
    "bf16-K-mask": (torch.bfloat16, "K", True),
    "fp32-1K-mask": (torch.float32, "1K", True),
}


@pytest.mark.parametrize("pruning", list(PRUNING))
@pytest.mark.parametrize("id_dtype", ID_DTYPES, ids=str)
@pytest.mark.parametrize("balance_mode", [0, 1])
def test_matches_oracle_grid(balance_mode, id_dtype, pruning):
    gen = torch.Generator().manual_seed(7)
    bs, k, n_logical, world_size = 9, 4, 6, 8
    table = make_table(n_logical, world_size + 1, gen)
    table[2, 0] = 1                                                     # a single-replica expert
    table[3, 0] = world_size                                            # one replica per rank
    ids = torch.randint(0, n_logical, (bs, k), generator=gen, dtype=id_dtype)
    kwargs = {"balance_mode": balance_mode}
    if PRUNING[pruning] is not None:
        dtype, shape, with_mask = PRUNING[pruning]
        kwargs.update(expert_scales=exact_sum_scales(bs, k, dtype, gen), pruning_threshold=dyadic_threshold(k, shape, gen))
        if with_mask:
            kwargs["active_mask"] = torch.arange(bs) < 6
    ranks = range(world_size) if balance_mode == 0 else [-1]
    for rank in ranks:
        if balance_mode == 0:
            kwargs.update(local_rank_id=rank, world_size=world_size)
        check_against_oracle(ids, table, **kwargs)


@pytest.mark.parametrize("thr_shape", ["K", "1K"])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_pruning_near_ties(scale_dtype, thr_shape):
    """Every entry at the fp32 decision boundary: rows are one base row moved by up to 2 units of
    ``2**-b``, thresholds are ``base / sum(base)`` moved by up to 2 ulp. The kernel must round
    exactly as SPEC §2.3 does (fp32 sum, fp32 product, keep iff >=)."""
    gen = torch.Generator().manual_seed(14)
    bs, k = 64, 6
    one = 2 ** EXACT_SUM_BITS[scale_dtype]
    base = torch.randint(one // 8, one // 2, (k,), generator=gen, dtype=torch.float64)
    m = base + torch.randint(-2, 3, (bs, k), generator=gen, dtype=torch.float64)
    scales = (m / one).to(scale_dtype)
    thr = (base / base.sum()).float()
    steps = torch.randint(-2, 3, (k,), generator=gen)
    for _ in range(2):
        thr = torch.where(steps > 0, torch.nextafter(thr, torch.tensor(1.0)), thr)
        thr = torch.where(steps < 0, torch.nextafter(thr, torch.tensor(0.0)), thr)
        steps = steps - steps.sign()
    kwargs = dict(expert_scales=scales, pruning_threshold=thr if thr_shape == "K" else thr.reshape(1, k), balance_mode=1)
    _, mask = check_against_oracle(torch.zeros(bs, k, dtype=torch.int64), torch.tensor([[1, 3]], dtype=torch.int32),
                                   **kwargs)
    assert 0.2 < mask.float().mean() < 0.8


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES, ids=str)
def test_pruning_softmax_scales(scale_dtype):
    """Realistic (non-dyadic) softmax weights. The fp32 sum order is the device's own (SPEC §10.1),
    so entries within rounding of the threshold are not compared; all others must agree."""
    gen = torch.Generator().manual_seed(8)
    bs, k = 64, 8
    scales = torch.randn(bs, k, generator=gen).softmax(-1).to(scale_dtype)
    thr = torch.full((k,), 0.1)
    ids = torch.randint(0, 4, (bs, k), generator=gen)
    table = make_table(4, 5, gen)
    kw = dict(expert_scales=scales, pruning_threshold=thr, balance_mode=1)
    got_ids, got_mask = moe_fusion.npu_moe_update_expert(ids, table, **kw)
    want_ids, want_mask = update_expert_oracle(ids, table, **kw)
    assert torch.equal(got_ids, want_ids)
    s = scales.double()
    clear = (s - thr.double() * s.sum(1, keepdim=True)).abs() > 1e-5
    assert clear.float().mean() > 0.9 and want_mask[clear].any() and not want_mask[clear].all()
    assert torch.equal(got_mask[clear], want_mask[clear])


@st.composite
def update_cases(draw):
    bs, k = draw(st.integers(1, 8)), draw(st.integers(1, 5))
    n_logical, width = draw(st.integers(1, 6)), draw(st.integers(2, 6))
    balance_mode = draw(st.sampled_from([0, 1]))
    world_size = draw(st.integers(1, 9))
    counts = draw(st.lists(st.integers(1, width - 1), min_size=n_logical, max_size=n_logical))
    instances = draw(st.lists(st.integers(0, 1023), min_size=n_logical * (width - 1), max_size=n_logical * (width - 1)))
    ids = draw(st.lists(st.integers(0, n_logical - 1), min_size=bs * k, max_size=bs * k))
    table = torch.cat([torch.tensor(counts).reshape(n_logical, 1), torch.tensor(instances).reshape(n_logical, width - 1)],
                      1).to(torch.int32)
    kwargs = {"balance_mode": balance_mode}
    if balance_mode == 0:
        kwargs.update(world_size=world_size, local_rank_id=draw(st.integers(0, world_size - 1)))
    pruning = draw(st.sampled_from(["none", "pruning", "pruning+mask"]))
    if pruning != "none":
        dtype = draw(st.sampled_from(SCALE_DTYPES))
        one = 2 ** EXACT_SUM_BITS[dtype]
        m = draw(st.lists(st.integers(0, one - 1), min_size=bs * k, max_size=bs * k))
        kwargs["expert_scales"] = (torch.tensor(m, dtype=torch.float64).reshape(bs, k) / one).to(dtype)
        thr = torch.tensor(draw(st.lists(st.integers(0, 96), min_size=k, max_size=k))) / 256
        kwargs["pruning_threshold"] = thr if draw(st.booleans()) else thr.reshape(1, k)
        if pruning == "pruning+mask":
            kwargs["active_mask"] = torch.tensor(draw(st.lists(st.booleans(), min_size=bs, max_size=bs)))
    return torch.tensor(ids, dtype=draw(st.sampled_from(ID_DTYPES))).reshape(bs, k), table, kwargs


@settings(max_examples=100, deadline=None)
@given(update_cases())
def test_matches_oracle_property(case):
    ids, table, kwargs = case
    got_ids, _ = check_against_oracle(ids, table, **kwargs)
    # Every id maps to one of its expert's first ``count`` instances.
    for logical, physical in zip(ids.flatten().tolist(), got_ids.flatten().tolist()):
        row = table[logical].tolist()
        assert physical in row[1: 1 + row[0]]


def test_unused_rows_may_hold_any_count():
    """Only rows that tokens use are read: a zero or oversized count elsewhere is no error."""
    table = torch.tensor([[2, 5, 6], [0, 0, 0], [9, 1, 2]], dtype=torch.int32)
    ids = torch.tensor([[0, 0], [0, 0]])
    for kwargs in (dict(local_rank_id=1, world_size=2), dict(balance_mode=1)):
        check_against_oracle(ids, table, **kwargs)


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 5, (6, 7), generator=gen).t()                # (7, 6), transposed
    table = make_table(5, 4, gen).t().contiguous().t()
    scales = exact_sum_scales(6, 7, torch.float32, gen).t()
    thr = dyadic_threshold(12, "K", gen)[::2]
    mask = torch.tensor([True, False] * 7)[::2]
    for kwargs in (dict(balance_mode=1), dict(local_rank_id=2, world_size=3)):
        check_against_oracle(ids, table, expert_scales=scales, pruning_threshold=thr, active_mask=mask, **kwargs)


# ---------------------------------------------------------------------------------------------
# Validation: every rule of SPEC §2.4, in eager mode and at trace time
# ---------------------------------------------------------------------------------------------

def _call(ids_shape=(4, 2), ids_dtype=torch.int64, table_shape=(3, 3), table_dtype=torch.int32, **kwargs):
    """Valid by default (portable and A3): 3 logical experts with 2 replicas, W = 2, rank 1."""
    ids = torch.zeros(ids_shape, dtype=ids_dtype)
    table = torch.zeros(table_shape, dtype=table_dtype)
    if table.dim() == 2 and table.size(1) > 1:
        table[:, 0] = min(2, table.size(1) - 1)
        table[:, 1:] = torch.arange(table[:, 1:].numel()).reshape(table[:, 1:].shape)
    kwargs = {"local_rank_id": 1, "world_size": 2, **kwargs}
    return (ids, table), kwargs


def _pruning(bs=4, k=2, **kwargs):
    return _call(ids_shape=(bs, k), expert_scales=torch.ones(bs, k), pruning_threshold=torch.ones(k), **kwargs)


COMBO = "expert_scales/pruning_threshold/active_mask must be given as none, {expert_scales, pruning_threshold} or all three"
SCALES, THR, MASK = torch.ones(4, 2), torch.ones(2), torch.ones(4, dtype=torch.bool)

# (id, call, target, exact message)
STRUCTURAL_ERRORS = [
    ("ids_1d", _call(ids_shape=(4,)), "portable", f"{NAME}: expert_ids must be 2-D, got shape (4,)"),
    ("ids_3d", _call(ids_shape=(4, 2, 1)), "portable", f"{NAME}: expert_ids must be 2-D, got shape (4, 2, 1)"),
    ("ids_float", _call(ids_dtype=torch.float32), "portable",
     f"{NAME}: expert_ids dtype must be one of (int32, int64), got float32"),
    ("ids_int16", _call(ids_dtype=torch.int16), "portable",
     f"{NAME}: expert_ids dtype must be one of (int32, int64), got int16"),
    ("table_1d", _call(table_shape=(3,)), "portable", f"{NAME}: eplb_table must be 2-D, got shape (3,)"),
    ("table_int64", _call(table_dtype=torch.int64), "portable",
     f"{NAME}: eplb_table dtype must be one of (int32), got int64"),
    ("bs_zero", _call(ids_shape=(0, 2)), "portable", f"{NAME}: expert_ids must have BS > 0 rows, got shape (0, 2)"),
    ("k_zero", _call(ids_shape=(4, 0)), "portable", f"{NAME}: expert_ids must have K > 0 columns, got shape (4, 0)"),
    ("no_logical_experts", _call(table_shape=(0, 3)), "portable",
     f"{NAME}: eplb_table must have at least one logical expert row, got shape (0, 3)"),
    ("F_one", _call(table_shape=(3, 1)), "portable",
     f"{NAME}: eplb_table must have F > 1 columns ([count, instances...]), got shape (3, 1)"),
    ("balance_mode_2", _call(balance_mode=2), "portable", f"{NAME}: balance_mode must be one of (0, 1), got 2"),
    ("mode0_world_size_default", _call(world_size=-1), "portable",
     f"{NAME}: world_size must be >= 1 when balance_mode == 0, got -1"),
    ("mode0_world_size_zero", _call(world_size=0, local_rank_id=0), "portable",
     f"{NAME}: world_size must be >= 1 when balance_mode == 0, got 0"),
    ("mode0_rank_negative", _call(local_rank_id=-1), "portable", f"{NAME}: local_rank_id must be in [0, 1], got -1"),
    ("mode0_rank_too_large", _call(local_rank_id=2), "portable", f"{NAME}: local_rank_id must be in [0, 1], got 2"),
    ("target_A2", _call(), "A2",
     f"{NAME}: target must be one of ('A3', 'portable') (the op does not exist on A2), got A2"),
    ("A3_bs_513", _call(ids_shape=(513, 2)), "A3", f"{NAME}: expert_ids BS must be in [1, 512], got BS=513"),
    ("A3_k_17", _call(ids_shape=(4, 17), table_shape=(17, 3)), "A3", f"{NAME}: expert_ids K must be in [1, 16], got K=17"),
    ("A3_k_above_logical", _call(ids_shape=(4, 4)), "A3", f"{NAME}: expert_ids K must be <= eplb_table.size(0)=3, got K=4"),
    ("A3_1025_logical", _call(table_shape=(1025, 3)), "A3",
     f"{NAME}: eplb_table must have at most 1024 rows, got shape (1025, 3)"),
    ("A3_world_size_1", _call(world_size=1, local_rank_id=0), "A3", f"{NAME}: world_size must be in [2, 768], got 1"),
    ("A3_world_size_769", _call(world_size=769), "A3", f"{NAME}: world_size must be in [2, 768], got 769"),
    ("A3_mode0_F_above_W+1", _call(table_shape=(3, 4)), "A3",
     f"{NAME}: eplb_table must have F <= world_size + 1 = 3 columns, got shape (3, 4)"),
    ("A3_mode1_F_770", _call(table_shape=(3, 770), balance_mode=1), "A3",
     f"{NAME}: eplb_table must have F <= 769 columns, got shape (3, 770)"),
    ("scales_alone", _call(expert_scales=SCALES), "portable", f"{NAME}: {COMBO}, got {{expert_scales}}"),
    ("threshold_alone", _call(pruning_threshold=THR), "portable", f"{NAME}: {COMBO}, got {{pruning_threshold}}"),
    ("mask_alone", _call(active_mask=MASK), "portable", f"{NAME}: {COMBO}, got {{active_mask}}"),
    ("mask_and_scales", _call(expert_scales=SCALES, active_mask=MASK), "portable",
     f"{NAME}: {COMBO}, got {{expert_scales, active_mask}}"),
    ("mask_and_threshold", _call(pruning_threshold=THR, active_mask=MASK), "portable",
     f"{NAME}: {COMBO}, got {{pruning_threshold, active_mask}}"),
    ("scales_float64", _call(expert_scales=SCALES.double(), pruning_threshold=THR), "portable",
     f"{NAME}: expert_scales dtype must be one of (float32, float16, bfloat16), got float64"),
    ("scales_wrong_shape", _call(expert_scales=torch.ones(4, 3), pruning_threshold=THR), "portable",
     f"{NAME}: expert_scales must have shape (4, 2), got shape (4, 3)"),
    ("threshold_float16", _call(expert_scales=SCALES, pruning_threshold=THR.half()), "portable",
     f"{NAME}: pruning_threshold dtype must be one of (float32), got float16"),
    ("threshold_too_long", _call(expert_scales=SCALES, pruning_threshold=torch.ones(3)), "portable",
     f"{NAME}: pruning_threshold must have shape (2,) or (1, 2), got shape (3,)"),
    ("threshold_2xK", _call(expert_scales=SCALES, pruning_threshold=torch.ones(2, 2)), "portable",
     f"{NAME}: pruning_threshold must have shape (2,) or (1, 2), got shape (2, 2)"),
    ("threshold_Kx1", _call(expert_scales=SCALES, pruning_threshold=torch.ones(2, 1)), "portable",
     f"{NAME}: pruning_threshold must have shape (2,) or (1, 2), got shape (2, 1)"),
    ("mask_int", _pruning(active_mask=torch.ones(4, dtype=torch.int64)), "portable",
     f"{NAME}: active_mask dtype must be one of (bool), got int64"),
    ("mask_wrong_shape", _pruning(active_mask=torch.ones(4, 1, dtype=torch.bool)), "portable",
     f"{NAME}: active_mask must have shape (4,), got shape (4, 1)"),
]
STRUCTURAL_IDS = [case[0] for case in STRUCTURAL_ERRORS]


@pytest.mark.parametrize("case_id,call,target,message", STRUCTURAL_ERRORS, ids=STRUCTURAL_IDS)
def test_structural_error_eager(case_id, call, target, message):
    args, kwargs = call
    with moe_fusion.target(target), pytest.raises(OpValidationError, match=f"^{re.escape(message)}$"):
        moe_fusion.npu_moe_update_expert(*args, **kwargs)


@pytest.mark.parametrize("case_id,call,target,message", STRUCTURAL_ERRORS, ids=STRUCTURAL_IDS)
def test_structural_error_compiled(case_id, call, target, message):
    with moe_fusion.target(target), pytest.raises(torch._dynamo.exc.TorchRuntimeError) as info:
        call_compiled(OP, call)
    assert message in str(info.value)


@pytest.mark.parametrize("case_id,call,target,message", STRUCTURAL_ERRORS, ids=STRUCTURAL_IDS)
def test_structural_error_compiled_dynamic(case_id, call, target, message):
    with moe_fusion.target(target), pytest.raises(torch._dynamo.exc.TorchRuntimeError) as info:
        call_compiled(OP, call, dynamic=True)
    assert message in str(info.value)


def _values_call(ids, table, **kwargs):
    return (torch.tensor(ids), torch.tensor(table, dtype=torch.int32)), {"local_rank_id": 0, "world_size": 2, **kwargs}


VALUE_ERRORS = [
    ("id_negative", _values_call([[0, -1]], [[1, 5, 6], [2, 7, 8]]), f"{NAME}: expert_ids values must be in [0, 2), got -1"),
    ("id_too_large", _values_call([[2, 0]], [[1, 5, 6], [2, 7, 8]]), f"{NAME}: expert_ids values must be in [0, 2), got 2"),
    ("id_too_large_mode1", _values_call([[1, 5]], [[1, 5, 6], [2, 7, 8]], balance_mode=1),
     f"{NAME}: expert_ids values must be in [0, 2), got 5"),
    ("count_zero", _values_call([[0, 1]], [[1, 5, 6], [0, 7, 8]]),
     f"{NAME}: eplb_table replica counts (column 0) of used experts must be in [1, 2], got 0"),
    ("count_above_F-1", _values_call([[1, 0]], [[3, 5, 6], [2, 7, 8]], balance_mode=1),
     f"{NAME}: eplb_table replica counts (column 0) of used experts must be in [1, 2], got 3"),
    ("count_negative", _values_call([[1, 0]], [[1, 5, 6], [-1, 7, 8]]),
     f"{NAME}: eplb_table replica counts (column 0) of used experts must be in [1, 2], got -1"),
]


@pytest.mark.parametrize("case_id,call,message", VALUE_ERRORS, ids=[c[0] for c in VALUE_ERRORS])
def test_value_error_eager(case_id, call, message):
    args, kwargs = call
    with pytest.raises(OpValidationError, match=f"^{re.escape(message)}$"):
        moe_fusion.npu_moe_update_expert(*args, **kwargs)


def test_value_error_compiled_raises_at_run_time():
    """Ids and counts are data: the kernel inside the graph checks them."""
    (ids, table), kwargs = VALUE_ERRORS[1][1]
    with pytest.raises(OpValidationError, match=re.escape("expert_ids values must be in [0, 2), got 2")):
        compiled(lambda i, t: OP(i, t, **kwargs))(ids, table)


ACCEPTED_ON_PORTABLE_ONLY = [
    ("bs_513", _call(ids_shape=(513, 2))),
    ("k_17", _call(ids_shape=(4, 17), table_shape=(17, 3))),
    ("k_above_logical", _call(ids_shape=(4, 4))),
    ("1025_logical", _call(table_shape=(1025, 3))),
    ("world_size_1", _call(world_size=1, local_rank_id=0, table_shape=(3, 2))),
    ("world_size_769", _call(world_size=769, local_rank_id=768)),
    ("mode0_F_above_W+1", _call(table_shape=(3, 4))),
    ("mode1_F_770", _call(table_shape=(3, 770), balance_mode=1)),
]


@pytest.mark.parametrize("case_id,call", ACCEPTED_ON_PORTABLE_ONLY, ids=[c[0] for c in ACCEPTED_ON_PORTABLE_ONLY])
def test_device_limits_do_not_apply_on_portable(case_id, call):
    (ids, table), kwargs = call
    ids = torch.arange(ids.numel()).reshape(ids.shape) % table.size(0)   # every logical expert in use
    assert moe_fusion.get_target() == "portable"
    check_against_oracle(ids, table, **kwargs)
    with moe_fusion.target("A3"), pytest.raises(OpValidationError, match=f"^{NAME}: "):
        moe_fusion.npu_moe_update_expert(ids, table, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(local_rank_id=767, world_size=768), dict(local_rank_id=0, world_size=2), dict(balance_mode=1)],
    ids=["W768", "W2", "mode1"])
def test_accepted_on_A3_at_the_limits(kwargs):
    gen = torch.Generator().manual_seed(10)
    table = make_table(1024, 3, gen)
    ids = torch.randint(0, 1024, (512, 16), generator=gen, dtype=torch.int32)
    pruning = dict(expert_scales=exact_sum_scales(512, 16, torch.bfloat16, gen),
                   pruning_threshold=torch.full((1, 16), 0.0625), active_mask=torch.arange(512) < 300)
    with moe_fusion.target("A3"):
        got = moe_fusion.npu_moe_update_expert(ids, table, **pruning, **kwargs)
        assert_outputs_equal(call_compiled(OP, ((ids, table), {**pruning, **kwargs})), got)
    assert_outputs_equal(got, update_expert_oracle(ids, table, **pruning, **kwargs))


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager
# ---------------------------------------------------------------------------------------------

def _compile_case(name, seed=11):
    gen = torch.Generator().manual_seed(seed)
    bs, k = 6, 3
    ids = torch.randint(0, 4, (bs, k), generator=gen, dtype=torch.int32 if "int32" in name else torch.int64)
    table = make_table(4, 5, gen)
    kwargs = {"balance_mode": 1} if "mode1" in name else {"local_rank_id": 2, "world_size": 4}
    if "pruning" in name:
        kwargs.update(expert_scales=exact_sum_scales(bs, k, torch.float16, gen),
                      pruning_threshold=dyadic_threshold(k, "1K", gen))
    if "mask" in name:
        kwargs["active_mask"] = torch.tensor([True, False, True, True, False, True])
    return (ids, table), kwargs


COMPILE_CASES = ["mode0-int64", "mode1-int32", "mode0-pruning", "mode1-int32-pruning-mask"]


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("name", COMPILE_CASES)
def test_compile_aot_eager_equals_eager(name, dynamic):
    args, kwargs = _compile_case(name)
    got = call_compiled(OP, (args, kwargs), dynamic=dynamic)
    assert_outputs_equal(got, moe_fusion.npu_moe_update_expert(*args, **kwargs))


def test_compile_dynamic_shapes_do_not_recompile():
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(lambda i, t, s, p, m: OP(i, t, expert_scales=s, pruning_threshold=p, active_mask=m, balance_mode=1),
                       fullgraph=True, dynamic=True, backend=counter)
    gen = torch.Generator().manual_seed(12)
    # The first call's sizes are all distinct, or duck sizing would tie them together.
    for bs, k, n_logical, width in [(7, 3, 5, 4), (12, 5, 6, 3), (2, 8, 9, 6)]:
        ids = torch.randint(0, n_logical, (bs, k), generator=gen)
        table = make_table(n_logical, width, gen)
        scales, thr = exact_sum_scales(bs, k, torch.float32, gen), dyadic_threshold(k, "K", gen)
        mask = torch.rand(bs, generator=gen) > 0.3
        got = fn(ids, table, scales, thr, mask)
        assert_outputs_equal(got, update_expert_oracle(ids, table, expert_scales=scales, pruning_threshold=thr,
                                                       active_mask=mask, balance_mode=1))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor_equals_eager(dynamic):
    gen = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 4, (5, 3), generator=gen)
    table = make_table(4, 5, gen)
    # Transposed scales: inductor asserts the kernel's output strides equal the fake kernel's.
    scales = exact_sum_scales(3, 5, torch.bfloat16, gen).t()
    thr = dyadic_threshold(3, "K", gen)

    def fn(i, t, s, p):
        balanced_ids, mask = OP(i, t, expert_scales=s, pruning_threshold=p, local_rank_id=1, world_size=3)
        return balanced_ids + 1, mask.logical_not()

    got = compiled(fn, dynamic=dynamic, backend="inductor")(ids, table, scales, thr)
    want_ids, want_mask = update_expert_oracle(ids, table, expert_scales=scales, pruning_threshold=thr,
                                               local_rank_id=1, world_size=3)
    assert_outputs_equal(got, (want_ids + 1, want_mask.logical_not()))
