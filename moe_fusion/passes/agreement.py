"""Rank agreement of the collective rewrites of one graph.

A rewrite that replaces collectives changes what this rank sends and waits for, so the ranks that
exchange with it must make the same rewrite: a rank that fused must never meet one that did not
(a peer that graph-breaks elsewhere, samples a guard differently or fails to trace would otherwise
hang or corrupt the exchange). Every run of the passes on a graph holding collectives over groups
of more than one rank therefore ends with a round of every rank of the job, through the default
process group's store:

1. each rank posts a fingerprint of its graph's collective calls before and after the passes
   (ops and group sizes, rank-independent: every SPMD rank of a block posts the same one; for the
   fused ops also their operands' shapes, which their contracts need equal on every rank);
2. it waits for every other rank's post, at most ``MOE_FUSION_AGREEMENT_TIMEOUT`` seconds (120);
3. it proposes ``fuse`` when all posts equal its own, ``abort`` otherwise or on timeout (a rank
   compiles other graphs, failed before its passes, or had a cache hit);
4. the first proposal written (``compare_set``) is everyone's verdict. A rank that timed out and
   a rank that saw every post thus cannot decide differently: ``fuse`` is only ever written by a
   rank that saw every post equal, its own included, so every rank made the same rewrites.

The round spans the whole job rather than the graph's groups: with overlapping groups (EP x TP)
the union of one rank's groups is not its peers' union, and a verdict per group could not be
withdrawn when another group of one of its ranks aborts. Rounds are numbered in compile order, so
ranks that compile the same graphs in the same order meet in the same round (pipeline stages with
graphs of the same structure agree too); ranks whose graphs differ post different fingerprints, or
none, and abort together. On ``abort`` the caller restores the graph (``snapshot``/``restore``)
and fuses only what is local to the rank.

The FX graph cache would let one rank skip the passes (and its round) while its peer runs them, so
graphs holding such collectives bypass it (``pipeline.MoeFusionGraphPass.uuid``).

A rank can also compile a graph again alone: its input changed shape or failed a guard while its
peers' inputs did not, so they keep running the graph compiled before. When the ranks had fused
that graph's collectives together, its peers are in the fused exchange, and neither of this rank's
outcomes meets them (the unfused graph's collectives would pair with the fused ops' exchange: a
hang, or bytes read as other bytes). Its round then times out without them; when its collectives
are among those of a graph whose rewrites an earlier round here agreed on (the recompiled graph may
be cut differently, e.g. with dynamic sizes), it raises ``GroupPeerError`` saying so instead of
aborting (the round's verdict is written ``abort`` first, so a peer that does compile this graph
later keeps it unfused). A rank ending with that error closes its connections, which ends its
peers' wait in the exchange.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from ..groups import GroupPeerError, registered_group
from .collectives import as_collective

TIMEOUT_ENV = "MOE_FUSION_AGREEMENT_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0
KEY_PREFIX = "moe_fusion/agreement"
FUSE, ABORT = "fuse", "abort"

# Rounds this process has held (the next round's number).
_held = [0]
# The collectives (``_kinds``) of each graph whose collective rewrites a round here agreed on: what
# peers that do not compile a graph again may be running fused.
_fused_kinds: list[collections.Counter] = []
# How ``collective_calls`` names the fused ops (never rewritten by a pass).
FUSED_OPS = "moe_fusion."
# What a rank posts for a graph it could not run the passes on (its peers then abort theirs).
UNFUSABLE = (("moe_fusion: the passes did not run on this graph", ()),)


def _group_names(node: fx.Node) -> tuple[str, ...]:
    """The process groups a call exchanges over: the ``group*`` string arguments of its schema
    (c10d functional collectives, the fused distributed ops), else a registered collective form's
    (torchair's)."""
    if node.op != "call_function":
        return ()
    if isinstance(node.target, torch._ops.OpOverload):
        names = []
        for position, argument in enumerate(node.target._schema.arguments):
            if argument.name.startswith("group") and isinstance(argument.type, torch.StringType):
                value = node.kwargs.get(argument.name, node.args[position] if position < len(node.args) else None)
                if isinstance(value, str) and value:
                    names.append(value)
        if names:
            return tuple(names)
    found = as_collective(node)
    return (found.group_name,) if found is not None else ()


def _size(group_name: str) -> int:
    """Ranks in the named group; 1 when it does not resolve here (a TP group of one rank)."""
    group = registered_group(group_name)
    return 1 if group is None else group.size()


def collective_calls(graph: fx.Graph) -> tuple[tuple, ...]:
    """The calls of ``graph`` over process groups of more than one rank, in graph order, as
    ``(op, group sizes)``: what the ranks of an SPMD job compiling the same graph share. A fused
    op's call also holds its tensor arguments' shapes: its contract needs them equal on every rank
    of its group (dispatch_v2's batch and top-k), where the collectives it replaced took per-rank
    sizes (split sizes read from the data), so ranks with different batches abort together."""
    calls = []
    for node in graph.nodes:
        sizes = tuple(size for size in map(_size, _group_names(node)) if size > 1)
        if sizes:
            fused = isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "moe_fusion"
            shapes = tuple(tuple(map(str, a.meta["val"].shape)) for a in node.args
                           if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)) if fused else ()
            calls.append((str(node.target), sizes, shapes))
    return tuple(calls)


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))


@dataclass(frozen=True)
class Verdict:
    """The round's outcome for this rank: ``fuse`` and, on abort, why (for the report)."""

    fuse: bool
    reason: str = ""


def agree(before: Sequence, after: Sequence) -> Verdict:
    """Hold the round (module docstring): fuse only if every rank of the job made the same
    collective rewrites (``after``, from ``collective_calls``) of the same graph (``before``).
    Raises ``GroupPeerError`` when the round times out on a graph whose collectives are among those
    of a graph an earlier round here fused (module docstring)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    store = dist.distributed_c10d._get_default_store()
    round_key = f"{KEY_PREFIX}/{_held[0]}"
    _held[0] += 1
    mine = hashlib.sha256(repr((tuple(before), tuple(after))).encode()).hexdigest()
    store.set(f"{round_key}/{rank}", mine)
    peers = [peer for peer in range(world) if peer != rank]
    absent: list[int] = []
    try:
        store.wait([f"{round_key}/{peer}" for peer in peers], timeout())
        differing = [peer for peer in peers if store.get(f"{round_key}/{peer}").decode() != mine]
        why = (f"ranks {differing} of {world} made other collective rewrites of their graph (or compiled "
               "another graph here)") if differing else ""
    except dist.DistStoreError:    # the store's wait timed out
        absent = [peer for peer in peers if not store.check([f"{round_key}/{peer}"])]
        why = (f"ranks {absent} of {world} did not reach this graph's agreement round within "
               f"{timeout().total_seconds():g} s (they compile other graphs, or failed before fusing; "
               f"{TIMEOUT_ENV} sets the wait)")
    verdict = store.compare_set(f"{round_key}/verdict", "", ABORT if why else FUSE).decode()
    kinds = _kinds(before)
    if absent and verdict == ABORT and kinds and any(not kinds - fused for fused in _fused_kinds):
        raise GroupPeerError(
            f"moe_fusion: rank {rank} compiled a graph again alone (its inputs changed shape or failed a "
            f"guard while those of ranks {absent} of {world} did not) after the ranks had fused it together: "
            "they run the fused exchange, which neither this graph's fused nor its unfused form would meet. "
            "Give every rank inputs of the same shapes (pad a short last batch), or compile with the "
            "varying sizes dynamic from the first call (torch._dynamo.mark_dynamic, dynamic=True), so "
            "that no rank recompiles alone")
    if verdict == FUSE:
        if tuple(after) != tuple(before):
            _fused_kinds.append(kinds)
        return Verdict(True)
    return Verdict(False, why or "another rank did not see every rank make the same rewrites")


def _kinds(calls: Sequence) -> collections.Counter:
    """The collectives of ``collective_calls`` as a multiset of (op, group sizes), the op named as in
    any graph that holds it (dynamo's packet or ATen's overload, the autograd variant or not)."""
    def kind(op: str) -> str:
        op = op.replace("_c10d_functional_autograd.", "_c10d_functional.")
        return op[:-len(".default")] if op.endswith(".default") else op
    return collections.Counter((kind(call[0]), call[1]) for call in calls)


def rounds_held() -> int:
    """How many rounds this process has held: a caller that failed can tell whether it still owes
    its peers the round of the graph (``agree(calls, UNFUSABLE)``)."""
    return _held[0]


def snapshot(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` (nodes and their meta) to ``restore`` it from."""
    copy = fx.Graph(owning_module=graph.owning_module)
    _copy_into(copy, graph, {})
    return copy


def restore(graph: fx.Graph, saved: fx.Graph) -> None:
    """Make ``graph`` compute ``saved`` again, in place (the compiler holds ``graph`` and its
    placeholders): every other node is erased and ``saved``'s are copied in."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in reversed([n for n in graph.nodes if n.op != "placeholder"]):
        graph.erase_node(node)
    saved_placeholders = [n for n in saved.nodes if n.op == "placeholder"]
    assert len(saved_placeholders) == len(placeholders), "a pass added or removed a graph input"
    _copy_into(graph, saved, dict(zip(saved_placeholders, placeholders)))


def _copy_into(graph: fx.Graph, source: fx.Graph, copied: dict[fx.Node, fx.Node]) -> None:
    """Append ``source``'s nodes not in ``copied`` to ``graph``, its output's meta included
    (inductor keeps output strides and visible outputs there)."""
    value, output = graph.graph_copy(source, copied, return_output_node=True)
    graph.output(value).meta.update(output.meta)


def passes_exchange(graph: Optional[fx.Graph]) -> bool:
    """In a multi-rank process, ``graph`` (None: not known) may hold collective rewrites: a collective
    other than the fused ops, which no pass rewrites (a graph holding only those, called by hand or
    by a module route, has nothing to agree on, and a rank compiling it again alone waits for no one)."""
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return False
    if dist.get_backend() == "fake":     # a compile-only job (FakeProcessGroup): no peer runs it
        return False
    return graph is None or any(not op.startswith(FUSED_OPS) for op, *_ in collective_calls(graph))
