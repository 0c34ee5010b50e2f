"""``npu_ffn_grouped``: the kernel against the independent FFN oracle (``oracle_ffn``, written from SPEC
§5.4) on the counted rows, zeros on the padding rows, agreement with ``npu_ffn``'s list form, a static
graph without host reads of the counts, and every validation rule in eager and compiled mode."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.exc import TorchRuntimeError

import moe_fusion
from cases.npu_ffn_grouped import GroupedCase, make_call
from moe_fusion import OpValidationError, npu_ffn, npu_ffn_grouped
from oracle_ffn import ffn_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def assert_matches_oracle(y: torch.Tensor, args: tuple, kwargs: dict) -> None:
    """Counted rows inside the oracle's enclosure (``npu_ffn`` with the counts as a list); padding rows zero."""
    x, w1, w2, activation = args
    tokens = kwargs["expert_tokens"]
    counts = torch.diff(tokens, prepend=tokens.new_zeros(1)) if kwargs.get("tokens_index_flag") else tokens
    total = int(counts.sum())
    assert y.dtype == x.dtype and y.shape == (x.size(0), w2.size(2))
    assert not y[total:].any(), "padding rows must be zero"
    if total == 0:
        return
    ref = ffn_reference(x[:total], w1, w2, activation, expert_tokens=counts.tolist(), bias1=kwargs.get("bias1"),
                        bias2=kwargs.get("bias2"), inner_precise=kwargs.get("inner_precise"))
    values = y[:total].double()
    outside = (values < ref.lo) | (values > ref.hi)
    assert not outside.any(), f"{int(outside.sum())} values outside the oracle's enclosure"


CASES = [GroupedCase(dtype=dtype, activation=act, bias=bias, counts=counts, rows=rows, index_form=index)
         for dtype in (FP32, BF16, FP16)
         for act, bias, index in (("silu", False, False), ("gelu", True, True), ("relu", True, False),
                                  ("fastgelu", False, True))
         for counts, rows in (((2, 0, 3), 7), ((4, 1), 5), ((0, 0, 0), 4))]
CASES += [GroupedCase(dtype=FP32, activation="swiglu", bias=True), GroupedCase(dtype=BF16, activation="geglu"),
          GroupedCase(dtype=FP16, activation="reglu", inner_precise=1), GroupedCase(dtype=FP16, inner_precise=1)]


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_oracle(case):
    args, kwargs = make_call(case)
    assert_matches_oracle(npu_ffn_grouped(*args, **kwargs), args, kwargs)


@settings(max_examples=25, deadline=None)
@given(counts=st.lists(st.integers(0, 6), min_size=1, max_size=5), padding=st.integers(0, 4),
       dtype=st.sampled_from([FP32, BF16]), seed=st.integers(0, 100))
def test_random_counts_match_oracle(counts, padding, dtype, seed):
    case = GroupedCase(counts=tuple(counts), rows=sum(counts) + padding, dtype=dtype, bias=True, seed=seed)
    args, kwargs = make_call(case)
    assert_matches_oracle(npu_ffn_grouped(*args, **kwargs), args, kwargs)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_equals_npu_ffn_on_counted_rows(dtype):
    """The tensor-count form computes what npu_ffn's list form computes, with the same roundings (the
    fp32 bias is added after the matmul instead of inside addmm: an fp32 ulp apart at most)."""
    args, kwargs = make_call(GroupedCase(counts=(3, 0, 4, 1), rows=11, dtype=dtype, bias=True, activation="gelu"))
    x, w1, w2, act = args
    y = npu_ffn_grouped(*args, **kwargs)
    expected = npu_ffn(x[:8], w1, w2, act, expert_tokens=[3, 0, 4, 1], bias1=kwargs["bias1"], bias2=kwargs["bias2"])
    torch.testing.assert_close(y[:8], expected, rtol=2e-7, atol=2e-7)


def test_static_graph_keeps_counts_on_device():
    """Compiled fullgraph with the counts computed in the graph: no host read, no data-dependent shape."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def block(x, w1, w2, ids):
        counts = torch.nn.functional.one_hot(ids, w1.size(0)).sum(0)     # like dispatch's expert_token_nums
        return npu_ffn_grouped(x, w1, w2, "silu", expert_tokens=counts)

    (x, w1, w2, _), _ = make_call(GroupedCase(counts=(2, 2, 3), rows=7))
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    compiled = torch.compile(block, backend=capture, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(x, w1, w2, ids), block(x, w1, w2, ids), rtol=0, atol=0)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("item" in t or "_local_scalar_dense" in t or "tolist" in t for t in targets), targets


def test_compiles_with_inductor():
    args, kwargs = make_call(GroupedCase(counts=(2, 3), rows=6, bias=True))
    compiled = torch.compile(npu_ffn_grouped, fullgraph=True, dynamic=False)
    torch.testing.assert_close(compiled(*args, **kwargs), npu_ffn_grouped(*args, **kwargs), rtol=0, atol=0)


# -- validation ---------------------------------------------------------------------------------

def _call(case: GroupedCase = GroupedCase(), **changes) -> tuple[tuple, dict]:
    args, kwargs = make_call(case)
    named = {**dict(zip(("x", "weight1", "weight2", "activation"), args)), **kwargs, **changes}
    return tuple(named.pop(k) for k in ("x", "weight1", "weight2", "activation")), named


BF = GroupedCase(dtype=BF16)
STRUCTURAL = [
    ("portable", _call(x=torch.randn(7)), "npu_ffn_grouped: x must be 2-D, got shape (7,)"),
    ("portable", _call(x=torch.ones(7, 8, dtype=torch.int32)),
     "npu_ffn_grouped: x dtype must be one of (float16, bfloat16, float32, float64), got int32"),
    ("A3", _call(x=torch.randn(7, 8, dtype=torch.float64)),
     "npu_ffn_grouped: x dtype must be one of (float16, bfloat16), got float64"),
    ("portable", _call(weight1=torch.randn(3, 8, 6, dtype=BF16)),
     "npu_ffn_grouped: weight1 dtype must equal x's (float32), got bfloat16"),
    ("portable", _call(weight2=torch.randn(3, 6)), "npu_ffn_grouped: weight2 must be 3-D, got shape (3, 6)"),
    ("portable", _call(expert_tokens=torch.tensor([2, 0, 3], dtype=torch.int32)),
     "npu_ffn_grouped: expert_tokens dtype must be one of (int64), got int32"),
    ("portable", _call(expert_tokens=torch.tensor([2, 5])),
     "npu_ffn_grouped: weight1 must have E=2 experts in dim 0 (len(expert_tokens)), got shape (3, 8, 6)"),
    ("portable", _call(weight1=torch.randn(3, 4, 6)),
     "npu_ffn_grouped: weight1 must have K1 == x.size(1) == 8, got shape (3, 4, 6)"),
    ("portable", _call(weight2=torch.randn(3, 5, 8)), "npu_ffn_grouped: weight2 must have K2 == N1 == 6, got shape (3, 5, 8)"),
    ("portable", _call(bias1=torch.randn(3, 5)), "npu_ffn_grouped: bias1 must have shape (3, 6), got shape (3, 5)"),
    ("portable", _call(BF, bias2=torch.randn(3, 8, dtype=BF16)),
     "npu_ffn_grouped: bias2 dtype must be one of (float32), got bfloat16"),
    ("portable", _call(activation="tanh"),
     "npu_ffn_grouped: activation must be one of ('fastgelu', 'gelu', 'relu', 'silu', 'geglu', 'swiglu', 'reglu') "
     "(case-insensitive), got 'tanh'"),
    ("portable", _call(inner_precise=2), "npu_ffn_grouped: inner_precise must be one of (0, 1), got 2"),
    ("A3", _call(), "npu_ffn_grouped: x dtype must be one of (float16, bfloat16), got float32"),
    ("A2", _call(replace(BF, activation="swiglu")),
     "npu_ffn_grouped: activation swiglu is not supported with experts on A2/A3, got 'swiglu'"),
    ("A3", _call(BF, inner_precise=1), "npu_ffn_grouped: inner_precise must be 0 (high precision) for bfloat16 x, got 1"),
    ("A3", _call(replace(BF, n2=4)), "npu_ffn_grouped: weight2 must have N2 == K1 == 8 on A2/A3, got shape (3, 6, 4)"),
]
VALUES = [
    (_call(expert_tokens=torch.tensor([2, -1, 3])), "npu_ffn_grouped: expert_tokens entries must be >= 0, got [2, -1, 3]"),
    (_call(expert_tokens=torch.tensor([2, 4, 3])), "npu_ffn_grouped: expert_tokens must cover at most the M=7 rows of x, "
                                                   "got [2, 4, 3]"),
    (_call(expert_tokens=torch.tensor([2, 1, 3]), tokens_index_flag=True),
     "npu_ffn_grouped: expert_tokens must be non-negative, non-decreasing cumulative ends (tokens_index_flag=True), "
     "got [2, 1, 3]"),
]


@pytest.mark.parametrize("target, call, message", STRUCTURAL, ids=lambda v: v if isinstance(v, str) else "")
def test_structural_rules_eager_and_compiled(target, call, message):
    args, kwargs = call
    with moe_fusion.target(target):
        with pytest.raises(OpValidationError) as eager:
            npu_ffn_grouped(*args, **kwargs)
        assert str(eager.value) == message
        torch._dynamo.reset()
        with pytest.raises(TorchRuntimeError) as traced:     # raised by the fake kernel at trace time
            torch.compile(npu_ffn_grouped, backend="eager", fullgraph=True)(*args, **kwargs)
        assert message in str(traced.value)


@pytest.mark.parametrize("call, message", VALUES, ids=lambda v: v if isinstance(v, str) else "")
def test_count_values_rejected_eager_and_compiled(call, message):
    args, kwargs = call
    with pytest.raises(OpValidationError) as eager:
        npu_ffn_grouped(*args, **kwargs)
    assert str(eager.value) == message
    torch._dynamo.reset()
    with pytest.raises(OpValidationError) as compiled:      # the counts exist only when the graph runs
        torch.compile(npu_ffn_grouped, backend="aot_eager", fullgraph=True)(*args, **kwargs)
    assert str(compiled.value) == message


def test_transposed_weight_views():
    """Stacked ``nn.Linear`` weights arrive as transposed views (the passes' layout): same result up to
    the matmul's blocking for that layout (fp32 ulps)."""
    args, kwargs = make_call(GroupedCase(counts=(3, 2), rows=6, k1=8, hidden=12, n2=8))
    x, w1, w2, act = args
    views = (w1.transpose(1, 2).contiguous().transpose(1, 2), w2.transpose(1, 2).contiguous().transpose(1, 2))
    assert not views[0].is_contiguous()
    torch.testing.assert_close(npu_ffn_grouped(x, *views, act, **kwargs), npu_ffn_grouped(*args, **kwargs),
                               rtol=1e-6, atol=1e-6)


def test_empty_input_with_numpy_strides():
    """An empty ``(0, K)`` tensor from numpy has strides (0, 0); the op returns an empty ``(0, N2)``
    output (and a zero gradient for the weights) instead of failing in the grouped matmul."""
    import numpy as np

    x = torch.from_numpy(np.zeros((0, 8), dtype=np.float32))
    w1, w2 = torch.randn(2, 8, 12, requires_grad=True), torch.randn(2, 12, 8, requires_grad=True)
    y = moe_fusion.npu_ffn_grouped(x, w1, w2, "relu", expert_tokens=torch.tensor([0, 0]))
    assert y.shape == (0, 8)
    y.sum().backward()
    assert not w1.grad.any() and not w2.grad.any()


@pytest.mark.parametrize("bias", [False, True])
def test_segment_ops_opcheck(bias):
    """The grouped FFN's internal segment ops: fake kernels agree with the real ones (shapes,
    strides, dtypes), with an odd K and N (padded to 16 bytes inside), an empty segment and rows
    past the last segment."""
    g = torch.Generator().manual_seed(0)
    a, ends = torch.randn(9, 7, generator=g), torch.tensor([2, 2, 7], dtype=torch.int32)
    w = torch.randn(3, 7, 5, generator=g)
    b = torch.randn(3, 5, generator=g) if bias else None
    ops = torch.ops.moe_fusion
    torch.library.opcheck(ops._segment_mm.default, (a, w, ends, b))
    torch.library.opcheck(ops._segment_mm_list.default, (a, list(w.unbind(0)), ends, b))
    torch.library.opcheck(ops._segment_outer.default, (a, torch.randn(9, 5, generator=g), ends))


def test_segment_mm_of_few_rows_against_transposed_weights_matches_plain_loops():
    """Segments of at most ``FEW_ROWS`` rows against ``nn.Linear``-style ``(N, K)`` weights (read as
    transposed views) take the kernel's other product order; every segment size around the bound,
    an empty one and rows past the last segment give the plain-loop products (fp32-close) and 0."""
    from moe_fusion.kernels.ffn_grouped import FEW_ROWS

    g = torch.Generator().manual_seed(5)
    sizes = [1, 0, FEW_ROWS, FEW_ROWS + 1, 3]
    ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)
    a = torch.randn(int(ends[-1]) + 2, 6, generator=g)
    linear = [torch.randn(5, 6, generator=g) for _ in sizes]             # (N, K) each
    got = torch.ops.moe_fusion._segment_mm_list(a, [w.t() for w in linear], ends)
    start = 0
    for e, end in enumerate(ends.tolist()):
        for r in range(start, end):
            for n in range(5):
                want = sum(float(a[r, k]) * float(linear[e][n, k]) for k in range(6))
                assert abs(float(got[r, n]) - want) <= 1e-5 * (1 + abs(want))
        start = end
    assert not got[start:].any()


def test_segment_outer_ops_match_plain_loops():
    """``_segment_outer`` and ``_segment_outer_list`` (column blocks of ``a``, any strides, stacked
    in list order): per segment ``sum_r a[r, k] * b[r, n]`` as plain loops compute it, 0 for an
    empty segment, rows past the last segment never read (NaN there changes nothing)."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 7, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    a[7:], b[7:] = float("nan"), float("nan")
    ends = torch.tensor([2, 2, 7], dtype=torch.int32)
    ops = torch.ops.moe_fusion
    whole = ops._segment_outer(a.float(), b.float(), ends)
    blocks = [a[:, 4:].float(), a[:, :4].float()]          # the column blocks swapped
    swapped = ops._segment_outer_list(blocks, b.float(), ends)
    assert swapped.shape == (3, 7, 5)
    order = [4, 5, 6, 0, 1, 2, 3]
    for e, (start, end) in enumerate([(0, 2), (2, 2), (2, 7)]):
        for k in range(7):
            for n in range(5):
                want = sum(float(a[r, k]) * float(b[r, n]) for r in range(start, end))
                assert abs(float(whole[e, k, n]) - want) <= 1e-5 * (1 + abs(want))
                want = sum(float(a[r, order[k]]) * float(b[r, n]) for r in range(start, end))
                assert abs(float(swapped[e, k, n]) - want) <= 1e-5 * (1 + abs(want))
    torch.library.opcheck(ops._segment_outer_list.default, (blocks, b.float(), ends))


def test_segment_activation_ops_touch_only_the_segments():
    """The activation between the grouped matmuls and its gradient (``_segment_activation``,
    ``_segment_activation_grad``) and the per-segment row sum (``_segment_sum``): the rows inside
    the segments as plain loops compute them, rows past the last segment 0; GLU forms read the
    two column halves as separate operands. Fake kernels agree with the real ones (opcheck)."""
    g = torch.Generator().manual_seed(1)
    h, ends = torch.randn(9, 6, generator=g), torch.tensor([2, 2, 7], dtype=torch.int32)
    ga = torch.randn(9, 6, generator=g)
    ops = torch.ops.moe_fusion
    relu = ops._segment_activation(h, None, ends, "relu", torch.float32, False)
    swiglu = ops._segment_activation(h[:, :3], h[:, 3:], ends, "swiglu", torch.float32, False)
    relu_grad = ops._segment_activation_grad(h, None, ga, ends, "relu")
    sums = ops._segment_sum(ga, ends)
    for r in range(9):
        for c in range(6):
            inside = r < 7
            assert relu[r, c] == (max(float(h[r, c]), 0.0) if inside else 0.0)
            assert relu_grad[r, c] == (float(ga[r, c]) if inside and h[r, c] > 0 else 0.0)
            if c < 3:
                left, right = float(h[r, c]), float(h[r, c + 3])
                want = left * right / (1 + math.exp(-right)) if inside else 0.0
                assert abs(float(swiglu[r, c]) - want) <= 1e-6 * (1 + abs(want))
    for e, (start, end) in enumerate([(0, 2), (2, 2), (2, 7)]):
        for c in range(6):
            want = sum(float(ga[r, c]) for r in range(start, end))
            assert abs(float(sums[e, c]) - want) <= 1e-5
    torch.library.opcheck(ops._segment_activation.default, (h, None, ends, "silu", torch.bfloat16, False))
    torch.library.opcheck(ops._segment_activation.default, (h[:, :3], h[:, 3:], ends, "swiglu", torch.float32, False))
    torch.library.opcheck(ops._segment_activation_grad.default, (h[:, :3], h[:, 3:], ga[:, :3], ends, "swiglu"))
    torch.library.opcheck(ops._segment_sum.default, (ga, ends))
