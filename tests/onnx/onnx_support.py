"""Helpers of the ONNX tests: export one function of tensors, read its custom nodes, run it in
onnxruntime (function bodies) or the reference evaluator (reference kernels), compare with eager."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from moe_fusion.onnx import DOMAIN, attach_functions, reference_evaluator, translation_table
from moe_fusion.onnx._dtypes import numpy_to_torch, torch_to_numpy


class Fn(torch.nn.Module):
    """A module whose forward is ``fn(*tensors)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)


def export_fn(fn: Callable[..., Any], args: Sequence[torch.Tensor], *, dynamic_shapes: Any = None,
              functions: bool = True) -> onnx.ModelProto:
    """``torch.onnx.export(dynamo=True)`` of ``fn`` with the translation table, bodies attached."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Fn(fn), tuple(args), dynamo=True, custom_translation_table=translation_table(),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    model = program.model_proto
    if functions:
        attach_functions(model)
    return model


def custom_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == DOMAIN]


def node_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def feeds(model: onnx.ModelProto, args: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: torch_to_numpy(a) for i, a in zip(model.graph.input, args)}


def run_ort(model: onnx.ModelProto, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, feeds(model, args))]


def run_reference(model: onnx.ModelProto, args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [numpy_to_torch(np.asarray(o)) for o in reference_evaluator(model).run(None, feeds(model, args))]


def eager(fn: Callable[..., Any], args: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = fn(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_outputs(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], atol: float = 1e-5,
                   rtol: float = 1e-5) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and tuple(a.shape) == tuple(e.shape), (a.dtype, e.dtype, a.shape, e.shape)
        if e.dtype.is_floating_point:
            torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol)
        else:
            assert torch.equal(a, e)


class Mlp(torch.nn.Module):
    """``linear -> relu -> linear``, written unfused: the FFN pass makes one ``npu_ffn`` of it."""

    def __init__(self, hidden: int = 8, inner: int = 16) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def mlp_factory() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """``(model, inputs)`` for ``python -m moe_fusion export onnx_support:mlp_factory out.onnx``."""
    torch.manual_seed(0)
    return Mlp().eval(), (torch.randn(6, 8),)
