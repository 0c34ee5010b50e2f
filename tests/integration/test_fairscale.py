"""fairscale 0.4.13's ``MOELayer`` + ``Top2Gate``, as installed from PyPI, unmodified, on real gloo
ranks under ``moe_fusion.compile``: its GShard einsums (``einsum("sec,sm->ecm")`` dispatch over the
all-to-all, ``einsum("sec,ecm->sm")`` combine) with argmax gating (Gumbel noise for the second
expert) and the fixed capacity ``2S/E``, which drops routes, become
``dispatch_v2 -> npu_ffn_grouped -> combine_v2`` with fairscale's own keep decision as the 2-D
``x_active_mask`` (``moe_capacity_a2a``), in inference and training (its ``_AllToAll`` autograd
Function becomes torch's differentiable all-to-all before autograd: ``autograd_collectives``). The
oracle is the eager layer on the same random stream: output, and in training the input and every
parameter gradient, equal within fp32 rounding. No shims: fairscale runs on CPU gloo as it is.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("fairscale")

from moe_fusion.launch import run_ranks  # noqa: E402
from integration.ranked_cases import (ExpertMlp, assert_block_fused, assert_steps_equal, eager_and_fused,  # noqa: E402
                                      run_by_world, steps_over_token_counts)

HIDDEN, FFN, EXPERTS, TOKENS = 16, 32, 4, 16
CASES = {  # name -> (world, compiler); fp32 (fairscale's gate does not run in bf16)
    "ep2": (2, "eager"),
    "ep2-inductor": (2, "inductor"),
    "ep4": (4, "eager"),
    "ep2-large": (2, "eager"),      # the guards evaluate a reduced instance; E * C == 2 * tokens == 4 * H
    "ep2-train": (2, "eager"),
    "ep2-inductor-train": (2, "inductor"),
}
TRAINING = {"ep2-train", "ep2-inductor-train"}   # forward and backward: output, input and parameter gradients
LARGE_SIZES = {"ep2-large": (512, 256)}   # name -> (tokens per rank, hidden)


def _layer(rank: int, world: int, hidden: int) -> torch.nn.Module:
    """fairscale's layer: the same gate on every rank, this rank's own experts."""
    from fairscale.nn.moe import MOELayer, Top2Gate

    torch.manual_seed(0)
    gate = Top2Gate(hidden, EXPERTS)
    torch.manual_seed(1 + rank)
    return MOELayer(gate, torch.nn.ModuleList([ExpertMlp(hidden, FFN) for _ in range(EXPERTS // world)]))


def _run(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    # The gate draws Gumbel noise: inductor must draw it as eager does for the outputs to compare.
    torch._inductor.config.fallback_random = True
    results = {}
    for name in names:
        _, compiler = CASES[name]
        tokens, hidden = LARGE_SIZES.get(name, (TOKENS, HIDDEN))
        train = name in TRAINING
        layer = _layer(rank, world, hidden).train(train)
        x = torch.randn(2, tokens // 2, hidden, generator=torch.Generator().manual_seed(100 + rank))
        results[name] = eager_and_fused(layer, x, train, compiler)
    return results


@pytest.fixture(scope="module")
def ranks() -> dict[int, list[dict[str, Any]]]:
    return run_by_world(CASES, _run)


@pytest.mark.parametrize("name", list(CASES))
def test_fairscale_moe_fuses_and_equals_eager(ranks, name):
    world, _ = CASES[name]
    for rank, result in enumerate(ranks[world]):
        case = result[name]
        assert_block_fused(case, rank, 2, name in TRAINING)
        assert not any("c10d" in k for k in case["ops"]), case["ops"]
        # No other pass took the dispatch einsum's bmm (it is the MoE block's, not a BMM-RS pair).
        assert not any(p == "bmm_reducescatter_alltoall" and ok for p, ok, _ in case["events"])
        assert_steps_equal(case["fused"], case["eager"], rank, name in TRAINING, rtol=1e-5, atol=1e-5)


def _changing_token_counts(rank: int, world: int) -> dict[str, Any]:
    xs = [torch.randn(2, tokens // 2, HIDDEN, generator=torch.Generator().manual_seed(tokens + rank))
          for tokens in (TOKENS, TOKENS + 8)]
    return {dynamic: steps_over_token_counts(_layer(rank, world, HIDDEN).eval(), xs, False, "eager", dynamic=dynamic)
            for dynamic in (None, True)}


def test_changed_token_counts_fuse_at_static_shapes_and_a_dynamic_compile_is_refused_with_the_reason():
    """Before, the recompile with dynamic sizes (dynamo's default, or dynamic=True) failed in the
    pass: "AttributeError: 'SymInt' object has no attribute 'dim'"."""
    for rank, result in enumerate(run_ranks(2, _changing_token_counts, timeout=300)):
        static, dynamic = result[None], result[True]
        fused = [ok for pattern, ok, _ in static["events"] if pattern == "moe_capacity_a2a"]
        assert fused == [True, True], (rank, static["events"])
        refused = [d for pattern, ok, d in dynamic["events"] if pattern == "moe_capacity_a2a" and not ok]
        assert refused and all("dynamic size" in d and "static shapes only" in d for d in refused), \
            (rank, dynamic["events"])
        for eager, got in static["steps"] + dynamic["steps"]:
            assert_steps_equal(got, eager, rank, False, rtol=1e-5, atol=1e-5)
