"""megatron-core 0.16.1's ``MoELayer`` (all-to-all or all-gather token dispatcher, ``SequentialMLP`` experts with local
linear layers, top-2 of 4 experts, fp32; or the legacy ``GroupedMLP`` experts, which Megatron runs in
bf16 only), as installed from PyPI, unmodified, on 2 gloo ranks with EP=2, under
``moe_fusion.compile``: the ``megatron_moe`` module route swaps in a forward of dispatch_v2 ->
grouped FFN -> combine_v2 over the layer's EP group, and the compiled step equals the eager layer
(the oracle: the same layer run eagerly before compiling), output and every parameter gradient
(bf16 layers within bf16 rounding: Megatron rounds fc1's output to bf16 where the fused FFN keeps
it in fp32). Experts whose activation the op lacks (erf GELU) stay the layer's own between the fused
dispatch and combine; layers the route cannot express are refused with the reason and keep their
forward.

The CPU shims Megatron needs (CUDA device / stream stand-ins, a CPU ``gmm`` for ``GroupedMLP``) are
test-side: ``megatron_shims``.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Iterator, Optional

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import moe_fusion  # noqa: E402
from moe_fusion.launch import run_ranks  # noqa: E402
from moe_fusion.passes import FusionReport  # noqa: E402
from step_results import named_step_results  # noqa: E402

WORLD, EXPERTS, TOP_K, HIDDEN, FFN, SEQ, BATCH = 2, 4, 2, 16, 24, 6, 2
DISPATCH, COMBINE, FFN_OP = ("moe_fusion.npu_moe_distribute_dispatch_v2.default",
                             "moe_fusion.npu_moe_distribute_combine_v2.default", "moe_fusion.npu_ffn_grouped.default")
_GROUPED = {"moe_grouped_gemm": True, "bf16": True, "params_dtype": torch.bfloat16}
FUSED_FFN, OWN_EXPERTS, REFUSED = "fused FFN", "own experts", "refused"     # what the route makes of the experts
# name -> (TransformerConfig overrides, shared experts, FUSED_FFN / OWN_EXPERTS / REFUSED).
CASES: dict[str, tuple[dict, bool, str]] = {
    "swiglu": ({}, False, FUSED_FFN),
    "swiglu-shared": ({}, True, FUSED_FFN),
    "relu-bias-capacity": ({"gated_linear_unit": False, "activation_func": F.relu, "add_bias_linear": True,
                            "moe_expert_capacity_factor": 0.75}, False, FUSED_FFN),
    "allgather-shared": ({"moe_token_dispatcher_type": "allgather"}, True, FUSED_FFN),
    # The legacy GroupedMLP experts (bf16 only, as Megatron asserts; no biases), over the shims' CPU gmm.
    "grouped-swiglu-bf16": (_GROUPED, False, FUSED_FFN),
    "grouped-relu-capacity-bf16": ({**_GROUPED, "gated_linear_unit": False, "activation_func": F.relu,
                                    "moe_expert_capacity_factor": 0.75}, True, FUSED_FFN),
    "grouped-top1-probs-on-input-bf16": ({**_GROUPED, "moe_router_topk": 1, "moe_router_pre_softmax": True,
                                          "moe_apply_probs_on_input": True, "gated_linear_unit": False,
                                          "activation_func": F.silu}, False, FUSED_FFN),
    # Activations npu_ffn_grouped has no exact form of: dispatch and combine fuse around Megatron's experts.
    "erf-gelu-bias": ({"gated_linear_unit": False, "activation_func": F.gelu, "add_bias_linear": True}, False,
                      OWN_EXPERTS),
    "allgather-erf-geglu-shared": ({"moe_token_dispatcher_type": "allgather", "activation_func": F.gelu}, True,
                                   OWN_EXPERTS),
    "grouped-erf-gelu-capacity-bf16": ({**_GROUPED, "gated_linear_unit": False, "activation_func": F.gelu,
                                        "moe_expert_capacity_factor": 0.75}, False, OWN_EXPERTS),
    "pad-to-capacity": ({"moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True,
                         "num_moe_experts": 2}, False, REFUSED),
}

# name -> TransformerConfig overrides of a layer the route meets under the cost gate (inductor's
# default). The bf16 layer uses the all-gather dispatcher: fused in fp32, its bf16 experts kept as its own.
GATED = {"bf16-gated": {"params_dtype": torch.bfloat16, "moe_token_dispatcher_type": "allgather"},
         "alltoall-gated": {}, "allgather-under-the-gate": {"moe_token_dispatcher_type": "allgather"}}


def make_layer(overrides: dict, shared: bool, hidden: int = HIDDEN, ffn: int = FFN, experts: int = EXPERTS,
               world: int = WORLD) -> torch.nn.Module:
    """Megatron's MoE layer (local specs, top-2 alltoall, SwiGLU unless ``overrides`` say otherwise),
    weights drawn here (the same on every rank)."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    options = dict(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=ffn,
                   moe_ffn_hidden_size=ffn, num_moe_experts=experts, moe_router_topk=TOP_K,
                   moe_token_dispatcher_type="alltoall", expert_model_parallel_size=world,
                   use_cpu_initialization=True, add_bias_linear=False, gated_linear_unit=True,
                   activation_func=F.silu, bias_activation_fusion=False, moe_router_load_balancing_type="none",
                   params_dtype=torch.float32, moe_shared_expert_intermediate_size=ffn if shared else None)
    options.update(overrides)
    spec = get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=options["num_moe_experts"],
                                           moe_grouped_gemm=options.get("moe_grouped_gemm", False))
    layer = build_module(spec, config=TransformerConfig(**options))
    gen = torch.Generator().manual_seed(3)      # the same router and shared experts on both ranks
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def _run(rank: int, world: int) -> dict[str, Any]:
    from integration import megatron_shims

    megatron_shims.install()
    megatron_shims.init_parallel(world)
    results = {"fullgraph": _fullgraph_error(rank)}
    for name, (overrides, shared, _) in CASES.items():
        for train in (False, True):
            layer = make_layer(overrides, shared).train(train)
            x = _tokens(rank, overrides.get("params_dtype", torch.float32))
            with torch.no_grad():
                routed_copies = int(layer.router(x)[1].sum())     # fewer than SEQ*BATCH*TOP_K: tokens dropped
            eager, compiled, report = _eager_and_compiled(layer, x, train, compiler="eager")
            results[name, train] = {
                "eager": eager, "compiled": compiled, "ops": collections.Counter(report.ops_after),
                "routed_copies": routed_copies, "fused": [e.detail for e in report.fused("module_route")],
                "refused": [e.detail for e in report.refused("module_route")], "report": report.format(),
                "settings": [e.detail for e in report.refused("dynamo_settings")]}
    results["one-rank-differs"] = _one_rank_differs(rank)
    results["inductor-gated"] = {train: _inductor_gated(rank, train) for train in (False, True)}
    results["own-experts-inductor"] = {train: _own_experts_inductor(rank, train) for train in (False, True)}
    # bf16 experts of the all-gather dispatcher where only rank 0's CPU multiplies bf16 natively:
    # rank 0 keeps the layer's own experts, rank 1 fuses them; both run the fused dispatch and combine.
    with _native_bf16(rank == 0):
        results["cpus-differ"] = _under_the_cost_gate(rank, GATED["bf16-gated"])
    with _native_bf16(True):
        for name, overrides in GATED.items():
            results[name] = _under_the_cost_gate(rank, overrides)
        layer = make_layer(GATED["bf16-gated"], False).eval()
        eager, compiled, _ = _eager_and_compiled(layer, _tokens(rank, torch.bfloat16), False)
        results["bf16-gated-inductor"] = {"eager": eager, "compiled": compiled}
    return results


@contextlib.contextmanager
def _native_bf16(native: bool) -> Iterator[None]:
    """This process's CPU reports AMX (native bf16 matmuls) or no native bf16 unit, whatever it has."""
    flags = torch.cpu._is_amx_tile_supported, torch.cpu._is_avx512_bf16_supported
    torch.cpu._is_amx_tile_supported = torch.cpu._is_avx512_bf16_supported = lambda: native
    try:
        yield
    finally:
        torch.cpu._is_amx_tile_supported, torch.cpu._is_avx512_bf16_supported = flags


def _tokens(rank: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This rank's layer input ``(SEQ, BATCH, HIDDEN)`` (its own draw: ranks route differently)."""
    return torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(10 + rank)).to(dtype)


def _eager_and_compiled(layer: torch.nn.Module, x: torch.Tensor, train: bool,
                        **options: Any) -> tuple[dict, dict, FusionReport]:
    """The oracle (``layer`` run eagerly first), then ``moe_fusion.compile(layer, **options)``'s step
    results on the same input (its second call: the first, checked against the oracle, runs the
    layer eagerly while the route is checked), and its report."""
    eager = named_step_results(layer, layer, x, train)
    report = FusionReport()
    torch._dynamo.reset()
    compiled = moe_fusion.compile(layer, report=report, **options)
    first = named_step_results(layer, compiled, x, train)     # eager, while the route is checked
    assert set(first) == set(eager), (set(first), set(eager))
    for key, want in eager.items():     # (Megatron's eager runs differ by an fp32 rounding or so)
        torch.testing.assert_close(first[key], want, msg=f"first call {key}")
    return eager, named_step_results(layer, compiled, x, train), report


def _under_the_cost_gate(rank: int, overrides: dict) -> dict[str, Any]:
    """Whether the route swapped the layer's forward under the cost gate, and its refusals."""
    from moe_fusion.passes import cost, module_routes

    layer = make_layer(overrides, False).eval()
    x = _tokens(rank, overrides.get("params_dtype", torch.float32))
    report = FusionReport()
    with cost.gated(True):
        routed = module_routes.apply_checked(layer, (x,), {}, report)
    return {"swapped": bool(routed.forwards), "refused": [e.detail for e in report.refused("module_route")],
            "fused": [e.detail for e in report.fused("module_route")]}


def _inductor_gated(rank: int, train: bool) -> dict[str, Any]:
    """The all-to-all layer with 2 local experts under inductor, where the cost gate leaves it
    unrouted: Megatron's own dispatcher uses data-dependent counts as Python list indices
    (``sort_chunks_by_idxs``), so compile falls back to dynamo's defaults instead of raising."""
    layer = make_layer({}, False).train(train)
    routings = []       # side effects of a call (Megatron's aux-loss logging) must happen once per call
    layer.router.register_forward_hook(lambda *_: routings.append(1))
    eager, compiled, report = _eager_and_compiled(layer, _tokens(rank), train)
    return {"eager": eager, "compiled": compiled, "refused": [e.detail for e in report.refused("module_route")],
            "settings": [e.detail for e in report.refused("dynamo_settings")], "routings": len(routings)}


def _fullgraph_error(rank: int) -> Optional[str]:
    """What ``fullgraph=True`` raises on an erf-GELU layer, whose own experts run outside the graph
    (before any collective of the route's check). Not timed out: the ranks agree on the candidate.
    (A routed layer's graph under fullgraph is not tested here: Megatron's router calls the CPU shim
    of ``torch.cuda.current_device``, which dynamo may take for a torch op returning a str.)"""
    layer = make_layer(CASES["erf-gelu-bias"][0], False).eval()
    torch._dynamo.reset()
    try:
        moe_fusion.compile(layer, compiler="eager", fullgraph=True)(_tokens(rank))
    except ValueError as raised:
        return str(raised)
    return None


def _own_experts_inductor(rank: int, train: bool) -> dict[str, Any]:
    """The erf-GELU layer under inductor, past the cost gate: fused dispatch and combine compiled
    around the layer's own experts, which run eagerly between them."""
    layer = make_layer(CASES["erf-gelu-bias"][0], False).train(train)
    eager, compiled, report = _eager_and_compiled(layer, _tokens(rank), train, cost_gate=False)
    return {"eager": eager, "compiled": compiled, "fused": [e.detail for e in report.fused("module_route")]}


def _one_rank_differs(rank: int) -> dict[str, Any]:
    """The swapped forward is made wrong on rank 1 only: rank 0's own check passes, yet both ranks
    must drop the swap (agreed over the EP group) and both report why."""
    from moe_fusion.passes import megatron_route, module_routes

    def swap(layer: torch.nn.Module) -> Any:
        undo = megatron_route.swap(layer)
        if rank == 1:
            routed = layer.forward
            layer.forward = lambda *args, **kwargs: (routed(*args, **kwargs)[0] * 1.01, None)
        return undo

    real = module_routes.ROUTES
    module_routes.ROUTES = tuple(module_routes.ModuleRoute(r.name, r.candidate, swap, r.agree)
                                 if r.name == "megatron_moe" else r for r in real)
    try:
        layer = make_layer({"num_moe_experts": 2}, False).eval()     # one local expert: see _inductor_gated
        eager, compiled, report = _eager_and_compiled(layer, _tokens(rank), False, compiler="eager")
    finally:
        module_routes.ROUTES = real
    return {"eager": eager, "compiled": compiled, "swapped": bool(report.fused("module_route")),
            "refused": [e.detail for e in report.refused("module_route")], "report": report.format()}


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return run_ranks(WORLD, _run, timeout=300)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", list(CASES))
def test_megatron_moe_layer(ranks, name, train):
    experts = CASES[name][2]
    routed = experts != REFUSED
    for rank, result in enumerate(ranks):
        case = result[name, train]
        if routed:
            assert len(case["fused"]) == 1 and "megatron_moe" in case["fused"][0], case["report"]
            assert case["ops"][DISPATCH] >= 1 and case["ops"][COMBINE] >= 1, case["report"]
            assert (case["ops"][FFN_OP] >= 1) == (experts == FUSED_FFN), case["report"]
            own = "the layer's own experts, left unfused" in case["fused"][0]
            assert own == (experts == OWN_EXPERTS), case["report"]
        else:
            assert not case["fused"] and len(case["refused"]) == 1, case["report"]
            assert "megatron_moe: not routed" in case["refused"][0], case["report"]
            assert case["ops"][DISPATCH] == 0, case["report"]
        if "capacity" in name and routed:
            assert case["routed_copies"] < SEQ * BATCH * TOP_K     # the capacity factor dropped copies
        assert set(case["compiled"]) == set(case["eager"])
        assert not train or len(case["eager"]) > 4     # output, x and the layer's parameters
        for key, want in case["eager"].items():
            got = case["compiled"][key]
            if want.dtype == torch.bfloat16:
                # Megatron rounds fc1's output to bf16, the fused FFN keeps it in fp32: the weight gradients
                # summed over those rows differ by up to 2-3 bf16 ulps (the module route's own bf16 rtol).
                scale = want.float().abs().max().item()
                error = (got.float() - want.float()).abs().max().item()
                assert got.dtype == want.dtype and error <= 2e-2 * scale + 1e-3, f"rank {rank} {key}: {error}, {scale}"
            else:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"rank {rank} {key}")


def test_refusal_reasons(ranks):
    for result in ranks:
        assert "padding to capacity" in result["pad-to-capacity", False]["refused"][0]
        for name in ("erf-gelu-bias", "allgather-erf-geglu-shared", "grouped-erf-gelu-capacity-bf16"):
            fused = result[name, False]["fused"][0]                 # what was left out, and why
            assert "own experts, left unfused (activation 'gelu'" in fused and "not erf" in fused, fused


def test_untraceable_layer_compiles_with_dynamo_defaults(ranks):
    """Under inductor the cost gate leaves the all-to-all layer unrouted; Megatron's own dispatcher
    with 2 local experts then does not trace under moe_fusion.compile's settings: compile falls back
    to dynamo's defaults (reported) instead of raising, and outputs and gradients equal eager."""
    for rank, result in enumerate(ranks):
        for train, case in result["inductor-gated"].items():
            assert len(case["refused"]) == 1 and "slower here" in case["refused"][0], case["refused"]
            assert len(case["settings"]) == 1 and "data-dependent" in case["settings"][0], case["settings"]
            assert "sort_chunks_by_idxs" in case["settings"][0], case["settings"]
            # eager, then two compiled calls; before, the first compiled call routed twice (its failed
            # attempt under captured counts ran the router's graph, then the rerun)
            assert case["routings"] == 3, case["routings"]
            assert set(case["compiled"]) == set(case["eager"])
            for key, want in case["eager"].items():
                torch.testing.assert_close(case["compiled"][key], want, rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank} {key}")


def test_bf16_experts_of_the_allgather_dispatcher_stay_the_layers_own_under_the_cost_gate(ranks):
    """Slower fused on a CPU with native bf16 matmuls, but plain inductor cannot run the dispatcher:
    the fused dispatch and combine keep the layer's own experts between them."""
    for result in ranks:
        case = result["bf16-gated"]
        assert case["swapped"] and not case["refused"] and len(case["fused"]) == 1, case
        assert "the layer's own experts, left unfused" in case["fused"][0], case
        assert "bfloat16 natively (AMX)" in case["fused"][0], case


def test_bf16_allgather_layer_under_inductor_and_the_cost_gate_equals_eager(ranks):
    """Before, the gate handed the layer back to plain inductor, which crashed in Megatron's
    dispatcher on both ranks ("masked_select: expected BoolTensor for mask")."""
    for rank, result in enumerate(ranks):
        case = result["bf16-gated-inductor"]
        torch.testing.assert_close(case["compiled"]["out"], case["eager"]["out"], rtol=2e-2, atol=2e-2,
                                   msg=lambda m: f"rank {rank}: {m}")


def test_ranks_whose_cpus_differ_fuse_the_exchange_together(ranks):
    first, second = (result["cpus-differ"] for result in ranks)
    assert first["swapped"] and second["swapped"] and not first["refused"] and not second["refused"], (first, second)
    assert "the layer's own experts, left unfused" in first["fused"][0], first
    assert "npu_ffn_grouped(swiglu)" in second["fused"][0], second


def test_alltoall_dispatcher_is_not_routed_under_the_cost_gate(ranks):
    """Its experts compute only their routed rows: fusing saves them no work off Ascend (cost.py)."""
    for result in ranks:
        case = result["alltoall-gated"]
        refused = case["refused"]
        assert not case["swapped"] and len(refused) == 1, case
        assert "slower here" in refused[0] and "Megatron's all-to-all token dispatcher" in refused[0], refused


def test_allgather_dispatcher_is_routed_under_the_cost_gate(ranks):
    """Plain inductor cannot run it (upstream masked_select crash): the gate leaves it fused."""
    for result in ranks:
        case = result["allgather-under-the-gate"]
        assert case["swapped"] and not case["refused"], case


def test_a_rank_that_differs_drops_the_route_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        case = result["one-rank-differs"]
        assert not case["swapped"] and len(case["refused"]) == 1, case["report"]
        why = case["refused"][0]
        assert ("max difference" in why) if rank == 1 else ("not on another process" in why), why
        torch.testing.assert_close(case["compiled"]["out"], case["eager"]["out"], rtol=1e-4, atol=1e-5)


def test_fullgraph_with_own_experts_raises_on_every_rank(ranks):
    for rank, result in enumerate(ranks):
        error = result["fullgraph"]
        assert error is not None and "fullgraph=True asks for one graph" in error, (rank, error)
        assert "own experts outside the graph" in error and "'gelu'" in error and "fullgraph=False" in error, error


def test_own_experts_under_inductor(ranks):
    for rank, result in enumerate(ranks):
        for train, case in result["own-experts-inductor"].items():
            assert len(case["fused"]) == 1 and "own experts, left unfused" in case["fused"][0], case["fused"]
            assert set(case["compiled"]) == set(case["eager"]) and (not train or len(case["eager"]) > 4)
            for key, want in case["eager"].items():
                torch.testing.assert_close(case["compiled"][key], want, rtol=1e-4, atol=1e-5,
                                           msg=f"rank {rank} {key} train={train}")
