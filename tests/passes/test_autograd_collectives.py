"""Custom autograd Functions around an all-to-all (fairscale's / DeepSpeed's ``_AllToAll``, PyTorch
PR 40762's pattern) become torch's differentiable functional all-to-all before autograd
(``autograd_collectives``), so the training graph fuses; a Function whose backward is not the
all-to-all's adjoint is left as it is (training then fuses nothing before autograd, and is still
exact). 2 gloo ranks: an all-to-all, a local expert MLP per rank, the all-to-all back; the oracle is
the same model run eagerly: output, input gradient and every parameter gradient."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion.passes import FusionReport
from step_results import step_results

HIDDEN, FFN, TOKENS, WORLD = 8, 16, 8, 2


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, group: dist.ProcessGroup, x: torch.Tensor) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x.contiguous())
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return None, _AllToAll.apply(ctx.group, grad)


class _ScaledBack(_AllToAll):
    """A look-alike: its backward is twice the adjoint (not an all-to-all's gradient)."""

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        return None, 2 * _AllToAll.apply(ctx.group, grad)


class ExpertsOverAllToAll(torch.nn.Module):
    def __init__(self, function: type, rank: int) -> None:
        super().__init__()
        self.function = function
        torch.manual_seed(rank)
        self.fc1, self.fc2 = torch.nn.Linear(HIDDEN, FFN), torch.nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        received = self.function.apply(dist.group.WORLD, x)
        return self.function.apply(dist.group.WORLD, self.fc2(torch.relu(self.fc1(received))))


def _run(rank: int, world: int) -> dict[str, Any]:
    results = {}
    for name, function in (("adjoint", _AllToAll), ("scaled-backward", _ScaledBack)):
        model = ExpertsOverAllToAll(function, rank)
        x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(10 + rank))
        report = FusionReport()
        torch._dynamo.reset()
        eager = step_results(model, model, x, train=True)
        compiled = step_results(model, moe_fusion.compile(model, report=report, compiler="eager"), x, train=True)
        results[name] = {"eager": eager, "compiled": compiled,
                         "events": [(e.pattern, e.fused, e.detail) for e in report.events]}
    return results


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORLD, _run, timeout=300)


@pytest.mark.parametrize("name", ["adjoint", "scaled-backward"])
def test_all_to_all_functions_train_fused_only_when_exact(ranks, name):
    for rank, result in enumerate(ranks):
        case = result[name]
        untraced = [d for p, ok, d in case["events"] if p == "training" and not ok]
        fused_ffn = [d for p, ok, d in case["events"] if p == "ffn" and ok]
        if name == "adjoint":
            assert not untraced and fused_ffn, case["events"]
        else:
            assert untraced and "custom_function_call" in untraced[0], case["events"]
        assert len(case["compiled"]) == len(case["eager"]) == 6     # y, x and 4 parameters
        for got, want in zip(case["compiled"], case["eager"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m, rank=rank: f"rank {rank}: {m}")
