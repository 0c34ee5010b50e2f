"""The pass protocol (``Refusal``, ``Match``) and what a pass run records: fused matches, refused
candidates with their reasons, op counts.

Every pattern module has ``find_<pattern>(graph, ctx) -> list[Match]``: candidates whose guards
passed (a guard raises ``Refusal``; ``attempt`` records the reason in ``ctx``). The pipeline then
calls ``match.replace_with(graph)``, which inserts the fused op and routes the replaced values'
uses to it (or raises ``Refusal`` with the graph unchanged when the compile target's op rejects
the call), and ``match.erase()``, which erases what became dead, collectives included.

Refusals are logged on the ``moe_fusion.passes`` logger at DEBUG, one line each; enable with
``TORCH_LOGS="+moe_fusion"`` (or plain ``logging``).
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Optional, Protocol, TypeVar

import torch
import torch.fx as fx

log = logging.getLogger("moe_fusion.passes")
try:  # TORCH_LOGS="+moe_fusion" turns the log on, like inductor's own artifacts
    from torch._logging._internal import register_log

    register_log("moe_fusion", "moe_fusion")
except ImportError:  # older torch: plain logging still works
    pass


class Refusal(Exception):
    """A candidate that looks like a pattern but must not be rewritten; the message says why
    (it goes to the report)."""


# Set while fusing a graph AOT autograd will differentiate (``pipeline.fuse_before_autograd``):
# fused op -> why its backward cannot run under the compiling backend (None: it can).
TrainingCheck = Callable[[Any], Optional[str]]
_training_check: contextvars.ContextVar[Optional[TrainingCheck]] = contextvars.ContextVar(
    "moe_fusion_training_check", default=None)


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, value: Any) -> Iterator[None]:
    """``var`` holds ``value`` inside the block, and what it held before after it."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def training(check: TrainingCheck) -> ContextManager[None]:
    """Inside the block, a rewrite that inserts an op ``check`` objects to is refused with its reason."""
    return scoped(_training_check, check)


def fusing_for_training() -> bool:
    """The graph being fused will be differentiated (inside ``training``)."""
    return _training_check.get() is not None


def untrainable(op: Any) -> Optional[str]:
    """Why the graph being fused cannot be trained with ``op`` in it, or None (also outside training)."""
    check = _training_check.get()
    return None if check is None else check(op)


class Match(Protocol):
    """A candidate a pass found and may rewrite."""

    @property
    def anchor(self) -> fx.Node:
        """The node the report names for this match."""

    @property
    def nodes(self) -> frozenset[fx.Node]:
        """Every node the rewrite replaces (two matches sharing one cannot both be fused)."""

    def describe(self) -> str:
        """What the match fuses into, for the report."""

    def replace_with(self, graph: fx.Graph) -> fx.Node:
        """Insert the fused op(s), route every outside use of a replaced value to them and
        return the fused node; raise ``Refusal`` (graph unchanged) when the op rejects the call."""

    def erase(self) -> None:
        """Erase the replaced nodes that have no users left."""


Found = TypeVar("Found")


# Node meta key set on every node the lowering inserted (``lowering``): a fused op's own ATen code.
LOWERED = "moe_fusion_lowered"


def lowered(node: fx.Node) -> bool:
    """``node`` is part of a fused op's lowering, not of the user's code: passes leave it alone (the
    post-grad pass runs again on the forward and backward graphs of a training step lowered on its
    joint graph, where re-matching that code would only refuse it)."""
    return bool(node.meta.get(LOWERED))


def attempt(ctx: Optional["PassContext"], pattern: str, anchor: fx.Node, match: Callable[[], Found]) -> Optional[Found]:
    """``match()``, or None when it raises ``Refusal`` (recorded in ``ctx`` when there is one) or
    when ``anchor`` is lowered code."""
    if lowered(anchor):
        return None
    try:
        return match()
    except Refusal as refusal:
        if ctx is not None:
            ctx.refuse(pattern, anchor, str(refusal))
        return None


@dataclass(frozen=True)
class FusionEvent:
    pattern: str
    fused: bool
    where: str          # the anchor node's name in the graph
    detail: str         # what was fused into, or why it was refused


def count_ops(graph: fx.Graph) -> collections.Counter:
    """Calls per target name (``aten.bmm.default``, ``moe_fusion.npu_ffn.default``, ...)."""
    counts: collections.Counter = collections.Counter()
    for node in graph.nodes:
        if node.op == "call_function":
            counts[_target_name(node.target)] += 1
    return counts


def _target_name(target: object) -> str:
    """``aten.mm.default`` for ops (their ``__name__`` drops the namespace), ``getitem`` for
    Python callables."""
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


@dataclass
class FusionReport:
    """Accumulates over every graph a backend compiles."""

    events: list[FusionEvent] = field(default_factory=list)
    ops_before: collections.Counter = field(default_factory=collections.Counter)
    ops_after: collections.Counter = field(default_factory=collections.Counter)

    def fused(self, pattern: Optional[str] = None) -> list[FusionEvent]:
        return [e for e in self.events if e.fused and pattern in (None, e.pattern)]

    def refused(self, pattern: Optional[str] = None) -> list[FusionEvent]:
        return [e for e in self.events if not e.fused and pattern in (None, e.pattern)]

    def format(self) -> str:
        lines = ["moe_fusion report", "  matches:"]
        lines += [f"    FUSED   {e.pattern:28s} at {e.where}: {e.detail}" for e in self.fused()] or ["    (none fused)"]
        lines += [f"    REFUSED {e.pattern:28s} at {e.where}: {e.detail}" for e in self.refused()]
        changed = sorted(k for k in set(self.ops_before) | set(self.ops_after) if self.ops_before[k] != self.ops_after[k])
        lines.append("  op counts (before -> after), ops that changed:")
        lines += [f"    {k:60s} {self.ops_before[k]:4d} -> {self.ops_after[k]:4d}" for k in changed] or ["    (no change)"]
        return "\n".join(lines)


@dataclass
class PassContext:
    """Handed to every pass: the target whose limits apply, and the report to write to."""

    target: str
    report: FusionReport

    def record_fused(self, pattern: str, anchor: fx.Node, detail: str) -> None:
        self.report.events.append(FusionEvent(pattern, True, anchor.name, detail))
        log.info("moe_fusion: fused %s at %s: %s", pattern, anchor.name, detail)

    def refuse(self, pattern: str, anchor: fx.Node, reason: str) -> None:
        self.report.events.append(FusionEvent(pattern, False, anchor.name, reason))
        log.debug("moe_fusion: refused %s at %s: %s", pattern, anchor.name, reason)
