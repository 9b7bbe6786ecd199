"""Input adapters: one per modality, turning an image-like input into tokens ``[B, N_m, D]``.

Constructor keywords, parameter names and shapes are MultiMAE's, so its checkpoints load
strictly. Token order inside a modality is row-major over the patch grid.
"""
from __future__ import annotations

import torch
from torch import nn

from multimae_att.model.pos_emb import Size2, build_2d_sincos_posemb, flatten_grid, pair, resize_pos_emb


def _make_pos_emb(dim: int, grid: tuple[int, int], sincos: bool, learnable: bool) -> nn.Parameter:
    """``[1, D, h, w]`` table: fixed sin-cos (trainable only if ``learnable``) or learned from N(0, 0.02)."""
    if sincos:
        return nn.Parameter(build_2d_sincos_posemb(grid[0], grid[1], embed_dim=dim), requires_grad=learnable)
    table = nn.Parameter(torch.zeros(1, dim, grid[0], grid[1]))
    nn.init.trunc_normal_(table, std=0.02)
    return table


class _SpatialInputAdapter(nn.Module):
    """Shared geometry of the patch-based adapters (see subclasses)."""

    pos_emb_mode = "bicubic"

    def __init__(self, stride_level: int, patch_size_full: Size2, dim_tokens: int | None,
                 sincos_pos_emb: bool, learnable_pos_emb: bool, image_size: Size2) -> None:
        super().__init__()
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens = dim_tokens
        self.sincos_pos_emb = sincos_pos_emb
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        # Patch size in this input's own pixels (an input at stride 4 has 4x smaller patches).
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)
        self.grid_size = (self.image_size[0] // (stride_level * self.P_H),
                          self.image_size[1] // (stride_level * self.P_W))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def _check_size(self, h: int, w: int) -> tuple[int, int]:
        if h % self.P_H or w % self.P_W:
            raise ValueError(f"{type(self).__name__}: input size {h}x{w} is not divisible by the "
                             f"patch size {self.P_H}x{self.P_W}")
        return h // self.P_H, w // self.P_W

    def full_image_size(self, x: torch.Tensor) -> tuple[int, int]:
        """(H, W) of the full-resolution image this input belongs to (its own size times stride)."""
        return x.shape[-2] * self.stride_level, x.shape[-1] * self.stride_level

    def _add_pos_emb(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        pos = flatten_grid(resize_pos_emb(self.pos_emb, grid, self.pos_emb_mode))
        # No cast of pos to the patches' dtype: under bf16 autocast the sum (the encoder's
        # residual stream) stays float32, as in MultiMAE.
        return tokens + pos

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_emb"}


class PatchedInputAdapter(_SpatialInputAdapter):
    """Image-like input ``[B, C, H, W]`` -> tokens ``[B, (H/P_H)*(W/P_W), D]`` (patchify + pos-emb).

    Args (MultiMAE's): ``num_channels``; ``stride_level`` (input resolution is 1/stride of the
    image); ``patch_size_full`` (patch size at full resolution); ``dim_tokens`` (set later by
    :meth:`init` when ``None``); ``sincos_pos_emb`` / ``learnable_pos_emb``; ``image_size`` (size
    of the stored pos-emb grid; other sizes are resized bicubically on the fly).
    """

    def __init__(self, num_channels: int, stride_level: int, patch_size_full: Size2,
                 dim_tokens: int | None = None, sincos_pos_emb: bool = True,
                 learnable_pos_emb: bool = False, image_size: Size2 = 224) -> None:
        super().__init__(stride_level, patch_size_full, dim_tokens, sincos_pos_emb, learnable_pos_emb, image_size)
        self.num_channels = num_channels
        if dim_tokens is not None:
            self.init(dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create the token-width-dependent parts (called by :class:`MultiMAE`)."""
        self.dim_tokens = dim_tokens
        self.pos_emb = _make_pos_emb(dim_tokens, self.grid_size, self.sincos_pos_emb, self.learnable_pos_emb)
        self.proj = nn.Conv2d(self.num_channels, dim_tokens, kernel_size=(self.P_H, self.P_W),
                              stride=(self.P_H, self.P_W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, N, D]`` with the positional embedding added."""
        if self.dim_tokens is None:
            raise RuntimeError("PatchedInputAdapter: call init(dim_tokens) first")
        grid = self._check_size(x.shape[-2], x.shape[-1])
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return self._add_pos_emb(tokens, grid)


class SemSegInputAdapter(_SpatialInputAdapter):
    """Label map ``[B, H, W]`` (int64 class ids) -> tokens ``[B, N, D]``.

    Each pixel's class is embedded (``class_emb``, ``dim_class_emb`` wide), then patchified by a
    strided convolution (or bilinearly pooled + 1x1 convolution with ``interpolate_class_emb``).
    ``emb_padding_idx`` adds one extra class whose embedding stays zero (MultiMAE's convention).
    Positional embeddings are resized bilinearly, as in MultiMAE.
    """

    pos_emb_mode = "bilinear"

    def __init__(self, num_classes: int, stride_level: int, patch_size_full: Size2,
                 dim_tokens: int | None = None, sincos_pos_emb: bool = True,
                 learnable_pos_emb: bool = False, image_size: Size2 = 224, dim_class_emb: int = 64,
                 interpolate_class_emb: bool = False, emb_padding_idx: int | None = None) -> None:
        super().__init__(stride_level, patch_size_full, dim_tokens, sincos_pos_emb, learnable_pos_emb, image_size)
        self.num_classes = num_classes + (1 if emb_padding_idx is not None else 0)
        self.dim_class_emb = dim_class_emb
        self.interpolate_class_emb = interpolate_class_emb
        self.emb_padding_idx = emb_padding_idx
        if dim_tokens is not None:
            self.init(dim_tokens)

    def init(self, dim_tokens: int = 768) -> None:
        """Create the token-width-dependent parts (called by :class:`MultiMAE`)."""
        self.dim_tokens = dim_tokens
        self.pos_emb = _make_pos_emb(dim_tokens, self.grid_size, self.sincos_pos_emb, self.learnable_pos_emb)
        self.class_emb = nn.Embedding(self.num_classes, self.dim_class_emb, padding_idx=self.emb_padding_idx)
        nn.init.trunc_normal_(self.class_emb.weight, std=0.02)
        if self.emb_padding_idx is not None:
            with torch.no_grad():
                self.class_emb.weight[self.emb_padding_idx].zero_()
        if self.interpolate_class_emb:
            # Names proj.1.* as in MultiMAE (index 0 is the parameter-free pooling).
            self.proj = nn.Sequential(
                nn.Upsample(scale_factor=(1 / self.P_H, 1 / self.P_W), mode="bilinear"),
                nn.Conv2d(self.dim_class_emb, dim_tokens, kernel_size=1),
            )
        else:
            self.proj = nn.Conv2d(self.dim_class_emb, dim_tokens, kernel_size=(self.P_H, self.P_W),
                                  stride=(self.P_H, self.P_W))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, W]`` int64 labels -> ``[B, N, D]`` with the positional embedding added."""
        if self.dim_tokens is None:
            raise RuntimeError("SemSegInputAdapter: call init(dim_tokens) first")
        if x.ndim != 3 or x.is_floating_point():
            raise ValueError(f"SemSegInputAdapter expects int64 labels [B, H, W], got {x.dtype} {list(x.shape)}")
        grid = self._check_size(x.shape[-2], x.shape[-1])
        emb = self.class_emb(x).permute(0, 3, 1, 2)  # [B, C_emb, H, W]
        tokens = self.proj(emb).flatten(2).transpose(1, 2)
        return self._add_pos_emb(tokens, grid)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "class_emb"}
