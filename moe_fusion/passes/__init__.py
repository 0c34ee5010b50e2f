"""FX fusion passes: unfused MoE subgraphs -> moe_fusion's fused ops (see DESIGN.md "Fusion passes").

Pattern modules register themselves with ``register_pass`` in pipeline order when imported here.
"""
from .context import FusionEvent, FusionReport, PassContext
from .explain import explain
from .pipeline import PASSES, MoeFusionGraphPass, backend, register_pass, run_fusion_passes

__all__ = ["FusionEvent", "FusionReport", "PassContext", "PASSES", "MoeFusionGraphPass", "backend", "explain",
           "register_pass", "run_fusion_passes"]
