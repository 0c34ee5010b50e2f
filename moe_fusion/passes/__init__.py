"""FX fusion passes: unfused MoE subgraphs -> moe_fusion's fused ops (see DESIGN.md "Fusion passes").

``pipeline.PIPELINE`` lists the passes in the order they run; ``context`` defines the protocol
every pattern module follows. Lower modules (``vocabulary``, ``_graph``, ``collectives``,
``_layout``, ``activations``, ``evaluate``, ``ffn_forms``, ``emit``, ``moe_block``) hold what
passes share; no pass imports another. ``lowering`` compiles the fused local ops for inductor;
``agreement`` makes the ranks of a group keep or undo their collective rewrites together;
``entry.compile`` is the one-call entry point (``moe_fusion.compile``).
"""
from .context import FusionEvent, FusionReport, Match, PassContext, Refusal
from .entry import compile
from .explain import explain
from .pipeline import PASSES, PIPELINE, FusionPass, MoeFusionGraphPass, backend, run_fusion_passes

__all__ = ["FusionEvent", "FusionReport", "FusionPass", "Match", "PassContext", "PASSES", "PIPELINE", "Refusal",
           "MoeFusionGraphPass", "backend", "compile", "explain", "run_fusion_passes"]
