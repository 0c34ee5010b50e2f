"""What every formula module shares: registering a formula, the error for a gradient that does not
exist, and the bookkeeping between a schema's inputs and the gradients ``backward`` returns.

The ops keep torch_npu's schemas, whose tensors are mostly keyword-only, which
``torch.library.register_autograd`` does not take; ``register_formula`` registers the same thing by
hand: an ``Autograd`` kernel that runs a ``torch.autograd.Function`` over every input in schema
order, whose forward calls the op below autograd.
"""
from __future__ import annotations

from typing import Any, Callable, NoReturn, Optional, Sequence

import torch

from ..meta import LIBRARY


class NotDifferentiableError(RuntimeError):
    """A backward needs the gradient of an op input that has none. The message names the op, the
    argument and why."""


def not_differentiable(op: str, arg: str, why: str) -> NoReturn:
    raise NotDifferentiableError(f"{op}: {arg} is not differentiable ({why})")


def input_names(op: str) -> tuple[str, ...]:
    """The op's inputs in schema order (positional and keyword-only): the order of the gradients
    its ``backward`` returns."""
    schema = getattr(torch.ops.moe_fusion, op).default._schema
    return tuple(a.name for a in schema.arguments)


def needed(ctx: Any, names: Sequence[str], name: str) -> bool:
    """Whether the backward must produce the gradient of input ``name``."""
    return bool(ctx.needs_input_grad[names.index(name)])


def gradients(names: Sequence[str], **grads: Any) -> tuple:
    """One entry per input in schema order: the given gradients, None for the others."""
    unknown = set(grads) - set(names)
    if unknown:
        raise KeyError(f"gradients for unknown inputs {sorted(unknown)}")
    return tuple(grads.get(n) for n in names)


def refuse_needed(ctx: Any, op: str, names: Sequence[str], arguments: dict[str, str]) -> None:
    """Raise for the first input of ``arguments`` (name -> why) whose gradient is needed."""
    for name, why in arguments.items():
        if needed(ctx, names, name):
            not_differentiable(op, name, why)


def register_formula(op: str, setup_context: Callable[[Any, tuple, Any], None],
                     backward: Callable[..., tuple], *,
                     forward: Optional[Callable[[Callable[..., Any], tuple], tuple]] = None) -> None:
    """Make ``torch.ops.moe_fusion.<op>`` differentiable: ``setup_context(ctx, inputs, output)``
    saves what ``backward(ctx, *output_grads)`` needs; ``inputs`` and the returned gradients are
    in schema order (``input_names``).

    ``forward(run, inputs)``, when given, replaces the plain call of the op: ``run(**changes)``
    calls it with ``inputs`` and some arguments changed (e.g. a flag asking for an output the
    backward needs and the caller did not request). It returns the caller's outputs followed by
    extra tensors, which ``setup_context`` sees at the end of ``output`` and ``backward`` receives
    ``None`` gradients for; the caller never sees them. Extras must not alias each other or an output.
    """
    overload = getattr(torch.ops.moe_fusion, op).default
    arguments = overload._schema.arguments
    names = tuple(a.name for a in arguments)
    positional = sum(1 for a in arguments if not a.kwarg_only)
    returned = len(overload._schema.returns)

    def call(values: tuple, changes: dict[str, Any]) -> Any:
        bound = {**dict(zip(names, values)), **changes}
        with torch._C._AutoDispatchBelowAutograd():
            return overload(*(bound[n] for n in names[:positional]), **{n: bound[n] for n in names[positional:]})

    class Formula(torch.autograd.Function):
        @staticmethod
        def forward(*values: Any) -> Any:
            if forward is None:
                return call(values, {})
            return forward(lambda **changes: call(values, changes), values)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
            if forward is not None:
                ctx.mark_non_differentiable(*output[returned:])
            setup_context(ctx, inputs, output)

        @staticmethod
        def backward(ctx: Any, *grads: Any) -> tuple:
            return backward(ctx, *grads)

    Formula.__name__ = f"{op}_formula"

    def autograd_kernel(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled() or not any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in (*args, *kwargs.values())):
            with torch._C._AutoDispatchBelowAutograd():   # nothing to record: skip the Function's cost
                return overload(*args, **kwargs)
        bound = dict(zip(names, args))
        for argument in arguments[len(args):]:
            bound[argument.name] = kwargs.get(argument.name, argument.default_value)
        output = Formula.apply(*(bound[n] for n in names))
        if forward is None:
            return output
        return output[0] if returned == 1 else output[:returned]   # drop the extras

    LIBRARY.impl(op, autograd_kernel, "Autograd")
