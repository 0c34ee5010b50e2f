"""dispatch_v2 / combine_v2 / combine_add_rms_norm on real gloo ranks (2, 4 and 8) against the
world-level oracle of ``oracle_moe_distribute.py`` (SPEC §3.4, §4.3).

One spawn per world size runs the whole grid (``_rank_fn``): every rank builds every case's
world-level inputs from the case seed, runs the ops on its own slice, and returns its outputs; the
parent compares each rank's outputs with the oracle's. H is small (16..64): the default
``portable`` target has no H limits. The A3 limits (1024 <= H <= 8192, BS <= 512, ...) are covered
by the validation tests, not here.

What is compared (SPEC §3.4):
* dispatch: every output's shape and dtype; valid ``expand_x`` rows bit for bit (int8 for
  quant_mode 2), padding rows zero; ``dynamic_scales`` bit for bit for quant_mode 2 (zero
  otherwise and in the padding); the documented ``assist_info_for_combine`` triples
  (rows < total_own); ``expert_token_nums``, ``ep_recv_counts`` (incl. the TP peer part),
  ``tp_recv_counts`` (content only for T == 2, where it is documented).
* combine / add_rms_norm: processed tokens within a tolerance derived from fp32 accumulation
  order (the oracle sums in SPEC's order; a kernel may sum in another) plus one ulp of the
  output dtype; rows of unprocessed tokens exactly zero (the project's documented choice).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import traceback
import zlib
from typing import Dict, List, Tuple

import pytest
import torch

from moe_fusion.launch import run_ranks
from oracle_moe_distribute import (MoeAttrs, add_rms_norm_rows, combine_add_rms_norm_world, combine_world,
                                   comm_quant_levels, dispatch_world, dynamic_quant_row, roundtrip_world)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
NORM_EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# Self-checks of the oracle: tiny cases worked out by hand from SPEC §3.4 / §4.3, written literally
# ----------------------------------------------------------------------------------------------
def t(rows, dtype=BF16):
    return torch.tensor(rows, dtype=dtype)


def ids(rows):
    return torch.tensor(rows, dtype=torch.int32)


def test_ep_two_ranks_layout_and_combine():
    # W=2, M=2 (L=1), K=1, BS=2: expert e lives on rank e.
    a = MoeAttrs(ep_world_size=2, moe_expert_num=2)
    xs = [t([[1, 2], [3, 4]]), t([[5, 6], [7, 8]])]
    eids = [ids([[1], [0]]), ids([[0], [0]])]
    d0, d1 = dispatch_world(xs, eids, a)
    assert d0.capacity == 4 and d0.expand_x.shape == (4, 2) and d0.assist_info_for_combine.shape == (512,)
    assert d0.expand_x.tolist() == [[3, 4], [5, 6], [7, 8], [0, 0]]
    assert d0.assist_info_for_combine[:9].tolist() == [0, 1, 0, 1, 0, 0, 1, 1, 0]
    assert d0.ep_recv_counts.tolist() == [1, 3] and d0.expert_token_nums.tolist() == [3]
    assert d1.expand_x.tolist() == [[1, 2], [0, 0], [0, 0], [0, 0]]
    assert d1.assist_info_for_combine[:3].tolist() == [0, 0, 0]
    assert d1.ep_recv_counts.tolist() == [1, 1] and d1.expert_token_nums.tolist() == [1]
    assert d0.tp_recv_counts.shape == (0,) and d0.expand_scales.shape == (0,)
    assert d0.dynamic_scales.tolist() == [0, 0, 0, 0]
    # combine: "FFN" doubles on rank 0 and triples on rank 1
    w = [torch.tensor([[0.5], [0.25]]), torch.tensor([[1.0], [2.0]])]
    out = combine_world([d0.expand_x * 2, d1.expand_x * 3], eids, [d0.assist_info_for_combine, d1.assist_info_for_combine],
                        [d0.ep_recv_counts, d1.ep_recv_counts], w, a)
    assert out[0].tolist() == [[1.5, 3], [1.5, 2]]
    assert out[1].tolist() == [[10, 12], [28, 32]]


def test_expert_token_nums_cumsum_and_masks():
    # W=2, M=4 (L=2), K=2. Rank 0 hosts experts 0,1; rank 1 hosts 2,3.
    a = MoeAttrs(ep_world_size=2, moe_expert_num=4, expert_token_nums_type=0)
    xs = [t([[1], [2], [3]]), t([[4], [5], [6]])]
    eids = [ids([[1, 2], [0, 1], [3, 0]]), ids([[1, 0], [2, 3], [0, 2]])]
    masks = [torch.tensor([True, True, False]),                             # 1-D prefix: tokens 0, 1
             torch.tensor([[True, False], [False, False], [False, True]])]  # 2-D: slots (0,0), (2,1)
    d0, d1 = dispatch_world(xs, eids, a, x_active_masks=masks)
    # rank 0, le 0 (expert 0): s0 token1 slot0 ; s1: none (token0 slot1 masked) ; le 1 (expert 1): s0 token0 slot0, token1 slot1; s1 token0 slot0
    assert d0.own_rows == [(0, 1, 0), (0, 0, 0), (0, 1, 1), (1, 0, 0)]
    assert d0.expand_x[:, 0].tolist() == [2, 1, 2, 4] + [0] * (d0.capacity - 4)
    assert d0.ep_recv_counts.tolist() == [1, 1, 3, 4]
    assert d0.expert_token_nums.tolist() == [1, 4]          # cumsum of [1, 3]
    # rank 1, le 0 (expert 2): s0 token0 slot1; s1 token2 slot1 ; le 1 (expert 3): none
    assert d1.own_rows == [(0, 0, 1), (1, 2, 1)]
    assert d1.ep_recv_counts.tolist() == [1, 2, 2, 2] and d1.expert_token_nums.tolist() == [2, 2]
    # round trip: masked tokens give zero rows, the 2-D-masked slots are skipped
    w = [torch.tensor([[0.5, 0.25]] * 3), torch.tensor([[2.0, 4.0]] * 3)]
    rt = roundtrip_world(xs, eids, w, a, x_active_masks=masks)
    assert rt[0][:, 0].tolist() == [0.75, 1.5, 0] and rt[1][:, 0].tolist() == [8, 0, 24]
    out = combine_world([d0.expand_x, d1.expand_x], eids, [d0.assist_info_for_combine, d1.assist_info_for_combine],
                        [d0.ep_recv_counts, d1.ep_recv_counts], w, a, x_active_masks=masks)
    assert torch.equal(out[0], rt[0]) and torch.equal(out[1], rt[1])


def test_shared_expert_rank_routing():
    # W=3, S=1, n_sh=1, M=2 (L=1): rank 0 shared, expert e on rank 1+e. Every token visits rank 0 in slot K.
    a = MoeAttrs(ep_world_size=3, moe_expert_num=2, shared_expert_num=1, shared_expert_rank_num=1)
    xs = [t([[1, 1]]), t([[2, 2]]), t([[3, 3]])]
    eids = [ids([[0]]), ids([[1]]), ids([[1]])]
    d = dispatch_world(xs, eids, a)
    assert [o.capacity for o in d] == [3, 3, 3]
    assert d[0].expand_x.tolist() == [[1, 1], [2, 2], [3, 3]]
    assert d[0].assist_info_for_combine[:9].tolist() == [0, 0, 1, 1, 0, 1, 2, 0, 1]
    assert d[0].ep_recv_counts.tolist() == [1, 2, 3] and d[0].expert_token_nums.tolist() == [3]
    assert d[1].expand_x.tolist() == [[1, 1], [0, 0], [0, 0]] and d[1].ep_recv_counts.tolist() == [1, 1, 1]
    assert d[2].expand_x.tolist() == [[2, 2], [3, 3], [0, 0]] and d[2].ep_recv_counts.tolist() == [0, 1, 2]
    w = [torch.tensor([[0.5]])] * 3
    out = combine_world([o.expand_x for o in d], eids, [o.assist_info_for_combine for o in d],
                        [o.ep_recv_counts for o in d], w, a)
    assert [o.tolist() for o in out] == [[[1.5, 1.5]], [[3, 3]], [[4.5, 4.5]]]   # 0.5 x + x (shared unweighted)


def test_shared_rank_groups():
    # W=4, S=2: n_sh=1 -> R_sh=2, source s goes to shared rank s % 2; n_sh=2 -> R_sh=1, every source to ranks 0 (q=0) and 1 (q=1)
    xs = [t([[s + 1]]) for s in range(4)]
    eids = [ids([[s % 2]]) for s in range(4)]
    a1 = MoeAttrs(ep_world_size=4, moe_expert_num=2, shared_expert_num=1, shared_expert_rank_num=2)
    d = dispatch_world(xs, eids, a1)
    assert d[0].own_rows == [(0, 0, 1), (2, 0, 1)] and d[1].own_rows == [(1, 0, 1), (3, 0, 1)]
    assert d[0].capacity == 2 and d[2].capacity == 4     # max_bs*ceil(W/R_sh) = 1*2 ; global_bs*min(L,K) = 4*1
    assert d[2].own_rows == [(0, 0, 0), (2, 0, 0)] and d[3].own_rows == [(1, 0, 0), (3, 0, 0)]
    a2 = MoeAttrs(ep_world_size=4, moe_expert_num=2, shared_expert_num=2, shared_expert_rank_num=2)
    d = dispatch_world(xs, eids, a2)
    assert d[0].own_rows == [(s, 0, 1) for s in range(4)] and d[1].own_rows == [(s, 0, 2) for s in range(4)]
    assert d[0].capacity == 4 and d[0].ep_recv_counts.tolist() == [1, 2, 3, 4]


def test_tp_own_then_peer():
    # world 4 = W 2 x T 2, M=2 (L=1). g -> (ep g//2, t g%2).
    a = MoeAttrs(ep_world_size=2, moe_expert_num=2, tp_world_size=2)
    xs = [t([[g + 1, g + 1]]) for g in range(4)]
    eids = [ids([[1]]), ids([[0]]), ids([[1]]), ids([[1]])]
    d = dispatch_world(xs, eids, a)
    assert [o.capacity for o in d] == [2] * 4 and d[0].expand_x.shape == (4, 2)
    assert d[0].expand_x[:, 0].tolist() == [2, 0, 0, 0] and d[0].tp_recv_counts.tolist() == [0, 1]
    assert d[0].ep_recv_counts.tolist() == [0, 0, 1, 1] and d[0].expert_token_nums.tolist() == [1]
    assert d[1].expand_x[:, 0].tolist() == [2, 0, 0, 0] and d[1].tp_recv_counts.tolist() == [0, 1]
    assert d[1].ep_recv_counts.tolist() == [1, 1, 0, 0]
    assert d[2].expand_x[:, 0].tolist() == [1, 3, 4, 0] and d[2].tp_recv_counts.tolist() == [2, 1]
    assert d[2].ep_recv_counts.tolist() == [1, 2, 0, 1] and d[2].expert_token_nums.tolist() == [3]
    assert d[2].assist_info_for_combine[:6].tolist() == [0, 0, 0, 1, 0, 0]
    assert d[3].expand_x[:, 0].tolist() == [4, 1, 3, 0] and d[3].tp_recv_counts.tolist() == [2, 1]
    assert d[3].ep_recv_counts.tolist() == [0, 1, 1, 2]
    # combine: each TP rank returns half, the reduce-scatter adds the two halves
    w = [torch.tensor([[1.0]])] * 4
    out = combine_world([o.expand_x * 0.5 for o in d], eids, [o.assist_info_for_combine for o in d],
                        [o.ep_recv_counts for o in d], w, a, tp_send_counts=[o.tp_recv_counts for o in d])
    assert [o[0, 0].item() for o in out] == [1, 2, 3, 4]


def test_dynamic_quant_literal():
    q, s = dynamic_quant_row(t([1, -2, 0.5, 4]))
    # ds = 127/4 = 31.75: 31.75 -> 32, -63.5 -> -64 (half to even), 15.875 -> 16, 127
    assert q.dtype == torch.int8 and q.tolist() == [32, -64, 16, 127]
    assert s.item() == torch.tensor(1 / 31.75, dtype=torch.float32).item()
    q, _ = dynamic_quant_row(t([1, -2, 0.5, 4]), torch.tensor([2.0, 1, 1, 1]))
    assert q.tolist() == [64, -64, 16, 127]
    q, _ = dynamic_quant_row(t([2.5, -2.5, 0, 4]))   # 2.5*31.75 = 79.375 -> 79 ; -79 ; 0
    assert q.tolist() == [79, -79, 0, 127]


def test_quant_dispatch_per_destination_smooth_scales():
    # n_sh_eff = 1: scales row 0 for the shared expert, row 1+e for MoE expert e
    a = MoeAttrs(ep_world_size=2, moe_expert_num=1, shared_expert_num=1, shared_expert_rank_num=1, quant_mode=2)
    xs = [t([[1, 2]]), t([[2, 4]])]
    eids = [ids([[0]]), ids([[0]])]
    sc = torch.tensor([[1.0, 1.0], [4.0, 1.0]])
    d = dispatch_world(xs, eids, a, scales=[sc, sc])
    assert d[0].expand_x.dtype == torch.int8 and d[0].expand_x.tolist() == [[64, 127], [64, 127]]   # shared: x as is
    assert d[1].expand_x[:2].tolist() == [[127, 64], [127, 64]]                                      # expert 0: x*(4,1)
    assert d[0].dynamic_scales.tolist()[:2] == [pytest_approx(2 / 127), pytest_approx(4 / 127)]
    assert d[1].dynamic_scales.tolist()[:2] == [pytest_approx(4 / 127), pytest_approx(8 / 127)]


def pytest_approx(v):
    import pytest
    return pytest.approx(v, rel=1e-6)


def test_comm_quant_levels_literal():
    row = t([1, 2, 3, 4, 5, 6, 7, 8, -8, 0, 0, 0, 0, 0, 0, 4])
    # x / (8/127) = 15.875 x: 16, 32, 48, 64 (63.5 half-even), 79, 95, 111, 127 ; second group likewise
    assert comm_quant_levels(row).tolist() == [16, 32, 48, 64, 79, 95, 111, 127, -127, 0, 0, 0, 0, 0, 0, 64]


def test_special_experts_literal():
    # M=2, Z=1 (id 2), C=1 (id 3), Q=1 (id 4): nothing is sent; combine computes them from ori_x
    a = MoeAttrs(ep_world_size=2, moe_expert_num=2, zero_expert_num=1, copy_expert_num=1, const_expert_num=1)
    xs = [t([[1, 2]]), t([[1, 2]])]
    eids = [ids([[2, 3, 4]]), ids([[4, 3, 2]])]
    d = dispatch_world(xs, eids, a)
    assert all(o.total_own == 0 and not o.expand_x.any() for o in d)
    w = [torch.tensor([[0.5, 0.25, 2.0]]), torch.tensor([[1.0, 1.0, 1.0]])]
    extra = dict(ori_xs=xs, const_expert_alpha_1=[t([3])] * 2, const_expert_alpha_2=[t([0.5])] * 2,
                 const_expert_v=[t([[4, 8]])] * 2)
    out = combine_world([o.expand_x for o in d], eids, [o.assist_info_for_combine for o in d],
                        [o.ep_recv_counts for o in d], w, a, **extra)
    # 0.25*(1,2) + 2*((1,2)*3 + (4,8)*0.5) = (10.25, 20.5) ; (1,2)*3+(2,4) + (1,2) = (6, 12)
    assert out[0].tolist() == [[10.25, 20.5]] and out[1].tolist() == [[6, 12]]
    assert [o.tolist() for o in roundtrip_world(xs, eids, w, a, **extra)] == [o.tolist() for o in out]


def test_add_rms_norm_literal():
    y, rstd, x = add_rms_norm_rows([torch.tensor([2.0, 4.0]), None], t([[[1, 0]], [[5, 5]]]), t([1, 2]), 1e-6)
    assert x.tolist() == [[[3, 4]], [[0, 0]]]
    assert rstd[0, 0, 0].item() == pytest_approx(1 / math.sqrt(12.5 + 1e-6)) and rstd[1, 0, 0].item() == 0
    assert y[0, 0].tolist() == [pytest_approx_bf(3 / math.sqrt(12.5)), pytest_approx_bf(8 / math.sqrt(12.5))]
    assert y[1].abs().sum() == 0


def pytest_approx_bf(v):
    import pytest
    return pytest.approx(v, rel=2 ** -7)


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    world: int
    attrs: MoeAttrs
    k: int
    h: int
    dtype: torch.dtype
    bs: Tuple[int, ...]                 # per global rank
    routing: str = "random"             # random | skew | no_expert0 | hot
    mask: str = "none"                  # none | 1d | 2d
    smooth_scales: bool = False
    shared_x: int = 0                   # 0: none, 2: (BS, H), 3: (2, BS/2, H)
    alpha_2d: bool = False              # const_expert_alpha_1/2 as (Q, H) (the docs' form, SPEC §9 #4)
    rms: bool = False                   # also run combine_add_rms_norm
    roundtrip: bool = False             # also run combine(dispatch(x)) with identity experts
    seed: int = 0


def _case(name, world, k, h, dtype, bs, **kw) -> Case:
    attr_names = {f.name for f in dataclasses.fields(MoeAttrs)}
    attrs = MoeAttrs(**{n: v for n, v in kw.items() if n in attr_names})
    rest = {n: v for n, v in kw.items() if n not in attr_names}
    bs = tuple(bs) if isinstance(bs, (tuple, list)) else (bs,) * world
    return Case(name=name, world=world, attrs=attrs, k=k, h=h, dtype=dtype, bs=bs, seed=zlib.crc32(name.encode()) % 100003, **rest)


CASES: Dict[int, List[Case]] = {
    # A world of one rank needs no process group (group_ep ""): run in the test process, no spawn.
    1: [
        _case("one_rank_mask2d_rms_shared_x", 1, 2, 32, BF16, 6, ep_world_size=1, moe_expert_num=4, mask="2d",
              shared_x=2, rms=True, roundtrip=True),
        _case("one_rank_quant_smooth_special_commquant", 1, 3, 16, FP16, 5, ep_world_size=1, moe_expert_num=3,
              zero_expert_num=1, copy_expert_num=1, const_expert_num=1, quant_mode=2, smooth_scales=True,
              comm_quant_mode=2, expert_token_nums_type=0),
    ],
    2: [
        _case("ep_bf16_random", 2, 2, 32, BF16, 5, ep_world_size=2, moe_expert_num=4, roundtrip=True),
        _case("ep_fp16_mask1d_cumsum", 2, 3, 16, FP16, 6, ep_world_size=2, moe_expert_num=6, mask="1d",
              expert_token_nums_type=0, roundtrip=True),
        _case("ep_quant_bf16", 2, 2, 32, BF16, 4, ep_world_size=2, moe_expert_num=4, quant_mode=2),
        _case("ep_quant_fp16_smooth_mask2d", 2, 2, 64, FP16, 5, ep_world_size=2, moe_expert_num=4, quant_mode=2,
              smooth_scales=True, mask="2d"),
        _case("shared_S1_n1_mask2d", 2, 2, 32, BF16, 4, ep_world_size=2, moe_expert_num=2, shared_expert_rank_num=1,
              shared_expert_num=1, mask="2d", roundtrip=True),
        _case("special_zero_copy_const", 2, 3, 32, BF16, 5, ep_world_size=2, moe_expert_num=4, zero_expert_num=1,
              copy_expert_num=1, const_expert_num=2, roundtrip=True),
        _case("special_alpha_2d_fp16", 2, 2, 16, FP16, 4, ep_world_size=2, moe_expert_num=2, zero_expert_num=1,
              copy_expert_num=1, const_expert_num=2, alpha_2d=True, mask="1d"),
        _case("comm_quant_bf16", 2, 2, 32, BF16, 4, ep_world_size=2, moe_expert_num=4, comm_quant_mode=2),
        _case("skew_rank1_receives_nothing", 2, 2, 16, FP16, 4, ep_world_size=2, moe_expert_num=4, routing="skew",
              roundtrip=True),
        _case("global_bs_uneven", 2, 2, 32, BF16, (3, 5), ep_world_size=2, moe_expert_num=4, global_bs=10,
              roundtrip=True),
        _case("rms_shared_x", 2, 2, 32, BF16, 4, ep_world_size=2, moe_expert_num=4, shared_x=3, rms=True,
              roundtrip=True),
        _case("tp_world_size_1", 2, 2, 16, BF16, 3, ep_world_size=2, moe_expert_num=2, tp_world_size=1,
              roundtrip=True),
        _case("fp32_quant_shared_smooth", 2, 1, 16, FP32, 3, ep_world_size=2, moe_expert_num=1,
              shared_expert_rank_num=1, shared_expert_num=1, quant_mode=2, smooth_scales=True),
        _case("fp32_ep", 2, 2, 16, FP32, 3, ep_world_size=2, moe_expert_num=2, roundtrip=True),
    ],
    4: [
        _case("tp_bf16", 4, 2, 32, BF16, 4, ep_world_size=2, moe_expert_num=2, tp_world_size=2, roundtrip=True),
        _case("tp_fp16_quant_mask1d", 4, 2, 32, FP16, 4, ep_world_size=2, moe_expert_num=2, tp_world_size=2,
              quant_mode=2, mask="1d"),
        _case("tp_skew_mask2d_rms", 4, 1, 32, BF16, 3, ep_world_size=2, moe_expert_num=2, tp_world_size=2,
              routing="skew", mask="2d", rms=True, roundtrip=True),
        _case("shared_S2_n1", 4, 2, 32, BF16, 3, ep_world_size=4, moe_expert_num=4, shared_expert_rank_num=2,
              shared_expert_num=1, roundtrip=True),
        _case("shared_S2_n2_quant_smooth", 4, 2, 32, BF16, 3, ep_world_size=4, moe_expert_num=4,
              shared_expert_rank_num=2, shared_expert_num=2, quant_mode=2, smooth_scales=True),
        _case("global_bs_cumsum_no_expert0", 4, 2, 16, FP16, (2, 4, 1, 3), ep_world_size=4, moe_expert_num=8,
              global_bs=16, expert_token_nums_type=0, routing="no_expert0", shared_x=2, roundtrip=True),
        _case("rank_with_bs0", 4, 2, 16, BF16, (3, 0, 2, 4), ep_world_size=4, moe_expert_num=4, global_bs=16,
              roundtrip=True),
        _case("shared_special_mask2d_commquant", 4, 3, 32, FP16, 4, ep_world_size=4, moe_expert_num=6,
              shared_expert_rank_num=1, shared_expert_num=1, zero_expert_num=1, copy_expert_num=1,
              const_expert_num=1, mask="2d", comm_quant_mode=2),
        _case("rms_shared_S2_n2", 4, 2, 32, BF16, 3, ep_world_size=4, moe_expert_num=4, shared_expert_rank_num=2,
              shared_expert_num=2, rms=True, roundtrip=True),
        _case("hot_mask1d_rank_all_masked", 4, 2, 16, BF16, 4, ep_world_size=4, moe_expert_num=4, routing="hot",
              mask="1d", roundtrip=True),
        _case("tp_shared_S1", 4, 1, 16, BF16, 3, ep_world_size=2, moe_expert_num=1, tp_world_size=2,
              shared_expert_rank_num=1, shared_expert_num=1, roundtrip=True),
    ],
    8: [
        _case("shared_S4_n4_global_bs", 8, 3, 32, BF16, (4, 2, 3, 4, 1, 4, 2, 3), ep_world_size=8, moe_expert_num=8,
              shared_expert_rank_num=4, shared_expert_num=4, global_bs=32, roundtrip=True),
        _case("shared_S3_n3_quant_smooth_fp16", 8, 2, 32, FP16, 3, ep_world_size=8, moe_expert_num=10,
              shared_expert_rank_num=3, shared_expert_num=3, quant_mode=2, smooth_scales=True),
        _case("shared_S4_n2_mask2d_rms", 8, 2, 32, BF16, 3, ep_world_size=8, moe_expert_num=8,
              shared_expert_rank_num=4, shared_expert_num=2, mask="2d", rms=True),
        _case("tp_quant_mask2d", 8, 2, 32, BF16, 3, ep_world_size=4, moe_expert_num=4, tp_world_size=2,
              quant_mode=2, mask="2d"),
        _case("ep_special_commquant_global_bs", 8, 4, 32, BF16, (2, 1, 3, 2, 1, 3, 2, 2), ep_world_size=8,
              moe_expert_num=16, global_bs=24, zero_expert_num=1, copy_expert_num=1, const_expert_num=1,
              comm_quant_mode=2, routing="hot"),
        _case("tp_rms_global_bs_roundtrip", 8, 2, 16, BF16, (4, 3, 4, 2, 1, 4, 3, 4), ep_world_size=4,
              moe_expert_num=4, tp_world_size=2, global_bs=16, rms=True, roundtrip=True),
    ],
}

ALL_CASES = [c for cs in CASES.values() for c in cs]


# ----------------------------------------------------------------------------------------------
# Inputs (identical on every rank and in the parent: everything comes from the case seed)
# ----------------------------------------------------------------------------------------------

def _routing_pool(case: Case) -> List[int]:
    a = case.attrs
    n_ids = a.M + a.zero_expert_num + a.copy_expert_num + a.const_expert_num
    special = list(range(a.M, n_ids))
    if case.routing == "random":
        return list(range(n_ids))
    if case.routing == "skew":        # only the first MoE rank's experts (others receive nothing)
        return list(range(max(a.L_moe, case.k - len(special)))) + special
    if case.routing == "no_expert0":
        return list(range(1, n_ids))
    if case.routing == "hot":         # everything on a few experts (and the special ones)
        return list(range(case.k + 1)) + special
    raise ValueError(case.routing)


def make_inputs(case: Case) -> dict:
    a, k, h, dt = case.attrs, case.k, case.h, case.dtype
    gen = torch.Generator().manual_seed(case.seed)
    pool = torch.tensor(_routing_pool(case), dtype=torch.int32)
    assert len(pool) >= k
    world = a.world
    inp = {n: [] for n in ("x", "ids", "w", "mask", "scales", "ori_x", "alpha1", "alpha2", "v", "shared_x",
                           "residual", "gamma")}
    n_scale_rows = a.n_sh_eff + a.M
    scales = (torch.rand(n_scale_rows, h, generator=gen) * 1.5 + 0.25) if case.smooth_scales else None
    Q = a.const_expert_num
    ashape = (Q, h) if case.alpha_2d else (Q,)
    alpha1 = (torch.randn(ashape, generator=gen)).to(dt) if Q else None
    alpha2 = (torch.randn(ashape, generator=gen)).to(dt) if Q else None
    const_v = (torch.randn(Q, h, generator=gen)).to(dt) if Q else None
    gamma = (torch.rand(h, generator=gen) + 0.5).to(dt)
    for g in range(world):
        bs = case.bs[g]
        inp["x"].append(torch.randn(bs, h, generator=gen).to(dt))
        ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:k]] for _ in range(bs)]) if bs else \
            torch.zeros(0, k, dtype=torch.int32)
        inp["ids"].append(ids.to(torch.int32))
        inp["w"].append(torch.rand(bs, k, generator=gen))
        if case.mask == "1d":
            cnt = bs if g == 0 else (0 if g == world - 1 else int(torch.randint(0, bs + 1, (1,), generator=gen)))
            inp["mask"].append(torch.arange(bs) < cnt)
        elif case.mask == "2d":
            m = torch.rand(bs, k, generator=gen) < 0.6
            if g == 0:
                m[0] = False
                m[-1] = True
            if g == world - 1:
                m[:] = False
            inp["mask"].append(m)
        else:
            inp["mask"].append(None)
        inp["scales"].append(scales)
        special = a.copy_expert_num + Q > 0
        inp["ori_x"].append(torch.randn(bs, h, generator=gen).to(dt) if special else None)
        inp["alpha1"].append(alpha1)
        inp["alpha2"].append(alpha2)
        inp["v"].append(const_v)
        if case.shared_x:
            sx = torch.randn(bs, h, generator=gen).to(dt)
            inp["shared_x"].append(sx.reshape(2, bs // 2, h) if case.shared_x == 3 else sx)
        else:
            inp["shared_x"].append(None)
        inp["residual"].append(torch.randn(bs, 1, h, generator=gen).to(dt) if case.rms else None)
        inp["gamma"].append(gamma if case.rms else None)
    return inp


def ffn_rows(case: Case, g: int, rows: int) -> torch.Tensor:
    """The "expert output" fed to combine on rank g: random, padding rows included (which combine
    must ignore), independent of the dispatched data."""
    gen = torch.Generator().manual_seed(case.seed * 131 + g)
    return torch.randn(rows, case.h, generator=gen).to(case.dtype)


def roundtrip_rows(case: Case, expand_x: torch.Tensor) -> torch.Tensor:
    """Identity experts. With TP each TP rank returns half of the row, as a TP-split FFN would
    (the combine's reduce-scatter adds the halves: 0.5x + 0.5x == x exactly)."""
    if case.attrs.tp == 2:
        return (expand_x.to(FP32) * 0.5).to(case.dtype)
    return expand_x


# ----------------------------------------------------------------------------------------------
# Rank side
# ----------------------------------------------------------------------------------------------

def _groups(world: int, need_tp: bool) -> dict:
    import torch.distributed as dist
    if world == 1:
        return {"world": ""}
    groups = {"world": dist.group.WORLD.group_name}
    if need_tp:       # every rank creates every group, in the same order
        for t in range(2):
            pg = dist.new_group(list(range(t, world, 2)))
            if dist.get_rank() % 2 == t:
                groups["ep"] = pg.group_name
        for e in range(world // 2):
            pg = dist.new_group([2 * e, 2 * e + 1])
            if dist.get_rank() // 2 == e:
                groups["tp"] = pg.group_name
    return groups


def op_kwargs(case: Case, rank: int, groups: dict) -> Tuple[str, int, dict]:
    """(group_ep, ep_rank_id, shared keyword attributes) for this rank."""
    a = case.attrs
    e, t = a.split(rank)
    kw = dict(tp_world_size=a.tp_world_size, tp_rank_id=t, shared_expert_num=a.shared_expert_num,
              shared_expert_rank_num=a.S, global_bs=a.global_bs, zero_expert_num=a.zero_expert_num,
              copy_expert_num=a.copy_expert_num, const_expert_num=a.const_expert_num)
    if a.tp == 2:
        kw["group_tp"] = groups["tp"]
        return groups["ep"], e, kw
    return groups["world"], e, kw


def run_case(case: Case, rank: int, groups: dict) -> dict:
    import moe_fusion
    a = case.attrs
    inp = make_inputs(case)
    g = rank
    group_ep, ep_rank, kw = op_kwargs(case, rank, groups)
    x, ids, w, mask = inp["x"][g], inp["ids"][g], inp["w"][g], inp["mask"][g]
    res = {}
    disp = moe_fusion.npu_moe_distribute_dispatch_v2(
        x, ids, group_ep, a.W, ep_rank, a.M, scales=inp["scales"][g], x_active_mask=mask,
        quant_mode=a.quant_mode, expert_token_nums_type=a.expert_token_nums_type, **kw)
    res["dispatch"] = tuple(disp)
    expand_x, _, assist, _, ep_recv, tp_recv, _ = disp
    comb_kw = dict(tp_send_counts=tp_recv, x_active_mask=mask, ori_x=inp["ori_x"][g],
                   const_expert_alpha_1=inp["alpha1"][g], const_expert_alpha_2=inp["alpha2"][g],
                   const_expert_v=inp["v"][g], shared_expert_x=inp["shared_x"][g], **kw)
    ffn = ffn_rows(case, g, expand_x.shape[0])
    res["combine"] = moe_fusion.npu_moe_distribute_combine_v2(
        ffn, ids, assist, ep_recv, w, group_ep, a.W, ep_rank, a.M, comm_quant_mode=a.comm_quant_mode, **comb_kw)
    if case.rms:
        res["rms"] = tuple(moe_fusion.npu_moe_distribute_combine_add_rms_norm(
            ffn, ids, assist, ep_recv, w, inp["residual"][g], inp["gamma"][g], group_ep, a.W, ep_rank, a.M,
            comm_quant_mode=a.comm_quant_mode, norm_eps=NORM_EPS, **comb_kw))
    if case.roundtrip:
        res["roundtrip"] = moe_fusion.npu_moe_distribute_combine_v2(
            roundtrip_rows(case, expand_x), ids, assist, ep_recv, w, group_ep, a.W, ep_rank, a.M, **comb_kw)
    return res


def _rank_fn(rank: int, world: int, names: List[str]) -> dict:
    cases = {c.name: c for c in CASES[world]}
    groups = _groups(world, any(cases[n].attrs.tp == 2 for n in names))
    out = {}
    for n in names:
        try:
            out[n] = run_case(cases[n], rank, groups)
        except Exception:   # a deterministic (validation) error on every rank: report it, keep going
            out[n] = {"error": traceback.format_exc()}
    return out


@functools.lru_cache(maxsize=None)
def _world_run(world: int):
    names = [c.name for c in CASES[world]]
    if world == 1:
        return [_rank_fn(0, 1, names)], None
    try:
        return run_ranks(world, _rank_fn, names, timeout=240, pg_timeout=45), None
    except Exception as error:   # cached too: a broken spawn must not be retried by every test
        return None, f"{type(error).__name__}: {error}"


def world_results(world: int) -> List[dict]:
    """All of this world size's cases, run in one spawn (cached for the session, failures too)."""
    results, error = _world_run(world)
    if error is not None:
        pytest.fail(f"the {world}-rank spawn failed: {error}")
    return results


def results_for(case: Case) -> List[dict]:
    per_rank = [r[case.name] for r in world_results(case.world)]
    for g, r in enumerate(per_rank):
        if "error" in r:
            pytest.fail(f"{case.name}: rank {g} raised:\n{r['error']}")
    return per_rank


# ----------------------------------------------------------------------------------------------
# Expected values and comparisons
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def expected(case_name: str) -> dict:
    case = next(c for c in ALL_CASES if c.name == case_name)
    a = case.attrs
    inp = make_inputs(case)
    disp = dispatch_world(inp["x"], inp["ids"], a, scales=inp["scales"], x_active_masks=inp["mask"])
    ffn = [ffn_rows(case, g, d.expand_x.shape[0]) for g, d in enumerate(disp)]
    comb_kw = dict(tp_send_counts=[d.tp_recv_counts for d in disp], x_active_masks=inp["mask"],
                   shared_expert_xs=inp["shared_x"], ori_xs=inp["ori_x"], const_expert_alpha_1=inp["alpha1"],
                   const_expert_alpha_2=inp["alpha2"], const_expert_v=inp["v"])
    meta = ([d.assist_info_for_combine for d in disp], [d.ep_recv_counts for d in disp])
    exp = {"inputs": inp, "dispatch": disp}
    exp["combine"] = combine_world(ffn, inp["ids"], *meta, inp["w"], a, **comb_kw)
    exp["combine_mag"] = combine_world(*_abs(ffn, inp["ids"], *meta, inp["w"]), a, return_acc=True,
                                       **_abs_kw(comb_kw))
    if case.rms:
        exp["rms"] = combine_add_rms_norm_world(ffn, inp["ids"], *meta, inp["w"], inp["residual"], inp["gamma"], a,
                                                norm_eps=NORM_EPS, **comb_kw)
    if case.roundtrip:
        rt_attrs = dataclasses.replace(a, comm_quant_mode=0)
        rt_kw = {n: v for n, v in comb_kw.items() if n != "tp_send_counts"}
        exp["roundtrip"] = roundtrip_world(inp["x"], inp["ids"], inp["w"], rt_attrs, **rt_kw)
        exp["roundtrip_mag"] = combine_world(
            *_abs([roundtrip_rows(case, d.expand_x) for d in disp], inp["ids"], *meta, inp["w"]), rt_attrs,
            return_acc=True, **_abs_kw(comb_kw))
    return exp


def _abs(*seqs):
    return [[None if v is None else (v.abs() if v.is_floating_point() else v) for v in s] for s in seqs]


def _abs_kw(kw):
    return {n: (_abs(v)[0] if n != "tp_send_counts" and v is not None else v) for n, v in kw.items()}


MANT_BITS = {BF16: 7, FP16: 10, FP32: 23}


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |v| (the subnormal spacing near zero)."""
    bits = MANT_BITS[dtype]
    min_exp = {BF16: -126, FP16: -14, FP32: -126}[dtype]       # exponent of the smallest normal
    vf = v.to(FP32).abs()
    _, e = torch.frexp(vf)                                      # vf = m * 2^e, m in [0.5, 1)
    e = torch.where(vf == 0, torch.full_like(e, min_exp), torch.clamp(e - 1, min=min_exp))
    return torch.ldexp(torch.ones_like(vf), e - bits)


def assert_rows_close(got: torch.Tensor, exp: torch.Tensor, mag: torch.Tensor, nterms: int, what: str,
                      ulps: float = 1.0) -> None:
    """|got - exp| <= ulps * ulp_dtype(exp) + nterms * 2^-23 * Σ|terms|: the fp32 sums of ``nterms``
    terms may be done in another order (each add errs by <= 2^-24 of the running sum, bounded by
    Σ|terms|), and the final rounding to the output dtype may then land one ulp away."""
    assert got.dtype == exp.dtype and got.shape == exp.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                              f"{exp.dtype}{tuple(exp.shape)}"
    diff = (got.to(FP32) - exp.to(FP32)).abs()
    tol = ulps * ulp(exp, exp.dtype) + nterms * 2.0 ** -23 * mag
    bad = ~(diff <= tol)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} elements off, first at {idx}: got {got[idx].item()} "
                             f"expected {exp[idx].item()} (tol {tol[idx].item():.3g})")


def assert_mostly_bitwise(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    """Beyond the per-element bound: summing the same fp32 terms in another order changes the final
    bf16/fp16 rounding only when the exact value lies within ~n * 2^-23 (relative) of a rounding
    boundary, i.e. for a fraction ~n * 2^-15 (bf16) of the elements. So at most 1% + 1 elements may
    differ at all; a semantic slip of one rounding step (e.g. a missing double rounding) moves far more.
    Not applied to fp32 outputs, where any reordering moves the last bits."""
    if exp.dtype == FP32:
        return
    differ = int((_bits(got) != _bits(exp)).sum())
    assert differ <= exp.numel() // 100 + 1, f"{what}: {differ} of {exp.numel()} elements not bit-identical"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return {BF16: lambda: t.view(torch.int16), FP16: lambda: t.view(torch.int16),
            FP32: lambda: t.view(torch.int32)}.get(t.dtype, lambda: t)()


def assert_bitwise(got: torch.Tensor, exp: torch.Tensor, what: str) -> None:
    assert got.dtype == exp.dtype and got.shape == exp.shape, f"{what}: {got.dtype}{tuple(got.shape)} vs " \
                                                              f"{exp.dtype}{tuple(exp.shape)}"
    neq = _bits(got) != _bits(exp)
    if neq.any():
        idx = tuple(neq.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(neq.sum())} elements differ, first at {idx}: got {got[idx].item()} "
                             f"expected {exp[idx].item()}")


def nterms(case: Case) -> int:
    return case.k + case.attrs.n_sh_eff + (1 if case.shared_x else 0) + 2


def _ids(cases):
    return [pytest.param(c, id=f"w{c.world}-{c.name}") for c in cases]


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

DISPATCH_NAMES = ("expand_x", "dynamic_scales", "assist_info_for_combine", "expert_token_nums", "ep_recv_counts",
                  "tp_recv_counts", "expand_scales")


@pytest.mark.parametrize("case", _ids(ALL_CASES))
def test_dispatch(case: Case):
    a = case.attrs
    got_all = results_for(case)
    exp_all = expected(case.name)["dispatch"]
    for g, (res, exp) in enumerate(zip(got_all, exp_all)):
        got = res["dispatch"]
        where = f"{case.name} rank {g}"
        assert len(got) == 7
        for name, gt, et in zip(DISPATCH_NAMES, got, exp.outputs()):
            assert gt.dtype == et.dtype and tuple(gt.shape) == tuple(et.shape), \
                f"{where} {name}: got {gt.dtype}{tuple(gt.shape)}, expected {et.dtype}{tuple(et.shape)}"
        n = exp.total_own + exp.total_peer
        assert_bitwise(got[0][:n], exp.expand_x[:n], f"{where} expand_x valid rows [0, {n})")
        assert not got[0][n:].to(FP32).any(), f"{where} expand_x padding rows [{n}, ...) not zero"
        if a.quant_mode == 2:
            assert_bitwise(got[1][:n], exp.dynamic_scales[:n], f"{where} dynamic_scales valid rows")
        assert not got[1][n:].any(), f"{where} dynamic_scales padding not zero"
        m = 3 * exp.total_own
        assert torch.equal(got[2][:m], exp.assist_info_for_combine[:m]), \
            f"{where} assist triples: got {got[2][:m].view(-1, 3).tolist()}, expected {exp.own_rows}"
        assert not got[2][m:].any(), f"{where} assist_info_for_combine past the {exp.total_own} triples not zero"
        assert torch.equal(got[3], exp.expert_token_nums), \
            f"{where} expert_token_nums: got {got[3].tolist()}, expected {exp.expert_token_nums.tolist()}"
        assert torch.equal(got[4], exp.ep_recv_counts), \
            f"{where} ep_recv_counts: got {got[4].tolist()}, expected {exp.ep_recv_counts.tolist()}"
        if a.tp_world_size == 2:
            assert torch.equal(got[5], exp.tp_recv_counts), \
                f"{where} tp_recv_counts: got {got[5].tolist()}, expected {exp.tp_recv_counts.tolist()}"


@pytest.mark.parametrize("case", _ids([c for c in ALL_CASES if c.attrs.quant_mode == 0]))
def test_dispatch_quant0_dynamic_scales_zero(case: Case):
    """quant_mode 0 writes no dynamic scales: the buffer is the documented zero padding."""
    for g, res in enumerate(results_for(case)):
        assert not res["dispatch"][1].any(), f"{case.name} rank {g}: dynamic_scales not zero for quant_mode 0"


@pytest.mark.parametrize("case", _ids(ALL_CASES))
def test_combine(case: Case):
    exp = expected(case.name)
    for g, res in enumerate(results_for(case)):
        got, want = res["combine"], exp["combine"][g]
        mag = torch.stack([m if m is not None else torch.zeros(case.h) for m in exp["combine_mag"][g]]) \
            if case.bs[g] else torch.zeros(0, case.h)
        assert_rows_close(got, want, mag, nterms(case), f"{case.name} rank {g} combine_v2")
        assert_mostly_bitwise(got, want, f"{case.name} rank {g} combine_v2")
        # rows of unprocessed tokens: exactly zero (not just within tolerance)
        unprocessed = [i for i, m in enumerate(exp["combine_mag"][g]) if m is None]
        assert not got[unprocessed].to(FP32).any(), f"{case.name} rank {g}: unprocessed rows {unprocessed} not zero"


RMS_CASES = [c for c in ALL_CASES if c.rms]


@pytest.mark.parametrize("case", _ids(RMS_CASES))
def test_combine_add_rms_norm(case: Case):
    exp = expected(case.name)
    inp = exp["inputs"]
    for g, res in enumerate(results_for(case)):
        y, rstd, x = res["rms"]
        ey, erstd, ex = exp["rms"][g]
        where = f"{case.name} rank {g} add_rms_norm"
        assert (y.shape, rstd.shape, x.shape) == (ey.shape, erstd.shape, ex.shape)
        assert (y.dtype, rstd.dtype, x.dtype) == (ey.dtype, erstd.dtype, ex.dtype)
        accs = exp["combine_mag"][g]
        mag = torch.stack([(m if m is not None else torch.zeros(case.h)) for m in accs]).unsqueeze(1) \
            + inp["residual"][g].to(FP32).abs()
        assert_rows_close(x, ex, mag, nterms(case) + 1, f"{where} x")
        assert_mostly_bitwise(x, ex, f"{where} x")
        # rstd: a mean of H squares in another order (<= H * 2^-24 relative), on xs perturbed as above
        torch.testing.assert_close(rstd, erstd, rtol=1e-4, atol=0, msg=lambda m: f"{where} rstd: {m}")
        # y = bf16(bf16(xs*rstd)*gamma): a 1-ulp move of the inner rounding moves y by gamma ulps
        inner = (ex.to(FP32) * erstd).abs()
        tol = 2 * ulp(ey, ey.dtype) + 2 * ulp(inner, ey.dtype) * inp["gamma"][g].to(FP32).abs()
        diff = (y.to(FP32) - ey.to(FP32)).abs()
        assert (diff <= tol).all(), f"{where} y: max excess {(diff - tol).max().item()}"
        assert_mostly_bitwise(y, ey, f"{where} y")
        unprocessed = [i for i, m in enumerate(accs) if m is None]
        for name, t in (("y", y), ("rstd", rstd), ("x", x)):
            assert not t[unprocessed].to(FP32).any(), f"{where} {name}: unprocessed rows {unprocessed} not zero"
