"""What the expert-parallel library tests share: cases run on real gloo ranks, grouped by world
size, and the checks of a case's fused block and its step results against eager."""
from __future__ import annotations

from typing import Any, Callable

import torch

from moe_fusion.launch import run_ranks
from step_results import step_results

DISPATCH = "moe_fusion.npu_moe_distribute_dispatch_v2.default"
COMBINE = "moe_fusion.npu_moe_distribute_combine_v2.default"


class ExpertMlp(torch.nn.Module):
    """An expert as the libraries take it (one module, copied per local expert): Linear -> ReLU -> Linear."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def eager_and_fused(layer: torch.nn.Module, x: torch.Tensor, train: bool, compiler: str,
                    **options: Any) -> dict[str, Any]:
    """One step of ``layer`` eagerly and under ``moe_fusion.compile`` (with ``options``) from the same
    random stream (the gates draw noise): ``step_results`` of each (as fp32), the report's events
    and its ops after."""
    run = steps_over_token_counts(layer, [x], train, compiler, **options)
    (eager, fused), = run["steps"]
    return {"eager": eager, "fused": fused, "ops": run["ops"], "events": run["events"]}


def steps_over_token_counts(layer: torch.nn.Module, xs: list[torch.Tensor], train: bool, compiler: str,
                            **options: Any) -> dict[str, Any]:
    """A step of ``layer`` on each of ``xs`` (token counts that change between calls, the same on
    every rank), eagerly and through one ``moe_fusion.compile`` of it (with ``options``), each from
    the same random stream: ``{"steps": [(eager, fused) step_results as fp32], "events": ...,
    "ops": the report's ops after}``."""
    import moe_fusion
    from moe_fusion.passes import FusionReport

    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(layer, report=report, compiler=compiler, **options)
    steps = []
    for x in xs:
        torch.manual_seed(7)
        eager = step_results(layer, layer, x, train)
        torch.manual_seed(7)
        fused = step_results(layer, compiled, x, train)
        steps.append(([t.float() for t in eager], [t.float() for t in fused]))
    return {"steps": steps, "ops": dict(report.ops_after),
            "events": [(e.pattern, e.fused, e.detail) for e in report.events]}


def run_by_world(cases: dict[str, tuple], fn: Callable[..., Any], timeout: float = 600) -> dict[int, list]:
    """``{world: run_ranks(world, fn, names)}`` for the cases (``(world, ...)`` each) of each world size."""
    by_world: dict[int, list[str]] = {}
    for name, (world, *_) in cases.items():
        by_world.setdefault(world, []).append(name)
    return {world: run_ranks(world, fn, names, timeout=timeout) for world, names in by_world.items()}


def assert_block_fused(case: dict[str, Any], rank: int, k: int, train: bool) -> None:
    """One ``moe_capacity_a2a`` fusion with K routes per token and the keep mask; dispatch/combine
    in the graphs and no all-to-all left (a training step's report counts the graph before autograd
    and AOT's forward and backward: at least one call each there)."""
    fused = [d for p, ok, d in case["events"] if p == "moe_capacity_a2a" and ok]
    assert len(fused) == 1 and f"K={k}" in fused[0] and "x_active_mask" in fused[0], (rank, case["events"])
    ops = case["ops"]
    calls = [ops.get(DISPATCH, 0), ops.get(COMBINE, 0)]
    assert (min(calls) >= 1 if train else calls == [1, 1]) and not any("all_to_all" in k for k in ops), \
        {k: v for k, v in ops.items() if "moe_fusion" in k or "c10d" in k}


def assert_steps_equal(fused: list[torch.Tensor], eager: list[torch.Tensor], rank: int, train: bool,
                       **tolerance: float) -> None:
    """The step's tensors (``step_results``: output, then with ``train`` the input and parameter
    gradients) equal eager's within ``tolerance``."""
    assert len(fused) == len(eager) and (not train or len(eager) > 8)
    for i, (got, want) in enumerate(zip(fused, eager)):
        torch.testing.assert_close(got, want, **tolerance, msg=lambda m, i=i: f"rank {rank} tensor {i}: {m}")
