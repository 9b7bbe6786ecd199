"""Multimodal data: folder layout and WebDataset shards, one geometry per sample for all modalities.

Entry points: :func:`build_loader` / :func:`build_dataset` (batch dicts as in docs/INTERFACES.md),
:func:`robust_standardize_depth` for the training step. Formats and layouts: docs/DATA.md.
"""
from multimae_att.data.decode import IMAGE_MODALITIES, MODALITIES, CorruptSample, decode_modality
from multimae_att.data.folder import FolderDataset
from multimae_att.data.loader import EpochSampler, MultiModalLoader, build_dataset, build_loader, detect_layout
from multimae_att.data.sample import SkipCounter, build_sample, collate
from multimae_att.data.shards import ShardDataset, resolve_shards
from multimae_att.data.transforms import (
    DEPTH_SCALE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    Geometry,
    make_geometry,
    robust_standardize_depth,
)

__all__ = [
    "IMAGE_MODALITIES", "MODALITIES", "CorruptSample", "decode_modality", "FolderDataset", "EpochSampler",
    "MultiModalLoader", "build_dataset", "build_loader", "detect_layout", "SkipCounter", "build_sample",
    "collate", "ShardDataset", "resolve_shards", "DEPTH_SCALE", "IMAGENET_MEAN", "IMAGENET_STD",
    "AugmentConfig", "Geometry", "make_geometry", "robust_standardize_depth",
]
