"""Recognize elementwise activations, as ATen ops or as inductor's decompositions of them.

Post-grad graphs hold ``aten.gelu`` / ``aten.silu`` on some backends (torchair keeps them) and
their decompositions on others (inductor: ``x * 0.5 * (1 + erf(x * 0.7071...))`` for GELU,
``x / (1 + exp(-x))`` for SiLU). ``match_activation(node)`` reads either form back.

Kinds: ``relu``, ``gelu_erf``, ``gelu_tanh``, ``silu``, ``fastgelu`` (``x * sigmoid(1.702 x)``).
Each fused op states which kinds it computes exactly; the others are refused.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from ._graph import is_op

aten = torch.ops.aten
_RTOL = 1e-6   # constants in decompositions are the Python floats of the formulas


@dataclass(frozen=True)
class ActivationMatch:
    kind: str
    input: fx.Node
    output: fx.Node
    nodes: tuple[fx.Node, ...]      # every node of the activation, output included

    def internal_nodes_private(self) -> bool:
        """No node of the activation but its output is used outside it (safe to erase)."""
        inside = set(self.nodes)
        return all(set(n.users) <= inside for n in self.nodes if n is not self.output)


def _close(value: Any, expected: float) -> bool:
    return isinstance(value, (int, float)) and math.isclose(float(value), expected, rel_tol=_RTOL)


def _scalar_mul(node: Any, factor: float) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``x * factor`` (either argument order)."""
    if not is_op(node, aten.mul.Tensor):
        return None
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _close(b, factor):
        return a
    if isinstance(b, fx.Node) and _close(a, factor):
        return b
    return None


def _plus_one(node: Any) -> Optional[fx.Node]:
    """``t`` when ``node`` is ``t + 1`` (either order)."""
    if not is_op(node, aten.add.Tensor, aten.add.Scalar) or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if isinstance(a, fx.Node) and _close(b, 1.0):
        return a
    if isinstance(b, fx.Node) and _close(a, 1.0):
        return b
    return None


def _product(node: Any) -> Optional[tuple[fx.Node, fx.Node]]:
    if is_op(node, aten.mul.Tensor) and all(isinstance(a, fx.Node) for a in node.args[:2]):
        return node.args[0], node.args[1]
    return None


def _aten(node: fx.Node) -> Optional[ActivationMatch]:
    if is_op(node, aten.relu):
        return ActivationMatch("relu", node.args[0], node, (node,))
    if is_op(node, aten.silu):
        return ActivationMatch("silu", node.args[0], node, (node,))
    if is_op(node, aten.gelu):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ActivationMatch("gelu_tanh" if approximate == "tanh" else "gelu_erf", node.args[0], node, (node,))
    return None


def _sigmoid_of(node: Any) -> Optional[tuple[fx.Node, tuple[fx.Node, ...]]]:
    """``(z, nodes)`` when ``node`` computes ``sigmoid(z)``."""
    if is_op(node, aten.sigmoid):
        return node.args[0], (node,)
    return None


def _x_times_sigmoid(node: fx.Node) -> Optional[ActivationMatch]:
    """``x * sigmoid(x)`` (silu) and ``x * sigmoid(1.702 x)`` (fastgelu)."""
    pair = _product(node)
    if pair is None:
        return None
    for x, other in (pair, pair[::-1]):
        sig = _sigmoid_of(other)
        if sig is None:
            continue
        z, sig_nodes = sig
        if z is x:
            return ActivationMatch("silu", x, node, (node,) + sig_nodes)
        if _scalar_mul(z, 1.702) is x:
            return ActivationMatch("fastgelu", x, node, (node, z) + sig_nodes)
    return None


def _x_over_one_plus_exp(node: fx.Node) -> Optional[ActivationMatch]:
    """``x / (1 + exp(-x))`` (inductor's silu) and ``x / (1 + exp(-1.702 x))`` (fastgelu)."""
    if not is_op(node, aten.div.Tensor):
        return None
    x, denominator = node.args[:2]
    exp = _plus_one(denominator)
    if not is_op(exp, aten.exp) or not is_op(exp.args[0], aten.neg):
        return None
    neg = exp.args[0]
    if neg.args[0] is x:
        return ActivationMatch("silu", x, node, (node, denominator, exp, neg))
    scaled = neg.args[0]
    if _scalar_mul(scaled, 1.702) is x:
        return ActivationMatch("fastgelu", x, node, (node, denominator, exp, neg, scaled))
    return None


def _gelu_decomposed(node: fx.Node) -> Optional[ActivationMatch]:
    """``(x * 0.5) * (1 + erf(x * 1/sqrt(2)))`` and ``(x * 0.5) * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    pair = _product(node)
    if pair is None:
        return None
    for half, one_plus in (pair, pair[::-1]):
        x = _scalar_mul(half, 0.5)
        inner = _plus_one(one_plus)
        if x is None or inner is None:
            continue
        if is_op(inner, aten.erf) and _scalar_mul(inner.args[0], 1 / math.sqrt(2)) is x:
            return ActivationMatch("gelu_erf", x, node, (node, half, one_plus, inner, inner.args[0]))
        if is_op(inner, aten.tanh):
            nodes = _tanh_gelu_inner(inner.args[0], x)
            if nodes is not None:
                return ActivationMatch("gelu_tanh", x, node, (node, half, one_plus, inner) + nodes)
    return None


def _tanh_gelu_inner(node: Any, x: fx.Node) -> Optional[tuple[fx.Node, ...]]:
    """Nodes of ``sqrt(2/pi) * (x + 0.044715 * x * x * x)`` when ``node`` computes it from ``x``."""
    total = _scalar_mul(node, math.sqrt(2 / math.pi))
    if not is_op(total, aten.add.Tensor):
        return None
    a, b = total.args[:2]
    cubic = b if a is x else a if b is x else None
    x_cubed = _scalar_mul(cubic, 0.044715)
    outer = _product(x_cubed)
    if outer is None or x not in outer:
        return None
    square = outer[0] if outer[1] is x else outer[1]
    if _product(square) != (x, x):
        return None
    return (node, total, cubic, x_cubed, square)


_MATCHERS: tuple[Callable[[fx.Node], Optional[ActivationMatch]], ...] = (
    _aten, _x_times_sigmoid, _x_over_one_plus_exp, _gelu_decomposed)


def match_activation(node: fx.Node) -> Optional[ActivationMatch]:
    """The activation whose output is ``node``, if ``node`` ends one."""
    for matcher in _MATCHERS:
        found = matcher(node)
        if found is not None:
            return found
    return None


def activation_from_input(x: fx.Node) -> Optional[ActivationMatch]:
    """The activation applied to ``x`` whose nodes are all fed (only) from ``x``: tries every
    user chain end below ``x``. Returns None if ``x`` feeds none or more than one use."""
    candidates = {node for user in x.users for node in _descendants(user, depth=7)}
    found = [m for m in map(match_activation, candidates) if m is not None and m.input is x]
    # The largest match is the whole activation (a sub-expression may match a smaller form).
    found.sort(key=lambda m: len(m.nodes), reverse=True)
    return found[0] if found else None


def _descendants(node: fx.Node, depth: int) -> list[fx.Node]:
    out, frontier = [node], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        out.extend(frontier)
    return out
