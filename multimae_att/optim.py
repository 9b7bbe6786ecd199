"""AdamW on the fastest kernel the device has, for both runners.

torch's default AdamW on a CPU is the per-parameter Python loop: ~10 small ops per parameter and
one ``.item()`` of the step count each (344 reads per step for ViT-S MultiMAE), 73 ms of a ViT-S
step here. The fused kernel (CUDA, and CPU since torch 2.4) does one pass per parameter with no
host read: 24 ms. Where no fused kernel exists, ``foreach`` batches the ops over parameters.
All three compute the same update (tested against each other).
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["ADAMW_IMPLEMENTATIONS", "adamw_implementation", "build_adamw", "load_optimizer_state"]

ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for-loop")
_FLAGS = ("fused", "foreach")


def adamw_implementation(device: torch.device | str) -> str:
    """``'fused'`` where torch has a fused AdamW kernel for the device type, else ``'foreach'``
    where it has foreach kernels, else ``'for-loop'``."""
    from torch.utils._foreach_utils import _get_foreach_kernels_supported_devices, _get_fused_kernels_supported_devices

    kind = torch.device(device).type
    if kind in _get_fused_kernels_supported_devices():
        return "fused"
    if kind in _get_foreach_kernels_supported_devices():
        return "foreach"
    return "for-loop"


def build_adamw(params: Iterable[Any], device: torch.device | str, *, lr: float = 1e-3,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                implementation: str = "auto") -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, ...)`` on ``implementation`` (``auto``: :func:`adamw_implementation`
    of ``device``, the device the parameters will live on when the optimizer steps)."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"AdamW implementation must be one of {ADAMW_IMPLEMENTATIONS}, got {implementation!r}")
    impl = adamw_implementation(device) if implementation == "auto" else implementation
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}[impl]
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kernel)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping the optimizer's own kernel choice.

    A state dict carries each group's ``fused`` / ``foreach`` flags and loading copies them over
    ours: a state saved by a for-loop optimizer (an older run, or another device) would otherwise
    switch the fused one back to the loop. The fused kernel keeps each step count as a float32
    tensor on the parameter's device; counts saved by the other kernels are moved there.
    """
    flags = [{k: g[k] for k in _FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, saved in zip(optimizer.param_groups, flags):
        group.update(saved)
        if not group.get("fused"):
            continue
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
