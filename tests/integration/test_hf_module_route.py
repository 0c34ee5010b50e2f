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


def _tokens(seed: int = 3) -> torch.Tensor:
    """A block's input ``(2, 6, HIDDEN)`` fp32."""
    return torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _routed_step(block: torch.nn.Module, train: bool, compiler: str = "eager"):
    """The report, the compiled step's results (the second call: the first runs the block eagerly
    while the route is checked) and the eager oracle's."""
    x = _tokens()
    want = step_results(block, block, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(block, report=report, compiler=compiler)
    _assert_equal(step_results(block, compiled, x, train), want)
    assert not report.fused("ffn") and "forward" not in vars(block.experts)    # nothing compiled yet
    got = step_results(block, compiled, x, train)
    assert "forward" not in vars(block.experts)    # the swapped forward is installed only during a call
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


def test_a_swap_that_changes_the_output_is_dropped(monkeypatch):
    """A route whose forward differs from the original on the first call is dropped and reported;
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
    assert "not swapped" in refused.detail and not report.fused(module_routes.PATTERN)
    _assert_equal(got, want)


def test_other_implementations_are_not_candidates():
    for implementation in ("grouped_mm", "batched_mm"):
        assert not module_routes.candidates(make_block("mixtral", implementation))
    assert not module_routes.candidates(torch.nn.Linear(2, 2))


def test_a_half_precision_swap_is_checked_at_its_dtype():
    """fp16 eager and grouped_mm experts differ by fp16 roundings: the check allows a few, so the
    route applies (and the result stays within fp16 rounding of eager)."""
    block = make_block("mixtral", "eager").half()
    x = _tokens().half()
    report = FusionReport()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = moe_fusion.compile(block, report=report, compiler="eager")
        compiled(x)
        got = compiled(x)[0]
        want = block(x)[0]
    assert report.fused(module_routes.PATTERN), report.format()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_the_first_call_draws_what_the_model_draws():
    """The first call runs the model as written (a block with dropout-like draws elsewhere): its
    output and the program's random stream afterwards are the eager call's; the check's own draws
    leave no trace. The swapped forward is kept, not installed."""
    block = make_block("mixtral", "eager")
    noisy = torch.nn.Sequential(torch.nn.Dropout(0.5), block).train()
    x = _tokens()
    torch.manual_seed(0)
    want = noisy(x)[0]
    after = torch.get_rng_state()
    torch.manual_seed(0)
    routed = module_routes.apply_checked(noisy, (x,), {}, FusionReport())
    assert torch.equal(torch.get_rng_state(), after)
    assert routed.ran and torch.equal(routed.output[0], want)
    assert [module for module, *_ in routed.forwards] == [block.experts] and "forward" not in vars(block.experts)
    with routed.installed():
        assert vars(block.experts)["forward"] is routed.forwards[0][1]
    assert "forward" not in vars(block.experts)


def _tiny_causal_lm():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=64)
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model, config


def test_a_kv_cache_is_appended_to_once_and_only_experts_are_candidates():
    """The first call's side effects happen once (the prompt enters the cache once), so decoding
    continues as eager does; the route is offered to the experts only (attention, rotary embedding
    and the models share the config and have wrapped forwards too)."""
    from transformers import DynamicCache

    model, config = _tiny_causal_lm()
    assert [path for path, *_ in module_routes.candidates(model)] == ["model.layers.0.mlp.experts"]
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, run in (("eager", model), ("fused", moe_fusion.compile(model, compiler="eager"))):
        torch._dynamo.reset()
        cache = DynamicCache(config=config)
        with torch.no_grad():
            run(input_ids=ids, past_key_values=cache, use_cache=True)
            logits[name] = run(input_ids=ids[:, :1], past_key_values=cache, use_cache=True).logits
        assert cache.get_seq_length() == 6, name
    torch.testing.assert_close(logits["fused"], logits["eager"], rtol=1e-5, atol=1e-5)


def test_the_users_module_is_left_as_it_was():
    """After compiled calls the experts module has no swapped forward: it saves and loads, and a
    later switch of its experts implementation takes effect."""
    import io

    block = make_block("mixtral", "eager")
    compiled = moe_fusion.compile(block, compiler="eager")
    x = _tokens()
    with torch.no_grad():
        compiled(x)
        compiled(x)
    assert "forward" not in vars(block.experts)
    buffer = io.BytesIO()
    torch.save(block, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], block(x)[0])


def test_a_nan_on_the_first_call_does_not_drop_the_route():
    """NaN where the original gives NaN is agreement: later clean calls fuse."""
    block = make_block("mixtral", "eager")
    x = _tokens()
    with_nan = x.clone()
    with_nan[0, 1, 3] = float("nan")
    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(block, report=report, compiler="eager")
    with torch.no_grad():
        first = compiled(with_nan)[0]
        assert first.isnan().any() and torch.equal(first.isnan(), block(with_nan)[0].isnan())
        got = compiled(x)[0]
        want = block(x)[0]
    assert report.fused(module_routes.PATTERN) and report.fused("ffn"), report.format()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_explain_applies_the_module_route():
    """``explain`` compiles as ``moe_fusion.compile`` does: eager experts fuse through the route."""
    block = make_block("mixtral", "eager")
    x = _tokens()
    report = moe_fusion.explain(block, x, print_report=False)
    assert report.fused(module_routes.PATTERN) and report.fused("ffn"), report.format()


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_from_the_first_call(reentrant):
    """The first call under torch.utils.checkpoint runs eagerly; its replay inside the backward must
    too (non-reentrant checkpointing checks the replay saves the same tensors), and the later,
    compiled steps replay compiled. Gradients equal eager's on every step."""
    from torch.utils.checkpoint import checkpoint

    block = make_block("mixtral", "eager")
    compiled = moe_fusion.compile(block, compiler="eager")
    torch._dynamo.reset()
    for step in range(3):
        x = _tokens(step)
        want = step_results(block, block, x, True)
        got = step_results(block, lambda t: checkpoint(compiled, t, use_reentrant=reentrant), x, True)
        _assert_equal(got, want)


def test_a_forward_the_user_sets_later_is_honoured():
    """After compiling, a forward set on the experts module (a wrapper, say) is what runs: the
    swapped forward was checked against the class's own, so it is not installed over another."""
    block = make_block("mixtral", "eager")
    compiled = moe_fusion.compile(block, compiler="eager")
    torch._dynamo.reset()
    x = _tokens()
    with torch.no_grad():
        compiled(x)
        compiled(x)
        own = block.experts.forward
        block.experts.forward = lambda *args, **kwargs: own(*args, **kwargs) * 2
        got, want = compiled(x)[0], block(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forward" in vars(block.experts)      # the user's, left in place
