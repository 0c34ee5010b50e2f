"""FX fusion passes: unfused MoE subgraphs -> moe_fusion's fused ops (see DESIGN.md "Fusion passes").

Pattern modules register themselves with ``register_pass`` in pipeline order when imported here.
"""
from .context import FusionEvent, FusionReport, PassContext
from .explain import explain
from .pipeline import PASSES, MoeFusionGraphPass, backend, register_pass, run_fusion_passes

# Pattern passes, in pipeline order.
# Whole expert-parallel MoE blocks first: they consume their expert FFNs, which the FFN pass would take alone.
from . import allgather_ep, capacity_a2a  # noqa: E402,F401
from . import alltoall_allgather_bmm, bmm_reducescatter_alltoall  # noqa: E402,F401
# FFN stays after every pass that may consume matmul chains as a whole (a future dispatch/combine
# pass included: import it above this line); re-routing is independent of the others.
from . import ffn, re_routing  # noqa: E402,F401

__all__ = ["FusionEvent", "FusionReport", "PassContext", "PASSES", "MoeFusionGraphPass", "backend", "explain",
           "register_pass", "run_fusion_passes"]
