"""A pure-Python stand-in for torchair's native module ``torchair.core._torchair``.

torchair's Python layer needs seven things from its native module to build GE graphs; this
module provides them without CANN:

* ``TorchNpuGraphBase``: the GE graph handle. Construction works; ``load``/``compile``/``run``
  raise ``GeRuntimeUnavailable`` (there is no GE to hand a graph to). torchair dumps the graph
  (``debug.graph_dump``) before it loads it, so the dump is complete when ``load`` raises.
* ``TorchDataType``: the dtype enum of the native llm_datadist bindings (values of ``ge::DataType``).
* ``get_registered_ir_def(op_type)``: the GE IR registry, served from ``moe_fusion.ge_plugin.ir``
  (the ops of this package; ``("ERROR", [], [], [])`` for any other type).
* ``check_cann_compat(...)``: ``""`` (every optional input/attr is supported).
* ``InitializeGraphEngine``, ``FinalizeGraphEngine``, ``SetDebugLogPath``: no-ops.
"""
from __future__ import annotations

import enum
from types import ModuleType
from typing import Any, NoReturn

from .ir import registered_ir_def

MODULE_NAME = "torchair.core._torchair"


class GeRuntimeUnavailable(RuntimeError):
    """Raised by every GE runtime entry point of the stub."""


class TorchNpuGraphBase:
    """GE graph handle whose runtime half does not exist here."""

    def __init__(self, name: str = "") -> None:
        self.name = name

    def _unavailable(self, what: str) -> NoReturn:
        raise GeRuntimeUnavailable(f"torchair stub: cannot {what} GE graph {self.name!r} without CANN "
                                   "(the GE graph was built and dumped; nothing can run it here)")

    def load(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._unavailable("load")

    def compile(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._unavailable("compile")

    def run(self, *args: Any, **kwargs: Any) -> NoReturn:
        self._unavailable("run")


class TorchDataType(enum.IntEnum):
    """``ge::DataType`` values of the dtypes torchair's llm_datadist maps torch dtypes to."""

    FLOAT32 = 0
    FLOAT16 = 1
    INT8 = 2
    INT32 = 3
    UINT8 = 4
    INT16 = 6
    UINT16 = 7
    UINT32 = 8
    INT64 = 9
    UINT64 = 10
    FLOAT64 = 11
    BOOL = 12
    COMPLEX64 = 16
    COMPLEX128 = 17
    BF16 = 27


def check_cann_compat(op_type: str, runtime_optional_inputs: tuple, runtime_optional_attrs: tuple) -> str:
    """Every optional input and attr is supported: no error message."""
    return ""


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def make_module() -> ModuleType:
    """A fresh module object to put at ``sys.modules["torchair.core._torchair"]``."""
    module = ModuleType(MODULE_NAME, __doc__)
    module.TorchNpuGraphBase = TorchNpuGraphBase
    module.TorchDataType = TorchDataType
    module.get_registered_ir_def = registered_ir_def
    module.check_cann_compat = check_cann_compat
    module.InitializeGraphEngine = _no_op
    module.FinalizeGraphEngine = _no_op
    module.SetDebugLogPath = _no_op
    module.IS_MOE_FUSION_STUB = True
    return module
