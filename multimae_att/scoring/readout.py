"""Cheap attention readout of one encoder layer (the scoring pass of attention-guided masking).

Based on AttMask's idea of reading the [CLS] row of the last self-attention layer; here the
global token(s) play the role of [CLS].

Cost model: every block before the readout layer runs normally (fused SDPA, nothing
materialised); the readout block only runs ``norm1`` and the q/k slices of its ``qkv``
projection for the query rows needed, and materialises the softmax of those rows only. Its
value/output projections and MLP are skipped, so the pass is cheaper than a plain forward.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

QUERIES = ("global", "mean")
MAX_LOGITS = 1 << 26  # elements of the largest attention block materialised at once (256 MiB fp32)


def readout_layer_index(layer: int, depth: int) -> int:
    """Normalise a Python-style (negative allowed) layer index; raise naming the valid range."""
    if not -depth <= layer < depth:
        raise ValueError(f"readout layer {layer} is out of range for an encoder of depth {depth} "
                         f"(valid: {-depth} .. {depth - 1})")
    return layer % depth


def readout_attention(blocks: Sequence[nn.Module], z: torch.Tensor, layer: int, num_global: int,
                      query: str = "global") -> torch.Tensor:
    """Attention of the ``layer``-th block over ``z [B, N + G, D]`` (global tokens LAST).

    Returns ``[B, H, N]``: for ``query='global'`` the softmax attention row of the global
    token(s) (averaged over the G global tokens) restricted to the N patch-token columns; for
    ``'mean'`` the attention each patch token receives, averaged over all N + G query rows.
    Rows are the full softmax over all N + G keys (not renormalised over patches).
    Blocks are timm ``Block``s (``norm1``, ``attn.qkv``, ``attn.num_heads``, no q/k norm).
    Call under ``torch.no_grad()``.
    """
    if query not in QUERIES:
        raise ValueError(f"unknown attention query {query!r}; expected one of {QUERIES}")
    if query == "global" and num_global < 1:
        raise ValueError("query='global' needs at least one global token (num_global_tokens >= 1)")
    layer = readout_layer_index(layer, len(blocks))
    for block in blocks[:layer]:
        z = block(z)
    block = blocks[layer]
    attn = block.attn
    if not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity):
        raise NotImplementedError("attention readout does not support q/k normalisation")
    B, T, D = z.shape
    h = attn.num_heads
    hd = D // h
    x = block.norm1(z)
    w, b = attn.qkv.weight, attn.qkv.bias
    w_q, w_k = w[:D], w[D:2 * D]
    b_q = None if b is None else b[:D]
    b_k = None if b is None else b[D:2 * D]
    rows = x[:, T - num_global:] if query == "global" else x
    k = F.linear(x, w_k, b_k).reshape(B, T, h, hd).transpose(1, 2).float()  # [B, h, T, hd]
    R = rows.shape[1]
    # 'mean' needs every row: bound the materialised [B, h, rows, T] block (a large GPU batch
    # would otherwise hold B*h*T*T floats at once); 'global' is a single chunk.
    step = max(1, MAX_LOGITS // (B * h * T))
    received = torch.zeros(B, h, T, device=z.device, dtype=torch.float32)
    for start in range(0, R, step):
        q = F.linear(rows[:, start:start + step], w_q, b_q)
        q = q.reshape(B, -1, h, hd).transpose(1, 2).float()  # [B, h, r, hd]
        # Logits and softmax in float32 (autocast off): under bf16 small attention weights would
        # lose most of their precision, and the masking ranks tokens by them.
        with torch.autocast(device_type=z.device.type, enabled=False):
            received += ((q * hd ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1).sum(dim=2)
    return received[:, :, :T - num_global] / R
