"""Rules and sizes shared by the MoE dispatch/combine pair (SPEC §1, §3.2, §3.5, §4.4).

``DistConfig`` is what a validated set of attributes means for this rank: the token count, top-k,
hidden size and token dtype, the EP/TP world, the shared-expert layout, the local expert count
``L``, the receive capacity ``A`` (exactly torch_npu's Meta arithmetic, SymInt-safe) and the
special-expert id ranges. It is the config of both combine ops; dispatch's ``DispatchConfig``
wraps it. ``check_dist_attrs`` applies the attribute rules common to dispatch and combine for the
current target:

* portable: only the rules the semantics need (ranks in range, divisibility, shared layout, ...);
* A2 / A3: plus that product's tiling limits (SPEC §3.5 "A2" list and A3 table).

Value rules (expert ids in range and unique per row, 1-D mask True-prefix) need tensor contents and
run in eager kernels only (``validate_id_values``, ``validate_mask_values``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import fail
from ..targets import get_target
from ._proto import INT32_MAX, PORTABLE_FLOATS, require, require_dim, require_dtype, require_in, require_range, require_shape, shape_of

DEVICE_X_DTYPES = (torch.bfloat16, torch.float16)   # tokens (x, expand_x) on A2/A3
X_DTYPES = DEVICE_X_DTYPES + PORTABLE_FLOATS        # the portable target adds fp32 and fp64
# expert_scales: fp32 on A2/A3, also fp64 on the portable target (gradient checks).
SCALE_DTYPES, PORTABLE_SCALE_DTYPES = (torch.float32,), PORTABLE_FLOATS
ASSIST_ROW_STRIDE = 128                             # Meta allocates A * 128 assist_info entries

MAX_GROUP_NAME = 127          # group names are 1..127 characters (torch_npu hcomm names)
A3_COMM_ALGS = ("", "fullmesh_v1", "fullmesh_v2")
A2_COMM_ALGS = ("", "0", "fullmesh", "hierarchy")
A3_MAX_WORLD, A3_MAX_EXPERTS, A3_MAX_BS, A3_MAX_BS_V2, A3_MAX_K, A3_MAX_K_V2 = 768, 1024, 512, 256, 16, 12
A3_H_RANGE, A3_MAX_SHARED, A3_MAX_LOCAL_TIMES_W = (1024, 8192), 4, 2048
A2_WORLDS_FULLMESH, A2_WORLDS_HIERARCHY = (16, 32, 64, 128, 256), (16, 32, 64)
A2_MAX_EXPERTS, A2_MAX_LOCAL_FULLMESH, A2_MAX_BS, A2_MAX_K = 512, 24, 256, 16
A2_MAX_H_FULLMESH, A2_MAX_H_HIERARCHY, A2_H_ALIGN = 7168, 10240, 32
# Bounds on every target (SPEC §3.5 gives the device values; the portable target takes the largest
# device value, so nothing torch_npu accepts on a device is refused):
# * ep_world_size <= 768 (A3): W multiplies into ep_recv_counts (W * L) and the default global_bs (BS * W).
# * moe_expert_num <= 1024 (A3): M sizes expert_token_nums (L = M / (W - S)) and ep_recv_counts (W * L).
# * global_bs / ep_world_size is the largest BS of any rank, so it is at most the target's largest BS
#   (portable: 512, or this rank's BS when larger); it sizes the receive capacity A.
# * A * 128 <= INT32_MAX: assist_info_for_combine has A * 128 int32-indexed entries, and ep_recv_counts /
#   tp_recv_counts count up to max(T, 1) * A rows in int32 (the device's largest A is 512 * 768 * 16).
MAX_WORLD, MAX_EXPERTS, PORTABLE_MAX_BS = A3_MAX_WORLD, A3_MAX_EXPERTS, A3_MAX_BS
MAX_CAPACITY = INT32_MAX // ASSIST_ROW_STRIDE


def ceil_div(a: Any, b: Any) -> Any:
    return (a + b - 1) // b


@dataclass(frozen=True)
class DistConfig:
    """One rank's view of a validated dispatch/combine configuration.

    ``n_shared`` is the effective shared expert count (``S == 0`` means none, whatever
    ``shared_expert_num`` says). ``local_experts`` is this rank's ``L`` (1 on a shared rank);
    ``meta_local_experts`` is torch_npu Meta's (larger with ``elastic_info``) and sizes
    ``expert_token_nums``/``ep_recv_counts``. ``capacity`` is ``A``.
    """

    num_tokens: Any             # BS (SymInt-able)
    top_k: Any                  # K
    hidden: Any                 # H
    dtype: torch.dtype          # x's (dispatch) or expand_x's (combine) dtype
    world: int                  # W
    rank: int                   # r
    moe_experts: int            # M
    tp_world: int               # T (0, 1 or 2)
    tp_rank: int                # t
    shared_ranks: int           # S
    n_shared: int               # effective shared expert count
    moe_local_experts: int      # M // (W - S): L on every MoE rank
    local_experts: int          # L of this rank
    meta_local_experts: int
    global_bs: Any              # global_bs_real (SymInt-able)
    capacity: Any               # A (SymInt-able)
    zero_experts: int
    copy_experts: int
    const_experts: int

    @property
    def is_shared_rank(self) -> bool:
        return self.rank < self.shared_ranks

    @property
    def ranks_per_shared_expert(self) -> int:
        """``R_sh``: shared expert ``q`` lives on ranks ``[q*R_sh, (q+1)*R_sh)``."""
        return self.shared_ranks // self.n_shared if self.n_shared else 0

    @property
    def tp_factor(self) -> int:
        """Row-count multiplier of the TP all-gather: ``max(T, 1)``."""
        return max(self.tp_world, 1)

    @property
    def recv_slots(self) -> int:
        """Entries of this rank's own part of ``ep_recv_counts``: ``W`` on a shared rank, else ``W*L``."""
        return self.world * self.local_experts

    @property
    def special_bounds(self) -> tuple[int, int, int, int]:
        """Ends of the id ranges: MoE ``[0, M)``, zero ``[M, b1)``, copy ``[b1, b2)``, const ``[b2, b3)``."""
        m = self.moe_experts
        return m, m + self.zero_experts, m + self.zero_experts + self.copy_experts, \
            m + self.zero_experts + self.copy_experts + self.const_experts


def recv_capacity(bs: Any, k: Any, world: int, rank: int, moe_experts: int, shared_ranks: int, shared_num: int,
                  global_bs: int, has_elastic: bool) -> tuple[Any, int, Any]:
    """``(A, meta_local_experts, global_bs_real)`` exactly as torch_npu's dispatch Meta computes them
    (SPEC §3.2, ``expert_shard_type == 0``). Requires validated attrs (``S < W``, shared layout)."""
    gbs = bs * world if global_bs == 0 else global_bs
    moe_local = moe_experts // (world - shared_ranks)
    max_bs = gbs // world
    shared_groups = ceil_div(world, shared_ranks // shared_num) if shared_ranks else 0
    if rank < shared_ranks:
        local, a = 1, max_bs * shared_groups
    else:
        local, a = moe_local, gbs * torch.sym_min(moe_local, k)
    if has_elastic:
        # Elastic scale-down may turn any rank into a MoE rank: size for the larger role.
        if shared_ranks == 0:
            a = gbs * torch.sym_min(moe_local, k)
        else:
            a = torch.sym_max(max_bs * shared_groups, gbs * torch.sym_min(moe_local, k))
        local = max(local, moe_local)
    return a, local, gbs


def _check_group_name(op: str, arg: str, name: str, needed: bool) -> None:
    if get_target() != "portable":
        require(1 <= len(name) <= MAX_GROUP_NAME, op, arg, f"length must be in [1, {MAX_GROUP_NAME}]", repr(name))
    elif needed:
        # Portable kernels resolve the name in the c10d registry: it cannot be empty.
        require(len(name) >= 1, op, arg, "must name a process group when its world size is > 1", repr(name))


def _check_shared_layout(op: str, world: int, shared_ranks: int, shared_num: int) -> int:
    """SPEC §3.5 shared rules; returns the effective shared expert count."""
    require(shared_num >= 0, op, "shared_expert_num", "must be >= 0", shared_num)
    require(0 <= shared_ranks < world, op, "shared_expert_rank_num", f"must be in [0, ep_world_size={world})",
            shared_ranks)
    # shared_expert_num keeps its default 1 when there are no shared ranks: that means "none".
    n_sh = 0 if (shared_ranks == 0 and shared_num == 1) else shared_num
    require((n_sh == 0) == (shared_ranks == 0), op, "shared_expert_num",
            "and shared_expert_rank_num must both be 0 or both be > 0",
            f"shared_expert_num={shared_num}, shared_expert_rank_num={shared_ranks}")
    if n_sh:
        require(shared_ranks % n_sh == 0, op, "shared_expert_rank_num",
                f"must be a multiple of shared_expert_num={n_sh}", shared_ranks)
    return n_sh


def check_dist_attrs(op: str, *, bs: Any, k: Any, h: Any, dtype: torch.dtype, group_ep: str, world: int, rank: int,
                     moe_experts: int, group_tp: str, tp_world: int, tp_rank: int, expert_shard_type: int,
                     shared_num: int, shared_ranks: int, global_bs: int, comm_alg: str, zero_experts: int,
                     copy_experts: int, const_experts: int, x_active_mask: Optional[torch.Tensor],
                     elastic_info: Optional[torch.Tensor], performance_info: Optional[torch.Tensor]) -> DistConfig:
    """The attribute and shared-input rules of dispatch (§3.5) and combine (§4.4) for the current target.

    ``bs``/``k``/``h`` are the token count, top-k and hidden size seen by the op (SymInt-able),
    ``dtype`` its token dtype. Returns the resolved config.
    """
    target = get_target()
    require(world >= 1, op, "ep_world_size", "must be >= 1", world)
    if target == "portable":   # A2/A3 check their own, tighter ranges below
        require(world <= MAX_WORLD, op, "ep_world_size", f"must be <= {MAX_WORLD}", world)
    require_range(op, "ep_rank_id", rank, 0, world - 1)
    _check_group_name(op, "group_ep", group_ep, world > 1)
    require_in(op, "tp_world_size", tp_world, (0, 1, 2))
    if tp_world > 1:
        require_range(op, "tp_rank_id", tp_rank, 0, tp_world - 1)
        _check_group_name(op, "group_tp", group_tp, True)
        # The TP exchange runs on its own group; one group cannot be both domains.
        require(group_tp != group_ep, op, "group_tp", "must differ from group_ep when tp_world_size > 1",
                repr(group_tp))
    else:
        require(tp_rank == 0, op, "tp_rank_id", "must be 0 when tp_world_size <= 1", tp_rank)
    # Shared-expert ranks come first; the other layout has no defined semantics (Meta gives A = 0).
    require_in(op, "expert_shard_type", expert_shard_type, (0,))
    n_sh = _check_shared_layout(op, world, shared_ranks, shared_num)
    require(moe_experts > 0, op, "moe_expert_num", "must be > 0", moe_experts)
    if target == "portable":
        require(moe_experts <= MAX_EXPERTS, op, "moe_expert_num", f"must be <= {MAX_EXPERTS}", moe_experts)
    require(moe_experts % (world - shared_ranks) == 0, op, "moe_expert_num",
            f"must be a multiple of ep_world_size - shared_expert_rank_num = {world - shared_ranks}", moe_experts)
    moe_local = moe_experts // (world - shared_ranks)
    if tp_world > 1:
        # The TP all-gather appends the peer's rows after ours: defined for one local expert only.
        require(moe_local == 1, op, "moe_expert_num",
                "must give one expert per MoE rank (moe_expert_num / (ep_world_size - shared_expert_rank_num) == 1) "
                "when tp_world_size == 2", f"{moe_experts} ({moe_local} per rank)")
        require(elastic_info is None, op, "elastic_info", "must be None when tp_world_size == 2", "a tensor")
    for arg, n in (("zero_expert_num", zero_experts), ("copy_expert_num", copy_experts),
                   ("const_expert_num", const_experts)):
        require(n >= 0, op, arg, "must be >= 0", n)
    total = moe_experts + zero_experts + copy_experts + const_experts
    require(total <= INT32_MAX, op, "moe_expert_num",
            f"+ zero/copy/const_expert_num must be <= {INT32_MAX} (ids are int32)", total)
    require(k >= 1, op, "expert_ids", "must have K >= 1 columns", f"K={k}")
    # Ids in a row are unique and lie in [0, total): K of them need K distinct ids.
    require(k <= total, op, "expert_ids", f"K must be <= moe_expert_num + zero/copy/const_expert_num = {total}",
            f"K={k}")
    require(h >= 1, op, "x" if op.endswith("dispatch_v2") else "expand_x", "must have hidden size H >= 1", f"H={h}")
    if global_bs != 0:
        require(global_bs >= bs * world and global_bs % world == 0, op, "global_bs",
                f"must be 0 or a multiple of ep_world_size={world} that is >= BS * ep_world_size = {bs * world}",
                global_bs)
        max_bs = {"A2": A2_MAX_BS, "A3": A3_MAX_BS}.get(target, torch.sym_max(bs, PORTABLE_MAX_BS))
        if not global_bs <= world * max_bs:
            max_bs = int(max_bs)   # the example's value in the message, also at trace time (failing anyway)
            fail(op, "global_bs", f"must be <= ep_world_size * {max_bs} = {world * max_bs} (global_bs / "
                 "ep_world_size is the largest BS of any rank)", global_bs)
    if x_active_mask is not None:
        require_dtype(op, "x_active_mask", x_active_mask, (torch.bool,))
        require_dim(op, "x_active_mask", x_active_mask, (1, 2))
        require_shape(op, "x_active_mask", x_active_mask, (bs,) if x_active_mask.dim() == 1 else (bs, k))
    if elastic_info is not None:
        require_dtype(op, "elastic_info", elastic_info, (torch.int32,))
        require_shape(op, "elastic_info", elastic_info, (4 + 2 * world,))
    if performance_info is not None:
        require_dtype(op, "performance_info", performance_info, (torch.int64,))
        require_shape(op, "performance_info", performance_info, (world,))
    comm_algs = {"A2": A2_COMM_ALGS, "A3": A3_COMM_ALGS}.get(target, tuple(dict.fromkeys(A3_COMM_ALGS + A2_COMM_ALGS)))
    require_in(op, "comm_alg", comm_alg, comm_algs)

    capacity, meta_local, gbs = recv_capacity(bs, k, world, rank, moe_experts, shared_ranks, n_sh, global_bs,
                                              elastic_info is not None)
    cfg = DistConfig(num_tokens=bs, top_k=k, hidden=h, dtype=dtype, world=world, rank=rank, moe_experts=moe_experts,
                     tp_world=tp_world, tp_rank=tp_rank, shared_ranks=shared_ranks, n_shared=n_sh,
                     moe_local_experts=moe_local, local_experts=1 if rank < shared_ranks else moe_local,
                     meta_local_experts=meta_local, global_bs=gbs, capacity=capacity, zero_experts=zero_experts,
                     copy_experts=copy_experts, const_experts=const_experts)
    if target == "A3":
        _check_a3(op, cfg, bs, k, h, shared_num, global_bs, comm_alg, x_active_mask, elastic_info, performance_info)
    elif target == "A2":
        _check_a2(op, cfg, bs, k, h, global_bs, comm_alg, x_active_mask, elastic_info)
    if not capacity <= MAX_CAPACITY:
        fail(op, "global_bs" if global_bs else "expert_ids",
             f"must keep the receive capacity A = global_bs_real * min(L, K) (or max_bs * shared groups) "
             f"<= {MAX_CAPACITY} (assist_info_for_combine holds A * {ASSIST_ROW_STRIDE} int32-indexed entries)",
             f"A={int(capacity)} (global_bs={global_bs}, BS={int(bs)}, K={int(k)})")
    return cfg


def _check_device_mask_with_varying_bs(op: str, bs: Any, world: int, global_bs: int, mask: Optional[torch.Tensor]):
    # The device requires every token to be valid when ranks have different BS (global_bs > BS*W).
    if mask is not None and global_bs != 0:
        require(global_bs <= bs * world, op, "x_active_mask",
                "must be None when global_bs > BS * ep_world_size (ranks with different BS)",
                f"global_bs={global_bs}, BS*ep_world_size={bs * world}")


def _check_a3(op, cfg: DistConfig, bs, k, h, shared_num, global_bs, comm_alg, mask, elastic_info, perf) -> None:
    v2 = comm_alg == "fullmesh_v2"
    require_range(op, "ep_world_size", cfg.world, 2, A3_MAX_WORLD)
    require_range(op, "moe_expert_num", cfg.moe_experts, 1, A3_MAX_EXPERTS)
    require_range(op, "shared_expert_num", shared_num, 0, A3_MAX_SHARED)
    max_bs, max_k = (A3_MAX_BS_V2, A3_MAX_K_V2) if v2 else (A3_MAX_BS, A3_MAX_K)
    require(1 <= bs <= max_bs, op, "expert_ids", f"BS must be in [1, {max_bs}] on A3", f"BS={bs}")
    require(k <= max_k, op, "expert_ids", f"K must be <= {max_k} on A3", f"K={k}")
    lo, hi = A3_H_RANGE
    require(lo <= h <= hi, op, "x" if op.endswith("dispatch_v2") else "expand_x",
            f"hidden size H must be in [{lo}, {hi}] on A3", f"H={h}")
    require(cfg.moe_local_experts * cfg.world <= A3_MAX_LOCAL_TIMES_W, op, "moe_expert_num",
            f"local_expert_num * ep_world_size must be <= {A3_MAX_LOCAL_TIMES_W} on A3",
            cfg.moe_local_experts * cfg.world)
    require(perf is None, op, "performance_info", "must be None on A3 (reserved)", "a tensor")
    _check_device_mask_with_varying_bs(op, bs, cfg.world, global_bs, mask)
    if v2:
        specials = cfg.zero_experts + cfg.copy_experts + cfg.const_experts
        for arg, bad in (("elastic_info", elastic_info is not None), ("x_active_mask", mask is not None),
                         ("zero_expert_num/copy_expert_num/const_expert_num", specials > 0),
                         ("tp_world_size", cfg.tp_world == 2)):
            require(not bad, op, arg, "is not supported with comm_alg 'fullmesh_v2'", "given")
        require(global_bs == 0 or global_bs == bs * cfg.world, op, "global_bs",
                "must be 0 or BS * ep_world_size with comm_alg 'fullmesh_v2' (no per-rank BS)", global_bs)


def _check_a2(op, cfg: DistConfig, bs, k, h, global_bs, comm_alg, mask, elastic_info) -> None:
    hierarchy = comm_alg == "hierarchy"
    worlds = A2_WORLDS_HIERARCHY if hierarchy else A2_WORLDS_FULLMESH
    require(cfg.world in worlds, op, "ep_world_size", f"must be one of {worlds} on A2 ({comm_alg or 'fullmesh'})",
            cfg.world)
    # A2 has no TP domain and no shared-expert ranks: refuse them rather than ignore them.
    require(cfg.tp_world <= 1, op, "tp_world_size", "must be 0 or 1 on A2 (no TP domain)", cfg.tp_world)
    require(cfg.shared_ranks == 0, op, "shared_expert_rank_num", "must be 0 on A2 (no shared experts)",
            cfg.shared_ranks)
    require_range(op, "moe_expert_num", cfg.moe_experts, 1, A2_MAX_EXPERTS)
    if not hierarchy:
        require(cfg.moe_local_experts <= A2_MAX_LOCAL_FULLMESH, op, "moe_expert_num",
                f"/ ep_world_size must be <= {A2_MAX_LOCAL_FULLMESH} on A2 fullmesh", cfg.moe_local_experts)
    max_h = A2_MAX_H_HIERARCHY if hierarchy else A2_MAX_H_FULLMESH
    h_arg = "x" if op.endswith("dispatch_v2") else "expand_x"
    require(h <= max_h and h % A2_H_ALIGN == 0, op, h_arg,
            f"hidden size H must be a multiple of {A2_H_ALIGN} in (0, {max_h}] on A2", f"H={h}")
    require(1 <= bs <= A2_MAX_BS, op, "expert_ids", f"BS must be in [1, {A2_MAX_BS}] on A2", f"BS={bs}")
    require(k <= A2_MAX_K, op, "expert_ids", f"K must be <= {A2_MAX_K} on A2", f"K={k}")
    if mask is not None:
        require(mask.dim() == 1, op, "x_active_mask", "must be 1-D on A2", f"shape {shape_of(mask)}")
    require(elastic_info is None, op, "elastic_info", "must be None on A2", "a tensor")
    specials = cfg.zero_experts + cfg.copy_experts + cfg.const_experts
    require(specials == 0, op, "zero_expert_num/copy_expert_num/const_expert_num", "must be 0 on A2",
            (cfg.zero_experts, cfg.copy_experts, cfg.const_experts))
    _check_device_mask_with_varying_bs(op, bs, cfg.world, global_bs, mask)


# ---------------------------------------------------------------------------------------------
# Value rules (eager only): they need tensor contents.
# ---------------------------------------------------------------------------------------------

def validate_id_values(op: str, expert_ids: torch.Tensor, total_experts: int) -> None:
    """Ids lie in ``[0, total_experts)`` and are unique within each row (SPEC §3.5 doc rule)."""
    if expert_ids.numel() == 0:
        return
    bad = (expert_ids < 0) | (expert_ids >= total_experts)
    if bool(bad.any()):
        fail(op, "expert_ids", f"values must be in [0, {total_experts})", int(expert_ids[bad][0]))
    ordered = expert_ids.sort(dim=1).values
    dup = ordered[:, 1:] == ordered[:, :-1]
    if bool(dup.any()):
        row = int(dup.any(dim=1).nonzero()[0])
        fail(op, "expert_ids", "values must be unique within a row", f"row {row} = {expert_ids[row].tolist()}")


def validate_mask_values(op: str, x_active_mask: Optional[torch.Tensor]) -> None:
    """A 1-D mask is a True-prefix: every True comes before every False (SPEC §3.5, §10 #12)."""
    if x_active_mask is None or x_active_mask.dim() != 1 or x_active_mask.numel() == 0:
        return
    count = int(x_active_mask.sum())
    if not bool(x_active_mask[:count].all()):
        fail(op, "x_active_mask", "must be a True-prefix when 1-D (all True before any False)",
             x_active_mask.int().tolist() if x_active_mask.numel() <= 16 else f"{count} True, not leading")
