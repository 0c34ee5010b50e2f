"""The operator prototype record and the small vocabulary validators are written in.

An ``OpProto`` is the single source of truth for one operator: its torch schema (torch_npu's),
its GE prototype (input/attr/output names, kinds, dtypes and defaults in GE order), and pure
functions over the op's own arguments, run once per call:

* ``validate(*args, **kwargs) -> Config``: structural rules (ranks, dtypes, shapes, attrs) for the
  current target. Works on real, fake and meta tensors and on SymInts, so eager and trace time
  raise the same error. Returns the op's config: a small frozen dataclass holding what the call
  means (derived sizes, modes, resolved attrs).
* ``infer_shape(config) -> tuple[OutSpec, ...]``: every output's shape and dtype, from the config.

The fake kernel is ``infer_shape(check(...))``; the eager kernel is ``check`` then the reference
kernel, which receives the config as its first argument. Rules that need tensor *contents*
(counts, ids) are functions of the proto modules too (``validate_values``, and the dispatch/combine
pair's ``validate_id_values``/``validate_mask_values``); only the eager kernels can run them, and
they do, once, where the values are at hand: dispatch and combine inside their count exchange, so
that every rank learns every rank's verdict (a rank raising alone before a collective would leave
its peers waiting), update_expert sharing its reads with the mapping.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true

from ..errors import fail
from ..targets import get_target

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True)
class GeInput:
    """One GE input. ``kind`` is ``"required"``, ``"optional"`` or ``"dynamic"``."""

    name: str
    dtypes: tuple[str, ...]
    kind: str = "required"


@dataclass(frozen=True)
class GeAttr:
    """One GE attr. ``type`` is a GE attr type name (``Int``, ``Float``, ``Str``, ``Bool``,
    ``ListInt``); ``default`` is ``None`` for a required attr."""

    name: str
    type: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class GeOutput:
    name: str
    dtypes: tuple[str, ...]


@dataclass(frozen=True)
class OutSpec:
    """Shape and dtype of one output, as ``infer_shape`` returns them."""

    shape: tuple
    dtype: torch.dtype


@dataclass(frozen=True)
class OpProto(Generic[ConfigT]):
    """Everything known about one operator, independent of any kernel or backend.

    ``ConfigT`` is the type ``validate`` returns and ``infer_shape`` and the kernel take.
    """

    name: str
    schema: str
    ge_type: str
    ge_inputs: tuple[GeInput, ...]
    ge_attrs: tuple[GeAttr, ...]
    ge_outputs: tuple[GeOutput, ...]
    validate: Callable[..., ConfigT]
    infer_shape: Callable[[ConfigT], tuple[OutSpec, ...]]
    targets: frozenset[str] = field(default_factory=lambda: frozenset({"portable", "A2", "A3"}))
    communicates: bool = False

    @property
    def qualname(self) -> str:
        return f"moe_fusion::{self.name}"

    @cached_property
    def arguments(self) -> tuple[torch.Argument, ...]:
        """The schema's arguments, parsed once per op."""
        return tuple(torch._C.parse_schema(f"{self.qualname}{self.schema}").arguments)

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Every argument of a call by name, in schema order, defaults filled in."""
        arguments = self.arguments
        names = [a.name for a in arguments]
        unknown = sorted(set(kwargs) - set(names))
        if len(args) > len(names) or unknown:
            raise TypeError(f"{self.name}: unexpected arguments {unknown or list(args[len(names):])}")
        bound: dict[str, Any] = {}
        for i, arg in enumerate(arguments):
            if i < len(args):
                bound[arg.name] = args[i]
            elif arg.name in kwargs:
                bound[arg.name] = kwargs[arg.name]
            elif arg.has_default_value():
                bound[arg.name] = arg.default_value
            else:
                raise TypeError(f"{self.name}: missing argument {arg.name!r}")
        return bound

    def check(self, *args: Any, **kwargs: Any) -> ConfigT:
        """Target support + structural rules, once per call: what both the fake and the eager
        kernel run first. Returns the op's config."""
        require_target(self.name, self.targets, get_target())
        return self.validate(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Validation vocabulary. Each helper raises OpValidationError("<op>: <arg> <rule>, got <seen>").
# ---------------------------------------------------------------------------------------------

# Largest int32: the device stores ids, row counts and row indices as int32, so every bound that keeps
# an index or a count inside int32 is written against it.
INT32_MAX = 2**31 - 1

# Float dtypes only the portable target accepts for an op's float tensors: fp32, and fp64 (what
# gradient checks need; the kernels then compute in fp64).
PORTABLE_FLOATS = (torch.float32, torch.float64)


def float_bias_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The bias dtype of float-mode x: fp16 for fp16, fp64 for fp64 (portable), fp32 otherwise."""
    return x_dtype if x_dtype in (torch.float16, torch.float64) else torch.float32


_DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32", torch.int64: "int64",
    torch.bool: "bool", torch.uint64: "uint64", torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_of(t: torch.Tensor) -> tuple:
    """Shape as a tuple for messages."""
    return tuple(t.shape)


def require(cond: Any, op: str, arg: str, rule: str, seen: Any) -> None:
    """Fail unless ``cond`` holds. ``cond`` may be a SymBool: it is then guarded on, except when it
    depends on sizes read from the data (unbacked) and the trace cannot decide it; the op's kernel
    checks it again on the real tensors when it runs."""
    if not guard_or_true(cond):
        fail(op, arg, rule, seen)


def require_dim(op: str, arg: str, t: torch.Tensor, dims: Sequence[int]) -> None:
    if t.dim() not in dims:
        if isinstance(dims, range):
            rule = f"must be {dims.start}-D to {dims.stop - 1}-D"
        else:
            rule = f"must be {'-D or '.join(map(str, dims))}-D"
        fail(op, arg, rule, f"shape {shape_of(t)}")


def require_dtype(op: str, arg: str, t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> None:
    if t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        fail(op, arg, f"dtype must be one of ({names})", dtype_name(t.dtype))


def require_shape(op: str, arg: str, t: torch.Tensor, shape: Sequence[Any]) -> None:
    if tuple(t.shape) != tuple(shape):
        fail(op, arg, f"must have shape {tuple(shape)}", f"shape {shape_of(t)}")


def require_same_dtype(op: str, arg: str, t: torch.Tensor, like_arg: str, like: torch.Tensor) -> None:
    """``t`` has the dtype of the argument ``like_arg`` (the tensor ``like``)."""
    if t.dtype != like.dtype:
        fail(op, arg, f"dtype must equal {like_arg}'s ({dtype_name(like.dtype)})", dtype_name(t.dtype))


def require_in(op: str, arg: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        fail(op, arg, f"must be one of {tuple(allowed)}", value)


def require_range(op: str, arg: str, value: Any, lo: Any, hi: Any) -> None:
    """``lo <= value <= hi`` (inclusive)."""
    if not (lo <= value <= hi):
        fail(op, arg, f"must be in [{lo}, {hi}]", value)


def require_target(op: str, supported: frozenset[str], current: str) -> None:
    if current not in supported:
        fail(op, "target", f"must be one of {tuple(sorted(supported))} (the op does not exist on {current})", current)
