"""How moe_fusion carries int4 weights in torch tensors.

torch has no int4 dtype that supports arithmetic, so an int4 weight of logical shape
``(..., K, N)`` is stored as a ``torch.uint8`` tensor of shape ``(..., K, N // 2)``: element
``n`` of a row lives in byte ``n // 2``, the even element in the low nibble and the odd element
in the high nibble, each a two's-complement 4-bit value in ``[-8, 7]``. ``N`` must be even (the
device rule for int4 weights). ``uint8`` is never a valid plain weight dtype, so the dtype alone
says "packed int4".
"""
from __future__ import annotations

import torch

INT4_CARRIER = torch.uint8


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack an integer tensor ``(..., N)`` with values in ``[-8, 7]`` into ``(..., N // 2)`` uint8."""
    if values.dtype.is_floating_point or values.dtype == torch.bool:
        raise ValueError(f"pack_int4: values must be an integer tensor, got {values.dtype}")
    if values.size(-1) % 2:
        raise ValueError(f"pack_int4: last dim must be even, got shape {tuple(values.shape)}")
    if values.numel() and (int(values.min()) < -8 or int(values.max()) > 7):
        raise ValueError(f"pack_int4: values must be in [-8, 7], got [{int(values.min())}, {int(values.max())}]")
    nibbles = (values.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Unpack ``(..., N // 2)`` uint8 into ``(..., N)`` int8 values in ``[-8, 7]``."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    pairs = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.size(-1) * 2)
    return pairs - ((pairs >= 8).to(torch.int8) << 4)
