"""Which attention kernel a pass runs: fused SDPA or the explicit softmax (the same function).

Every attention module of the model (timm's encoder ``Attention``, our decoders'
``CrossAttention``) has a ``fused_attn`` flag. The choice is made per call, from the device,
the compute dtype (autocast's, else the tensors') and whether the pass builds a graph, so that a
training step and its no-grad scoring pass can use different kernels. ``train.attention``
(``auto | fused | explicit``) forces one path everywhere.

``auto``, measured on a 2-vCPU Intel Xeon with AMX-BF16 (one encoder block of the ``small``
bench preset, batch 8, 1 thread, CPU time, explicit / fused): bf16 training at 99 tokens 0.58,
bf16 no-grad at 589 tokens 1.20, fp32 training at 99 tokens 0.99 and at 589 tokens 1.23, fp32
no-grad 1.32; the decoders' attention cores (196 queries, 32-dim heads) 0.56-0.84 in bf16 and
~2.0 in fp32 training. The CPU flash-attention kernels in bf16 are what is slow (slower than the
same kernels in fp32). So:

* CPU, with grad, bf16/fp16: explicit;
* everything else (CPU fp32, every no-grad pass, CUDA): fused. On CUDA fused SDPA picks the
  flash / memory-efficient kernels; no measurement says otherwise yet (``scripts/gpu_check.sh``
  records one).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ATTENTION_MODES", "check_attention_mode", "compute_dtype", "auto_fused", "use_fused",
           "attention_modules", "set_fused"]

ATTENTION_MODES = ("auto", "fused", "explicit")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_attention_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on ``x``'s device run in: autocast's when it is on, else ``x``'s."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def auto_fused(device_type: str, dtype: torch.dtype, grad: bool) -> bool:
    """The measured choice of ``auto`` (module docstring): False only for low-precision
    training on a CPU."""
    return not (device_type == "cpu" and grad and dtype in _LOW_PRECISION)


def use_fused(mode: str, x: torch.Tensor, grad: bool | None = None) -> bool:
    """Fused SDPA for a pass over ``x``? ``grad`` defaults to ``torch.is_grad_enabled()``."""
    if mode == "fused":
        return True
    if mode == "explicit":
        return False
    check_attention_mode(mode)
    grad = torch.is_grad_enabled() if grad is None else grad
    return auto_fused(x.device.type, compute_dtype(x), grad)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Every submodule with a boolean ``fused_attn`` flag (timm ``Attention``, ``CrossAttention``)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def set_fused(modules: list[nn.Module] | nn.Module, enabled: bool) -> None:
    """Set ``fused_attn`` on ``modules`` (or on every attention module inside one module)."""
    for m in attention_modules(modules) if isinstance(modules, nn.Module) else modules:
        m.fused_attn = enabled
