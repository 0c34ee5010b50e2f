"""A model factory for ``python -m moe_fusion explain`` and ``export``:

    PYTHONPATH=examples python -m moe_fusion explain mlp_factory:make_mlp
    PYTHONPATH=examples python -m moe_fusion export mlp_factory:make_mlp mlp.onnx
"""
import torch
import torch.nn.functional as F


class Mlp(torch.nn.Module):
    """Linear -> GELU -> Linear, written as people write it: the ``ffn`` pass fuses it into
    ``npu_ffn`` when the GELU is the tanh form, and says why it refuses the erf form."""

    def __init__(self, hidden: int = 64, ffn_hidden: int = 256, approximate: str = "tanh") -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(hidden, ffn_hidden), torch.nn.Linear(ffn_hidden, hidden)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))


class TwoMlps(torch.nn.Module):
    """One MLP that fuses (tanh GELU) and one that is refused (erf GELU)."""

    def __init__(self) -> None:
        super().__init__()
        self.fusable, self.refused = Mlp(approximate="tanh"), Mlp(approximate="none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refused(self.fusable(x))


def make_mlp():
    """``(model, inputs)``."""
    torch.manual_seed(0)
    return TwoMlps().eval(), (torch.randn(32, 64),)
