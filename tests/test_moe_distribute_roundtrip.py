"""Round trip and compilation of dispatch_v2 -> experts -> combine_v2 on real gloo ranks.

* SPEC §8.2: ``combine(dispatch(x))`` with identity experts equals ``Σ_k w_k·x`` over the active
  slots (special experts from ``ori_x``) plus the shared experts' ``x`` and ``shared_expert_x``,
  unweighted. With TP each TP rank returns half of its rows, so the reduce-scatter's sum is ``x``.
  The grid's round-trip runs share the spawns of ``test_moe_distribute_ranks`` (one per world size).
* ``torch.compile(fullgraph=True)`` of a function calling dispatch_v2 -> elementwise scaling ->
  combine_v2 equals eager, on 2 gloo ranks (aot_eager for most cases, one inductor case).
"""
from __future__ import annotations

import functools
import zlib

import pytest
import torch

from moe_fusion.launch import run_ranks
from oracle_moe_distribute import MoeAttrs, combine_world, dispatch_world
from test_moe_distribute_ranks import (ALL_CASES, BF16, FP16, FP32, assert_mostly_bitwise, assert_rows_close, expected,
                                       nterms, results_for)

RT_CASES = [c for c in ALL_CASES if c.roundtrip]


@pytest.mark.parametrize("case", [pytest.param(c, id=f"w{c.world}-{c.name}") for c in RT_CASES])
def test_roundtrip_identity_experts(case):
    exp = expected(case.name)
    for g, res in enumerate(results_for(case)):
        want = exp["roundtrip"][g]
        mag = [m if m is not None else torch.zeros(case.h) for m in exp["roundtrip_mag"][g]]
        mag = torch.stack(mag) if mag else torch.zeros(0, case.h)
        assert_rows_close(res["roundtrip"], want, mag, nterms(case), f"{case.name} rank {g} round trip")
        assert_mostly_bitwise(res["roundtrip"], want, f"{case.name} rank {g} round trip")


def test_roundtrip_grid_covers_tp_and_shared():
    """The round-trip grid includes TP, shared experts (n_sh >= 1), masks and special experts on 2 and 4 ranks."""
    worlds = {c.world for c in RT_CASES}
    assert {2, 4} <= worlds
    assert any(c.attrs.tp == 2 for c in RT_CASES if c.world == 4)
    assert {c.attrs.n_sh_eff for c in RT_CASES} >= {0, 1, 2}
    assert any(c.mask == "1d" for c in RT_CASES) and any(c.mask == "2d" for c in RT_CASES)
    assert any(c.attrs.const_expert_num for c in RT_CASES) and any(c.shared_x for c in RT_CASES)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------

# (name, backend, attrs, dtype, bs, k, h)
COMPILE_CASES = [
    ("aot_eager_ep_bf16", "aot_eager", MoeAttrs(ep_world_size=2, moe_expert_num=4), BF16, 4, 2, 32),
    ("aot_eager_shared_fp16", "aot_eager", MoeAttrs(ep_world_size=2, moe_expert_num=2, shared_expert_num=1,
                                                    shared_expert_rank_num=1), FP16, 3, 2, 16),
    ("aot_eager_quant_dequant", "aot_eager", MoeAttrs(ep_world_size=2, moe_expert_num=4, quant_mode=2), BF16, 4, 2,
     32),
    ("inductor_ep_bf16", "inductor", MoeAttrs(ep_world_size=2, moe_expert_num=4), BF16, 4, 2, 32),
]


def _compile_inputs(name, attrs, dtype, bs, k, h):
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    xs, ids, ws = [], [], []
    for _ in range(attrs.world):
        xs.append(torch.randn(bs, h, generator=gen).to(dtype))
        ids.append(torch.stack([torch.randperm(attrs.M, generator=gen)[:k] for _ in range(bs)]).to(torch.int32))
        ws.append(torch.rand(bs, k, generator=gen))
    return xs, ids, ws


def _experts(expand_x, dynamic_scales, dtype, quant):
    """The "experts": an elementwise scaling (after dequantization for quant_mode 2)."""
    if quant:
        return (expand_x.to(FP32) * dynamic_scales.unsqueeze(1) * 1.5).to(dtype)
    return (expand_x.to(FP32) * 1.5).to(dtype)


def _layer(x, ids, w, *, group, attrs, dtype, rank):
    import moe_fusion
    a = attrs
    kw = dict(shared_expert_num=a.shared_expert_num, shared_expert_rank_num=a.S)
    expand_x, dyn, assist, _, ep_recv, tp_recv, _ = moe_fusion.npu_moe_distribute_dispatch_v2(
        x, ids, group, a.W, rank, a.M, quant_mode=a.quant_mode, **kw)
    y = _experts(expand_x, dyn, dtype, a.quant_mode == 2)
    return moe_fusion.npu_moe_distribute_combine_v2(y, ids, assist, ep_recv, w, group, a.W, rank, a.M,
                                                    tp_send_counts=tp_recv, **kw)


def _compile_rank_fn(rank, world, cases):
    import torch.distributed as dist
    import torch._dynamo
    group = dist.group.WORLD.group_name
    out = {}
    for name, backend, attrs, dtype, bs, k, h in cases:
        xs, ids, ws = _compile_inputs(name, attrs, dtype, bs, k, h)
        fn = functools.partial(_layer, group=group, attrs=attrs, dtype=dtype, rank=rank)
        eager = fn(xs[rank], ids[rank], ws[rank])
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend=backend)(xs[rank], ids[rank], ws[rank])
        out[name] = (eager, compiled)
    return out


@functools.lru_cache(maxsize=None)
def _compile_results():
    return run_ranks(2, _compile_rank_fn, COMPILE_CASES, timeout=240, pg_timeout=90)


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in COMPILE_CASES])
def test_compile_fullgraph_equals_eager(case):
    name, backend, attrs, dtype, bs, k, h = case
    results = _compile_results()
    xs, ids, ws = _compile_inputs(name, attrs, dtype, bs, k, h)
    disp = dispatch_world(xs, ids, attrs)
    ffn = [_experts(d.expand_x, d.dynamic_scales, dtype, attrs.quant_mode == 2) for d in disp]
    meta = ([d.assist_info_for_combine for d in disp], [d.ep_recv_counts for d in disp])
    want = combine_world(ffn, ids, *meta, ws, attrs)
    mag = combine_world([f.abs() for f in ffn], ids, *meta, ws, attrs, return_acc=True)
    for g, res in enumerate(results):
        eager, compiled = res[name]
        # the same kernels run in both; the compiled elementwise scaling is fp32 then one rounding, as in eager
        assert eager.dtype == compiled.dtype and eager.shape == compiled.shape
        assert torch.equal(compiled.view(torch.int16), eager.view(torch.int16)), f"{name} rank {g}: compiled != eager"
        m = torch.stack([v if v is not None else torch.zeros(h) for v in mag[g]])
        assert_rows_close(eager, want[g], m, k + attrs.n_sh_eff + 2, f"{name} rank {g} eager vs oracle")
        assert_mostly_bitwise(eager, want[g], f"{name} rank {g} eager vs oracle")
