"""A compiled training step fuses: ``torch.compile(model, backend=moe_fusion.backend())`` on a module
whose parameters require grad, then ``loss.backward()``, runs the fused ops in the forward and their
formulas in the backward (``pipeline.fuse_before_autograd``). Output, input gradient and every
parameter gradient equal the unfused eager step's (fp32)."""
from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

import moe_fusion
from moe_fusion.passes import FusionReport, backend, pipeline

HIDDEN, FFN_HIDDEN, TOKENS = 16, 32, 12


class DenseMLP(nn.Module):
    def __init__(self, activation: Callable = F.silu) -> None:
        super().__init__()
        self.up, self.down, self.activation = nn.Linear(HIDDEN, FFN_HIDDEN), nn.Linear(FFN_HIDDEN, HIDDEN), activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.activation(self.up(x)))


class GluMLP(nn.Module):
    """LlamaMLP: ``down(silu(gate(x)) * up(x))``, no biases."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.up = nn.Linear(HIDDEN, FFN_HIDDEN, bias=False)
        self.down = nn.Linear(FFN_HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class SegmentExperts(nn.Module):
    """Per-expert MLPs over static row segments of the tokens, concatenated."""

    def __init__(self, bounds: tuple[int, ...] = (0, 5, 12)) -> None:
        super().__init__()
        self.bounds = bounds
        self.experts = nn.ModuleList(DenseMLP(lambda t: F.gelu(t, approximate="tanh")) for _ in bounds[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(x[a:b]) for e, a, b in zip(self.experts, self.bounds, self.bounds[1:])])


def _step(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    return _cast_step(model, model, x)


@pytest.mark.parametrize("model_type", [DenseMLP, GluMLP, SegmentExperts])
@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_training_step_fuses_and_equals_eager(model_type, compiler):
    torch.manual_seed(0)
    model = model_type()
    x = torch.randn(TOKENS, HIDDEN)
    want_out, want_grads = _step(model, x)
    report = FusionReport()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend(report=report, compiler=compiler), fullgraph=True)
    got_out, got_grads = _step(compiled, x)
    assert [e.pattern for e in report.fused()] == ["ffn"], report.format()
    assert not report.refused("ffn"), report.format()
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_joint_graph_differentiates_the_fused_op(monkeypatch):
    """AOT autograd receives the fused graph: its forward calls npu_ffn, and no forward output is
    an FFN intermediate (the refusal this issue reported)."""
    graphs: list[fx.GraphModule] = []
    real = pipeline.fuse_before_autograd

    def spy(gm, example_inputs, graph_pass):
        graphs.append(real(gm, example_inputs, graph_pass))
        return graphs[-1]

    monkeypatch.setattr(pipeline, "fuse_before_autograd", spy)
    torch._dynamo.reset()
    model = DenseMLP()
    _step(torch.compile(model, backend=backend(compiler="eager"), fullgraph=True), torch.randn(TOKENS, HIDDEN))
    (fused,) = graphs
    targets = [n.target for n in fused.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moe_fusion.npu_ffn.default) == 1
    assert torch.ops.aten.addmm.default not in targets and torch.ops.aten.mm.default not in targets


def test_inference_keeps_the_post_grad_route(monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "fuse_before_autograd", lambda *a: calls.append(a))
    torch._dynamo.reset()
    report = FusionReport()
    with torch.no_grad():
        torch.compile(DenseMLP(), backend=backend(report=report, compiler="eager"))(torch.randn(TOKENS, HIDDEN))
    assert not calls and [e.pattern for e in report.fused()] == ["ffn"]


def test_explain_reports_the_training_graph():
    report = moe_fusion.explain(DenseMLP(), torch.randn(TOKENS, HIDDEN, requires_grad=True), grad=True,
                                print_report=False)
    assert [e.pattern for e in report.fused()] == ["ffn"], report.format()


def test_a_fused_op_without_formula_is_refused(monkeypatch):
    """Never a silently wrong gradient: a rewrite to a fused op that could not be differentiated is
    refused before AOT autograd, and the report says why."""
    monkeypatch.setattr(pipeline, "_differentiable", lambda op: op is not torch.ops.moe_fusion.npu_ffn.default)
    torch._dynamo.reset()
    model, report = DenseMLP(), FusionReport()
    x = torch.randn(TOKENS, HIDDEN)
    want_out, want_grads = _step(model, x)
    got_out, got_grads = _step(torch.compile(model, backend=backend(report=report, compiler="eager")), x)
    assert not report.fused()
    assert any(e.pattern == "ffn" and "cannot be trained here: moe_fusion::npu_ffn has no autograd formula" in e.detail
               for e in report.refused()), report.format()
    torch.testing.assert_close(got_out, want_out)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want)


def test_bf16_training_fuses_and_casts_stay_differentiable():
    """Inductor's decompositions turn dtype casts into ``prims.convert_element_type``, which has no
    autograd formula: the fused training graph hands AOT autograd ``aten._to_copy`` instead."""
    torch.manual_seed(0)
    model = DenseMLP().to(torch.bfloat16)
    x = torch.randn(TOKENS, HIDDEN).to(torch.bfloat16)

    def run(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: m(t).float()      # a bf16 model read in fp32, as mixed precision does

    want_out, want_grads = _cast_step(model, run(model), x)
    report = FusionReport()
    torch._dynamo.reset()
    got_out, got_grads = _cast_step(model, run(torch.compile(model, backend=backend(report=report,
                                                                                   compiler="eager"))), x)
    assert [e.pattern for e in report.fused()] == ["ffn"], report.format()
    torch.testing.assert_close(got_out, want_out, rtol=2e-2, atol=2e-2)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


def _cast_step(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
               x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One step of ``run`` (``model``, its compiled form, or a function of it): the output, then the
    gradients of ``x`` and of every parameter of ``model`` (cleared after)."""
    x = x.clone().requires_grad_()
    out = run(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


class Doubled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * 2


class WithAutogradFunction(DenseMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return Doubled.apply(super().forward(x))


class WithInPlaceMask(DenseMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x > -1
        mask &= x < 1
        return super().forward(x * mask)


@pytest.mark.parametrize("model_type, reason", [
    (WithAutogradFunction, "custom_function_call"),
    (WithInPlaceMask, "does not trace as a functional ATen graph"),
])
def test_graphs_that_do_not_trace_train_unfused(model_type, reason):
    """Graphs functionalization cannot trace (custom autograd Functions, some in-place ops) go to
    AOT autograd as they are: right gradients, no fusion, and the report says why."""
    torch.manual_seed(0)
    model = model_type()
    x = torch.randn(TOKENS, HIDDEN)
    want_out, want_grads = _step(model, x)
    report = FusionReport()
    torch._dynamo.reset()
    got_out, got_grads = _step(torch.compile(model, backend=backend(report=report, compiler="eager")), x)
    assert not report.fused()
    assert any(e.pattern == "training" and reason in e.detail for e in report.refused()), report.format()
    torch.testing.assert_close(got_out, want_out)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want)
