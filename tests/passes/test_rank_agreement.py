"""Ranks agree on their collective rewrites: a rank that fused never meets one that did not.

Real gloo ranks. The round itself (``agreement.agree``): equal posts fuse, a differing post aborts
everyone, a rank that never posts or posts after its peer gave up aborts everyone. Then through
``torch.compile``: a block one rank refuses (its pass list lacks the pattern) is undone on the rank
that fused it, both run the unfused graph and equal eager, and the reports say why.
"""
from __future__ import annotations

import os
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

import moe_fusion
from moe_fusion.demo.moe_layers import TrainableCapacityAllToAllMoE
from moe_fusion.groups import GroupPeerError
from moe_fusion.launch import run_ranks
from moe_fusion.passes import PIPELINE, agreement, pipeline

from moe_dispatch_combine_variants import LAYERS, tokens

A2A = (("_c10d_functional.all_to_all_single.default", (2,)),)
FUSED = (("moe_fusion.npu_moe_distribute_dispatch_v2.default", (2,)),)


def _round(rank: int, world: int, after_by_rank: dict, delay_by_rank: dict, skip_first: tuple) -> list[tuple]:
    """Two rounds (graphs with one and two fused calls), as each rank's arguments say: ``(fuse,
    reason)`` of each round this rank held."""
    os.environ[agreement.TIMEOUT_ENV] = "3"
    before = A2A
    verdicts = []
    for number in range(2):
        if number == 0 and rank in skip_first:
            continue
        time.sleep(delay_by_rank.get(rank, 0.0))
        after = after_by_rank.get(rank, FUSED) * (number + 1)
        verdict = agreement.agree(before, after)
        verdicts.append((verdict.fuse, verdict.reason))
    return verdicts


def test_equal_posts_fuse_on_every_rank():
    results = run_ranks(2, _round, {}, {}, (), timeout=120)
    assert results == [[(True, ""), (True, "")]] * 2


def test_one_rank_rewriting_otherwise_aborts_every_rank():
    results = run_ranks(2, _round, {1: A2A}, {}, (), timeout=120)
    for rank, verdicts in enumerate(results):
        assert [fuse for fuse, _ in verdicts] == [False, False], rank
    assert "ranks [1] of 2 made other collective rewrites" in results[0][0][1]
    assert "ranks [0] of 2 made other collective rewrites" in results[1][0][1]


def test_a_rank_missing_a_round_aborts_its_peer_and_every_later_round():
    # Rank 1 skips the first graph: its round on the second meets rank 0's post for the first, they
    # differ, and rank 0's round on the second times out. Out of step, every round aborts.
    results = run_ranks(2, _round, {}, {}, (1,), timeout=120)
    assert [fuse for fuse, _ in results[0]] == [False, False]
    assert [fuse for fuse, _ in results[1]] == [False]
    assert "made other collective rewrites" in results[0][0][1]
    assert "ranks [1] of 2 did not reach this graph's agreement round within 3 s" in results[0][1][1]


def test_a_peer_posting_after_the_timeout_adopts_the_abort():
    # Rank 1 posts the same calls as rank 0, but after rank 0 gave up: it sees every post equal,
    # yet the verdict rank 0 wrote first is everyone's.
    results = run_ranks(2, _round, {}, {1: 5.0}, (), timeout=120)
    assert [fuse for fuse, _ in results[0]] == [False, False]
    assert [fuse for fuse, _ in results[1]] == [False, False]
    assert "another rank did not see every rank make the same rewrites" in results[1][0][1]


HIDDEN, FFN_HIDDEN, TOKEN_COUNT = 16, 24, 8


def _compile(rank: int, world: int, refusing_rank: int, train: bool) -> dict[str, Any]:
    """The capacity block compiled on every rank, with its pattern left out on ``refusing_rank``
    (for training, the layer written with differentiable collectives: ``dist``'s have no autograd)."""
    layer_type = TrainableCapacityAllToAllMoE if train else LAYERS["capacity"]
    layer = layer_type(HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5)
    x = tokens(rank, TOKEN_COUNT, HIDDEN, torch.float32, "balanced").requires_grad_(train)
    passes = [p.name for p in PIPELINE if rank != refusing_rank or p.name != "moe_capacity_a2a"]
    report = moe_fusion.FusionReport()
    compiled = torch.compile(layer, backend=moe_fusion.backend(passes=passes, report=report, compiler="eager"),
                             fullgraph=True, dynamic=False)
    with torch.set_grad_enabled(train):
        eager = layer(x)
        fused = compiled(x)
    close = torch.allclose(fused, eager, rtol=1e-5, atol=1e-5)
    if train:
        eager_grad, = torch.autograd.grad(eager.sum(), x)
        fused_grad, = torch.autograd.grad(fused.sum(), x)
        close = close and torch.allclose(fused_grad, eager_grad, rtol=1e-5, atol=1e-5)
    return {"close": close, "fused": sorted(e.pattern for e in report.fused()),
            "refused": [(e.pattern, e.detail) for e in report.refused()
                        if e.pattern in ("moe_capacity_a2a", pipeline.AGREEMENT)]}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_a_block_one_rank_refuses_is_undone_on_every_rank(train):
    results = run_ranks(2, _compile, 1, train, timeout=400)
    for rank, result in enumerate(results):
        assert result["close"], rank
        assert "moe_capacity_a2a" not in result["fused"], rank
        assert any(pattern == pipeline.AGREEMENT and "made other collective rewrites" in detail
                   for pattern, detail in result["refused"]), (rank, result["refused"])
    assert any(pattern == "moe_capacity_a2a" and detail.startswith("undone by the rank agreement")
               for pattern, detail in results[0]["refused"]), results[0]["refused"]


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_a_block_every_rank_fuses_stays_fused(train):
    results = run_ranks(2, _compile, -1, train, timeout=400)
    for rank, result in enumerate(results):
        assert result["close"], rank
        assert "moe_capacity_a2a" in result["fused"], rank
        assert not [r for r in result["refused"] if r[0] == pipeline.AGREEMENT], (rank, result["refused"])


def _solo_round(rank: int, world: int, first_fuses: bool) -> tuple:
    """Both ranks hold a round on a graph (rewritten, or not, as ``first_fuses`` says); then rank 0
    alone holds one on a graph of the same collectives (its input changed shape, its peer's did not):
    ``("raised", message)`` or ``(fuse, reason)`` of rank 0's second round."""
    os.environ[agreement.TIMEOUT_ENV] = "3"
    agreement.agree(A2A, FUSED if first_fuses else A2A)
    if rank != 0:
        return ()
    try:
        verdict = agreement.agree((("_c10d_functional.all_to_all_single", (2,), ()),), A2A)
    except GroupPeerError as error:
        return ("raised", str(error))
    return (verdict.fuse, verdict.reason)


def test_a_rank_compiling_a_fused_graph_again_alone_raises():
    """Its peer runs the fused exchange: no outcome of this rank's round would meet it."""
    solo, _ = run_ranks(2, _solo_round, True, timeout=120)
    assert solo[0] == "raised" and "rank 0 compiled a graph again alone" in solo[1], solo
    assert "ranks [1] of 2 did not" in solo[1] and "pad a short last batch" in solo[1], solo


def test_a_rank_compiling_an_unfused_graph_again_alone_aborts():
    """Its peer runs the unfused graph, which the abort keeps here too."""
    solo, _ = run_ranks(2, _solo_round, False, timeout=120)
    assert solo[0] is False and "did not reach this graph's agreement round" in solo[1], solo


def _recompile_alone(rank: int, world: int) -> list[str]:
    """The capacity block fused on both ranks; then rank 0's batch shrinks (it recompiles alone)
    while rank 1's does not (it runs its fused graph): what each rank's second call raised."""
    os.environ[agreement.TIMEOUT_ENV] = "5"
    layer = LAYERS["capacity"](HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5)
    compiled = torch.compile(layer, backend=moe_fusion.backend(compiler="eager"), fullgraph=True, dynamic=False)
    with torch.no_grad():
        compiled(tokens(rank, TOKEN_COUNT, HIDDEN, torch.float32, "balanced"))
        try:
            compiled(tokens(rank, TOKEN_COUNT // 2 if rank == 0 else TOKEN_COUNT, HIDDEN, torch.float32, "balanced"))
        except Exception as error:      # noqa: BLE001  (the test reads what it was)
            return [type(error).__name__, str(error)]
    return []


def test_a_rank_recompiling_alone_ends_both_ranks_with_errors_not_a_hang():
    """Before, rank 0 aborted into the unfused graph, whose all-to-all paired with rank 1's fused
    exchange: both ranks hung. Now rank 0 says why, and rank 1's exchange names the missing peer."""
    first, second = run_ranks(2, _recompile_alone, timeout=240, pg_timeout=20)
    assert "compiled a graph again alone" in first[1], first
    assert second and "rank 0 of the group did not reach it" in second[1], second


def _fused_ops_by_hand(rank: int, world: int) -> tuple[int, bool, int]:
    """A graph calling dispatch_v2 and combine_v2 itself (as a module route's does), compiled on every
    rank, then again on rank 0 alone (a float argument only rank 0 changes): the rounds held, whether
    each call equals eager, and the rounds held after the lone recompile."""
    os.environ[agreement.TIMEOUT_ENV] = "60"     # a lone round would wait this long, then abort
    group = dist.group.WORLD.group_name
    experts = 2 * world

    def exchange(x: torch.Tensor, ids: torch.Tensor, scale: float) -> torch.Tensor:
        expand_x, _, assist, _, recv_counts, _, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
            x, ids, group, world, rank, experts)
        weights = torch.full(ids.shape, scale, dtype=torch.float32)
        return moe_fusion.npu_moe_distribute_combine_v2(expand_x, ids, assist, recv_counts, weights, group, world,
                                                        rank, experts)

    x = tokens(rank, TOKEN_COUNT, HIDDEN, torch.float32, "balanced")
    ids = torch.stack([torch.arange(TOKEN_COUNT) % experts, (torch.arange(TOKEN_COUNT) + 1) % experts], 1).int()
    compiled = torch.compile(exchange, backend=moe_fusion.backend(compiler="eager"), fullgraph=True, dynamic=False)
    equal = torch.allclose(compiled(x, ids, 0.5), exchange(x, ids, 0.5))
    held = agreement.rounds_held()
    scale = 0.25 if rank == 0 else 0.5
    equal = equal and torch.allclose(compiled(x, ids, scale), exchange(x, ids, scale))
    return held, equal, agreement.rounds_held()


def test_a_graph_of_fused_ops_only_holds_no_round():
    """No pass rewrites the fused ops: nothing to agree on, and a rank compiling such a graph again
    alone waits for no one (before, its lone round stalled it for the agreement timeout)."""
    for rank, (held, equal, held_after) in enumerate(run_ranks(2, _fused_ops_by_hand, timeout=120)):
        assert held == 0 and held_after == 0 and equal, (rank, held, equal, held_after)
