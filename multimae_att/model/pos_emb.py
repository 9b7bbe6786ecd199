"""Fixed 2-D sine-cosine positional embeddings and their resizing.

Layout (checkpoints store these tables: a contract): a ``[1, D, h, w]`` grid whose channels are four equal blocks
``sin(row·ω), cos(row·ω), sin(col·ω), cos(col·ω)`` with ``ω_k = 1 / T^(k / (D/4))``,
``k = 0 .. D/4 - 1`` and ``T = 10000``. This equals MultiMAE's (MoCo-v3 style) tables for the
square grids it is used with; for non-square grids MultiMAE's construction scrambles rows and
columns, ours keeps them apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Size2 = int | tuple[int, int]


def pair(value: Size2) -> tuple[int, int]:
    """``7 -> (7, 7)``; a 2-sequence is returned as a tuple."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"expected an int or a pair, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def build_2d_sincos_posemb(h: int, w: int, embed_dim: int = 1024, temperature: float = 10000.0) -> torch.Tensor:
    """Return the fixed sin-cos table ``[1, embed_dim, h, w]`` (float32), layout in the module doc.

    The arithmetic (float32 ``arange``, ``T ** (k / (D/4))``, outer products) follows the same
    order of operations as MultiMAE's so the stored tensors are bit-identical.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"2-D sin-cos positional embedding needs embed_dim divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = torch.arange(quarter, dtype=torch.float32) / quarter
    omega = 1.0 / (temperature ** omega)  # [D/4]
    rows = torch.arange(h, dtype=torch.float32)[:, None] * omega[None, :]  # [h, D/4]
    cols = torch.arange(w, dtype=torch.float32)[:, None] * omega[None, :]  # [w, D/4]
    row_part = torch.cat([rows.sin(), rows.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    col_part = torch.cat([cols.sin(), cols.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    table = torch.cat([row_part, col_part], dim=2)  # [h, w, D]
    return table.permute(2, 0, 1).unsqueeze(0).contiguous()


def resize_pos_emb(pos_emb: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize a ``[1, D, h, w]`` table to ``size = (h', w')`` (``align_corners=False``).

    Returns the input itself when the size already matches: interpolating to the same size is
    an identity, and skipping it saves a kernel launch per adapter per step.
    """
    if tuple(pos_emb.shape[-2:]) == tuple(size):
        return pos_emb
    return F.interpolate(pos_emb, size=size, mode=mode, align_corners=False)


def flatten_grid(pos_emb: torch.Tensor) -> torch.Tensor:
    """``[1, D, h, w] -> [1, h*w, D]`` in row-major token order (the adapters' token order)."""
    return pos_emb.flatten(2).transpose(1, 2)
