"""HF transformers' MoE blocks, as installed from PyPI (the ``integration`` extra), unmodified, under
``torch.compile(block, backend=moe_fusion.backend())``: Mixtral, Qwen3-MoE and DeepSeek-V3 sparse
blocks, single device, fp32, inference and training.

* ``grouped_mm`` experts (the experts sorted by expert, two grouped matmuls over the same
  ``offs``): the routed experts become one ``npu_ffn_grouped`` (``ffn`` pass, grouped form), and
  DeepSeek-V3's shared experts an ``npu_ffn``; output, input gradient and every parameter gradient
  equal the unfused eager block's.
* ``batched_mm`` experts (per token-slot weights gathered by expert id) and ``eager`` experts (a
  Python loop over the experts hit, which dynamo cannot keep in one graph) are not fused by the
  graph passes: the test pins that down, with the output still equal to eager, so a change there
  is noticed. ``moe_fusion.compile`` fuses eager experts through its module route
  (``test_hf_module_route.py``).

Weights are drawn here (``from_config``-built blocks leave HF's experts uninitialized).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from moe_fusion.passes import FusionReport, backend

HIDDEN, INNER, EXPERTS, TOP_K = 32, 64, 4, 2
BLOCKS = {   # name -> (config class, block class), importable paths in transformers
    "mixtral": ("transformers.MixtralConfig", "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock",
                dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)),
    "qwen3_moe": ("transformers.Qwen3MoeConfig", "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock",
                  dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=INNER, norm_topk_prob=True)),
    "deepseek_v3": ("transformers.DeepseekV3Config", "transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE",
                    dict(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=INNER,
                         n_shared_experts=1, n_group=2, topk_group=1)),
}


def _resolve(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def make_block(name: str, implementation: str, hidden: int = HIDDEN, inner: int = INNER) -> torch.nn.Module:
    """The library's block ``name`` with ``implementation`` experts, random weights (std 0.2 at the
    test sizes, ``1/sqrt(fan-in)``-like at larger ones)."""
    config_path, block_path, options = BLOCKS[name]
    options = {k: (inner if v == INNER else v) for k, v in options.items()}
    config = _resolve(config_path)(hidden_size=hidden, intermediate_size=inner, **options)
    config._experts_implementation = implementation
    block = _resolve(block_path)(config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * min(0.2, hidden ** -0.5))
    return block


def _step(block: torch.nn.Module, run, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
    leaf = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        out = run(leaf)
        y = out[0] if isinstance(out, tuple) else out
        if not train:
            return [y]
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    grads = [y.detach(), leaf.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None]
    block.zero_grad(set_to_none=True)
    return grads


def compiled_step(name: str, implementation: str, train: bool, compiler: str = "eager"):
    block = make_block(name, implementation)
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = _step(block, block, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    got = _step(block, torch.compile(block, backend=backend(report=report, compiler=compiler)), x, train)
    return report, got, want


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_grouped_mm_experts_become_npu_ffn_grouped(name, train):
    report, got, want = compiled_step(name, "grouped_mm", train)
    details = [e.detail for e in report.fused("ffn")]
    assert any(d.startswith("npu_ffn_grouped(swiglu, GLU") for d in details), report.format()
    if name == "deepseek_v3":       # the shared expert: a LlamaMLP-like GLU MLP
        assert any(d.startswith("npu_ffn(swiglu, GLU") for d in details), report.format()
    if train:
        assert len(got) > 4         # output, x, and the block's parameters
    _assert_equal(got, want)


def test_inductor_training_step_fuses():
    report, got, want = compiled_step("mixtral", "grouped_mm", True, compiler="inductor")
    assert [e.detail.split("(")[0] for e in report.fused("ffn")] == ["npu_ffn_grouped"], report.format()
    _assert_equal(got, want)


@pytest.mark.parametrize("implementation", ["batched_mm", "eager"])
def test_other_expert_implementations_stay_unfused(implementation):
    report, got, want = compiled_step("mixtral", implementation, False)
    assert not [e for e in report.fused() if "npu_ffn_grouped" in e.detail], report.format()
    if implementation == "batched_mm":     # the report says why (eager experts never reach one graph)
        assert any("gathered per token" in e.detail for e in report.refused("ffn")), report.format()
    _assert_equal(got, want)
