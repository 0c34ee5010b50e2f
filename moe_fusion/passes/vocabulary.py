"""The ATen op sets the passes reason with, defined once and composed from each other.

Post-grad graphs spell one intent several ways (``view``/``reshape``/``_unsafe_view``, ``permute``/
``transpose``, copies inductor inserts before a reshape). A pass names the set whose property it
relies on; every set here is a union of the smaller ones above it.
"""
from __future__ import annotations

import torch

aten, prims = torch.ops.aten, torch.ops.prims

# Reinterpret the same elements with another shape.
VIEW_OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# A copy that keeps values: inductor materializes permuted tensors with clone before a reshape.
COPY_OPS = (aten.clone.default, aten.contiguous.default)
# Reorder dims.
PERMUTE_OPS = (aten.permute.default, aten.transpose.int)
# Change the shape (row-major) without changing any value or their order.
RESHAPE_OPS = VIEW_OPS + COPY_OPS + (aten.alias.default, aten.unsqueeze.default, aten.squeeze.default,
                                     aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints)
# Move or copy elements without changing them (an expand to the same shape included).
MOVE_OPS = RESHAPE_OPS + PERMUTE_OPS + (aten.expand.default,)
# Output a polynomial (of degree <= 2 here) in the tensor inputs: einsums lower to these.
MULTILINEAR_OPS = MOVE_OPS + (aten.bmm.default, aten.mm.default, aten.mul.Tensor, aten.sum.dim_IntList)
# Move whole rows between tensors (what lies between an all_to_all and the expert FFNs).
ROW_MOVE_OPS = MOVE_OPS + (aten.split.Tensor, aten.split_with_sizes.default, aten.cat.default, aten.stack.default,
                           aten.select.int, aten.slice.Tensor)
# Allocate a tensor of given sizes without reading any value.
ALLOCATION_OPS = (aten.empty.memory_format, aten.new_empty.default)
# Deterministic ops a compile-time constant (a key table) may be built from: no randomness, no inputs.
CONSTANT_OPS = (prims.iota, aten.arange, aten.repeat, aten.expand, aten.clone, aten.remainder, aten.fmod, aten.div,
                aten.floor_divide, aten.unsqueeze, aten.permute, aten.mul, aten.add, aten.sub, aten.neg,
                prims.convert_element_type, aten._to_copy, aten.full, aten.select, aten.slice,
                aten.view, aten.reshape, aten._unsafe_view)

# Grouped matmuls ``(S, K) x (E, K, N) -> (S, N)`` over row segments ending at ``offs`` (int32
# cumulative ends): torch's, and HF transformers' fallback op (named: the library may be absent).
GROUPED_MM_NAMES = frozenset({"aten._grouped_mm.default", "transformers.grouped_mm_fallback.default"})
