"""Named model sizes and the standard pretraining set-up.

``ENCODER_SIZES`` holds the encoder widths; ``DECODER_SIZES`` the default decoders that go with
them (MultiMAE's: 256-d, depth 2, 8 heads; a 64-d one for ``tiny``). ``tiny`` is a CPU size for
demos and tests, not a published model.

Standard pretraining set-up (MultiMAE's): rgb + depth + semseg in (semseg: 133 COCO classes at
stride 4, 64-d class embedding); rgb, depth, semseg and ``norm_rgb`` (normalised-pixel RGB
target, same decoder as rgb) out; every decoder uses task queries and embeddings of all inputs.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from multimae_att.modalities import MODALITIES, MODEL_MODALITIES, SEMSEG_NUM_CLASSES, get_output
from multimae_att.model.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from multimae_att.model.multimae import MultiMAE, MultiViT
from multimae_att.model.output_adapters import SpatialOutputAdapter

ENCODER_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(dim_tokens=96, depth=3, num_heads=3, mlp_ratio=4.0),
    "small": dict(dim_tokens=384, depth=12, num_heads=6, mlp_ratio=4.0),   # ViT-S (DINO's, TokenCut's)
    "base": dict(dim_tokens=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "large": dict(dim_tokens=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}
DECODER_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(decoder_dim=64, decoder_depth=2, decoder_heads=2),
    "small": dict(decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "base": dict(decoder_dim=256, decoder_depth=2, decoder_heads=8),
    "large": dict(decoder_dim=256, decoder_depth=2, decoder_heads=8),
}
Adapters = dict[str, nn.Module]
STRIDE = {m: MODALITIES[m].stride for m in MODEL_MODALITIES}   # stride levels, from the modality table


def make_adapters(in_domains: Sequence[str] = ("rgb", "depth", "semseg"),
                  out_domains: Sequence[str] = ("rgb", "depth", "semseg"), extra_norm_rgb: bool = True,
                  patch_size: int = 16, image_size: int = 224, decoder_dim: int = 256,
                  decoder_depth: int = 2, decoder_heads: int = 8,
                  semseg_num_classes: int = SEMSEG_NUM_CLASSES,
                  dim_class_emb: int = MODALITIES["semseg"].class_dim,
                  use_task_queries: bool = True, use_xattn: bool = True
                  ) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Input and output adapters of MultiMAE's pretraining script for the given modalities.

    Channels, stride levels and the class embedding come from the modality table
    (:mod:`multimae_att.modalities`); ``semseg_num_classes`` and ``dim_class_emb`` override the
    table's class count and embedding width of the label modality.
    """
    unknown = [d for d in (*in_domains, *out_domains) if d not in STRIDE]
    if unknown:
        raise ValueError(f"unknown modalities {unknown}; supported: {sorted(STRIDE)}")

    def channels(modality: str) -> int:
        m = MODALITIES[modality]
        return semseg_num_classes if m.labels else m.channels

    inputs: dict[str, nn.Module] = {}
    for d in in_domains:
        if MODALITIES[d].labels:
            inputs[d] = SemSegInputAdapter(semseg_num_classes, STRIDE[d], patch_size, image_size=image_size,
                                           dim_class_emb=dim_class_emb)
        else:
            inputs[d] = PatchedInputAdapter(channels(d), STRIDE[d], patch_size, image_size=image_size)
    outputs: dict[str, nn.Module] = {}
    names = list(out_domains) + (["norm_rgb"] if extra_norm_rgb else [])
    for name in names:
        task = get_output(name).target
        outputs[name] = SpatialOutputAdapter(
            channels(task), STRIDE[task], patch_size,
            dim_tokens=decoder_dim, depth=decoder_depth, num_heads=decoder_heads, image_size=image_size,
            use_task_queries=use_task_queries, task=task, context_tasks=list(in_domains), use_xattn=use_xattn)
    return inputs, outputs


def _build(cls: type, size: str, input_adapters: dict[str, nn.Module],
           output_adapters: dict[str, nn.Module] | None, **kwargs: Any) -> MultiMAE:
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(ENCODER_SIZES)}")
    return cls(input_adapters=input_adapters, output_adapters=output_adapters,
               **{**ENCODER_SIZES[size], **kwargs})


# MultiMAE's factory names (same signature): the encoder size is fixed, adapters come from the caller.
def pretrain_multimae_tiny(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiMAE:
    return _build(MultiMAE, "tiny", input_adapters, output_adapters, **kwargs)


def pretrain_multimae_base(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiMAE:
    return _build(MultiMAE, "base", input_adapters, output_adapters, **kwargs)


def pretrain_multimae_large(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiMAE:
    return _build(MultiMAE, "large", input_adapters, output_adapters, **kwargs)


def multivit_tiny(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiViT:
    return _build(MultiViT, "tiny", input_adapters, output_adapters, **kwargs)


def multivit_base(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiViT:
    return _build(MultiViT, "base", input_adapters, output_adapters, **kwargs)


def multivit_large(input_adapters: Adapters, output_adapters: Adapters | None, **kwargs: Any) -> MultiViT:
    return _build(MultiViT, "large", input_adapters, output_adapters, **kwargs)


def create_pretrain_model(size: str = "base", in_domains: Sequence[str] = ("rgb", "depth", "semseg"),
                          out_domains: Sequence[str] = ("rgb", "depth", "semseg"), extra_norm_rgb: bool = True,
                          patch_size: int = 16, image_size: int = 224, num_global_tokens: int = 1,
                          drop_path_rate: float = 0.0, **adapter_kwargs: Any) -> MultiMAE:
    """The standard pretraining MultiMAE of a named size (decoder defaults from ``DECODER_SIZES``,
    overridable through ``adapter_kwargs``, see :func:`make_adapters`)."""
    if size not in ENCODER_SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(ENCODER_SIZES)}")
    kw = {**DECODER_SIZES[size], **adapter_kwargs}
    inputs, outputs = make_adapters(in_domains, out_domains, extra_norm_rgb, patch_size, image_size, **kw)
    return _build(MultiMAE, size, inputs, outputs, num_global_tokens=num_global_tokens,
                  drop_path_rate=drop_path_rate)
