"""Inductor's lowering of the fused local ops (``passes.lowering``): under ``moe_fusion.backend()``
with inductor, a fused ``npu_ffn`` / ``npu_ffn_grouped`` is compiled from its kernel's ATen ops
(no opaque extern call of the reference kernel), the GLU weight reorder the FFN pass emits is
never materialized, results and gradients equal the eager model's, and the count rules the
kernel checks on the host become device asserts. The oracle is always the unfused model run
eagerly."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.decomposition import select_decomp_table
from torch._inductor.utils import run_and_get_code
from torch.fx.experimental.proxy_tensor import make_fx

import moe_fusion
from moe_fusion.passes import FusionReport, backend
from moe_fusion.kernels.ffn_grouped import segment_mm
from moe_fusion.passes.lowering import split_concatenated_weights, unstack_segment_weights
from step_results import step_results

H, INNER, ROWS = 16, 32, 12


class GateFirstMLP(torch.nn.Module):
    """Llama's MLP: ``down(silu(gate(x)) * up(x))``; the op's GLU takes the activated half second,
    so the FFN pass concatenates the weights as ``[up; gate]``."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate, self.up = torch.nn.Linear(H, INNER, bias=False), torch.nn.Linear(H, INNER, bias=False)
        self.down = torch.nn.Linear(INNER, H, bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _compiled_code(model: torch.nn.Module, compile_backend, x: torch.Tensor, train: bool) -> tuple[list, str]:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=compile_backend)
    results, code = run_and_get_code(lambda: step_results(model, compiled, x, train))
    # Without comment lines (they name the ATen ops a kernel came from).
    return results, "\n".join(line for source in code for line in source.splitlines()
                              if not line.lstrip().startswith("#"))


@pytest.mark.parametrize("train", [False, True])
def test_glu_mlp_compiles_like_plain_inductor(train):
    model, x = GateFirstMLP(), torch.randn(ROWS, H, generator=torch.Generator().manual_seed(1))
    report = FusionReport()
    got, code = _compiled_code(model, backend(report=report), x, train)
    _, plain_code = _compiled_code(model, "inductor", x, train)
    assert [e.detail.split("(")[0] for e in report.fused("ffn")] == ["npu_ffn"], report.format()
    assert "moe_fusion.npu_ffn" not in code           # no extern call of the reference kernel
    assert "cat" not in code            # the [up; gate] weight is never built (no cat kernel)
    # No more matmuls than inductor runs for the unfused chain (the backward's recomputation of
    # the hidden activations is merged with the forward's).
    mm_calls = re.compile(r"extern_kernels\.(?:mm|addmm|bmm)\(")
    assert len(mm_calls.findall(code)) <= len(mm_calls.findall(plain_code))
    want = step_results(model, model, x, train)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_hf_grouped_experts_compile_from_the_kernel(name, train):
    pytest.importorskip("transformers")
    from integration.test_hf_transformers import make_block

    block = make_block(name, "grouped_mm", hidden=H, inner=INNER)
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(3))
    report = FusionReport()
    got, code = _compiled_code(block, backend(report=report), x, train)
    assert "npu_ffn_grouped" in {e.detail.split("(")[0] for e in report.fused("ffn")}, report.format()
    assert "moe_fusion.npu_ffn_grouped.default(" not in code
    assert "moe_fusion._ffn_grouped_backward.default(" not in code
    assert "moe_fusion._segment_mm.default(" in code
    # Every re-routed row is counted: the activation is inductor's own pointwise code.
    assert "moe_fusion._segment_activation" not in code
    experts = block.experts.gate_up_proj.size(0)
    # The GLU reorder of the stored (E, 2I, H) gate_up_proj is never copied (training: its
    # gradient is written in the stored order, not assembled from swapped halves).
    assert f"empty_strided_cpu(({experts}, {2 * INNER}, {H})" not in code
    assert "slice_backward" not in code and "slice_scatter" not in code
    assert "cat" not in code or train       # training: the activation's gradient halves are concatenated
    want = step_results(block, block, x, train)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_lowered_counts_are_checked_on_the_device():
    """Counts the kernel would check on the host raise from the compiled code too."""
    def ffn(x, w1, w2, counts):
        return moe_fusion.npu_ffn_grouped(x, w1, w2, "relu", expert_tokens=counts)

    g = torch.Generator().manual_seed(0)
    x, w1, w2 = torch.randn(8, 4, generator=g), torch.randn(2, 4, 8, generator=g), torch.randn(2, 8, 4, generator=g)
    torch._dynamo.reset()
    compiled = torch.compile(ffn, backend=backend())
    good = torch.tensor([3, 5])
    torch.testing.assert_close(compiled(x, w1, w2, good), ffn(x, w1, w2, good))
    with pytest.raises(RuntimeError, match="npu_ffn_grouped: expert_tokens entries must be >= 0"):
        compiled(x, w1, w2, torch.tensor([-1, 5]))
    with pytest.raises(RuntimeError, match="npu_ffn_grouped: expert_tokens must cover at most the M rows"):
        compiled(x, w1, w2, torch.tensor([4, 5]))


def _traced(fn, *args):
    """``fn`` as a post-grad-like graph (inductor's decompositions, fake values on the nodes)."""
    return make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="fake")(*args)


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_column_slices_of_a_concatenated_weight_become_one_matmul_each():
    a, w0, w1 = torch.randn(5, 6), torch.randn(3, 6), torch.randn(4, 6)

    def fn(a, w0, w1):
        h = a @ torch.cat([w0, w1]).t()           # permute(cat) along the columns
        return h[:, :3] * 2, h[:, 3:] - 1

    gm = _traced(fn, a, w0, w1)
    assert split_concatenated_weights(gm.graph) == 1
    gm.recompile()
    assert torch.ops.aten.cat.default not in _targets(gm)
    for got, want in zip(gm(a, w0, w1), fn(a, w0, w1)):
        torch.testing.assert_close(got, want)


def test_a_slice_across_pieces_keeps_the_concatenation():
    a, w0, w1 = torch.randn(5, 6), torch.randn(3, 6), torch.randn(4, 6)

    def fn(a, w0, w1):
        h = a @ torch.cat([w0, w1]).t()
        return h[:, 1:5]                          # reads both pieces

    gm = _traced(fn, a, w0, w1)
    assert split_concatenated_weights(gm.graph) == 0
    assert torch.ops.aten.cat.default in _targets(gm)


def test_a_weight_concatenated_along_the_contraction_becomes_a_sum():
    a, w0, w1 = torch.randn(5, 7), torch.randn(3, 4), torch.randn(4, 4)

    def fn(a, w0, w1):
        return a @ torch.cat([w0, w1])

    gm = _traced(fn, a, w0, w1)
    assert split_concatenated_weights(gm.graph) == 1
    gm.recompile()
    assert torch.ops.aten.cat.default not in _targets(gm)
    torch.testing.assert_close(gm(a, w0, w1), fn(a, w0, w1))


def test_a_stack_of_expert_linear_weights_is_read_in_place():
    """``_segment_mm`` of the FFN pass's stack of ``nn.Linear`` weights (``emit.stack_parts``:
    ``cat`` of ``unsqueeze``, permuted) reads the experts' weights as a list: no stack is built, the
    products are the same bit for bit, the bias is added per segment and the rows past the last
    segment are 0."""
    g = torch.Generator().manual_seed(0)
    a, weights = torch.randn(9, 6, generator=g), [torch.randn(5, 6, generator=g) for _ in range(3)]
    bias, ends = torch.randn(3, 5, generator=g), torch.tensor([2, 2, 7], dtype=torch.int32)

    def fn(a, w0, w1, w2, bias, ends):
        stacked = torch.cat([w.unsqueeze(0) for w in (w0, w1, w2)]).permute(0, 2, 1)
        return segment_mm(a, stacked, ends, bias)

    gm = _traced(fn, a, *weights, bias, ends)
    assert unstack_segment_weights(gm.graph) == 1
    gm.recompile()
    assert torch.ops.aten.cat.default not in _targets(gm)
    assert torch.ops.moe_fusion._segment_mm.default not in _targets(gm)
    got = gm(a, *weights, bias, ends)
    assert torch.equal(got, fn(a, *weights, bias, ends))
    want = torch.cat([a[0:2] @ weights[0].t() + bias[0], a[2:7] @ weights[2].t() + bias[2], torch.zeros(2, 5)])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("cut", ["split", "slice"])
def test_halves_of_a_torch_stack_of_expert_weights_are_read_in_place(cut):
    """The Megatron route's weights: ``torch.stack`` of the experts' fc1 weights (traced as ``view``
    of a ``cat`` of the flat pieces), cut into GLU halves along the columns and transposed. Each
    half's ``_segment_mm`` reads its expert's rows of the weight in place, with the same products,
    and the stack is gone; a cut across the expert dim keeps it."""
    g = torch.Generator().manual_seed(1)
    a, weights = torch.randn(9, 6, generator=g), [torch.randn(8, 6, generator=g) for _ in range(2)]
    ends = torch.tensor([3, 7], dtype=torch.int32)

    def fn(a, w0, w1, ends):
        stacked = torch.stack([w0, w1])                                  # (E, 2I, H)
        halves = stacked.split(4, dim=1) if cut == "split" else (stacked[:, :4], stacked[:, 4:])
        return [segment_mm(a, half.transpose(1, 2), ends) for half in halves]

    gm = _traced(fn, a, *weights, ends)
    assert unstack_segment_weights(gm.graph) == 2
    gm.recompile()
    assert torch.ops.moe_fusion._segment_mm.default not in _targets(gm)
    assert torch.ops.aten.cat.default not in _targets(gm)
    got = gm(a, *weights, ends)
    for half, rows in enumerate([slice(0, 4), slice(4, 8)]):
        want = torch.cat([a[0:3] @ weights[0][rows].t(), a[3:7] @ weights[1][rows].t(), torch.zeros(2, 4)])
        assert torch.equal(got[half], fn(a, *weights, ends)[half])
        torch.testing.assert_close(got[half], want)

    def across_experts(a, w0, w1, ends):
        return segment_mm(a, torch.stack([w0, w1, w1])[1:].transpose(1, 2), ends)

    gm = _traced(across_experts, a, *weights, ends)
    assert unstack_segment_weights(gm.graph) == 0


@pytest.mark.parametrize("form", ["cat", "scatter"])
def test_reordered_blocks_of_a_segment_outer_read_the_operand_in_place(form):
    """``G = segment_outer(a, b)`` with its dim-1 blocks swapped, as autograd writes a swapped GLU
    weight's gradient back (a ``cat`` of slices, or ``slice_scatter``s into zeros to the open end,
    summed): the pass computes it as ``_segment_outer_list`` of ``a``'s blocks, G and the copies
    gone, values equal; blocks that do not fill the result are left alone."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 6, generator=g), torch.randn(9, 5, generator=g)
    ends = torch.tensor([3, 7], dtype=torch.int32)

    def fn(a, b, ends):
        outer = torch.ops.moe_fusion._segment_outer(a, b, ends)              # (2, 6, 5)
        if form == "cat":
            return torch.cat([outer[:, 4:], outer[:, :4]], dim=1)
        base = torch.zeros_like(outer)
        return (torch.slice_scatter(base, outer[:, 4:], 1, 0, 2)
                + torch.slice_scatter(base, outer[:, :4], 1, 2, 9223372036854775807))

    gm = _traced(fn, a, b, ends)
    assert split_concatenated_weights(gm.graph) == 1
    gm.recompile()
    assert torch.ops.moe_fusion._segment_outer.default not in _targets(gm)
    assert torch.ops.moe_fusion._segment_outer_list.default in _targets(gm)
    assert torch.ops.aten.cat.default not in _targets(gm)
    want = torch.stack([torch.cat([a[s:t, 4:], a[s:t, :4]], dim=1).t() @ b[s:t] for s, t in [(0, 3), (3, 7)]])
    torch.testing.assert_close(gm(a, b, ends), want)

    def partial(a, b, ends):
        outer = torch.ops.moe_fusion._segment_outer(a, b, ends)
        return torch.cat([outer[:, 4:], outer[:, :2]], dim=1)                # not a reordering of G

    assert split_concatenated_weights(_traced(partial, a, b, ends).graph) == 0


@pytest.mark.parametrize("train", [False, True])
def test_dispatched_rows_run_the_activation_on_the_counted_rows_only(train):
    """``npu_ffn_grouped`` of ``dispatch_v2``'s ``expand_x`` (its static worst case: 4 tokens x 2
    slots of up to 8 rows, mostly padding): the activation and its gradient are the segment ops,
    which touch only the counted rows, not inductor pointwise code over every row; the results
    equal eager's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, H, generator=g, requires_grad=train)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.int32)
    w1 = torch.randn(2, H, INNER, generator=g, requires_grad=train)
    w2 = torch.randn(2, INNER, H, generator=g, requires_grad=train)
    weights = torch.rand(4, 2, generator=g)

    def layer(x, w1, w2):
        expand_x, _, assist, counts, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
            x, ids, "", 1, 0, 2, expert_token_nums_type=1)
        y = moe_fusion.npu_ffn_grouped(expand_x, w1, w2, "silu", expert_tokens=counts)
        out = moe_fusion.npu_moe_distribute_combine_v2(y, ids, assist, ep_counts, weights, "", 1, 0, 2,
                                                       tp_send_counts=tp_counts)
        return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() if train else out

    def run(fn):
        with torch.set_grad_enabled(train):
            out = fn(x, w1, w2)
            if not train:
                return [out]
            return [out, *torch.autograd.grad(out, (x, w1, w2))]

    torch._dynamo.reset()
    got, codes = run_and_get_code(run, torch.compile(layer, backend=backend(cost_gate=False)))
    code = "\n".join(codes)
    assert "moe_fusion._segment_activation.default(" in code
    assert ("moe_fusion._segment_activation_grad.default(" in code) == train
    for g_, w_ in zip(got, run(layer)):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)


def test_gradient_of_glu_halves_stored_in_the_other_order_is_not_copied():
    """Megatron's fc1 weights hold ``[gate; up]``, the op's GLU takes the activated half second: the
    FFN pass swaps the halves of the stacked weights, and autograd writes the two halves of the
    weight gradient back into zeros at swapped places (``slice_scatter`` of slices to the open end).
    The lowering computes that gradient as ``_segment_outer_list`` of the activation gradient's
    column blocks in the weight's order: the experts' gradients are views of its output, no
    weight-sized copy; results and gradients equal eager's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, H, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=torch.int32)
    fc1 = [torch.randn(2 * INNER, H, generator=g, requires_grad=True) for _ in range(2)]     # (2I, H) each
    w2 = torch.randn(2, INNER, H, generator=g, requires_grad=True)
    weights = torch.rand(4, 2, generator=g)

    def layer(x, fc1_0, fc1_1, w2):
        expand_x, _, assist, counts, ep_counts, tp_counts, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
            x, ids, "", 1, 0, 2, expert_token_nums_type=1)
        stacked = torch.stack([fc1_0, fc1_1])
        swapped = torch.cat([stacked[:, INNER:], stacked[:, :INNER]], dim=1)          # [up; gate]
        y = moe_fusion.npu_ffn_grouped(expand_x, swapped.transpose(1, 2), w2, "swiglu", expert_tokens=counts)
        out = moe_fusion.npu_moe_distribute_combine_v2(y, ids, assist, ep_counts, weights, "", 1, 0, 2,
                                                       tp_send_counts=tp_counts)
        return (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum()

    def run(fn):
        out = fn(x, *fc1, w2)
        return [out, *torch.autograd.grad(out, (x, *fc1, w2))]

    torch._dynamo.reset()
    got, codes = run_and_get_code(run, torch.compile(layer, backend=backend(cost_gate=False)))
    backward = codes[-1]
    assert "moe_fusion._segment_outer_list.default(" in backward
    # The experts' fc1 gradients are returned as views of one buffer, not written by a copy kernel.
    returned = re.search(r"return \((.*)\)", backward).group(1)
    assert len(re.findall(rf"reinterpret_tensor\(buf\d+, \({2 * INNER}, {H}\)", returned)) == 2, returned
    for g_, w_ in zip(got, run(layer)):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-5)
