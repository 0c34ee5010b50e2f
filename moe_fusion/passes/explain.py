"""``moe_fusion.explain(model, *inputs)``: which patterns fused, which were refused and why."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .context import FusionReport
from .pipeline import backend


def explain(model: Any, *inputs: Any, target: Optional[str] = None, passes: Optional[Sequence[str]] = None,
            print_report: bool = True, grad: bool = False) -> FusionReport:
    """Compile ``model`` with the fusion passes (no code generation), run it once on ``inputs``,
    and return (and print) the report. Models with collectives need their process groups.

    By default the model runs as inference (``torch.no_grad``); ``grad=True`` runs it with grad
    mode on and reports on the training graph (fused before AOT autograd when an input or a
    parameter requires grad; see ``pipeline``)."""
    report = FusionReport()
    compiled = torch.compile(model, backend=backend(target, passes, report, compiler="eager"), dynamic=False)
    with torch.set_grad_enabled(grad):
        compiled(*inputs)
    if print_report:
        print(report.format())
    return report
