"""dispatch_v2 / combine_v2 / combine_add_rms_norm in a world of one rank (portable target, no
process group), their fake kernels, and torch.compile of the pair.

* round trip (SPEC §8.2): ``combine(dispatch(x))`` with identity experts equals
  ``sum_j w_j * E_j(x)`` over active slots (copy/const/zero experts from ``ori_x``) plus
  ``shared_expert_x``, for every dtype, quant mode, mask kind;
* the canonical layout of the implementation-defined outputs (SPEC §3.4) and zero padding;
* the quantizers bit for bit against SPEC's pseudo-code, and their ``amax == 0`` choice;
* Add + RmsNorm (SPEC §4.3);
* fake kernels on SymInts against a transliteration of torch_npu's Meta (SPEC §3.2), including
  shared-expert ranks, elastic_info, TP and expert_scales that the fidelity grid does not cover;
* ``torch.compile(fullgraph=True)`` with ``dynamic=False`` and ``True`` equals eager.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_fusion as mf
from moe_fusion.kernels.moe_distribute_combine import comm_dequant, comm_quant
from moe_fusion.kernels.moe_distribute_dispatch import dynamic_quant

BF16, FP16, FP32, I32 = torch.bfloat16, torch.float16, torch.float32, torch.int32
M = 6                        # MoE experts, all on the one rank (L = 6)


def _routing(seed, bs, k, total, mask_kind):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(total, generator=g)[:k] for _ in range(bs)]).int()
    w = torch.rand(bs, k, generator=g)
    mask = None
    if mask_kind == "1d":
        mask = torch.arange(bs) < bs - 2
    elif mask_kind == "2d":
        mask = torch.rand(bs, k, generator=g) > 0.35
        mask[0] = False                                     # a token with no active slot at all
    return g, ids, w, mask


def _expected(x, ids, w, mask, ori_x=None, specials=(0, 0, 0), consts=None, shared_x=None):
    """``sum_j w_j * E_j(x)`` in fp64 (independent of the kernel's fp32 order), zero for unprocessed tokens."""
    bs, k = ids.shape
    zero, copy, const = specials
    active = torch.ones(bs, k, dtype=torch.bool) if mask is None else (
        mask.unsqueeze(1).expand(bs, k) if mask.dim() == 1 else mask)
    xd, wd = x.double(), w.double()
    acc = torch.zeros(bs, x.size(1), dtype=torch.float64)
    for j in range(k):
        e = ids[:, j].long()
        on = active[:, j].unsqueeze(1)
        acc += torch.where(on & (e < M).unsqueeze(1), xd * wd[:, j:j + 1], 0)
        is_copy = (e >= M + zero) & (e < M + zero + copy)
        if copy:
            acc += torch.where(on & is_copy.unsqueeze(1), ori_x.double() * wd[:, j:j + 1], 0)
        if const:
            c = (e - M - zero - copy).clamp(0, const - 1)
            a1, a2, v = (t.double()[c] for t in consts)
            a1, a2 = (a if a.dim() == 2 else a.unsqueeze(1) for a in (a1, a2))
            is_const = (e >= M + zero + copy).unsqueeze(1)
            acc += torch.where(on & is_const, (ori_x.double() * a1 + v * a2) * wd[:, j:j + 1], 0)
    if shared_x is not None:
        acc += shared_x.reshape(bs, -1).double()
    return torch.where(active.any(1, keepdim=True), acc, 0)


def _dispatch(x, ids, **kw):
    return mf.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, M, **kw)


def _combine(outs, ids, w, **kw):
    expand_x, _, assist, _, counts, tp_counts, _ = outs
    return mf.npu_moe_distribute_combine_v2(expand_x, ids, assist, counts, w, "", 1, 0, M, tp_send_counts=tp_counts,
                                            **kw)


def _ulp(dtype):
    return {BF16: 2.0 ** -8, FP16: 2.0 ** -11, FP32: 2.0 ** -23}[dtype]


ROUND_TRIP = list(itertools.product((BF16, FP16, FP32), (0, 2), ("none", "1d", "2d")))


@pytest.mark.parametrize("dtype,quant,mask_kind", ROUND_TRIP, ids=[f"{d}-q{q}-{m}".replace("torch.", "")
                                                                  for d, q, m in ROUND_TRIP])
def test_round_trip_identity_experts(dtype, quant, mask_kind):
    bs, h, k = 9, 40, 3
    g, ids, w, mask = _routing(hash((str(dtype), quant, mask_kind)) % 1000, bs, k, M, mask_kind)
    x = torch.randn(bs, h, generator=g).to(dtype)
    scales = torch.rand(M, h, generator=g) + 0.5 if quant else None
    outs = _dispatch(x, ids, quant_mode=quant, scales=scales, x_active_mask=mask)
    expand_x, dyn = outs[0], outs[1]
    if quant:
        # Identity experts on the smoothed, quantized rows; undo the smooth scale of each row's expert.
        row_expert = outs[2][: 3 * expand_x.size(0)].view(-1, 3)
        tok, slot = row_expert[:, 1].long(), row_expert[:, 2].long()
        n = int(outs[4][-1])
        smooth = torch.ones(expand_x.size(0), h)
        smooth[:n] = scales[ids[tok[:n], slot[:n]].long()]
        expand_x = (expand_x.float() * dyn.unsqueeze(1) / smooth).to(dtype)
    y = _combine((expand_x,) + outs[1:], ids, w, x_active_mask=mask)
    want = _expected(x, ids, w, mask)
    assert y.dtype == dtype and y.shape == (bs, h)
    # Quantization error: half a step of 127 levels of each row's max, times sum |w|.
    step = x.float().abs().amax(1, keepdim=True) * (1.5 / 127 if quant else 0)
    tol = (want.abs() * 2 * _ulp(dtype) + step * w.sum(1, keepdim=True) + 1e-6).float()
    assert ((y.float() - want.float()).abs() <= tol).all()
    if mask is not None:
        processed = mask if mask.dim() == 1 else mask.any(1)
        assert not y[~processed].float().any(), "unprocessed tokens must give zero rows"


def test_special_experts_and_shared_expert_x():
    """Zero, copy and const experts (alphas (Q,) and (Q, H)), and a 3-D shared_expert_x."""
    bs, h, k, specials = 8, 24, 4, (2, 1, 2)
    g, ids, w, mask = _routing(5, bs, k, M + sum(specials), "2d")
    x = torch.randn(bs, h, generator=g)
    consts = (torch.rand(2, generator=g), torch.rand(2, h, generator=g), torch.randn(2, h, generator=g))
    shared_x = torch.randn(2, bs // 2, h, generator=g)
    attrs = dict(zero_expert_num=2, copy_expert_num=1, const_expert_num=2)
    outs = _dispatch(x, ids, x_active_mask=mask, **attrs)
    y = _combine(outs, ids, w, x_active_mask=mask, ori_x=x, const_expert_alpha_1=consts[0],
                 const_expert_alpha_2=consts[1], const_expert_v=consts[2], shared_expert_x=shared_x, **attrs)
    want = _expected(x, ids, w, mask, ori_x=x, specials=specials, consts=consts, shared_x=shared_x)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    # Special experts are never sent: every row's expert id is < M.
    n = int(outs[4][M - 1])
    triples = outs[2][: 3 * n].view(n, 3).long()
    assert (ids[triples[:, 1], triples[:, 2]] < M).all()


def test_canonical_layout():
    """SPEC §3.4 on one rank: rows local-expert-major (token order kept), triples, prefix sums,
    token counts (both types), zero padding and zero tails."""
    bs, h, k = 7, 8, 2
    g, ids, w, _ = _routing(11, bs, k, M, "none")
    x = torch.randn(bs, h, generator=g).to(BF16)
    outs = _dispatch(x, ids, tp_world_size=1, expert_scales=w)
    expand_x, dyn, assist, nums, counts, tp_counts, expand_scales = outs
    a = bs * min(M, k)
    assert [tuple(o.shape) for o in outs] == [(a, h), (a,), (max(bs * k, 128 * a),), (M,), (M,), (1,), (a,)]
    tok, slot = torch.nonzero(torch.ones(bs, k, dtype=torch.bool), as_tuple=True)
    order = torch.argsort(ids[tok, slot].long() * bs + tok)
    want_triples = torch.stack([torch.zeros_like(tok), tok[order], slot[order]], 1).int()
    assert torch.equal(assist[: 3 * a].view(a, 3), want_triples)
    assert not assist[3 * a:].any()
    assert torch.equal(expand_x, x[tok[order]])
    per_expert = torch.bincount(ids.reshape(-1).long(), minlength=M)
    assert torch.equal(nums, per_expert)
    assert torch.equal(counts, per_expert.cumsum(0).int())
    assert tp_counts.tolist() == [a]
    assert torch.equal(expand_scales, w[tok[order], slot[order]])
    assert not dyn.any()
    prefix = _dispatch(x, ids, expert_token_nums_type=0, global_bs=2 * bs)
    assert torch.equal(prefix[3], per_expert.cumsum(0))
    assert prefix[0].size(0) == 2 * a and not prefix[0][a:].float().any(), "padding rows must be zero"


def test_dynamic_quant_matches_spec_pseudocode():
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 33, generator=g) * torch.logspace(-3, 3, 64).unsqueeze(1)
    rows[5] = 0
    q, scale = dynamic_quant(rows)
    for i in range(rows.size(0)):
        amax = rows[i].abs().max()
        if amax == 0:
            assert not q[i].any() and scale[i] == 0     # our choice for the device's NaN path
            continue
        ds = torch.tensor(127.0) / amax
        assert torch.equal(q[i], torch.round(rows[i] * ds).to(torch.int32).to(torch.int8))
        assert scale[i] == torch.tensor(1.0) / ds


def test_comm_quant_matches_spec_pseudocode():
    g = torch.Generator().manual_seed(4)
    rows = (torch.randn(16, 21, generator=g) * 3).to(BF16)     # 21 = two full groups of 8 and a tail of 5
    rows[2, :8] = 0                                            # an all-zero group
    q, scales = comm_quant(rows)
    deq = comm_dequant(q, scales)
    assert q.dtype == torch.int8 and scales.dtype == BF16 and scales.shape == (16, 3)
    for i, gi in itertools.product(range(16), range(3)):
        xf = rows[i, gi * 8:(gi + 1) * 8].float()
        m = xf.abs().max()
        sc = m * torch.tensor(1.0 / 127.0)
        if m == 0:
            assert not q[i, gi * 8:(gi + 1) * 8].any() and not deq[i, gi * 8:(gi + 1) * 8].float().any()
            continue
        want_q = (xf / sc).to(FP16).float().round().to(torch.int8)
        assert torch.equal(q[i, gi * 8:(gi + 1) * 8], want_q)
        assert scales[i, gi] == sc.to(BF16)
        assert torch.equal(deq[i, gi * 8:(gi + 1) * 8], (want_q.to(FP16).float() * sc.to(BF16).float()).to(BF16))


def test_combine_comm_quant_round_trip():
    bs, h, k = 6, 32, 2
    g, ids, w, _ = _routing(8, bs, k, M, "none")
    x = torch.randn(bs, h, generator=g).to(BF16)
    y = _combine(_dispatch(x, ids), ids, w, comm_quant_mode=2)
    want = _expected(x, ids, w, None)
    group_max = x.float().view(bs, -1, 8).abs().amax(2).repeat_interleave(8, 1)
    tol = group_max / 127 * w.sum(1, keepdim=True) + want.abs().float() * 2 ** -7
    assert ((y.float() - want.float()).abs() <= tol).all()


@pytest.mark.parametrize("mask_kind", ["none", "2d"])
def test_add_rms_norm(mask_kind):
    bs, h, k = 8, 64, 2
    g, ids, w, mask = _routing(9, bs, k, M, mask_kind)
    x = torch.randn(bs, h, generator=g).to(BF16)
    residual = torch.randn(bs, 1, h, generator=g).to(BF16)
    gamma = (torch.rand(h, generator=g) + 0.5).to(BF16)
    outs = _dispatch(x, ids, x_active_mask=mask)
    y, rstd, x_out = mf.npu_moe_distribute_combine_add_rms_norm(
        outs[0], ids, outs[2], outs[4], w, residual, gamma, "", 1, 0, M, tp_send_counts=outs[5],
        x_active_mask=mask, norm_eps=1e-5)
    assert (y.shape, rstd.shape, x_out.shape) == ((bs, 1, h), (bs, 1, 1), (bs, 1, h))
    assert (y.dtype, rstd.dtype, x_out.dtype) == (BF16, FP32, BF16)
    xs = _expected(x, ids, w, mask) + residual.reshape(bs, h).double()
    want_rstd = 1 / torch.sqrt(xs.pow(2).mean(1, keepdim=True) + 1e-5)
    processed = torch.ones(bs, dtype=torch.bool) if mask is None else mask.any(1)
    torch.testing.assert_close(x_out[processed, 0].double(), xs[processed], rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(rstd[processed, 0].double(), want_rstd[processed], rtol=1e-4, atol=0)
    torch.testing.assert_close(y[processed, 0].double(), (xs * want_rstd * gamma.double())[processed],
                               rtol=2 ** -6, atol=2e-2)
    for out in (y, rstd, x_out):
        assert not out[~processed].float().any()


def test_no_tokens_on_portable():
    """BS = 0 is defined (nothing to send) on the portable target."""
    x, ids = torch.zeros(0, 8, dtype=BF16), torch.zeros(0, 2, dtype=I32)
    outs = _dispatch(x, ids)
    assert outs[0].shape == (0, 8) and not outs[3].any()
    assert _combine(outs, ids, torch.zeros(0, 2)).shape == (0, 8)


def test_performance_info_is_left_unchanged():
    perf = torch.arange(1, dtype=torch.int64) + 7
    x, ids = torch.randn(3, 8).to(BF16), torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=I32)
    outs = _dispatch(x, ids, performance_info=perf)
    _combine(outs, ids, torch.ones(3, 2), performance_info=perf)
    assert perf.tolist() == [7]


# ---- fake kernels against torch_npu's Meta arithmetic ---------------------------------------------

def _torch_npu_meta(bs, h, k, W, r, M_, S, n_sh, T, gbs, quant, elastic, expert_scales):
    """SPEC §3.2 verbatim (expert_shard_type 0): the output shapes torch_npu's Meta returns."""
    is_default = n_sh == 1 and S == 0
    is_none = n_sh == 0 and S == 0
    g = bs * W if gbs == 0 else gbs
    if r < S:
        local = 1
        per = S // n_sh
        a = (g // W) * ((W + per - 1) // per)
    else:
        local = M_ // (W - S)
        a = g * min(local, k)
    if elastic:
        if is_default or is_none:
            local = max(local, M_ // (W - S))
            a = g * min(local, k)
        else:
            per = S // n_sh
            a = max((g // W) * math.ceil(W / per), g * min(M_ // (W - S), k))
            local = max(local, M_ // (W - S))
    ep = W * local * (T if T == 2 else 1)
    if expert_scales:
        ep = W * local + g * 2 * k * (W // 8)
    return [(max(a, a * T), h), (a * T,) if T > 1 else (a,), (max(bs * k, a * 128),), (local,), (ep,), (T,),
            (a,) if expert_scales else (0,)]


META_GRID = [
    # bs, k, W, r, M, S, n_sh, T, global_bs, elastic, expert_scales
    (3, 2, 8, 0, 6, 2, 1, 0, 0, False, False), (3, 2, 8, 1, 6, 2, 2, 0, 0, False, False),
    (3, 2, 8, 5, 6, 2, 1, 0, 0, False, True), (3, 4, 8, 5, 12, 2, 1, 0, 40, False, False),
    (5, 3, 6, 0, 4, 2, 1, 0, 0, True, False), (5, 3, 6, 4, 8, 2, 2, 0, 36, True, False),
    (5, 3, 6, 4, 12, 0, 0, 0, 0, True, True), (2, 1, 4, 3, 4, 0, 1, 2, 0, False, False),
    (2, 1, 16, 7, 16, 0, 1, 2, 64, False, True), (4, 2, 10, 1, 5, 5, 5, 2, 0, False, False),
]


@pytest.mark.parametrize("grid", META_GRID)
def test_fake_shapes_match_torch_npu_meta(grid):
    bs, k, W, r, M_, S, n_sh, T, gbs, elastic, with_scales = grid
    h = 16
    kwargs = dict(shared_expert_rank_num=S, shared_expert_num=n_sh, tp_world_size=T, group_tp="tp" if T else "",
                  tp_rank_id=0, global_bs=gbs, quant_mode=2)
    with FakeTensorMode():
        x, ids = torch.empty(bs, h, dtype=BF16), torch.empty(bs, k, dtype=I32)
        if elastic:
            kwargs["elastic_info"] = torch.empty(4 + 2 * W, dtype=I32)
        if with_scales:
            kwargs["expert_scales"] = torch.empty(bs, k)
        outs = mf.npu_moe_distribute_dispatch_v2(x, ids, "ep", W, r, M_, **kwargs)
    want = _torch_npu_meta(bs, h, k, W, r, M_, S, n_sh, T, gbs, 2, elastic, with_scales)
    assert [tuple(o.shape) for o in outs] == want
    assert [o.dtype for o in outs] == [torch.int8, FP32, I32, torch.int64, I32, I32, FP32]


# ---- torch.compile ----------------------------------------------------------------------------------

def _layer(x, ids, w, scales, mask):
    outs = torch.ops.moe_fusion.npu_moe_distribute_dispatch_v2(x, ids, "", 1, 0, M, quant_mode=2, scales=scales,
                                                               x_active_mask=mask)
    rows = (outs[0].float() * outs[1].unsqueeze(1) * 0.5).to(x.dtype)       # a stand-in expert
    y = torch.ops.moe_fusion.npu_moe_distribute_combine_v2(rows, ids, outs[2], outs[4], w, "", 1, 0, M,
                                                           tp_send_counts=outs[5], x_active_mask=mask)
    return y, outs[3]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()
    compiled = torch.compile(_layer, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for bs in (6, 9):                                        # a second size exercises dynamic shapes
        g, ids, w, mask = _routing(bs, bs, 2, M, "2d")
        x = torch.randn(bs, 32, generator=g).to(BF16)
        scales = torch.rand(M, 32, generator=g) + 0.5
        for got, want in zip(compiled(x, ids, w, scales, mask), _layer(x, ids, w, scales, mask)):
            assert got.dtype == want.dtype and torch.equal(got, want)
