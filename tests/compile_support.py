"""Calling an op under ``torch.compile(fullgraph=True)``, every tensor argument a graph input."""
from __future__ import annotations

from typing import Any, Callable

import torch


def compiled(fn: Callable[..., Any], *, dynamic: bool = False, backend: str = "aot_eager") -> Callable[..., Any]:
    torch._dynamo.reset()  # a fresh cache per case: callers share one code object
    return torch.compile(fn, fullgraph=True, dynamic=dynamic, backend=backend)


def call_compiled(op: Callable[..., Any], call: tuple[tuple, dict], *, dynamic: bool = False,
                  backend: str = "aot_eager") -> Any:
    """Run ``op(*args, **kwargs)`` compiled, passing every tensor as a graph input."""
    args, kwargs = call
    tensor_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    attrs = {k: v for k, v in kwargs.items() if k not in tensor_names}

    def fn(*tensors):
        return op(*tensors[:len(args)], **dict(zip(tensor_names, tensors[len(args):])), **attrs)

    return compiled(fn, dynamic=dynamic, backend=backend)(*args, *(kwargs[k] for k in tensor_names))
