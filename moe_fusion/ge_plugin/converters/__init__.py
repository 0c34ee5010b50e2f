"""GE converters of every moe_fusion op, by op name (``CONVERTERS``).

Importing this package needs torchair; ``moe_fusion.ge_plugin.register_converters()`` imports it
only when torchair is importable and registers each converter for its op.
"""
from __future__ import annotations

from . import bmm_collectives, local_ops, moe_distribute  # noqa: F401  (each fills CONVERTERS)
from ._emit import CONVERTERS, emit

__all__ = ["CONVERTERS", "emit"]
