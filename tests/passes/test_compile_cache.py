"""The FX graph cache never hands one rank's fused graph to another.

The MoE rewrites bake this rank's ``ep_rank_id`` (and the group's members) into the graph, so the
pass's ``uuid()`` (part of inductor's cache key) must differ where the fused graphs do. Reproduces
the reported failure: two runs of the same ranks sharing one ``TORCHINDUCTOR_CACHE_DIR`` must both
be right on every rank. Graphs with collectives bypass the cache (every rank must hold their rank
agreement round, ``passes.agreement``); local graphs are served from it.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import moe_fusion
from moe_fusion.launch import run_ranks
from moe_fusion.passes import MoeFusionGraphPass, pipeline

from moe_dispatch_combine_variants import LAYERS, tokens

HIDDEN, FFN_HIDDEN, TOKENS, WORLD = 16, 24, 8, 2
PATTERNS = {"capacity": "moe_capacity_a2a", "allgather": "moe_allgather_ep"}


def _run(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {"local": _local_ffn()}
    for name, pattern in PATTERNS.items():
        layer = LAYERS[name](HIDDEN, FFN_HIDDEN, 2 * world, 2, ep_group=dist.group.WORLD, seed=5)
        x = tokens(rank, TOKENS, HIDDEN, torch.float32, "balanced")
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            eager = layer(x)
            compiled = torch.compile(layer, backend=moe_fusion.backend(), fullgraph=True, dynamic=False)(x)
        out[name] = {"close": bool(torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5)),
                     "fused": counters["moe_fusion"][f"fused_{pattern}"],
                     "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}
    return out


def _local_ffn() -> dict[str, Any]:
    """A graph without collectives, compiled in the same multi-rank process."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, FFN_HIDDEN), torch.nn.ReLU(), torch.nn.Linear(FFN_HIDDEN, HIDDEN))
    x = torch.randn(TOKENS, HIDDEN)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        close = torch.allclose(torch.compile(mlp, backend=moe_fusion.backend(), fullgraph=True)(x), mlp(x),
                               rtol=1e-5, atol=1e-5)
    return {"close": close, "fused": counters["moe_fusion"]["fused_ffn"],
            "cache_hits": counters["inductor"]["fxgraph_cache_hit"]}


def test_second_run_from_a_shared_cache_is_right_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    first = run_ranks(WORLD, _run, timeout=400)
    second = run_ranks(WORLD, _run, timeout=400)
    for rank in range(WORLD):
        for name in PATTERNS:
            assert first[rank][name] == {"close": True, "fused": 1, "cache_hits": 0}, (rank, name, first[rank][name])
            # A graph with collectives bypasses the cache: every rank runs the passes again and
            # holds the agreement round its peers wait in (a rank served from the cache would not).
            assert second[rank][name] == {"close": True, "fused": 1, "cache_hits": 0}, (rank, name, second[rank][name])
        assert first[rank]["local"] == {"close": True, "fused": 1, "cache_hits": 0}, (rank, first[rank]["local"])
        # A local graph is served from the cache (the pass did not run again), still right.
        assert second[rank]["local"] == {"close": True, "fused": 0, "cache_hits": 1}, (rank, second[rank]["local"])


def test_cache_key_covers_sources_ranks_and_groups(monkeypatch):
    hashed: list[tuple[str, ...]] = []
    real = pipeline.get_hash_for_files
    monkeypatch.setattr(pipeline, "get_hash_for_files", lambda files: hashed.append(files) or real(files))
    key = MoeFusionGraphPass(target="A3").uuid()
    names = {f.split("moe_fusion/", 1)[1] for f in hashed[0]}
    # The lowering inlines the kernels and the formulas' backward ops into the cached code.
    assert {"passes/pipeline.py", "passes/capacity_a2a.py", "passes/lowering.py", "op_protos/ffn.py",
            "kernels/ffn_grouped.py", "autograd/local_ops.py", "targets.py"} <= names
    assert key[1:3] == ("A3", None) and key[4] is True
    assert MoeFusionGraphPass(target="A3", lower=False).uuid() != key
    assert MoeFusionGraphPass(target="A3", cost_gate=False).uuid() != key
    if not dist.is_initialized():
        assert key[3] == ()   # no process group: nothing rank-specific can be baked in


def test_cache_key_covers_the_cpus_native_matmuls(monkeypatch):
    """The cost gate's verdicts depend on the CPU: machines sharing a cache must not share them."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with_amx = MoeFusionGraphPass(target="A3").uuid()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert MoeFusionGraphPass(target="A3").uuid() != with_amx


def test_cache_key_differs_per_rank():
    keys = run_ranks(WORLD, _uuid, timeout=120)
    assert keys[0] != keys[1]
    assert keys[0][0] == keys[1][0]             # same sources
    assert [k[3][0] for k in keys] == [0, 1]     # this process's rank


def _uuid(rank: int, world: int) -> Any:
    assert MoeFusionGraphPass().uuid() is None     # collective passes, on a graph not known: no cache
    return MoeFusionGraphPass(passes=("ffn",)).uuid()


@pytest.mark.parametrize("passes", [None, ("ffn",)])
def test_a_report_bypasses_the_cache(passes):
    assert MoeFusionGraphPass(passes=passes, report=moe_fusion.FusionReport()).uuid() is None


def _context_with_a_group_this_rank_is_not_in(rank: int, world: int) -> tuple:
    dist.new_group([0])       # rank 1 holds it as GroupMember.NON_GROUP_MEMBER (DeepSpeed's EP groups do this)
    return pipeline.compile_context()


def test_cache_key_with_groups_this_rank_is_not_in():
    """The key is computed (no crash) and names only the groups this rank is in."""
    contexts = run_ranks(2, _context_with_a_group_this_rank_is_not_in, timeout=120)
    assert len(contexts[0][2]) == len(contexts[1][2]) + 1     # rank 0 is in the new group, rank 1 is not
    assert all(isinstance(name, str) for _, _, groups in contexts for name, _ in groups)
