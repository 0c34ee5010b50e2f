"""HF transformers' MoE blocks, as installed from PyPI (the ``integration`` extra), unmodified, under
``torch.compile(block, backend=moe_fusion.backend())``: Mixtral, Qwen3-MoE and DeepSeek-V3 sparse
blocks, single device, fp32, inference and training.

* ``grouped_mm`` experts (the experts sorted by expert, two grouped matmuls over the same
  ``offs``): the routed experts become one ``npu_ffn_grouped`` (``ffn`` pass, grouped form), and
  DeepSeek-V3's shared experts an ``npu_ffn``; output, input gradient and every parameter gradient
  equal the unfused eager block's.
* ``batched_mm`` experts (per token-slot weights ``W[expert_ids]`` gathered from the router's top-k
  ids, two bmms): the routed experts become one ``npu_ffn_grouped`` over the rows sorted by expert
  and scattered back (``ffn`` pass, gathered form), with the same equalities; the bmms are gone.
  The same experts compiled alone, their ids a graph input rather than a top-k of the router, are
  refused (the ids are not known to lie in ``[0, E)``) and still equal eager.
* ``eager`` experts (a Python loop over the experts hit, which dynamo cannot keep in one graph) are
  not fused by the graph passes: the test pins that down, with the output still equal to eager, so a
  change is noticed. ``moe_fusion.compile`` fuses them through its module route
  (``test_hf_module_route.py``).

Weights are drawn here (``from_config``-built blocks leave HF's experts uninitialized).
"""
from __future__ import annotations

import importlib

import pytest
import torch

from moe_fusion.passes import FusionReport, backend
from step_results import step_results

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


def compiled_step(name: str, implementation: str, train: bool, compiler: str = "eager"):
    block = make_block(name, implementation)
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = step_results(block, block, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    got = step_results(block, torch.compile(block, backend=backend(report=report, compiler=compiler)), x, train)
    return report, got, want


def _fused_details(report: FusionReport, name: str) -> list[str]:
    """The ffn pass's fused details; asserts the routed experts' ``npu_ffn_grouped`` is among them
    (and DeepSeek-V3's shared expert, a LlamaMLP-like GLU MLP, as an ``npu_ffn``)."""
    details = [e.detail for e in report.fused("ffn")]
    assert any(d.startswith("npu_ffn_grouped(swiglu, GLU") for d in details), report.format()
    if name == "deepseek_v3":
        assert any(d.startswith("npu_ffn(swiglu, GLU") for d in details), report.format()
    return details


def _assert_equal(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_grouped_mm_experts_become_npu_ffn_grouped(name, train):
    report, got, want = compiled_step(name, "grouped_mm", train)
    _fused_details(report, name)
    if train:
        assert len(got) > 4         # output, x, and the block's parameters
    _assert_equal(got, want)


def test_inductor_training_step_fuses():
    report, got, want = compiled_step("mixtral", "grouped_mm", True, compiler="inductor")
    assert [e.detail.split("(")[0] for e in report.fused("ffn")] == ["npu_ffn_grouped"], report.format()
    _assert_equal(got, want)


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_inductor_inference_fuses(implementation):
    """The inference graph reaches inductor's lowering with the rewrite's own nodes (the batched_mm
    sort's expert range once crashed it: ``aten.arange.default`` has a decomposition but no lowering)."""
    report, got, want = compiled_step("mixtral", implementation, False, compiler="inductor")
    assert [e.detail.split("(")[0] for e in report.fused("ffn")] == ["npu_ffn_grouped"], report.format()
    _assert_equal(got, want)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_batched_mm_experts_become_sorted_npu_ffn_grouped(name, train):
    report, got, want = compiled_step(name, "batched_mm", train)
    details = _fused_details(report, name)
    assert sum("sorted by expert" in d for d in details) == 1, report.format()
    assert report.ops_after["aten.bmm.default"] == 0 < report.ops_before["aten.bmm.default"], report.format()
    assert not report.refused("ffn"), report.format()
    if train:
        assert len(got) > 4         # output, x, and the block's parameters
    _assert_equal(got, want)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_batched_mm_experts_with_input_ids_stay_unfused(train):
    """HF's batched_mm experts compiled alone: ``W[ids]`` with ``ids`` a graph input, not a top-k of
    the router. Sorting by them would be exact only for ids in ``[0, E)``, which nothing proves."""
    experts = make_block("mixtral", "batched_mm").experts
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(12, HIDDEN, generator=gen)
    ids = torch.randint(0, EXPERTS, (12, TOP_K), generator=gen)
    weights = torch.rand(12, TOP_K, generator=gen)
    report = FusionReport()
    torch._dynamo.reset()
    compiled = torch.compile(experts, backend=backend(report=report, compiler="eager"))
    got, want = (step_results(experts, lambda leaf, run=run: run(leaf, ids, weights), x, train) for run in (compiled, experts))
    assert not report.fused(), report.format()
    assert any("not the indices of a topk" in e.detail for e in report.refused("ffn")), report.format()
    _assert_equal(got, want)


def test_eager_experts_stay_unfused():
    report, got, want = compiled_step("mixtral", "eager", False)
    assert not [e for e in report.fused() if "npu_ffn_grouped" in e.detail], report.format()
    _assert_equal(got, want)
