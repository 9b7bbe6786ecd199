"""``train.compile``: ``torch.compile`` the model's heavy parts in place.

Each encoder block and each output adapter is compiled on its own (``nn.Module.compile``, which
keeps parameter names and the state dict unchanged, so checkpoints and DDP see the same model).
Per block rather than the whole model: the scoring pass runs the blocks one by one up to its
readout layer, and the step's Python (masking, token gathering, cache look-ups) stays eager.
The attention kernel flag (``fused_attn``) differs between the training pass and the scoring
pass; each value gets its own compiled graph.

Measured on a CPU (docs/BENCHMARKS.md): no gain for the blocks, so it is off by default; on a
GPU it is expected to fuse the elementwise work around the matrix products.
"""
from __future__ import annotations

from torch import nn

__all__ = ["compile_model", "apply_speed_options"]


def compile_model(model: nn.Module, **options) -> nn.Module:
    """Compile ``model.encoder``'s blocks and ``model.output_adapters`` in place; returns ``model``.

    ``options`` go to ``torch.compile`` (e.g. ``mode='max-autotune'``).
    """
    for block in getattr(model, "encoder", ()):
        block.compile(**options)
    for adapter in (getattr(model, "output_adapters", None) or {}).values():
        adapter.compile(**options)
    return model


def apply_speed_options(model: nn.Module, attention: str = "auto", compile: bool = False) -> nn.Module:
    """``train.attention`` and ``train.compile`` on a freshly built model (both runners call it)."""
    model.set_attention(attention)
    if compile:
        compile_model(model)
    return model
