"""One faulty rank among healthy ones: every surviving rank raises a named error within a bound.

Real gloo ranks (3 and 4). The faulty rank is the last one (rank 0 for the attribute cases the
issue reported: it hosts the store and the first all-gather slot). Two kinds of fault:

* joinable (one spawn per world, batched): the faulty rank calls the op with bad input (structural
  or value rule, a bad group size or rank argument) or with an attribute that differs from its
  peers (moe_expert_num, H, K, global_bs, quant modes, ep_world_size, the op itself). Every rank
  must raise ``OpValidationError`` naming the op, quickly (the fixed-size agreement exchange);
* gone (one spawn each, ``pg_timeout`` = PG_TIMEOUT seconds): the faulty rank names an unknown
  group, never calls the op, or exits (also while a healthy rank is late: it must not be named).
  Every survivor must raise ``GroupPeerError`` naming the op, the group and the faulty rank within
  PG_TIMEOUT + SLACK seconds.
"""
from __future__ import annotations

import os
import re
import time
from typing import Any, Callable

import pytest
import torch

from moe_fusion.launch import run_ranks

BF16, I32 = torch.bfloat16, torch.int32
DISPATCH, COMBINE = "npu_moe_distribute_dispatch_v2", "npu_moe_distribute_combine_v2"
PG_TIMEOUT, SLACK = 4.0, 4.0
QUICK = 2.0            # seconds: an agreed error never waits for a timeout
LATE = 0.5             # seconds a healthy rank arrives late: it must not be named as the absent one


def _call(op: str, **kw: Any) -> Any:
    import moe_fusion
    return getattr(moe_fusion, op)(**kw)


def _dispatch_kw(rank: int, world: int, **over: Any) -> dict:
    g = torch.Generator().manual_seed(rank)
    m = 2 * world
    kw = dict(x=torch.randn(3, 16, generator=g).to(BF16),
              expert_ids=torch.stack([torch.randperm(m, generator=g)[:2] for _ in range(3)]).to(I32),
              group_ep=torch.distributed.group.WORLD.group_name, ep_world_size=world, ep_rank_id=rank,
              moe_expert_num=m)
    kw.update(over)
    return kw


def _combine_kw(rank: int, world: int, **over: Any) -> dict:
    d = _dispatch_kw(rank, world)
    expand_x, _, assist, _, counts, _, _ = _call(DISPATCH, **d)
    kw = dict(expand_x=expand_x, expert_ids=d["expert_ids"], assist_info_for_combine=assist, ep_send_counts=counts,
              expert_scales=torch.ones(3, 2), group_ep=d["group_ep"], ep_world_size=world, ep_rank_id=rank,
              moe_expert_num=d["moe_expert_num"])
    kw.update(over)
    return kw


# name -> (op, faulty rank (-1: the last), the faulty rank's overrides as a function of (rank, world),
#          pattern every rank's message must match, pattern of the faulty rank's own message or None)
JOINABLE: dict[str, tuple[str, int, Callable[[int, int], dict], str, str | None]] = {
    "x-int32": (DISPATCH, -1, lambda r, w: dict(x=torch.zeros(3, 16, dtype=torch.int32)),
                  r"ranks must all accept their inputs, got a rejection by rank {bad}", r"x dtype must be one of"),
    "expert-scales-shape": (COMBINE, -1, lambda r, w: dict(expert_scales=torch.ones(3, 5)),
                            r"rejection by rank {bad}", r"expert_scales must have shape \(3, 2\)"),
    "ep-world-size": (DISPATCH, -1, lambda r, w: dict(ep_world_size=w + 1, moe_expert_num=2 * (w + 1)),
                      r"rejection by rank {bad}", r"group_ep must have \d ranks"),
    "ep-rank-id": (COMBINE, -1, lambda r, w: dict(ep_rank_id=0), r"rejection by rank {bad}",
                   r"group_ep must hold this process at rank 0"),
    "bad-ids": (DISPATCH, -1, lambda r, w: dict(expert_ids=torch.full((3, 2), 99, dtype=I32)),
                r"rejection by rank {bad}", r"expert_ids values must be in"),
    "moe-expert-num": (DISPATCH, 0, lambda r, w: dict(moe_expert_num=4 * w),
                       r"moe_expert_num must be the same on every rank of group_ep, got \d+ on this rank, "
                       r"\d+ on rank \d", None),
    "hidden-size": (DISPATCH, -1, lambda r, w: dict(x=torch.zeros(3, 24, dtype=BF16)),
                    r"x \(hidden size H\) must be the same on every rank of group_ep", None),
    "top-k": (DISPATCH, 0, lambda r, w: dict(expert_ids=torch.tensor([[0], [1], [2]], dtype=I32)),
              r"expert_ids \(K\) must be the same on every rank", None),
    "global-bs": (DISPATCH, -1, lambda r, w: dict(global_bs=8 * w), r"global_bs must be the same on every rank", None),
    "quant-mode": (DISPATCH, 0, lambda r, w: dict(quant_mode=2), r"quant_mode must be the same on every rank", None),
    "comm-quant-mode": (COMBINE, -1, lambda r, w: dict(comm_quant_mode=2),
                        r"comm_quant_mode must be the same on every rank", None),
    "other-op": (COMBINE, -1, None, r"group_ep must be called by every rank of the group in the same order", None),
}


def _joinable_rank(rank: int, world: int) -> dict:
    """Each case's ``(error type, message, seconds)`` on this rank; cases run in order on every rank."""
    out = {}
    for name, (op, bad, over, _, _) in JOINABLE.items():
        bad = world - 1 if bad == -1 else bad
        start = time.monotonic()
        try:
            if name == "other-op" and rank == bad:
                _call(DISPATCH, **_dispatch_kw(rank, world))        # paired with the peers' dispatch
                _call(DISPATCH, **_dispatch_kw(rank, world))        # while the peers call combine
            elif op == DISPATCH:
                _call(op, **_dispatch_kw(rank, world, **(over(rank, world) if rank == bad else {})))
            else:
                kw = _combine_kw(rank, world)
                kw.update(over(rank, world) if rank == bad and over else {})
                _call(op, **kw)
            out[name] = ("no error", "", time.monotonic() - start)
        except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
            out[name] = (type(error).__name__, str(error), time.monotonic() - start)
    return out


@pytest.fixture(scope="module", params=[3, 4])
def joinable_results(request):
    return request.param, run_ranks(request.param, _joinable_rank, timeout=180, pg_timeout=PG_TIMEOUT)


@pytest.mark.parametrize("name", list(JOINABLE))
def test_joinable_fault_every_rank_raises_named_error_quickly(joinable_results, name):
    world, results = joinable_results
    op, bad, _, everyone, own = JOINABLE[name]
    bad = world - 1 if bad == -1 else bad
    for rank, res in enumerate(results):
        kind, message, seconds = res[name]
        expect_op = DISPATCH if (name == "other-op" and rank == bad) else op
        assert kind == "OpValidationError", (rank, kind, message)
        assert message.startswith(f"{expect_op}: "), (rank, message)
        pattern = own if (rank == bad and own) else everyone.format(bad=bad)
        assert re.search(pattern, message), (rank, message)
        assert seconds < QUICK, f"rank {rank} waited {seconds:.1f}s for {name}"


# ---- gone peers: one spawn each -----------------------------------------------------------------

def _gone_rank(rank: int, world: int, op: str, fault: str) -> tuple[str, str, float]:
    """The faulty last rank names an unknown group, never calls ``op``, or exits before it."""
    bad = world - 1
    kw = _combine_kw(rank, world) if op == COMBINE else _dispatch_kw(rank, world)
    if rank == bad:
        if fault.startswith("exits"):
            os._exit(7)
        if fault == "never-calls":
            time.sleep(PG_TIMEOUT + SLACK)
            return ("skipped", "", 0.0)
        kw["group_ep"] = "no-such-group"
    if fault == "exits-one-late" and rank == 1:
        time.sleep(LATE)      # healthy, but reaches the exchange after the peers saw the exit
    start = time.monotonic()
    try:
        _call(op, **kw)
        return ("no error", "", time.monotonic() - start)
    except Exception as error:  # noqa: BLE001 - the test inspects whatever was raised
        return (type(error).__name__, str(error), time.monotonic() - start)


GONE = [(DISPATCH, "unknown-group", 3), (COMBINE, "unknown-group", 4), (DISPATCH, "never-calls", 4),
        (COMBINE, "never-calls", 3), (DISPATCH, "exits", 3), (COMBINE, "exits", 4), (DISPATCH, "exits-one-late", 4)]


@pytest.mark.parametrize("op,fault,world", [pytest.param(*g, id=f"{g[0].split('_')[-1]}-{g[1]}-w{g[2]}")
                                            for g in GONE])
def test_gone_peer_every_survivor_raises_named_error_within_timeout(op, fault, world):
    bad = world - 1
    results = run_ranks(world, _gone_rank, op, fault, timeout=120, pg_timeout=PG_TIMEOUT, may_exit={bad})
    for rank, res in enumerate(results):
        if rank == bad:
            if fault == "unknown-group":
                assert res[0] == "OpValidationError" and "group_ep must name a registered process group" in res[1]
            continue
        kind, message, seconds = res
        assert kind == "GroupPeerError", (rank, kind, message)
        assert message.startswith(f"{op}: group_ep "), (rank, message)
        assert re.search(rf"rank {bad} of the group did not reach it", message), (rank, message)
        assert seconds < PG_TIMEOUT + SLACK, f"rank {rank} waited {seconds:.1f}s"
