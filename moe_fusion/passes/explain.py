"""``moe_fusion.explain(model, *inputs)``: which patterns fused, which were refused and why."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .context import FusionReport
from .entry import compile


def explain(model: Any, *inputs: Any, target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
            print_report: bool = True, grad: bool = False, compiler: str = "eager",
            cost_gate: bool = True) -> FusionReport:
    """Compile ``model`` as ``moe_fusion.compile`` does (its module routes and dynamo settings), run
    it on ``inputs``, and return (and print) the report. Models with collectives need their process
    groups. When a module route applies, the model runs twice: its first call runs eagerly while the
    route is checked, the second compiles.

    By default the model runs as inference (``torch.no_grad``); ``grad=True`` runs it with grad
    mode on and reports on the training graph (fused before AOT autograd when an input or a
    parameter requires grad; see ``pipeline``). ``compiler="eager"`` (the default) generates no
    code and never applies the cost gate; ``compiler="inductor"`` reports what the default
    ``moe_fusion.compile`` does, the cost gate's refusals included."""
    report = FusionReport()
    compiled = compile(model, target=target, report=report, passes=passes, compiler=compiler, cost_gate=cost_gate,
                       dynamic=False)
    with torch.set_grad_enabled(grad):
        compiled(*inputs)
        if not report.ops_before:       # nothing compiled yet: the first call checked a module route
            compiled(*inputs)
    if print_report:
        print(report.format())
    return report
