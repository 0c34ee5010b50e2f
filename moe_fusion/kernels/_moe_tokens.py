"""Which tokens and top-k slots take part in a MoE dispatch/combine (SPEC §3.4 step 0, §4.3)."""
from __future__ import annotations

from typing import Optional

import torch


def active_slots(x_active_mask: Optional[torch.Tensor], bs: int, k: int, device: torch.device) -> torch.Tensor:
    """``(BS, K)`` bool: slot ``(i, j)`` takes part (no mask: all; 1-D: the token's row; 2-D: as given)."""
    if x_active_mask is None:
        return torch.ones((bs, k), dtype=torch.bool, device=device)
    if x_active_mask.dim() == 1:
        return x_active_mask.unsqueeze(1).expand(bs, k)
    return x_active_mask


def valid_tokens(x_active_mask: Optional[torch.Tensor], bs: int, device: torch.device) -> torch.Tensor:
    """``(BS,)`` bool: the token is processed (sent to shared experts, combined)."""
    if x_active_mask is None:
        return torch.ones((bs,), dtype=torch.bool, device=device)
    return x_active_mask if x_active_mask.dim() == 1 else x_active_mask.any(dim=1)
