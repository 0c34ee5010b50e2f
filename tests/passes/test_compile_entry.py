"""``moe_fusion.compile``: one call compiles a model with the fusion passes and keeps data-dependent
counts (``.item()``, ``nonzero``) inside one graph, with that dynamo configuration scoped to the
compiled model."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import moe_fusion
from moe_fusion.passes import FusionReport


class CapacityScaled(torch.nn.Module):
    """A count read on the host (as DeepSpeed reads its capacity) and a data-dependent shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        capacity = int((x > 0).sum().item())
        kept = torch.nonzero(x.sum(-1) > 0).squeeze(-1)
        return x * capacity + x[kept].sum(0)


def _graphs(run, x) -> int:
    torch._dynamo.reset()
    counters.clear()
    run(x)
    return counters["stats"]["unique_graphs"]


def test_data_dependent_counts_stay_in_one_graph():
    model, x = CapacityScaled(), torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    compiled = moe_fusion.compile(model, compiler="eager")
    assert _graphs(compiled, x) == 1
    torch.testing.assert_close(compiled(x), model(x))
    # Plain torch.compile with the same backend breaks the graph at the host read.
    assert _graphs(torch.compile(model, backend=moe_fusion.backend(compiler="eager")), x) > 1


def test_the_dynamo_configuration_is_scoped_to_the_model():
    compiled = moe_fusion.compile(CapacityScaled(), compiler="eager")
    compiled(torch.randn(3, 4))
    assert not torch._dynamo.config.capture_scalar_outputs
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops


def test_functions_compile_too():
    def scaled(x):
        return x * (x > 0).sum().item()

    compiled = moe_fusion.compile(scaled, compiler="eager")
    assert compiled.__name__ == "scaled" and _graphs(compiled, torch.ones(3)) == 1


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("compiler", ["eager", "inductor"])
def test_the_report_and_options_reach_the_backend(compiler):
    pytest.importorskip("transformers")
    from integration.test_hf_transformers import make_block

    block, report = make_block("mixtral", "grouped_mm", hidden=16, inner=32), FusionReport()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    compiled = moe_fusion.compile(block, report=report, compiler=compiler, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(_output(compiled(x)), _output(block(x)))
    assert "npu_ffn_grouped" in {e.detail.split("(")[0] for e in report.fused("ffn")}, report.format()
