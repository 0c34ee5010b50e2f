"""DeepSpeed 0.19.8's ``deepspeed.moe.layer.MoE``, as installed from PyPI, unmodified, on real gloo
ranks under ``moe_fusion.compile``: its sparse slot routing (``scatter``/``index`` dispatch over
the expert-parallel all-to-all, ``index`` + gate combine; argmax gating, random token selection for
k=1, Gumbel noise for k=2's second expert) becomes ``dispatch_v2 -> npu_ffn_grouped -> combine_v2``
(``moe_capacity_a2a``'s slot form), dropped routes as the 2-D ``x_active_mask``; the residual MLP
of ``use_residual`` becomes ``npu_ffn``. The oracle is the eager layer on the same random stream
(the gates draw noise): output equal within fp32 rounding (bf16 roundings in the bf16 case), and in
the training cases the input and every parameter gradient too (DeepSpeed's ``_AllToAll`` autograd
Function becomes torch's differentiable all-to-all before autograd: ``autograd_collectives``).
Under inductor the cost gate leaves a capacity factor of 1 (one expert row per route) unfused, as
plain inductor compiles it, and says why; with the gate off the same block fuses.

Shims (test side, ``deepspeed_shims``): DeepSpeed's CPU shared-memory op is not built, and
deepspeed.comm adopts the gloo group.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("deepspeed")

from moe_fusion.launch import run_ranks  # noqa: E402

from integration.ranked_cases import (ExpertMlp, assert_block_fused, assert_steps_equal, eager_and_fused,  # noqa: E402
                                      run_by_world, steps_over_token_counts)

HIDDEN, FFN, EXPERTS, TOKENS = 16, 32, 4, 16
CASES = {  # name -> (world, MoE options, compiler, dtype)
    "k1-dropless": (2, {"k": 1, "drop_tokens": False}, "eager", torch.float32),
    "k2-dropless": (2, {"k": 2, "drop_tokens": False}, "eager", torch.float32),
    "k1-capacity-drops": (2, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32),
    "k2-capacity-drops": (2, {"k": 2, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32),
    "k2-residual": (2, {"k": 2, "drop_tokens": False, "use_residual": True}, "eager", torch.float32),
    "k2-no-second-sampling": (2, {"k": 2, "drop_tokens": False, "top2_2nd_expert_sampling": False}, "eager",
                              torch.float32),
    "k2-inductor": (2, {"k": 2, "drop_tokens": False}, "inductor", torch.float32),
    "k1-capacity-inductor": (2, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "inductor", torch.float32),
    "k1-capacity-inductor-gated": (2, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "inductor",
                                   torch.float32),
    "k2-bf16": (2, {"k": 2, "drop_tokens": False}, "eager", torch.bfloat16),
    "k2-ep4": (4, {"k": 2, "drop_tokens": False}, "eager", torch.float32),
    "k1-capacity-ep4": (4, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32),
}
# name -> (tokens per rank, hidden): blocks large enough that the guards evaluate a reduced instance,
# with sizes that coincide (E * C == tokens, H == E * C / 2) as powers of two do.
LARGE = {"k2-dropless-large": (2, {"k": 2, "drop_tokens": False}, "eager", torch.float32),
         "k1-capacity-large": (2, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32),
         # top-2's capacity ceil(2.0 * S / E) reads S / E as a float: the reduced instance divides it too
         "k2-capacity-large": (2, {"k": 2, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32)}
LARGE_SIZES = (512, 256)
CASES.update(LARGE)
# Training steps (forward and backward of a fixed loss): output, input and every parameter gradient.
TRAINING = {"k2-dropless-train": (2, {"k": 2, "drop_tokens": False}, "eager", torch.float32),
            "k1-capacity-train": (2, {"k": 1, "drop_tokens": True, "capacity_factor": 1.0}, "eager", torch.float32),
            "k2-residual-train": (2, {"k": 2, "drop_tokens": False, "use_residual": True}, "eager", torch.float32),
            "k2-inductor-train": (2, {"k": 2, "drop_tokens": False}, "inductor", torch.float32)}
CASES.update(TRAINING)
# Capacity factor 1 gives the experts one row per route: under inductor the cost gate leaves that
# block unfused (``cost.refuse_unpadded_slot_block``); with the gate off it fuses (its lowering).
GATED = {"k1-capacity-inductor-gated"}
COMPILE_OPTIONS = {"k1-capacity-inductor": {"cost_gate": False}}


def _run(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    from integration.deepspeed_shims import deepspeed_moe, init_deepspeed

    init_deepspeed()
    # The gates draw noise: inductor must draw it as eager does for the outputs to compare.
    torch._inductor.config.fallback_random = True
    results = {}
    for name in names:
        _, options, compiler, dtype = CASES[name]
        tokens, hidden = LARGE_SIZES if name in LARGE else (TOKENS, HIDDEN)
        train = name in TRAINING
        layer = deepspeed_moe(ExpertMlp(hidden, FFN), hidden, EXPERTS, world, seed=0, rank=rank, min_capacity=4,
                              **options)
        layer = layer.to(dtype).train(train)
        x = torch.randn(2, tokens // 2, hidden, generator=torch.Generator().manual_seed(100 + rank)).to(dtype)
        results[name] = eager_and_fused(layer, x, train, compiler, **COMPILE_OPTIONS.get(name, {}))
    return results


@pytest.fixture(scope="module")
def ranks() -> dict[int, list[dict[str, Any]]]:
    return run_by_world(CASES, _run)


@pytest.mark.parametrize("name", [name for name in CASES if name not in GATED])
def test_deepspeed_moe_fuses_and_equals_eager(ranks, name):
    world, options, _, dtype = CASES[name]
    for rank, result in enumerate(ranks[world]):
        case = result[name]
        assert_block_fused(case, rank, options["k"], name in TRAINING)
        if options.get("use_residual"):
            assert any(p == "ffn" and ok for p, ok, _ in case["events"]), case["events"]
        tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
        assert_steps_equal(case["fused"], case["eager"], rank, name in TRAINING, **tol)


@pytest.mark.parametrize("name", sorted(GATED))
def test_the_cost_gate_leaves_a_capacity_without_padding_unfused_under_inductor(ranks, name):
    world = CASES[name][0]
    for rank, result in enumerate(ranks[world]):
        case = result[name]
        blocks = [(ok, detail) for pattern, ok, detail in case["events"] if pattern == "moe_capacity_a2a"]
        assert len(blocks) == 1 and not blocks[0][0], (rank, case["events"])
        assert "slower here than the unfused code" in blocks[0][1] and "16 rows per rank for 16 routes" in blocks[0][1]
        assert not any("moe_fusion" in op and "distribute" in op for op in case["ops"]), case["ops"]
        assert_steps_equal(case["fused"], case["eager"], rank, False, rtol=1e-5, atol=1e-5)


class ErfGeluExpert(ExpertMlp):
    """Linear -> exact (erf) GELU -> Linear: npu_ffn_grouped's gelu is the tanh form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def _erf_gelu_block(rank: int, world: int) -> dict[str, Any]:
    from integration.deepspeed_shims import deepspeed_moe, init_deepspeed

    init_deepspeed()
    layer = deepspeed_moe(ErfGeluExpert(HIDDEN, FFN), HIDDEN, EXPERTS, world, seed=0, rank=rank, min_capacity=4,
                          k=2, drop_tokens=False).eval()
    x = torch.randn(2, TOKENS // 2, HIDDEN, generator=torch.Generator().manual_seed(100 + rank))
    return eager_and_fused(layer, x, False, "eager")


def test_a_block_with_experts_the_op_cannot_compute_is_refused_with_the_reason():
    """Before, the block was no candidate at all: the report named only the experts' FFN refusals."""
    for rank, case in enumerate(run_ranks(2, _erf_gelu_block, timeout=300)):
        blocks = [(ok, detail) for pattern, ok, detail in case["events"] if pattern == "moe_capacity_a2a"]
        assert len(blocks) == 1 and not blocks[0][0], (rank, case["events"])
        assert "an expert FFN the fused ops cannot compute" in blocks[0][1] and "erf" in blocks[0][1], blocks
        assert_steps_equal(case["fused"], case["eager"], rank, False, rtol=1e-5, atol=1e-5)


def _changing_token_counts(rank: int, world: int) -> dict[str, Any]:
    from integration.deepspeed_shims import deepspeed_moe, init_deepspeed

    init_deepspeed()
    layer = deepspeed_moe(ExpertMlp(HIDDEN, FFN), HIDDEN, EXPERTS, world, seed=0, rank=rank, min_capacity=4,
                          k=1, drop_tokens=True, capacity_factor=2.0).train()
    xs = [torch.randn(2, tokens // 2, HIDDEN, generator=torch.Generator().manual_seed(tokens + rank))
          for tokens in (TOKENS, TOKENS + 8)]
    return steps_over_token_counts(layer, xs, True, "eager")


def test_a_changed_token_count_recompiles_at_static_shapes_and_fuses_again():
    """A last batch of another size. Before, dynamo recompiled the block with dynamic sizes and,
    under moe_fusion.compile's captured scalars, computed DeepSpeed's capacity ceil(S / E * 2) as
    NaN: 'index 17 is out of bounds for dimension 0 with size 17' on both ranks."""
    for rank, case in enumerate(run_ranks(2, _changing_token_counts, timeout=300)):
        fused = [detail for pattern, ok, detail in case["events"] if pattern == "moe_capacity_a2a" and ok]
        assert len(fused) == 2 and all("K=1" in d for d in fused), (rank, case["events"])
        for eager, got in case["steps"]:
            assert_steps_equal(got, eager, rank, True, rtol=1e-5, atol=1e-5)
