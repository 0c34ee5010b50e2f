"""Transport shared by the MoE dispatch and combine kernels.

Every call runs, before any payload moves, one **agreement exchange** (``agree``): an all-gather of
a vector of ``AGREEMENT_LEN`` int64 over the TP pair (when ``T == 2``), then over the EP group (sent
as an all-to-all of copies, ``_start_all_gather``). Its
size is fixed (independent of every attribute, of the op and of the inputs), so ranks that disagree
on anything, or that rejected their inputs, still complete it, and every rank then raises together:

* a rank whose inputs fail a check (structural, group or value rule) sends status ``REJECTED``
  (the registered wrapper makes a rank that failed the structural checks join too, see
  ``join_rejected``); every rank raises, this one its own error, the others a named rejection;
* otherwise each field must be the same on every rank of its scope (the op itself, H, dtype, K,
  expert counts, modes, ...), else every rank raises the same disagreement error.

Over the EP group the vector also carries the call's **counts** (``agree``'s ``counts``: rows per
destination rank and local expert, dispatch's and combine's count exchange) in an area of
``counts_capacity(group size)`` int64 after the header, so the agreement and the count exchange are
one all-gather. The area's size depends only on the group, never on the call; counts that do not fit
(more than ``counts_capacity`` entries, a size every rank derives from agreed values) are left out
and exchanged after the agreement by ``exchange_counts`` (an all-to-all, int64). Then the kernels
exchange rows (``exchange_rows``: ``all_to_all_single`` with split sizes over a ``uint8`` buffer of packed rows,
``RowLayout``, in send/receive staging buffers reused across calls, ``staging_rows``). A backend
failure of any collective (a peer exited, stopped, or never called the op: gloo raises after the
process group's timeout) becomes a ``GroupPeerError`` naming the op, the group and the ranks that
did not reach the exchange (from a per-group arrival mark in the default ``torch.distributed``
store).

A group of one rank is never looked up and moves nothing (``group is None``).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NoReturn, Optional, Sequence

import torch
import torch.distributed as dist

from ..errors import OpValidationError, fail
from ..groups import GroupPeerError, registered_group
from ..op_protos.moe_distribute_common import DistConfig
from ._groups import resolve_group

Tensor = torch.Tensor
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
OP_CODES = {"npu_moe_distribute_dispatch_v2": 1, "npu_moe_distribute_combine_v2": 2,
            "npu_moe_distribute_combine_add_rms_norm": 3}
AGREEMENT_LEN = 32                 # int64 entries: [op code, status, field values..., zero padding]
COUNTS_CAPACITY = 256              # int64 count entries an EP agreement vector carries (at least the group size)
OK, REJECTED = 0, 1
# Field scopes: which ranks must send the same value.
EVERYWHERE, EP_ONLY, TP_ONLY, PER_RANK = "everywhere", "ep", "tp", "per-rank"


# ---------------------------------------------------------------------------------------------
# Byte packing: rows of several dtypes side by side in one uint8 buffer.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowLayout:
    """Fields ``(dtype, width in elements)`` packed side by side in one ``uint8`` row.

    Each field starts at a byte offset that is a multiple of its element size and the row length is
    a multiple of the largest element size, so every field of a row buffer ``(N, row_bytes)`` is a
    plain strided view of its dtype for any ``N`` (0 and 1 included) and any slice of whole rows:
    packing and unpacking never reinterpret a misaligned byte offset.
    """

    fields: tuple[tuple[torch.dtype, int], ...]

    @property
    def offsets(self) -> tuple[int, ...]:
        offsets, end = [], 0
        for dtype, width in self.fields:
            end = -(-end // dtype.itemsize) * dtype.itemsize      # round up to the field's alignment
            offsets.append(end)
            end += width * dtype.itemsize
        return tuple(offsets)

    @property
    def row_bytes(self) -> int:
        dtype, width = self.fields[-1]
        end = self.offsets[-1] + width * dtype.itemsize
        align = max(d.itemsize for d, _ in self.fields)
        return -(-end // align) * align

    def _views(self, buf: Tensor) -> list[Tensor]:
        return [buf[:, off:off + width * dtype.itemsize].view(dtype)
                for (dtype, width), off in zip(self.fields, self.offsets)]

    @property
    def gaps(self) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` byte ranges of a row that no field covers (alignment padding)."""
        ends = [off + width * dtype.itemsize for (dtype, width), off in zip(self.fields, self.offsets)]
        starts = list(self.offsets[1:]) + [self.row_bytes]
        return tuple((end, start) for end, start in zip(ends, starts) if start > end)

    def empty(self, n: int, device: torch.device, staging: Optional[tuple[str, str]] = None) -> Tensor:
        """``(n, row_bytes)`` uint8 rows whose fields are yet to be written; alignment padding bytes
        are zero (only they are zero-filled). ``staging`` ``(role, group name)``: the rows of that
        reused buffer (``staging_rows``), else a new allocation."""
        if staging is None:
            buf = torch.empty((n, self.row_bytes), dtype=torch.uint8, device=device)
        else:
            buf = staging_rows(*staging, n, self.row_bytes, device)
        for start, end in self.gaps:
            buf[:, start:end].zero_()
        return buf

    def pack(self, parts: Sequence[Tensor], staging: Optional[tuple[str, str]] = None) -> Tensor:
        """``(N, row_bytes)`` uint8 holding ``parts`` (``(N, width_i)`` tensors of the layout's
        dtypes, any strides), rows from ``empty`` (``staging`` as there)."""
        buf = self.empty(parts[0].size(0), parts[0].device, staging)
        for view, part in zip(self._views(buf), parts):
            view.copy_(part)
        return buf

    def unpack(self, buf: Tensor) -> list[Tensor]:
        """Views ``(N, width_i)`` of each field of ``buf`` ``(N, row_bytes)`` uint8 (rows of stride
        ``row_bytes``: a buffer this layout packed or received, or a slice of its rows)."""
        return self._views(buf)


_STAGING: dict[tuple[str, str, torch.device], Tensor] = {}   # (role, group name, device) -> uint8 bytes


def staging_rows(role: str, group_name: str, n: int, row_bytes: int, device: torch.device) -> Tensor:
    """``(n, row_bytes)`` uint8 rows at the start of a buffer kept for the next call with the same
    ``role`` (``"send"`` or ``"recv"``) on the same group and device, grown (never shrunk) when too
    small, so the payload exchanges do not fault fresh pages in on every call. Its contents are
    whatever the last user left: only a kernel's own send/receive staging may live there, read
    and written within one call, never an output (the next call would overwrite it)."""
    key = (role, group_name, device)
    buf = _STAGING.get(key)
    if buf is None or buf.numel() < n * row_bytes:
        buf = _STAGING[key] = torch.empty(n * row_bytes, dtype=torch.uint8, device=device)
    return buf[:n * row_bytes].view(n, row_bytes)


# ---------------------------------------------------------------------------------------------
# Groups and backend failures.
# ---------------------------------------------------------------------------------------------

def group_or_none(op: str, arg: str, name: str, world: int, rank: int) -> Optional[dist.ProcessGroup]:
    """The process group named ``name``, or None for a world of one rank (no communication)."""
    return None if world == 1 else resolve_group(op, arg, name, world, rank)


def _arrival_key(group: dist.ProcessGroup, group_rank: int) -> str:
    return f"moe_fusion/arrived/{group.group_name}/{group_rank}"


_ARRIVALS: dict[str, int] = {}     # group name -> agreement exchanges this process entered on it


def _mark_arrival(group: dist.ProcessGroup) -> int:
    """Count this agreement exchange on ``group`` and publish the count in the default store, so
    that a peer whose collective fails can tell which ranks never reached it. Returns the count."""
    seq = _ARRIVALS.get(group.group_name, 0) + 1
    _ARRIVALS[group.group_name] = seq
    store = _default_store()
    if store is not None:
        store.set(_arrival_key(group, group.rank()), str(seq))
    return seq


def _default_store() -> Optional[dist.Store]:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):   # no default group, or a backend without a store
        return None


ARRIVAL_GRACE = 2.0   # seconds a failed exchange waits for merely late peers before naming absentees


def _missing_peers(group: dist.ProcessGroup, seq: int) -> list[int]:
    """Group ranks that did not reach this exchange (arrival count below ``seq``).

    A peer's exit fails the collective at once, possibly before a slow but healthy peer has
    arrived; so the ranks still missing are read again until at most one is left (the usual cause
    of the failure: one absent rank) or ``ARRIVAL_GRACE`` has passed. A peer that arrived and then
    failed while a healthy one is late still leaves the late one named."""
    deadline = time.monotonic() + ARRIVAL_GRACE
    missing = _absent_now(group, seq, range(group.size())) or []
    while len(missing) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        still = _absent_now(group, seq, missing)      # arrival counts only grow
        if still is None:
            break
        missing = still
    return missing


def _absent_now(group: dist.ProcessGroup, seq: int, ranks: Iterable[int]) -> Optional[list[int]]:
    """Those of the group ``ranks`` whose published arrival count is below ``seq`` at this moment;
    None when there is no store to read (gone with the peers, or never there)."""
    store = _default_store()
    if store is None:
        return None
    missing = []
    for r in ranks:
        key = _arrival_key(group, r)
        try:
            reached = int(store.get(key)) if store.check([key]) else 0
        except RuntimeError:     # the store itself is gone with the peers: nothing more to learn
            return None
        if reached < seq:
            missing.append(r)
    return missing


@contextlib.contextmanager
def peer_guard(op: str, arg: str, group: Optional[dist.ProcessGroup], stage: str, seq: int = 0) -> Iterator[None]:
    """Turn a backend failure of the collectives inside into a ``GroupPeerError`` naming ``op``, the
    group ``arg`` and, for an agreement exchange (``seq`` > 0), the ranks that never reached it."""
    try:
        yield
    except OpValidationError:
        raise
    except RuntimeError as error:   # c10d's DistBackendError and gloo's errors are RuntimeErrors
        if group is None:
            raise
        missing = _missing_peers(group, seq) if seq else []
        who = (f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of the group did not reach it "
               "(exited, stopped, or never called the op)" if missing else "a peer failed during it")
        raise GroupPeerError(f"{op}: {arg} {group.group_name!r} ({group.size()} ranks, this process is rank "
                             f"{group.rank()}): the {stage} did not complete within the process group's timeout: "
                             f"{who}. Backend error: {error}") from error


def _start_all_gather(group: dist.ProcessGroup, vector: Tensor) -> tuple[Tensor, dist.Work]:
    """Start gathering every rank's ``vector`` ``(n,)``: returns ``(rows (G, n), work)``, row ``s``
    rank ``s``'s vector once ``work`` is done. Sent as an all-to-all of ``G`` copies: one round of
    pairwise sends, where gloo's all-gather is a ring of ``G - 1`` dependent steps (a 2 KB vector:
    1.8-2.9 ms against 3.8-4.0 ms on 4 ranks sharing 2 cores, the same on 2 ranks)."""
    rows = vector.new_empty(group.size() * vector.numel())
    work = dist.all_to_all_single(rows, vector.repeat(group.size()), group=group, async_op=True)
    return rows.view(group.size(), vector.numel()), work


# ---------------------------------------------------------------------------------------------
# Agreement exchange.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One agreed value: ``name`` as error messages say it, ``scope`` which ranks must match."""

    name: str
    value: int
    scope: str = EVERYWHERE


def dist_fields(cfg: DistConfig, tokens_arg: str, global_bs: int) -> list[Field]:
    """The agreed values dispatch and the combines share: the ``DistConfig`` attributes that shape
    the rows and their routing (``tokens_arg`` names the token tensor in messages)."""
    return [
        Field("ep_world_size", cfg.world), Field("ep_rank_id (the TP pair's EP rank)", cfg.rank, TP_ONLY),
        Field("tp_world_size", cfg.tp_world), Field("tp_rank_id (the EP domain's TP rank)", cfg.tp_rank, EP_ONLY),
        Field(f"{tokens_arg} (hidden size H)", cfg.hidden), Field(f"{tokens_arg} (dtype)", DTYPE_CODES[cfg.dtype]),
        Field("expert_ids (K)", cfg.top_k), Field("moe_expert_num", cfg.moe_experts),
        Field("shared_expert_rank_num", cfg.shared_ranks), Field("shared_expert_num", cfg.n_shared),
        Field("global_bs", global_bs), Field("zero_expert_num", cfg.zero_experts),
        Field("copy_expert_num", cfg.copy_experts), Field("const_expert_num", cfg.const_experts),
    ]


def counts_capacity(group_size: int) -> int:
    """Count entries the EP agreement vector of a group of ``group_size`` ranks carries after its
    header: a function of the group alone, so every member's vector has the same size."""
    return max(COUNTS_CAPACITY, group_size)


def _vector(op: str, status: int, fields: Sequence[Field], device: torch.device, area: int = 0,
            counts: Optional[Tensor] = None) -> Tensor:
    """``[op code, status, field values..., zero padding]`` (``AGREEMENT_LEN``), then an ``area`` of
    int64 holding ``counts`` (flattened) followed by zeros."""
    values = [OP_CODES[op], status] + [f.value for f in fields]
    # A bug guard, not a user error: the vector's size must never depend on the call.
    assert len(values) <= AGREEMENT_LEN, f"{op}: {len(values)} agreement entries exceed {AGREEMENT_LEN}"
    vector = torch.zeros(AGREEMENT_LEN + area, dtype=torch.int64, device=device)
    vector[:len(values)] = torch.tensor(values, dtype=torch.int64)
    if counts is not None:
        vector[AGREEMENT_LEN:AGREEMENT_LEN + counts.numel()] = counts.reshape(-1)
    return vector


def _op_name(code: int) -> str:
    return next((name for name, c in OP_CODES.items() if c == code), f"an unknown op (code {code})")


def _disagreement(op: str, arg: str, fields: Sequence[Field], rows: list[list[int]], rank: int,
                  scope: str) -> Optional[str]:
    """The first disagreement among ``rows`` (every rank's ``AGREEMENT_LEN`` header values, this
    rank's at ``rank``; Python ints: a few dozen comparisons cost less than tensor ops) as a
    message, None when every rank agrees: first the op itself, then each field of the scope."""
    mine = rows[rank]
    for peer, theirs in enumerate(rows):
        if theirs[0] != mine[0]:
            return (f"{op}: {arg} must be called by every rank of the group in the same order, got {op} on this "
                    f"rank, {_op_name(theirs[0])} on rank {peer}")
    for i, f in enumerate(fields):
        if f.scope not in (EVERYWHERE, scope):
            continue
        for peer, theirs in enumerate(rows):
            if theirs[2 + i] != mine[2 + i]:
                return (f"{op}: {f.name} must be the same on every rank of {arg}, got {mine[2 + i]} on this rank, "
                        f"{theirs[2 + i]} on rank {peer}")
    return None


@dataclass(frozen=True)
class Exchange:
    """The groups of one call: EP (``ep``, named by ``group_ep``) and the TP pair (``tp``); None
    where the world is one rank."""

    op: str
    ep: Optional[dist.ProcessGroup]
    tp: Optional[dist.ProcessGroup]

    def agree(self, fields: Sequence[Field], error: Optional[OpValidationError], device: torch.device,
              tp_check: Optional[Callable[[Tensor], Optional[OpValidationError]]] = None,
              counts: Optional[Tensor] = None,
              meanwhile: Optional[Callable[[], Any]] = None) -> tuple[Tensor, Optional[Tensor], Any]:
        """The agreement exchange (module docstring). ``error``: this rank's rejection, if any.
        ``tp_check(tp_rows)`` may reject the TP pair's rows (both ranks run it on the same rows).
        ``counts``: int64 counts to carry in the EP vector's count area (``carries``; None: zeros).
        ``meanwhile()``: host work to run while the EP exchange is in flight (preparing the
        payload: the verdict may still discard it), run only when this rank accepted its inputs.

        Returns ``(ep_rows (W, AGREEMENT_LEN + area), tp_rows (2, AGREEMENT_LEN) or None, what
        meanwhile returned or None)``, the rows int64, field ``i`` in column ``2 + i``, the count
        area (EP only) from column ``AGREEMENT_LEN``; raises on every rank of both groups together
        otherwise.
        """
        status = OK if error is None else REJECTED
        tp_rows = None
        if self.tp is not None:
            tp_rows, _ = self._gather(self.tp, "group_tp", _vector(self.op, status, fields, device))
            if error is None:
                t = self.tp.rank()
                tp_header = tp_rows[:, :AGREEMENT_LEN].tolist()
                if tp_header[1 - t][1] != OK:
                    error = OpValidationError(f"{self.op}: group_tp ranks must all accept their inputs, got a "
                                              f"rejection by TP rank {1 - t} (see that rank's error)")
                else:
                    message = _disagreement(self.op, "group_tp", fields, tp_header, t, TP_ONLY)
                    error = OpValidationError(message) if message else (tp_check(tp_rows) if tp_check else None)
        # A TP verdict travels in the EP status: both EP domains of the pair stop together.
        area = 0 if self.ep is None else counts_capacity(self.ep.size())
        if counts is not None:
            assert counts.numel() <= area or self.ep is None, f"{self.op}: counts exceed the agreement's count area"
            counts = counts if self.ep is not None else None
        vector = _vector(self.op, OK if error is None else REJECTED, fields, device, area, counts)
        meanwhile = meanwhile if error is None else None
        if self.ep is None:
            ep_rows, prepared = vector.unsqueeze(0), meanwhile() if meanwhile else None
        else:
            ep_rows, prepared = self._gather(self.ep, "group_ep", vector, meanwhile)
        rank = 0 if self.ep is None else self.ep.rank()
        ep_header = ep_rows[:, :AGREEMENT_LEN].tolist()
        message = _disagreement(self.op, "group_ep", [], ep_header, rank, EP_ONLY)   # the op itself first
        if message:
            raise OpValidationError(message)
        if error is not None:
            raise error
        bad = [peer for peer, theirs in enumerate(ep_header) if theirs[1] != OK]
        if bad:
            fail(self.op, "group_ep", "ranks must all accept their inputs",
                 f"a rejection by rank {bad[0]} of group_ep or its TP peer (see that rank's error)")
        message = _disagreement(self.op, "group_ep", fields, ep_header, rank, EP_ONLY)
        if message:
            raise OpValidationError(message)
        return ep_rows, tp_rows, prepared

    def carries(self, entries: int) -> bool:
        """Whether ``entries`` counts fit the EP agreement vector's count area (a group of one
        exchanges nothing: always). Every rank decides alike when ``entries`` comes from agreed values."""
        return self.ep is None or entries <= counts_capacity(self.ep.size())

    def counts_after(self, ep_rows: Tensor, counts: Tensor) -> Tensor:
        """What ``exchange_counts(op, ep, counts)`` returns, for ``counts`` ``(W, C)`` int64 of this
        rank: read from ``agree``'s ``ep_rows`` when they carried every rank's counts (``carries``),
        else exchanged now."""
        counts = counts.to(torch.int64)
        if self.ep is None:
            return counts.contiguous()
        if not self.carries(counts.numel()):
            return exchange_counts(self.op, self.ep, counts)
        every = ep_rows[:, AGREEMENT_LEN:AGREEMENT_LEN + counts.numel()].reshape(self.ep.size(), *counts.shape)
        return every[:, self.ep.rank()].contiguous()

    def _gather(self, group: dist.ProcessGroup, arg: str, vector: Tensor,
                meanwhile: Optional[Callable[[], Any]] = None) -> tuple[Tensor, Any]:
        """``(every rank's vector (G, n), what meanwhile returned)``: ``meanwhile`` and the arrival
        mark (a store round trip) run while the exchange is in flight."""
        with peer_guard(self.op, arg, group, "agreement exchange"):
            rows, work = _start_all_gather(group, vector)
        seq = _mark_arrival(group)
        try:
            prepared = meanwhile() if meanwhile else None
        finally:        # never leave the exchange pending, even when the host work failed
            with peer_guard(self.op, arg, group, "agreement exchange", seq):
                work.wait()
        return rows, prepared


def open_exchange(op: str, group_ep: str, ep_world: int, ep_rank: int, group_tp: str, tp_world: int,
                  tp_rank: int) -> Exchange:
    """Resolve the call's groups; a group that fails its checks still lets this rank join the
    agreement exchange with its error (``join_rejected``), so the peers stop too."""
    try:
        ep = group_or_none(op, "group_ep", group_ep, ep_world, ep_rank)
        tp = group_or_none(op, "group_tp", group_tp, 2, tp_rank) if tp_world == 2 else None
    except OpValidationError as error:
        join_rejected(op, error, group_ep, group_tp, tp_world)
    return Exchange(op, ep, tp)


def join_rejected(op: str, error: OpValidationError, group_ep: object, group_tp: object,
                  tp_world: object) -> NoReturn:
    """Take part in the agreement exchange with a rejection, then raise ``error``.

    For a rank whose call failed before its kernel could agree (structural checks, groups). The
    groups are looked up leniently from the raw arguments: a name that resolves to a group of more
    than one rank is joined (its peers are waiting there, whatever the size and rank arguments
    say). A name that does not resolve cannot be joined: the peers then fail after the process
    group's timeout with a ``GroupPeerError`` naming this rank.
    """
    ep = registered_group(group_ep) if isinstance(group_ep, str) else None
    tp = registered_group(group_tp) if isinstance(group_tp, str) and tp_world == 2 else None
    if tp is not None and tp.size() != 2:
        tp = None        # not a TP pair: no peer waits on it in a TP stage
    if ep is not None and ep.size() > 1 or tp is not None:
        exchange = Exchange(op, ep if ep is not None and ep.size() > 1 else None, tp)
        exchange.agree([], error, torch.device("cpu"))
    raise error


# ---------------------------------------------------------------------------------------------
# Count and payload exchanges (after the agreement: their sizes are then the same on every rank).
# ---------------------------------------------------------------------------------------------

def exchange_counts(op: str, group: Optional[dist.ProcessGroup], counts: Tensor) -> Tensor:
    """Send ``counts[d]`` to rank ``d``: ``counts`` ``(W, C)`` int64; returns ``(W, C)`` with row ``s``
    = what rank ``s`` sent to this rank (one all-to-all)."""
    send = counts.to(torch.int64).contiguous()
    if group is None:
        return send
    received = torch.empty_like(send)
    with peer_guard(op, "group_ep", group, "count exchange"):
        dist.all_to_all_single(received, send, group=group)
    return received


def exchange_rows(op: str, group: Optional[dist.ProcessGroup], buf: Tensor, send_splits: Tensor,
                  recv_splits: Tensor) -> Tensor:
    """All-to-all of ``buf`` ``(N, B)`` uint8 rows: ``send_splits[d]`` consecutive rows go to rank ``d``.
    Returns the rows received, in the group's ``"recv"`` staging buffer (``staging_rows``: read
    them before the next exchange), or ``buf`` itself for a group of one."""
    if group is None:
        return buf
    out = staging_rows("recv", group.group_name, int(recv_splits.sum()), buf.size(1), buf.device)
    with peer_guard(op, "group_ep", group, "payload exchange"):
        dist.all_to_all_single(out, buf, output_split_sizes=recv_splits.tolist(),
                               input_split_sizes=send_splits.tolist(), group=group)
    return out
