"""Recognize the collective forms of torchair graphs (``torch.ops.npu_define.*``) as ``Collective``s.

By the time torchair runs ``CompilerConfig.post_grad_custom_pre_pass``, its AOT decompositions
have rewritten some collectives into its own ``npu_define`` ops, which carry a ``(tag, ranks,
group_size)`` triple instead of a group name and element counts instead of row splits:

* ``_c10d_functional.all_to_all_single`` (what ``dist.all_to_all_single`` and the functional
  collective trace to) becomes ``npu_define.all_to_all_single_npu(input, send_counts,
  send_displacements, recv_counts, recv_displacements, tag, ranks, group_size)``, still followed
  by ``_c10d_functional.wait_tensor``; the list form ``dist.all_to_all`` traces to it directly.
* ``dist.all_gather_into_tensor`` patched by ``torchair.patch_for_hcom()`` traces to
  ``npu_define._allgather_in_tensor_shape(input, output_shape, tag, ranks, group_size)``;
  ``dist.all_gather`` (list form, equal sizes) decomposes to
  ``npu_define.allgather_in_tensor(out, input, tag, ranks, group_size)`` (``out`` only gives the shape).
* torch_npu's ``all_gather_into_tensor_uneven`` / ``reduce_scatter_tensor_uneven`` trace to
  ``npu_define.allgather_in_tensor_uneven`` / ``npu_define.reduce_scatter_tensor_uneven``; they are
  the plain collectives when every rank's rows are equal.

``all_gather_into_tensor`` and ``reduce_scatter_tensor`` keep their ``_c10d_functional`` form
(``collectives.py``). Matching is by the op's qualified name, so this module imports without
torchair; importing it adds the recognizers to ``collectives.RECOGNIZERS`` (once). Forms with
symbolic sizes or counts are not recognized (the patterns need static shapes).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import torch.fx as fx

from ._layout import static_shape
from .collectives import RECOGNIZERS, Collective, waited_by

log = logging.getLogger(__name__)

ALL_TO_ALL = "npu_define.all_to_all_single_npu.default"
ALL_GATHER_SHAPE = "npu_define._allgather_in_tensor_shape.default"
ALL_GATHER_OUT = "npu_define.allgather_in_tensor.default"
ALL_GATHER_UNEVEN = "npu_define.allgather_in_tensor_uneven.default"
REDUCE_SCATTER_UNEVEN = "npu_define.reduce_scatter_tensor_uneven.default"


def _arguments(node: fx.Node, qualified_name: str) -> Optional[dict[str, Any]]:
    """The node's arguments by schema name when it calls ``qualified_name``, else None."""
    if node.op != "call_function" or str(node.target) != qualified_name:
        return None
    names = [a.name for a in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def group_name_of(tag: str, ranks: Sequence[int]) -> Optional[str]:
    """The c10d name of the process group torchair designates by ``(tag, ranks)`` (the names the
    ``_c10d_functional`` forms carry), None when this process has no such group."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _find_pg_by_ranks_and_tag

    group = _find_pg_by_ranks_and_tag(tag, list(ranks))
    if group is None:
        log.debug("torchair collective on tag %r ranks %s: no such process group here", tag, list(ranks))
        return None
    return group.group_name


def _static(values: Sequence[Any]) -> Optional[tuple[int, ...]]:
    """``values`` when they are all ints (symbolic sizes are graph nodes here), else None."""
    return tuple(values) if all(isinstance(v, int) for v in values) else None


def _rows(counts: tuple[int, ...], row_numel: int) -> Optional[tuple[int, ...]]:
    """Element counts as dim-0 row counts; None when a count is not whole rows."""
    if row_numel == 0 or any(c % row_numel for c in counts):
        return None
    return tuple(c // row_numel for c in counts)


def _packed(counts: tuple[int, ...], displacements: Sequence[Any]) -> bool:
    """Chunks laid end to end, in rank order (the only layout a row-split collective has)."""
    return list(displacements) == [sum(counts[:i]) for i in range(len(counts))]


def _all_to_all(node: fx.Node) -> Optional[Collective]:
    a = _arguments(node, ALL_TO_ALL)
    shape = None if a is None else static_shape(a["input"])
    if shape is None:
        return None
    row_numel = math.prod(shape[1:])
    splits = []   # output (recv), then input (send) split sizes in rows
    for counts, displacements in ((a["recv_counts"], a["recv_displacements"]),
                                  (a["send_counts"], a["send_displacements"])):
        counts = _static(counts)
        if counts is None:
            return None
        if not counts:            # no counts: equal splits
            splits.append(None)
            continue
        rows = _rows(counts, row_numel)
        if rows is None or not _packed(counts, displacements):
            return None
        splits.append(rows)
    group = group_name_of(a["tag"], a["ranks"])
    if group is None:
        return None
    wait = waited_by(node)
    result = wait if wait is not None else node
    nodes = (node, wait) if wait is not None else (node,)
    return Collective("all_to_all", a["input"], result, group, a["group_size"], nodes, splits[0], splits[1])


def _all_gather(node: fx.Node, inp: fx.Node, tag: str, ranks: Sequence[int], size: int,
                extra: tuple[fx.Node, ...] = ()) -> Optional[Collective]:
    """An all-gather concatenating ``size`` equal chunks along dim 0 (``node``'s value)."""
    shape, out_shape = static_shape(inp), static_shape(node)
    if shape is None or out_shape != (size * shape[0], *shape[1:]):
        return None
    group = group_name_of(tag, ranks)
    return None if group is None else Collective("all_gather", inp, node, group, size, (*extra, node))


def _all_gather_shape(node: fx.Node) -> Optional[Collective]:
    a = _arguments(node, ALL_GATHER_SHAPE)
    return None if a is None else _all_gather(node, a["input"], a["tag"], a["ranks"], a["group_size"])


def _all_gather_out(node: fx.Node) -> Optional[Collective]:
    a = _arguments(node, ALL_GATHER_OUT)
    if a is None:
        return None
    out = a["out"]   # a buffer whose shape is all the op reads: it goes when the op goes
    extra = (out,) if isinstance(out, fx.Node) and len(out.users) == 1 and out.op == "call_function" else ()
    return _all_gather(node, a["input"], a["tag"], a["ranks"], a["group_size"], extra)


def _all_gather_uneven(node: fx.Node) -> Optional[Collective]:
    a = _arguments(node, ALL_GATHER_UNEVEN)
    rows = None if a is None else _static(a["recv_counts"])
    if rows is None:
        return None
    size, displacements = a["group_size"], a["recv_displacements"]
    even = len(rows) == size and all(r == a["send_count"] for r in rows)
    if not even or (displacements and not _packed(rows, displacements)):
        return None
    return _all_gather(node, a["input_tensor"], a["tag"], a["rank_list"], size)


def _reduce_scatter_uneven(node: fx.Node) -> Optional[Collective]:
    a = _arguments(node, REDUCE_SCATTER_UNEVEN)
    rows = None if a is None else _static(a["send_counts"])
    shape = None if a is None else static_shape(a["input_tensor"])
    if rows is None or shape is None:
        return None
    size, displacements = a["group_size"], a["send_displacements"]
    even = len(rows) == size and all(r == a["recv_count"] for r in rows) and sum(rows) == shape[0]
    if not even or (displacements and not _packed(rows, displacements)):
        return None
    group = group_name_of(a["tag"], a["rank_list"])
    if group is None:
        return None
    return Collective("reduce_scatter", a["input_tensor"], node, group, size, (node,), reduce_op=a["reduce_type"])


TORCHAIR_RECOGNIZERS: tuple[Callable[[fx.Node], Optional[Collective]], ...] = (
    _all_to_all, _all_gather_shape, _all_gather_out, _all_gather_uneven, _reduce_scatter_uneven)

RECOGNIZERS.extend(r for r in TORCHAIR_RECOGNIZERS if r not in RECOGNIZERS)
