"""Benchmark presets: model size, input size, batch, repeats; synthetic batches.

``micro`` exists for the smoke test only; ``tiny`` is the CPU check (< 1 min on 2 cores);
``small`` is a ViT-S-width MultiMAE for CPU ratios; ``base`` is ViT-B/16 at 224 px (the real
recipe: rgb + depth + semseg in, 98 of 588 tokens visible) for a GPU.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from multimae_att.modalities import get_modality
from multimae_att.model import MultiMAE, make_adapters

MODALITIES = ("rgb", "depth", "semseg")


@dataclass(frozen=True)
class Preset:
    """One benchmark configuration (``num_encoded``: K visible tokens per sample)."""

    name: str
    dim_tokens: int
    depth: int
    num_heads: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    image_size: int
    batch_size: int
    num_encoded: int
    warmup: int
    repeats: int
    semseg_classes: int = 133
    patch_size: int = 16
    cache_grid: int = 32
    mask_batch: int = 256  # batch of the mask-generation throughput test
    data_samples: int = 32  # samples of the data-pipeline throughput test
    source_size: tuple[int, int] = (480, 640)  # synthetic source images (H, W)
    matmul_size: int = 2048  # n of the n x n matrix product that measures the peak (8192 on a GPU)
    extra: dict = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        return self.image_size // self.patch_size, self.image_size // self.patch_size

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "micro": Preset("micro", 48, 2, 2, 32, 1, 2, 64, 2, 8, warmup=1, repeats=1, semseg_classes=8,
                    cache_grid=8, mask_batch=8, data_samples=4, source_size=(96, 128), matmul_size=256),
    "tiny": Preset("tiny", 96, 3, 3, 64, 2, 2, 224, 4, 98, warmup=1, repeats=5, data_samples=16),
    "small": Preset("small", 384, 12, 6, 256, 2, 8, 224, 8, 98, warmup=2, repeats=7),
    "base": Preset("base", 768, 12, 12, 256, 2, 8, 224, 64, 98, warmup=5, repeats=20,
                   mask_batch=1024, data_samples=128),
}


def build_model(p: Preset) -> MultiMAE:
    """MultiMAE's pretraining set-up at the preset's size (rgb/depth/semseg in; + norm_rgb out)."""
    inputs, outputs = make_adapters(MODALITIES, MODALITIES, extra_norm_rgb=True, patch_size=p.patch_size,
                                    image_size=p.image_size, decoder_dim=p.decoder_dim,
                                    decoder_depth=p.decoder_depth, decoder_heads=p.decoder_heads,
                                    semseg_num_classes=p.semseg_classes)
    return MultiMAE(inputs, outputs, dim_tokens=p.dim_tokens, depth=p.depth, num_heads=p.num_heads)


def random_input(modality: str, batch_size: int, image_size: int, classes: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Random data of a model modality, shaped and ranged as the data pipeline's tensors
    (:func:`multimae_att.data.transforms.to_tensors`) by its table entry: ``image_size //
    stride`` pixels a side; labels int64 ``[B, h, w]`` in ``[0, classes)``; ``rgb8`` images
    ImageNet-normalised (standard normal here), other images in ``[0, 1)``, float ``[B, C, H, W]``."""
    mod = get_modality(modality)
    if not mod.model:
        raise ValueError(f"random_input draws model modalities only, not {modality!r}")
    side = image_size // mod.stride
    if mod.labels:
        return torch.randint(0, classes, (batch_size, side, side), generator=generator)
    draw = torch.randn if mod.encoding == "rgb8" else torch.rand
    return draw(batch_size, mod.channels, side, side, generator=generator)


def synthetic_batch(p: Preset, device: torch.device, seed: int = 0) -> dict:
    """A batch with every key of docs/INTERFACES.md that a pretraining step reads."""
    g = torch.Generator().manual_seed(seed)
    B, S = p.batch_size, p.image_size
    src_h, src_w = p.source_size
    scale = torch.empty(B).uniform_(0.3, 1.0, generator=g)
    height, width = scale * src_h, scale * src_w * torch.empty(B).uniform_(0.75, 1.0, generator=g)
    top = torch.rand(B, generator=g) * (src_h - height)
    left = torch.rand(B, generator=g) * (src_w - width)
    batch = {m: random_input(m, B, S, p.semseg_classes, g) for m in MODALITIES}
    batch.update({"crop_box": torch.stack([top, left, height, width], 1),
                  "flip": torch.rand(B, generator=g) < 0.5,
                  "source_size": torch.tensor([[src_h, src_w]] * B)})
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["sample_id"] = [f"bench_{i:06d}" for i in range(B)]
    return batch
