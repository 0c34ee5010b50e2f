"""``npu_moe_re_routing`` (SPEC §7): kernel vs the loop oracle, validation in eager and compiled
graphs, compile vs eager, and the worked example of the torch_npu API page."""
import math
import random
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

import moe_fusion
from compile_support import call_compiled, compiled
from moe_fusion import OpValidationError
from oracles_local import re_routing_oracle

OP = torch.ops.moe_fusion.npu_moe_re_routing.default
TOKEN_DTYPES = [torch.float16, torch.bfloat16, torch.int8, torch.float32]
COUNT_DTYPES = [torch.int32, torch.int64]
_BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}

# (N, E) count patterns: rank-major rows, expert columns.
COUNT_PATTERNS = {
    "balanced": [[2, 2, 2], [2, 2, 2]],
    "unbalanced": [[5, 0, 1, 3], [0, 2, 7, 1], [4, 4, 0, 0]],
    "empty_rank": [[3, 1], [0, 0], [2, 5]],
    "empty_expert": [[3, 0, 2], [1, 0, 4]],
    "one_rank": [[4, 0, 3, 1]],
    "one_expert": [[3], [0], [5]],
    "one_block": [[0, 0], [0, 6]],
    "no_tokens": [[0, 0], [0, 0]],
}


def make_tokens(num_tokens, hidden, dtype, gen):
    """Random rows; float rows also carry -0.0, inf and NaN, which a bit copy must keep."""
    if dtype == torch.int8:
        return torch.randint(-128, 128, (num_tokens, hidden), generator=gen, dtype=torch.int8)
    tokens = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    specials = torch.tensor([-0.0, float("inf"), float("nan")], dtype=dtype)
    flat = tokens.view(-1)
    flat[: min(3, flat.numel())] = specials[: min(3, flat.numel())]
    return tokens


def bits(t):
    """``t`` reinterpreted as integers, so equality is bitwise (NaN == NaN, -0.0 != 0.0)."""
    return t.view(_BITS[t.dtype]) if t.dtype in _BITS else t


def assert_outputs_equal(got, want):
    assert len(got) == len(want) == 4
    for name, g, w in zip(("permute_tokens", "permute_per_token_scales", "permute_token_idx", "expert_token_num"),
                          got, want):
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(bits(g), bits(w)), f"{name} differs"


def check_against_oracle(tokens, counts, scales):
    got = moe_fusion.npu_moe_re_routing(tokens, counts, per_token_scales=scales)
    assert_outputs_equal(got, re_routing_oracle(tokens, counts, scales))
    assert got[0].is_contiguous()
    return got


# ---------------------------------------------------------------------------------------------
# Kernel vs oracle
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern", list(COUNT_PATTERNS))
@pytest.mark.parametrize("with_scales", [False, True], ids=["no_scales", "scales"])
@pytest.mark.parametrize("count_dtype", COUNT_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", TOKEN_DTYPES, ids=str)
def test_matches_oracle_grid(dtype, count_dtype, with_scales, pattern):
    gen = torch.Generator().manual_seed(1)
    counts = torch.tensor(COUNT_PATTERNS[pattern], dtype=count_dtype)
    num_tokens = int(sum(map(sum, COUNT_PATTERNS[pattern])))
    tokens = make_tokens(num_tokens, 5, dtype, gen)
    scales = torch.randn(num_tokens, generator=gen) if with_scales else None
    permute_tokens, permute_scales, idx, expert_token_num = check_against_oracle(tokens, counts, scales)
    # The gather index is a permutation that reproduces the output rows.
    assert sorted(idx.tolist()) == list(range(num_tokens))
    assert torch.equal(bits(permute_tokens), bits(tokens[idx.long()]))
    if not with_scales:
        assert torch.equal(permute_scales, torch.zeros(num_tokens))  # documented choice (README)


def test_hand_computed_example():
    """Two ranks, two experts: c = [[1, 2], [3, 1]] -> rows (r0e0, r1e0, r0e1, r1e1)."""
    tokens = torch.arange(7, dtype=torch.float16).unsqueeze(1).repeat(1, 3)
    counts = torch.tensor([[1, 2], [3, 1]], dtype=torch.int32)
    scales = torch.arange(7, dtype=torch.float32) / 8
    permute_tokens, permute_scales, idx, expert_token_num = moe_fusion.npu_moe_re_routing(
        tokens, counts, per_token_scales=scales)
    expected_idx = [0, 3, 4, 5, 1, 2, 6]  # expert 0: rank0 row 0, rank1 rows 3-5; expert 1: rank0 rows 1-2, rank1 row 6
    assert idx.tolist() == expected_idx
    assert permute_tokens[:, 0].tolist() == expected_idx
    assert permute_scales.tolist() == [i / 8 for i in expected_idx]
    assert expert_token_num.tolist() == [4, 3] and expert_token_num.dtype == torch.int32


def test_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(6, 9, generator=gen, dtype=torch.float16).t()      # (9, 6), strides (1, 9)
    counts = torch.tensor([[2, 1], [3, 0], [0, 2], [1, 0]], dtype=torch.int64).t()   # (2, 4), transposed
    scales = torch.randn(18, generator=gen)[::2]
    check_against_oracle(tokens, counts, scales)


@st.composite
def routings(draw):
    num_ranks = draw(st.integers(1, 5))
    num_experts = draw(st.integers(1, 5))
    count = st.one_of(st.just(0), st.integers(0, 4))           # many zero blocks
    counts = draw(st.lists(st.lists(count, min_size=num_experts, max_size=num_experts),
                           min_size=num_ranks, max_size=num_ranks))
    return (counts, draw(st.integers(1, 6)), draw(st.sampled_from(TOKEN_DTYPES)),
            draw(st.sampled_from(COUNT_DTYPES)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=80, deadline=None)
@given(routings())
def test_matches_oracle_property(case):
    counts, hidden, dtype, count_dtype, with_scales, seed = case
    gen = torch.Generator().manual_seed(seed)
    num_tokens = sum(map(sum, counts))
    tokens = make_tokens(num_tokens, hidden, dtype, gen)
    scales = torch.randn(num_tokens, generator=gen) if with_scales else None
    got = check_against_oracle(tokens, torch.tensor(counts, dtype=count_dtype), scales)
    assert got[3].tolist() == [sum(col) for col in zip(*counts)]


def test_api_page_worked_example():
    """The single-operator example of torch_npu.npu_moe_re_routing, as written on the API page."""
    random.seed(0)
    torch.manual_seed(0)
    tokens_num = 16384
    tokens_length = 7168
    rank_num = 16
    expert_num = 16
    tokens = torch.randint(low=-10, high=20, size=(tokens_num, tokens_length), dtype=torch.int8)
    expert_token_num_per_rank = torch.ones(rank_num, expert_num, dtype=torch.int32)
    tokens_sum = 0
    for i in range(rank_num):
        for j in range(expert_num):
            if i == rank_num - 1 and j == expert_num - 1:
                expert_token_num_per_rank[i][j] = tokens_num - tokens_sum
                break
            if tokens_num >= rank_num * expert_num:
                floor = math.floor(tokens_num / (rank_num * expert_num))
                rand_num = random.randint(1, floor)
            elif tokens_sum >= tokens_num:
                rand_num = 0
            else:
                rand_int = tokens_num - tokens_sum
                rand_num = random.randint(0, rand_int)
            rand_num = 1
            expert_token_num_per_rank[i][j] = rand_num
            tokens_sum += rand_num
    per_token_scales = torch.randn(tokens_num, dtype=torch.float32)
    expert_token_num_type = 1
    idx_type = 0
    permute_tokens, permute_per_token_scales, permute_token_idx, expert_token_num = moe_fusion.npu_moe_re_routing(
        tokens, expert_token_num_per_rank, per_token_scales=per_token_scales,
        expert_token_num_type=expert_token_num_type, idx_type=idx_type)

    # The page's construction: one row per block, the last block takes the rest.
    last = tokens_num - (rank_num * expert_num - 1)
    assert expert_token_num_per_rank[-1, -1].item() == last and int(expert_token_num_per_rank.sum()) == tokens_num

    want_tokens, want_scales, want_idx, want_counts = re_routing_oracle(
        tokens, expert_token_num_per_rank, per_token_scales)
    assert torch.equal(permute_token_idx, want_idx)
    assert torch.equal(permute_tokens, want_tokens)
    assert torch.equal(permute_tokens, tokens[want_idx.long()])
    assert torch.equal(permute_per_token_scales, want_scales)
    assert torch.equal(expert_token_num, want_counts)
    # Spot checks by hand: block (i, j) of one row moves from row 16 i + j to row 16 j + i, the big
    # last block (rank 15, expert 15) stays at the end, and expert 15 gets 15 + last rows.
    for i, j in [(0, 0), (0, 1), (3, 7), (14, 15), (15, 0), (15, 14)]:
        assert torch.equal(permute_tokens[16 * j + i], tokens[16 * i + j])
        assert permute_per_token_scales[16 * j + i].item() == per_token_scales[16 * i + j].item()
    assert torch.equal(permute_tokens[255:], tokens[255:])
    assert expert_token_num.tolist() == [16] * 15 + [15 + last]


# ---------------------------------------------------------------------------------------------
# Validation: every rule of SPEC §7.4, in eager mode and at trace time
# ---------------------------------------------------------------------------------------------

NAME = "npu_moe_re_routing"
C22 = [[1, 2], [0, 3]]  # A = 6


def _call(tokens_shape=(6, 4), tokens_dtype=torch.float16, counts=C22, counts_dtype=torch.int32, **kwargs):
    tokens = torch.ones(tokens_shape, dtype=tokens_dtype)
    return (tokens, torch.tensor(counts, dtype=counts_dtype)), kwargs


# (id, call, target, exact message)
STRUCTURAL_ERRORS = [
    ("tokens_1d", _call(tokens_shape=(6,)), "portable", f"{NAME}: tokens must be 2-D, got shape (6,)"),
    ("tokens_3d", _call(tokens_shape=(6, 4, 1)), "portable", f"{NAME}: tokens must be 2-D, got shape (6, 4, 1)"),
    ("counts_1d", ((torch.ones(6, 4), torch.tensor([1, 5], dtype=torch.int32)), {}), "portable",
     f"{NAME}: expert_token_num_per_rank must be 2-D, got shape (2,)"),
    ("counts_3d", ((torch.ones(6, 4), torch.ones(1, 2, 3, dtype=torch.int32)), {}), "portable",
     f"{NAME}: expert_token_num_per_rank must be 2-D, got shape (1, 2, 3)"),
    ("tokens_float64_on_A3", _call(tokens_dtype=torch.float64), "A3",
     f"{NAME}: tokens dtype must be one of (float16, bfloat16, int8), got float64"),
    ("tokens_int32", _call(tokens_dtype=torch.int32), "portable",
     f"{NAME}: tokens dtype must be one of (float16, bfloat16, int8, float32, float64), got int32"),
    ("tokens_float32_on_A3", _call(tokens_dtype=torch.float32), "A3",
     f"{NAME}: tokens dtype must be one of (float16, bfloat16, int8), got float32"),
    ("tokens_float32_on_A2", _call(tokens_dtype=torch.float32), "A2",
     f"{NAME}: tokens dtype must be one of (float16, bfloat16, int8), got float32"),
    ("counts_float", _call(counts_dtype=torch.float32), "portable",
     f"{NAME}: expert_token_num_per_rank dtype must be one of (int32, int64), got float32"),
    ("counts_int16", _call(counts_dtype=torch.int16), "portable",
     f"{NAME}: expert_token_num_per_rank dtype must be one of (int32, int64), got int16"),
    ("cumsum_mode", _call(expert_token_num_type=0), "portable",
     f"{NAME}: expert_token_num_type must be 1 (counts; cumsum mode 0 is not implemented), got 0"),
    ("scatter_index", _call(idx_type=1), "portable",
     f"{NAME}: idx_type must be 0 (gather index; scatter index 1 is not implemented), got 1"),
    ("tokens_dtype_given", ((torch.ones(6, 4, dtype=torch.int8), torch.tensor(C22, dtype=torch.int32)),
                            {"tokens_dtype": 290}), "portable",
     f"{NAME}: tokens_dtype must be None (fp8/fp4 tokens are not supported), got 290"),
    ("H_above_16384_on_A3", _call(tokens_shape=(6, 16385)), "A3",
     f"{NAME}: tokens hidden size H must be in [1, 16384], got H=16385"),
    ("H_above_16384_on_A2", _call(tokens_shape=(6, 16385)), "A2",
     f"{NAME}: tokens hidden size H must be in [1, 16384], got H=16385"),
    ("H_zero_on_A3", _call(tokens_shape=(6, 0)), "A3", f"{NAME}: tokens hidden size H must be in [1, 16384], got H=0"),
    ("scales_float16", _call(per_token_scales=torch.ones(6, dtype=torch.float16)), "portable",
     f"{NAME}: per_token_scales dtype must be one of (float32, float64), got float16"),
    ("scales_too_long", _call(per_token_scales=torch.ones(7)), "portable",
     f"{NAME}: per_token_scales must have shape (6,), got shape (7,)"),
    ("scales_2d", _call(per_token_scales=torch.ones(6, 1)), "portable",
     f"{NAME}: per_token_scales must have shape (6,), got shape (6, 1)"),
]
STRUCTURAL_IDS = [case[0] for case in STRUCTURAL_ERRORS]


@pytest.mark.parametrize("case_id,call,target,message", STRUCTURAL_ERRORS, ids=STRUCTURAL_IDS)
def test_structural_error_eager(case_id, call, target, message):
    args, kwargs = call
    with moe_fusion.target(target), pytest.raises(OpValidationError, match=f"^{re.escape(message)}$"):
        moe_fusion.npu_moe_re_routing(*args, **kwargs)


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


VALUE_ERRORS = [
    ("sum_too_large", _call(counts=[[1, 2], [0, 4]]),
     f"{NAME}: expert_token_num_per_rank must sum to tokens.size(0)=6, got sum 7"),
    ("sum_too_small", _call(counts=[[1, 2], [0, 2]]),
     f"{NAME}: expert_token_num_per_rank must sum to tokens.size(0)=6, got sum 5"),
    ("negative_count", _call(counts=[[4, -1], [0, 3]]), f"{NAME}: expert_token_num_per_rank entries must be >= 0, got -1"),
    ("negative_count_int64", _call(counts=[[4, 3], [-2, 1]], counts_dtype=torch.int64),
     f"{NAME}: expert_token_num_per_rank entries must be >= 0, got -2"),
]


@pytest.mark.parametrize("case_id,call,message", VALUE_ERRORS, ids=[c[0] for c in VALUE_ERRORS])
def test_value_error_eager(case_id, call, message):
    args, kwargs = call
    with pytest.raises(OpValidationError, match=f"^{re.escape(message)}$"):
        moe_fusion.npu_moe_re_routing(*args, **kwargs)


def test_value_error_compiled_raises_at_run_time():
    """Counts are data: the fake kernel cannot see them, the kernel inside the graph checks them."""
    (tokens, counts), _ = _call(counts=[[1, 2], [0, 4]])
    with pytest.raises(OpValidationError, match=re.escape("must sum to tokens.size(0)=6, got sum 7")):
        compiled(lambda t, c: OP(t, c))(tokens, counts)


@pytest.mark.parametrize("target,shape,dtype", [
    ("portable", (3, 16385), torch.float16),   # the H limit is A2/A3 hardware only
    ("portable", (3, 0), torch.bfloat16),      # empty rows are a defined copy
    ("portable", (3, 4), torch.float32),       # fp32 tokens are portable only
    ("A3", (3, 16384), torch.int8),            # H == 16384 is allowed by the tiling (SPEC §9 #17)
    ("A2", (3, 1), torch.bfloat16),
], ids=["H16385-portable", "H0-portable", "fp32-portable", "H16384-A3", "H1-A2"])
def test_accepted_at_the_limits(target, shape, dtype):
    tokens = make_tokens(shape[0], shape[1], dtype, torch.Generator().manual_seed(3))
    counts = torch.tensor([[1, 0], [0, 2]], dtype=torch.int32)
    with moe_fusion.target(target):
        got = moe_fusion.npu_moe_re_routing(tokens, counts)
        assert_outputs_equal(got, re_routing_oracle(tokens, counts))
        compiled_out = call_compiled(OP, ((tokens, counts), {}))
    assert_outputs_equal(compiled_out, got)


def test_zero_counts_accepted():
    """SPEC §9 #18: the API page says counts > 0, the kernel handles 0; we accept >= 0."""
    tokens = torch.randn(3, 2)
    counts = torch.tensor([[0, 3], [0, 0]], dtype=torch.int64)
    got = moe_fusion.npu_moe_re_routing(tokens, counts)
    assert got[2].tolist() == [0, 1, 2] and got[3].tolist() == [0, 3]


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) equals eager
# ---------------------------------------------------------------------------------------------

COMPILE_CASES = [
    ([[1, 2, 0], [3, 0, 2]], (8, 16), torch.float16, torch.int32, True),
    ([[2, 1], [0, 0], [1, 3]], (7, 8), torch.bfloat16, torch.int64, False),
    ([[4, 1], [2, 2]], (9, 5), torch.int8, torch.int32, True),
    ([[3, 3, 1]], (7, 4), torch.float32, torch.int64, False),
]


def _inputs(counts, shape, dtype, count_dtype, with_scales, seed=4):
    gen = torch.Generator().manual_seed(seed)
    tokens = make_tokens(*shape, dtype, gen)
    return tokens, torch.tensor(counts, dtype=count_dtype), torch.randn(shape[0], generator=gen) if with_scales else None


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", COMPILE_CASES, ids=["fp16-scales", "bf16", "int8-scales", "fp32"])
def test_compile_aot_eager_equals_eager(case, dynamic):
    tokens, counts, scales = _inputs(*case)
    kwargs = {} if scales is None else {"per_token_scales": scales}
    got = call_compiled(OP, ((tokens, counts), kwargs), dynamic=dynamic)
    assert_outputs_equal(got, moe_fusion.npu_moe_re_routing(tokens, counts, per_token_scales=scales))


def test_compile_dynamic_shapes_do_not_recompile():
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    fn = torch.compile(lambda t, c, s: OP(t, c, per_token_scales=s), fullgraph=True, dynamic=True, backend=counter)
    # The first call's sizes are all distinct, or duck sizing would tie them together.
    for counts, hidden in [([[1, 2, 0], [3, 1, 0]], 4), ([[2, 0, 5], [1, 3, 0], [0, 2, 2]], 6),
                           ([[3, 4, 2, 2], [0, 1, 0, 5]], 3)]:
        tokens, c, scales = _inputs(counts, (sum(map(sum, counts)), hidden), torch.bfloat16, torch.int64, True)
        got = fn(tokens, c, scales)
        assert_outputs_equal(got, re_routing_oracle(tokens, c, scales))
    assert counter.frame_count == 1


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_compile_inductor_equals_eager(dynamic):
    # Non-contiguous tokens: inductor asserts the kernel's output strides equal the fake kernel's.
    tokens = make_tokens(9, 7, torch.float16, torch.Generator().manual_seed(5)).t()
    counts = torch.tensor([[2, 0, 1], [1, 3, 0]], dtype=torch.int32)
    scales = torch.randn(7)

    def fn(t, c, s):
        out = OP(t, c, per_token_scales=s)
        return out[0] * 2, out[1] + 1, out[2], out[3]

    got = compiled(fn, dynamic=dynamic, backend="inductor")(tokens, counts, scales)
    permute_tokens, permute_scales, idx, expert_token_num = re_routing_oracle(tokens, counts, scales)
    assert_outputs_equal(got, (permute_tokens * 2, permute_scales + 1, idx, expert_token_num))
