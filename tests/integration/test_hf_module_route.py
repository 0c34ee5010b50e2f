"""HF transformers' ``eager`` experts (a Python loop over the experts hit, which dynamo cannot keep in
one graph) through ``moe_fusion.compile``: the ``hf_experts`` module route gives each experts module
transformers' own ``grouped_mm`` forward, checked against the original on the first call, and the
FFN pass fuses it into ``npu_ffn_grouped``. Oracles: the unfused eager block."""
from __future__ import annotations

import pytest
import torch

import moe_fusion
from moe_fusion.passes import FusionReport, module_routes

from integration.test_hf_transformers import BLOCKS, HIDDEN, _assert_equal, make_block
from step_results import step_results


def _routed_step(block: torch.nn.Module, train: bool, compiler: str = "eager"):
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    want = step_results(block, block, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    got = step_results(block, moe_fusion.compile(block, report=report, compiler=compiler), x, train)
    return report, got, want


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_eager_experts_fuse_through_the_module_route(name, train):
    block = make_block(name, "eager")
    report, got, want = _routed_step(block, train)
    (route,) = report.fused(module_routes.PATTERN)
    assert route.where.endswith("experts") and "eager experts -> transformers' grouped_mm experts" in route.detail
    assert any(e.detail.startswith("npu_ffn_grouped(swiglu, GLU") for e in report.fused("ffn")), report.format()
    assert block.experts.config._experts_implementation == "eager"     # the config is not touched
    _assert_equal(got, want)


def test_inductor_inference_through_the_module_route():
    report, got, want = _routed_step(make_block("qwen3_moe", "eager"), False, compiler="inductor")
    assert report.fused(module_routes.PATTERN) and report.fused("ffn"), report.format()
    _assert_equal(got, want)


def test_a_swap_that_changes_the_output_is_undone(monkeypatch):
    """A route whose forward differs from the original on the first call is undone and reported;
    the block then runs (unfused) as the original."""
    real_swap = module_routes.ROUTES[0].swap

    def wrong_swap(module):
        undo = real_swap(module)
        swapped = module.forward
        module.forward = lambda *args, **kwargs: swapped(*args, **kwargs) * 1.01
        return undo

    monkeypatch.setattr(module_routes, "ROUTES", (module_routes.ModuleRoute(
        "hf_experts", module_routes.ROUTES[0].candidate, wrong_swap),))
    block = make_block("mixtral", "eager")
    report, got, want = _routed_step(block, False)
    (refused,) = report.refused(module_routes.PATTERN)
    assert "the swapped forward differs from the original on the first call (max difference" in refused.detail
    assert "undone" in refused.detail and not report.fused(module_routes.PATTERN)
    assert "forward" not in vars(block.experts)      # the class's own forward again
    _assert_equal(got, want)


def test_other_implementations_are_not_candidates():
    for implementation in ("grouped_mm", "batched_mm"):
        assert not module_routes.candidates(make_block("mixtral", implementation))
    assert not module_routes.candidates(torch.nn.Linear(2, 2))


def test_a_half_precision_swap_is_checked_at_its_dtype():
    """fp16 eager and grouped_mm experts differ by fp16 roundings: the check allows a few, so the
    route applies (and the result stays within fp16 rounding of eager)."""
    block = make_block("mixtral", "eager").half()
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(3)).half()
    report = FusionReport()
    torch._dynamo.reset()
    with torch.no_grad():
        got = moe_fusion.compile(block, report=report, compiler="eager")(x)[0]
        want = block(x)[0]
    assert report.fused(module_routes.PATTERN), report.format()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_the_check_leaves_the_random_generators_as_it_found_them():
    """The first call's extra eager run (a block with dropout-like draws elsewhere) must not shift
    the program's random stream."""
    block = make_block("mixtral", "eager")
    noisy = torch.nn.Sequential(torch.nn.Dropout(0.5), block).train()
    x = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    module_routes.apply_checked(noisy, (x,), {}, FusionReport())
    assert torch.equal(torch.get_rng_state(), before)
    assert "forward" in vars(block.experts)           # swapped: equal on the first call
