"""Autograd formulas of the fused ops (``torch.library.register_autograd``), so they differentiate
in eager mode, under ``torch.compile`` and through AOT autograd, on every device.

One module per op family; each registers its formulas when imported (``moe_fusion`` imports this
package). A formula is written over the ops' semantics (SPEC), not over a kernel, so the NPU
kernels behind the same ops get the same backward. Inputs with no gradient (integer ids and
counts, quant scales, int8 paths) raise ``NotDifferentiableError`` naming the op and the
argument when a backward needs their gradient; they never get a silent zero.
"""
from ._common import NotDifferentiableError
from . import local_ops  # noqa: F401  (registers the formulas)
from . import bmm_collectives  # noqa: F401
from . import moe_distribute  # noqa: F401

__all__ = ["NotDifferentiableError"]
