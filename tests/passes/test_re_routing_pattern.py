"""The re-routing fusion pass (``moe_fusion/passes/re_routing.py``): matcher tests on ``make_fx``
graphs with inductor's decompositions (forms that must fuse, look-alikes that must not, with the
refusal reason), then end-to-end ``torch.compile`` (eager compiler, one inductor case, one
``dynamic=True`` case). Re-routing is a bit copy: fused and unfused outputs must be equal.
"""
from __future__ import annotations

import pytest
import torch

from moe_fusion.passes import FusionReport, backend
from pass_helpers import calls, fuse, refusals

aten = torch.ops.aten
RE_ROUTING = torch.ops.moe_fusion.npu_moe_re_routing
N, E, H = 2, 3, 4
COUNTS = torch.tensor([[1, 0, 2], [2, 1, 1]])        # (N, E), rank-major blocks; A = 7 rows
A = int(COUNTS.sum())


def inputs(dtype=torch.float32, counts_dtype=torch.int64, hidden=H):
    return torch.randn(A, hidden).to(dtype), COUNTS.to(counts_dtype), torch.rand(A)


def reroute_full(tokens, counts, scales):
    """Every output the op can provide: tokens, scales, gather index, per-expert counts."""
    expert_of_block = torch.arange(E).repeat(N)
    keys = torch.repeat_interleave(expert_of_block, counts.flatten(), output_size=tokens.size(0))
    order = torch.argsort(keys, stable=True)
    return tokens[order], scales[order], order, counts.sum(0)


def reroute_expand_sort(tokens, counts, scales):
    keys = torch.arange(E).expand(N, E).reshape(-1).repeat_interleave(counts.reshape(-1), output_size=tokens.size(0))
    _, order = torch.sort(keys, stable=True)
    return (tokens.index_select(0, order),)


def reroute_remainder(tokens, counts, scales):
    keys = (torch.arange(N * E) % E).repeat_interleave(counts.view(-1), output_size=A)
    return (torch.index_select(tokens, 0, keys.argsort(stable=True)),)


def reroute_descending(tokens, counts, scales):
    keys = (E - 1 - torch.arange(E)).repeat(N).repeat_interleave(counts.flatten(), output_size=A)
    return (tokens[torch.sort(keys, stable=True, descending=True)[1]],)


def assert_fused(fn, args, target="portable"):
    gm, report = fuse(fn, *args, passes=["re_routing"], target=target)
    (node,) = calls(gm, RE_ROUTING)
    assert not calls(gm, aten.sort), gm.graph
    assert len(report.fused("re_routing")) == 1 and not report.refused("re_routing")
    for got, want in zip(gm(*args), fn(*args)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    return gm, node


def assert_refused(fn, args, reason, target="portable"):
    gm, report = fuse(fn, *args, passes=["re_routing"], target=target)
    assert not calls(gm, RE_ROUTING), gm.graph
    assert any(reason in r for r in refusals(report, "re_routing")), refusals(report, "re_routing")


@pytest.mark.parametrize("counts_dtype", [torch.int64, torch.int32])
def test_full_form_wires_every_output(counts_dtype):
    gm, node = assert_fused(reroute_full, inputs(counts_dtype=counts_dtype))
    assert node.kwargs["per_token_scales"].name == "scales_1"
    assert not calls(gm, aten.searchsorted, aten.cumsum, aten.index, aten.sum, aten.repeat)


@pytest.mark.parametrize("fn", [reroute_expand_sort, reroute_remainder, reroute_descending])
def test_other_key_forms_fuse(fn):
    assert_fused(fn, inputs())


def test_zero_counts_and_empty_experts():
    counts = torch.tensor([[0, 0, 3], [0, 4, 0]])
    assert_fused(reroute_full, (torch.randn(7, H), counts, torch.rand(7)))


def test_a3_fuses_bf16_tokens():
    assert_fused(reroute_expand_sort, inputs(torch.bfloat16), target="A3")


@pytest.mark.parametrize("args, reason", [
    (inputs(), "tokens dtype must be one of (float16, bfloat16, int8)"),
    (inputs(torch.float16, hidden=16385), "hidden size H must be in [1, 16384]"),
], ids=["fp32", "H>16384"])
def test_a3_limits_are_refused(args, reason):
    assert_refused(reroute_expand_sort, args, reason, target="A3")


def test_unstable_sort_is_refused():
    def fn(tokens, counts, scales):
        keys = torch.arange(E).repeat(N).repeat_interleave(counts.flatten(), output_size=A)
        return (tokens[torch.argsort(keys)],)
    assert_refused(fn, inputs(), "not stable")


@pytest.mark.parametrize("table, reason", [
    (lambda: torch.arange(N * E), "differ between ranks"),                       # global block id: identity
    (lambda: torch.arange(N).repeat_interleave(E), "differ between ranks"),       # sort by rank
    (lambda: (E - 1 - torch.arange(E)).repeat(N), "do not order the experts"),    # descending keys, ascending sort
    (lambda: torch.arange(E).repeat(N) // 2, "do not order the experts"),          # two experts share a key
], ids=["block-id", "rank-id", "reversed", "merged"])
def test_keys_not_in_expert_order_are_refused(table, reason):
    def fn(tokens, counts, scales):
        keys = table().repeat_interleave(counts.flatten(), output_size=A)
        return (tokens[torch.argsort(keys, stable=True)],)
    assert_refused(fn, inputs(), reason)


def test_keys_from_data_are_refused():
    def fn(tokens, counts, expert_of_block):
        keys = expert_of_block.repeat_interleave(counts.flatten(), output_size=A)
        return (tokens[torch.argsort(keys, stable=True)],)
    assert_refused(fn, (torch.randn(A, H), COUNTS, torch.arange(E).repeat(N)), "not a compile-time constant")


def test_flat_counts_are_refused():
    fn = lambda tokens, counts, scales: reroute_expand_sort(tokens, counts.view(N, E), scales)   # noqa: E731

    def flat(tokens, counts, scales):
        keys = torch.arange(E).repeat(N).repeat_interleave(counts, output_size=A)
        return (tokens[torch.argsort(keys, stable=True)],)
    assert_refused(flat, (torch.randn(A, H), COUNTS.flatten(), None), "not a 2-D (N, E) tensor")
    assert_fused(fn, (torch.randn(A, H), COUNTS.flatten(), None))       # a view to (N, E) is enough


def test_counts_of_another_shape_are_refused():
    def fn(tokens, counts, scales):
        keys = torch.arange(E).repeat(N).repeat_interleave(counts.flatten(), output_size=A)
        return (tokens[torch.argsort(keys, stable=True)],)
    assert_refused(fn, (torch.randn(A, H), COUNTS.view(N, E, 1), None), "not a 2-D (N, E) tensor")
    assert_refused(fn, (torch.randn(A, H), COUNTS.view(E, N), None), "the block keys differ between ranks")


def test_gather_of_3d_rows_is_refused():
    def fn(tokens, counts, scales):
        keys = torch.arange(E).repeat(N).repeat_interleave(counts.flatten(), output_size=A)
        return (tokens[torch.argsort(keys, stable=True)],)
    assert_refused(fn, (torch.randn(A, 2, H), COUNTS, None), "gathers no 2-D token rows")


# -- end to end ----------------------------------------------------------------------------------

def compile_and_run(fn, args, compiler="eager", dynamic=False):
    torch._dynamo.reset()
    report = FusionReport()
    return torch.compile(fn, backend=backend("portable", ["re_routing"], report, compiler=compiler),
                         dynamic=dynamic)(*args), report


def test_compiled_matches_eager():
    args = inputs(counts_dtype=torch.int32)
    out, report = compile_and_run(reroute_full, args)
    assert report.ops_after["moe_fusion.npu_moe_re_routing.default"] == 1 and report.ops_after["aten.sort.stable"] == 0
    for got, want in zip(out, reroute_full(*args)):
        assert torch.equal(got, want)


def test_inductor_matches_eager():
    args = inputs()
    out, report = compile_and_run(reroute_full, args, compiler="inductor")
    assert report.fused("re_routing") and report.ops_after["aten.sort.stable"] == 0
    for got, want in zip(out, reroute_full(*args)):
        assert torch.equal(got, want)


def test_dynamic_shapes_compile_correctly():
    """With symbolic counts shapes the key table cannot be checked: the pass declines."""
    args = inputs()
    out, report = compile_and_run(reroute_full, args, dynamic=True)
    for got, want in zip(out, reroute_full(*args)):
        assert torch.equal(got, want)
    assert report.refused("re_routing") and not report.fused("re_routing")
