"""A decoder's predictions at its kept query positions only (AMT: the thrown ones are dropped).

A decoder that drops query rows computes them packed, ``[B, W, C * ph * pw]`` (W = the most rows
a sample keeps). Zero-filling the dropped positions and unpatchifying to an image, only for the
losses to cut the counted patches out of that image again, is a scatter, a full-image copy and a
gather in the forward pass and as many in the backward; for a 133-class semseg output that is as
much memory traffic as a decoder block. The pretraining step therefore asks for the packed rows
(``forward_masked(..., packed=True)``) and the losses read them directly
(:func:`multimae_att.pretrain.losses.masked_loss`); :meth:`PackedPrediction.image` gives the
zero-filled image of the plain call when one is needed (pictures).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["PackedPrediction", "as_images", "unpatchify"]


@dataclass
class PackedPrediction:
    """``rows [B, W, C * ph * pw]``: the prediction of each decoded patch (channel-major, then
    the patch's pixels row-major: the layout of MultiMAE's ``out_proj``); ``index [B, W]`` int64:
    the token position (row-major over ``grid``) of each row, kept rows first in token order;
    ``valid [B, W]`` bool: the row is a real kept position (None: all are; padding rows, present
    when samples keep different numbers, point at dropped positions and hold no prediction);
    ``grid`` (h, w) tokens; ``channels`` C; ``patch`` (ph, pw) pixels per token."""

    rows: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor | None
    grid: tuple[int, int]
    channels: int
    patch: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]

    def image(self) -> torch.Tensor:
        """The zero-filled prediction ``[B, C, h * ph, w * pw]`` (dropped positions are 0), as
        the decoder returns it without ``packed``."""
        rows = self.rows if self.valid is None else self.rows * self.valid.unsqueeze(-1).to(self.rows.dtype)
        B, _, P = rows.shape
        full = rows.new_zeros(B, self.num_tokens, P).scatter(1, self.index.unsqueeze(-1).expand(-1, -1, P), rows)
        return unpatchify(full, self.grid, self.channels, self.patch)


def unpatchify(rows: torch.Tensor, grid: tuple[int, int], channels: int, patch: tuple[int, int]) -> torch.Tensor:
    """``[B, h * w, C * ph * pw]`` (one row per token, row-major over ``grid``; each row
    channel-major, then the patch's pixels row-major: ``out_proj``'s layout) -> the image
    ``[B, C, h * ph, w * pw]``."""
    (h, w), (ph, pw), B = grid, patch, rows.shape[0]
    out = rows.reshape(B, h, w, channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(B, channels, h * ph, w * pw)


def as_images(preds: Mapping[str, torch.Tensor | PackedPrediction]) -> dict[str, torch.Tensor]:
    """``preds`` with every :class:`PackedPrediction` replaced by its zero-filled image."""
    return {k: v.image() if isinstance(v, PackedPrediction) else v for k, v in preds.items()}
