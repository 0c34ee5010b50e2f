"""One step of a model, eager or compiled, as the tensors a test compares."""
from __future__ import annotations

from typing import Any, Callable

import torch


def named_step_results(model: torch.nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor,
                       train: bool) -> dict[str, torch.Tensor]:
    """``{"out": y}`` of ``run(x)`` (its first output when it returns a tuple), and with ``train``
    also ``"x"``: the gradient of ``x``, and the gradient of every parameter of ``model`` that gets
    one under its name, from the fixed loss ``sum(y * linspace(-1, 1))``; the parameters' gradients
    are cleared afterwards."""
    leaf = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = run(leaf)
        y = out[0] if isinstance(out, tuple) else out
        if not train:
            return {"out": y.detach()}
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    grads = {"out": y.detach(), "x": leaf.grad}
    grads.update({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    return grads


def step_results(model: torch.nn.Module, run: Callable[[torch.Tensor], Any], x: torch.Tensor,
                 train: bool) -> list[torch.Tensor]:
    """``named_step_results`` as a list: ``[y]``, and with ``train`` ``[y, x.grad, *parameter grads]``."""
    return list(named_step_results(model, run, x, train).values())
