"""NPU dispatch: with torch_npu importable, the ops torch_npu ships run torch_npu's kernels on
``PrivateUse1`` tensors, with every argument forwarded; without torch_npu nothing is registered.
No NPU here: a fake ``torch_npu`` module records the calls (and answers with the reference
kernel), and the ``PrivateUse1`` kernel is reached with ``OpOverload.redispatch``."""
from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

from moe_fusion.ge_plugin import npu_dispatch
from moe_fusion.op_protos import PROTOS

PRIVATEUSE1 = torch._C.DispatchKeySet(torch._C.DispatchKey.PrivateUse1)


def _has_npu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"moe_fusion::{name}", "PrivateUse1")


@pytest.fixture
def fake_torch_npu(monkeypatch):
    """A ``torch_npu`` module in ``sys.modules`` whose ``npu_*`` functions record their calls."""
    calls = []
    module = types.ModuleType("torch_npu")
    for name in npu_dispatch.NPU_OPS:
        def record(*args, _name=name, **kwargs):
            calls.append((_name, args, kwargs))
            return getattr(torch.ops.moe_fusion, _name).default(*args, **kwargs)

        setattr(module, name, record)
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    yield calls
    npu_dispatch.unregister_npu_dispatch()


def test_no_op_without_torch_npu(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert npu_dispatch.register_npu_dispatch() is False
    assert not any(_has_npu_kernel(name) for name in PROTOS)


def test_registers_the_ops_torch_npu_ships(fake_torch_npu):
    assert npu_dispatch.register_npu_dispatch() and npu_dispatch.register_npu_dispatch()  # idempotent
    assert {name for name in PROTOS if _has_npu_kernel(name)} == set(PROTOS) & npu_dispatch.TORCH_NPU_OPS
    assert {"npu_alltoall_allgather_bmm", "npu_bmm_reducescatter_alltoall"}.isdisjoint(npu_dispatch.TORCH_NPU_OPS)
    npu_dispatch.unregister_npu_dispatch()
    assert not any(_has_npu_kernel(name) for name in PROTOS)


def _with_defaults(name: str, args: tuple, kwargs: dict) -> dict:
    schema = getattr(torch.ops.moe_fusion, name).default._schema
    given = {a.name: v for a, v in zip(schema.arguments, args)} | kwargs
    return {a.name: given.get(a.name, a.default_value) for a in schema.arguments}


@pytest.mark.parametrize("name", npu_dispatch.NPU_OPS)
def test_forwards_every_argument(fake_torch_npu, name):
    npu_dispatch.register_npu_dispatch()
    args, kwargs = importlib.import_module(f"cases.{name}").opcheck_cases()[-1]
    op = getattr(torch.ops.moe_fusion, name).default
    out = op.redispatch(PRIVATEUSE1, *args, **kwargs)
    [(called, fwd_args, fwd_kwargs)] = fake_torch_npu
    assert called == name
    forwarded, expected = _with_defaults(name, fwd_args, fwd_kwargs), _with_defaults(name, args, kwargs)
    assert forwarded.keys() == expected.keys()
    for arg, value in expected.items():  # the same tensor objects, the same values
        assert forwarded[arg] is value if isinstance(value, torch.Tensor) else forwarded[arg] == value, arg
    reference = op(*args, **kwargs)
    for got, want in zip(out if isinstance(out, tuple) else (out,), reference if isinstance(reference, tuple)
                         else (reference,)):
        assert got.shape == want.shape and got.dtype == want.dtype
