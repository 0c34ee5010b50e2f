"""Run a function on real gloo ranks over loopback, with deadlines so nothing can hang.

Used by the tests, the benchmarks and the demo: real multi-process ranks on one machine.

``run_ranks(world_size, fn, *args)`` spawns ``world_size`` processes, each of which joins a gloo
process group on 127.0.0.1 and calls ``fn(rank, world_size, *args)``; it returns the list of
per-rank results (picklable: tensors, tuples, dicts). A rank that raises makes the whole call
raise at once with that rank's traceback; a run past ``timeout`` seconds kills every rank. Ranks
listed in ``may_exit`` may die without a result (fault-injection tests): their result is None.
``pg_timeout`` is the gloo process group's timeout, which bounds how long a collective waits for a
peer that is gone (the ops then raise ``moe_fusion.groups.GroupPeerError``).
Batch many cases into one ``fn``: a spawn costs seconds (every rank imports torch).
"""
from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Collection

import torch
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any,
               pg_timeout: float) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"   # gloo must never pick a non-loopback interface
    # Share the cores between the ranks, as torchrun does: oversubscribed intra-op threads thrash.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{LOOPBACK}:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=pg_timeout))
        try:
            result = fn(rank, world_size, *args)
            buffer = io.BytesIO()
            torch.save(result, buffer)   # bytes, not shared-memory tensors: the rank exits right after
            results.put((rank, True, buffer.getvalue()))
        finally:
            _leave(rank, world_size, pg_timeout)
            dist.destroy_process_group()
    except BaseException:  # report every failure, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))


def _leave(rank: int, world_size: int, wait: float) -> None:
    """Rank 0 hosts the TCP store: it stays until every rank has left (at most ``wait`` seconds),
    so that peers still handling a failed collective can read the store (the ops name the ranks
    that never reached an exchange from it)."""
    import torch.distributed as dist

    try:
        store = dist.distributed_c10d._get_default_store()
        store.add("moe_fusion/launch/left", 1)
        deadline = time.monotonic() + wait
        while rank == 0 and store.add("moe_fusion/launch/left", 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except RuntimeError:   # the store's host is gone already: nothing to wait for
        pass


def _failure_report(failures: dict[int, str], results: Any, grace: float = 3.0) -> str:
    """All ranks' failures that arrive within ``grace`` seconds: the first one to arrive is often
    a peer's broken connection, not the root cause."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            continue
        if not ok:
            failures[rank] = payload
    return "\n".join(f"rank {r} failed:\n{tb}" for r, tb in sorted(failures.items()))


def run_ranks(world_size: int, fn: Callable[..., Any], *args: Any, timeout: float = 180.0,
              pg_timeout: float = 60.0, may_exit: Collection[int] = ()) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return their results
    (None for a rank of ``may_exit`` that died first)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, results, pg_timeout), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(collected))} did not finish "
                                   f"within {timeout:.0f}s")
            try:
                rank, ok, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in collected]
                for r in [r for r in dead if r in may_exit]:
                    collected[r] = None
                dead = [r for r in dead if r not in may_exit]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            if not ok:
                raise RuntimeError(_failure_report({rank: payload}, results))
            collected[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [collected[r] for r in range(world_size)]
