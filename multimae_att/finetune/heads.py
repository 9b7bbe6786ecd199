"""Task heads ("output adapters") with MultiMAE's state-dict names.

Each head follows MultiMAE's output-adapter protocol so that it plugs into ``MultiViT`` and so
that weights finetuned with MultiMAE load strictly (and ours load into MultiMAE):

* ``head.init(dim_tokens_enc)`` builds the parts that depend on the encoder width;
* ``head(encoder_tokens, input_info)`` where ``encoder_tokens`` is ``[B, N, D]`` (patch tokens
  of every input modality in ``input_info['tasks']`` order, global tokens LAST), or a list of
  such tensors, one per encoder block, for :class:`DPTOutputAdapter`; ``input_info`` holds
  ``image_size`` (H, W) and ``tasks[m]['start_idx'/'end_idx']`` token ranges.

Architectures (ideas, not code, from MultiMAE / ConvNeXt / DPT, all public papers):
:class:`ConvNeXtAdapter` (linear projection of each patch token to ``preds_per_patch`` sub-patch
features, ConvNeXt blocks, 1x1 classifier, bilinear upsampling), :class:`DPTOutputAdapter`
(four encoder layers reassembled at 1/4..1/32 resolution, RefineNet-style fusion, regression
or segmentation head) and :class:`LinearOutputAdapter` (norm + linear on mean-pooled tokens).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, trunc_normal_

from multimae_att.model.pos_emb import pair

__all__ = ["ConvNeXtBlock", "ConvNeXtAdapter", "DPTOutputAdapter", "LinearOutputAdapter",
           "select_task_tokens", "fill_dpt_aliases"]


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def select_task_tokens(encoder_tokens: torch.Tensor, input_info: dict,
                       main_tasks: Iterable[str]) -> torch.Tensor:
    """Patch tokens of ``main_tasks`` concatenated along channels: ``[B, N_m, D * len(tasks)]``.

    Every selected modality must have the same token grid (same N_m); global tokens are dropped.
    """
    parts = []
    for task in main_tasks:
        if task not in input_info["tasks"]:
            raise KeyError(f"head expects input modality '{task}', the encoder saw "
                           f"{list(input_info['tasks'])}")
        info = input_info["tasks"][task]
        parts.append(encoder_tokens[:, info["start_idx"]:info["end_idx"]])
    return torch.cat(parts, dim=-1)


class ConvNeXtBlock(nn.Module):
    """Isotropic ConvNeXt block on ``[B, C, H, W]``: 7x7 depthwise conv, LayerNorm over channels,
    4x MLP with GELU, optional layer scale ``gamma``, residual (+ drop path)."""

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)                   # channels last for LN + Linear
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        if self.gamma is not None:
            y = self.gamma * y
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class ConvNeXtAdapter(nn.Module):
    """Semantic-segmentation head: logits ``[B, num_classes, H, W]`` at input resolution.

    Each patch token is projected to ``embed_dim`` = ``preds_per_patch`` x ``class_dim`` and
    unfolded into a sqrt(p) x sqrt(p) block of ``class_dim``-d features (so the feature map is at
    1/(patch/sqrt(p)) resolution, 1/4 for the ADE20K recipe: 6144-d, 16 per patch, 4 blocks).
    """

    def __init__(self, num_classes: int, embed_dim: int = 6144, preds_per_patch: int = 16,
                 main_tasks: Iterable[str] = ("rgb",), patch_size: int = 16, depth: int = 4,
                 interpolate_mode: str = "bilinear", drop_path_rate: float = 0.0,
                 dim_tokens_enc: int | None = None) -> None:
        super().__init__()
        side = int(round(preds_per_patch ** 0.5))
        if side * side != preds_per_patch or embed_dim % preds_per_patch:
            raise ValueError(f"ConvNeXtAdapter: preds_per_patch={preds_per_patch} must be a square "
                             f"dividing embed_dim={embed_dim}")
        self.main_tasks = tuple(main_tasks)
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.preds_per_patch = preds_per_patch
        self.side = side
        self.class_dim = embed_dim // preds_per_patch
        self.num_classes = num_classes
        self.interpolate_mode = interpolate_mode
        dpr = torch.linspace(0, drop_path_rate, max(depth, 1)).tolist()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(self.class_dim, drop_path=dpr[i])
                                      for i in range(depth)])
        self.final_layer = nn.Conv2d(self.class_dim, num_classes, 1)
        self.apply(_init_linear)
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the token projection (depends on encoder width and number of main tasks)."""
        self.in_channels = dim_tokens_enc * len(self.main_tasks)
        self.proj_dec = nn.Linear(self.in_channels, self.embed_dim)
        _init_linear(self.proj_dec)

    def reset_parameters(self) -> None:
        """Truncated-normal Linear weights, zero biases, unit LayerNorms (ConvNeXt's init)."""
        self.apply(_init_linear)

    def forward(self, encoder_tokens: torch.Tensor, input_info: dict) -> torch.Tensor:
        h, w = input_info["image_size"]
        nh, nw = h // self.patch_size, w // self.patch_size
        x = self.proj_dec(select_task_tokens(encoder_tokens, input_info, self.main_tasks))
        # each token's features unfold into an s x s block of class_dim-d features (MultiMAE's layout)
        x = rearrange(x, "b (nh nw) (ph pw c) -> b c (nh ph) (nw pw)", nh=nh, nw=nw, ph=self.side, pw=self.side)
        x = self.final_layer(self.blocks(x))
        return F.interpolate(x, size=(h, w), mode=self.interpolate_mode)


class _ResidualConvUnit(nn.Module):
    """ReLU-conv3x3-(BN)-ReLU-conv3x3-(BN) + identity."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.bn = use_bn
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=not use_bn)
        if use_bn:
            self.bn1 = nn.BatchNorm2d(features)
            self.bn2 = nn.BatchNorm2d(features)
        self.activation = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(x))
        out = self.bn1(out) if self.bn else out
        out = self.conv2(self.activation(out))
        out = self.bn2(out) if self.bn else out
        return out + x


class _FusionBlock(nn.Module):
    """RefineNet fusion: (previous path + RCU(skip)) -> RCU -> 2x bilinear -> 1x1 conv."""

    def __init__(self, features: int, use_bn: bool) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = _ResidualConvUnit(features, use_bn)
        self.resConfUnit2 = _ResidualConvUnit(features, use_bn)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            if x.shape[-2:] != skip.shape[-2:]:   # token grids not divisible by 2 (DPT assumes they are)
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class _Upsample(nn.Module):
    """Parameter-free 2x bilinear upsampling (a position in ``head`` so indices match DPT's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class DPTOutputAdapter(nn.Module):
    """DPT head: four encoder layers (``hooks``) -> dense output ``[B, num_classes, H, W]``.

    ``head_type='regression'`` (depth) or ``'semseg'``. Like MultiMAE's module, the reassemble
    convolutions are registered twice, as ``act_{1..4}_postprocess`` and as the list
    ``act_postprocess.{0..3}``, and the 3x3 projections as ``scratch.layer{1..4}_rn`` and
    ``scratch.layer_rn.{0..3}``; both names are in the state dict (aliases of one tensor).
    """

    def __init__(self, num_classes: int = 3, stride_level: int = 1,
                 patch_size: int | tuple[int, int] = 16, main_tasks: Iterable[str] = ("rgb",),
                 hooks: Sequence[int] = (2, 5, 8, 11), layer_dims: Sequence[int] = (96, 192, 384, 768),
                 feature_dim: int = 256, use_bn: bool = False, dim_tokens_enc: int | None = None,
                 head_type: str = "regression") -> None:
        super().__init__()
        if len(hooks) != 4 or len(layer_dims) != 4:
            raise ValueError(f"DPTOutputAdapter: need 4 hooks and 4 layer_dims, got {hooks}, {layer_dims}")
        self.num_channels = num_classes
        self.stride_level = stride_level
        self.patch_size = pair(patch_size)
        self.main_tasks = tuple(main_tasks)
        self.hooks = list(hooks)
        self.layer_dims = list(layer_dims)
        self.feature_dim = feature_dim
        self.head_type = head_type
        self.P_H = max(1, self.patch_size[0] // stride_level)
        self.P_W = max(1, self.patch_size[1] // stride_level)

        self.scratch = nn.Module()
        for i, dim in enumerate(self.layer_dims, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(dim, feature_dim, 3, padding=1, bias=False))
        self.scratch.layer_rn = nn.ModuleList([getattr(self.scratch, f"layer{i}_rn") for i in range(1, 5)])
        for i in range(1, 5):
            setattr(self.scratch, f"refinenet{i}", _FusionBlock(feature_dim, use_bn))

        if head_type == "regression":
            self.head = nn.Sequential(
                nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1), _Upsample(),
                nn.Conv2d(feature_dim // 2, 32, 3, padding=1), nn.ReLU(True),
                nn.Conv2d(32, num_classes, 1))
        elif head_type == "semseg":
            self.head = nn.Sequential(
                nn.Conv2d(feature_dim, feature_dim, 3, padding=1, bias=False),
                nn.BatchNorm2d(feature_dim) if use_bn else nn.Identity(), nn.ReLU(True),
                nn.Dropout(0.1, False), nn.Conv2d(feature_dim, num_classes, 1), _Upsample())
        else:
            raise ValueError(f"DPT head_type must be 'regression' or 'semseg', got {head_type!r}")
        self.dim_tokens_enc = None
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the reassemble layers: 1x1 conv to ``layer_dims[i]`` then resample by 4, 2, 1, 1/2."""
        self.dim_tokens_enc = dim_tokens_enc * len(self.main_tasks)
        d, dims = self.dim_tokens_enc, self.layer_dims
        self.act_1_postprocess = nn.Sequential(
            nn.Conv2d(d, dims[0], 1), nn.ConvTranspose2d(dims[0], dims[0], 4, stride=4))
        self.act_2_postprocess = nn.Sequential(
            nn.Conv2d(d, dims[1], 1), nn.ConvTranspose2d(dims[1], dims[1], 2, stride=2))
        self.act_3_postprocess = nn.Sequential(nn.Conv2d(d, dims[2], 1))
        self.act_4_postprocess = nn.Sequential(
            nn.Conv2d(d, dims[3], 1), nn.Conv2d(dims[3], dims[3], 3, stride=2, padding=1))
        self.act_postprocess = nn.ModuleList([self.act_1_postprocess, self.act_2_postprocess,
                                              self.act_3_postprocess, self.act_4_postprocess])

    def forward(self, encoder_tokens: list[torch.Tensor], input_info: dict) -> torch.Tensor:
        if self.dim_tokens_enc is None:
            raise RuntimeError("DPTOutputAdapter: call init(dim_tokens_enc) first")
        if not isinstance(encoder_tokens, (list, tuple)):
            raise TypeError("DPTOutputAdapter needs the tokens of every encoder block "
                            "(run the encoder with return_all_layers=True)")
        h, w = input_info["image_size"]
        nh, nw = h // (self.stride_level * self.P_H), w // (self.stride_level * self.P_W)
        layers = []
        for i, hook in enumerate(self.hooks):
            x = select_task_tokens(encoder_tokens[hook], input_info, self.main_tasks)  # [B, N, D]
            x = rearrange(x, "b (nh nw) d -> b d nh nw", nh=nh, nw=nw)
            layers.append(self.scratch.layer_rn[i](self.act_postprocess[i](x)))
        path = self.scratch.refinenet4(layers[3])
        path = self.scratch.refinenet3(path, layers[2])
        path = self.scratch.refinenet2(path, layers[1])
        path = self.scratch.refinenet1(path, layers[0])
        out = self.head(path)
        if out.shape[-2:] != (h, w):   # patch sizes other than 16 give another output scale
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out


def fill_dpt_aliases(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Return a copy where each DPT alias key missing from ``state_dict`` is filled from its twin.

    Some tools save each tensor once (e.g. only ``act_postprocess.0.0.weight``); MultiMAE's
    checkpoints hold both names. ``prefix`` is the head's key prefix, e.g.
    ``'output_adapters.depth.'``.
    """
    out = dict(state_dict)
    pairs = [(f"act_{i + 1}_postprocess.", f"act_postprocess.{i}.") for i in range(4)]
    pairs += [(f"scratch.layer{i + 1}_rn.", f"scratch.layer_rn.{i}.") for i in range(4)]
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        for a, b in pairs:
            for src, dst in ((a, b), (b, a)):
                if rest.startswith(src):
                    out.setdefault(prefix + dst + rest[len(src):], value)
    return out


class LinearOutputAdapter(nn.Module):
    """Classification head: norm + linear on mean-pooled tokens -> logits ``[B, num_classes]``.

    ``use_mean_pooling=True`` averages *all* encoder tokens, global token included (as MultiMAE);
    otherwise the last token (the global token) is used. ``norm='layer'`` is MultiMAE's
    finetuning head (LayerNorm); ``norm='batch'`` is the linear-probe head (BatchNorm without
    affine, as in MAE's linear probing), state-dict names ``norm.*`` and ``head.*`` either way.
    """

    def __init__(self, num_classes: int, dim_tokens_enc: int | None = None,
                 use_mean_pooling: bool = True, init_scale: float = 1.0, norm: str = "layer") -> None:
        super().__init__()
        if norm not in ("layer", "batch"):
            raise ValueError(f"LinearOutputAdapter: norm must be 'layer' or 'batch', got {norm!r}")
        self.num_classes = num_classes
        self.use_mean_pooling = use_mean_pooling
        self.init_scale = init_scale
        self.norm_kind = norm
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        self.dim_tokens_enc = dim_tokens_enc
        self.norm = (nn.LayerNorm(dim_tokens_enc, eps=1e-6) if self.norm_kind == "layer"
                     else nn.BatchNorm1d(dim_tokens_enc, affine=False, eps=1e-6))
        self.head = nn.Linear(dim_tokens_enc, self.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal head scaled by ``init_scale``, zero bias, unit LayerNorm."""
        self.apply(_init_linear)
        with torch.no_grad():   # small initial logits keep the pretrained features intact early on
            self.head.weight.mul_(self.init_scale)
            self.head.bias.mul_(self.init_scale)

    def pool(self, encoder_tokens: torch.Tensor) -> torch.Tensor:
        """``[B, N, D]`` -> ``[B, D]`` (mean over all tokens, or the last = global token)."""
        return encoder_tokens.mean(1) if self.use_mean_pooling else encoder_tokens[:, -1]

    def forward(self, encoder_tokens: torch.Tensor, input_info: dict | None = None) -> torch.Tensor:
        if isinstance(encoder_tokens, (list, tuple)):
            encoder_tokens = encoder_tokens[-1]
        return self.head(self.norm(self.pool(encoder_tokens)))
