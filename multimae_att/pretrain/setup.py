"""Assembling a pretraining run from its config: data, model, masking policy, optimizer, init weights.

Everything here fails fast with a message naming the config key or file at fault.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import nn

from multimae_att.config import ConfigError
from multimae_att.pretrain.config import PretrainConfig

__all__ = ["check_data_source", "build_pretrain_loader", "build_refresh_loader",
           "build_model", "build_policy", "label_ranges",
           "param_groups", "load_init_checkpoint"]


def check_data_source(cfg: PretrainConfig) -> None:
    """A local ``data.root`` must hold ``data.split`` (remote/pattern shard specs are checked by the loader)."""
    from multimae_att.preflight import check_data_root

    check_data_root(cfg.data.root, {"data.split": cfg.data.split}, cfg.data.layout)


def label_ranges(cfg: PretrainConfig) -> dict[str, tuple[int, None]]:
    """semseg labels must index the input adapter's class embedding: ``[0, semseg_num_classes)``,
    no ignore value (a sample with any other label is skipped and counted as corrupt)."""
    return {"semseg": (cfg.model.semseg_num_classes, None)} if "semseg" in cfg.model.in_modalities else {}


def build_pretrain_loader(cfg: PretrainConfig, rank: int, world_size: int):
    """The rank's loader (already split by rank; not to be passed to ``accelerator.prepare``)."""
    from multimae_att.data import build_loader

    check_data_source(cfg)
    d = cfg.data
    mods = list(cfg.model.in_modalities)
    attg = cfg.loss.attg
    if attg.enabled and attg.source == "data":
        mods.append("att_map")  # precomputed maps, cropped with the sample, one value per token
    try:
        return build_loader(d.root, mods, batch_size=d.batch_size, num_workers=d.num_workers,
                            split=d.split, image_size=d.image_size, train=True, layout=d.layout,
                            seed=cfg.train.seed, rank=rank, world_size=world_size,
                            scale=tuple(d.crop_scale), hflip=d.hflip,
                            samples_per_epoch=d.samples_per_epoch,
                            att_map_stride=cfg.model.patch_size, label_ranges=label_ranges(cfg))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.root={d.root!r}: {e}") from e


def build_refresh_loader(cfg: PretrainConfig, rank: int, world_size: int):
    """Whole training images for the attention cache's full-image refresh (``masking.cache``).

    Evaluation mode with ``eval_full_image``: crop box = the whole source resized to
    ``data.image_size`` (aspect not kept), no flip, fixed order, no padding, no dropped batch, so
    ranks ``0..world_size-1`` together visit every sample of the split exactly once.
    """
    from multimae_att.data import build_loader

    d = cfg.data
    try:
        return build_loader(d.root, list(cfg.model.in_modalities), batch_size=d.batch_size,
                            num_workers=d.num_workers, split=d.split, image_size=d.image_size,
                            train=False, eval_full_image=True, drop_last=False, layout=d.layout,
                            seed=cfg.train.seed, rank=rank, world_size=world_size,
                            label_ranges=label_ranges(cfg))
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"data.root={d.root!r} (attention cache refresh): {e}") from e


def build_model(cfg: PretrainConfig) -> nn.Module:
    """The pretraining MultiMAE of ``model.*`` at ``data.image_size``."""
    from multimae_att.model import create_pretrain_model

    m = cfg.model
    dec = {k: v for k, v in (("decoder_dim", m.decoder_dim), ("decoder_depth", m.decoder_depth),
                             ("decoder_heads", m.decoder_heads)) if v is not None}
    from multimae_att.model.compile import apply_speed_options

    model = create_pretrain_model(m.size, in_domains=m.in_modalities, out_domains=m.out_modalities,
                                  extra_norm_rgb=m.extra_norm_rgb, patch_size=m.patch_size,
                                  image_size=cfg.data.image_size, num_global_tokens=m.num_global_tokens,
                                  drop_path_rate=m.drop_path_rate,
                                  semseg_num_classes=m.semseg_num_classes, **dec)
    return apply_speed_options(model, cfg.train.attention, cfg.train.compile)


def build_policy(cfg: PretrainConfig):
    """The :class:`~multimae_att.masking.MaskingPolicy` of ``masking.*`` (through
    :func:`~multimae_att.masking.build_masker`, the one builder of a policy from a config section)."""
    from multimae_att.masking import build_masker

    m = cfg.masking
    keys = ("strategy", "params", "warmup_epochs", "prob", "alphas", "sample_tasks_uniformly")
    # the adaptive section as is ('enabled': false turns it off)
    section = {**{k: getattr(m, k) for k in keys}, "adaptive": dataclasses.asdict(m.adaptive)}
    return build_masker(section, list(cfg.model.in_modalities))


def param_groups(model: nn.Module, weight_decay: float, extra: nn.Module | None = None
                 ) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms (1-D tensors) and ``no_weight_decay()`` names.

    ``extra``: another module trained alongside (the loss predictor), same rule, same two groups.
    """
    decay, no_decay = [], []
    for module in (model,) if extra is None else (model, extra):
        skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name in skip or any(name.endswith(s) for s in skip):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def load_init_checkpoint(model: nn.Module, spec: str) -> dict | None:
    """Load ``init.checkpoint`` strictly into ``model``; return its optimizer state (or None).

    ``spec``: a published name, a URL or a path (:func:`multimae_att.hub.resolve_checkpoint`).
    Safe loading, layout conversion and the strict key/shape check are
    :mod:`multimae_att.checkpoint`'s (positional grids are resized to ``data.image_size``). A
    file for another architecture raises :class:`ConfigError` listing the differences.
    """
    from multimae_att.checkpoint import (
        CheckpointKeyError,
        UnreadableCheckpointError,
        UnsafeCheckpointError,
        load_checkpoint,
        load_weights,
        model_state,
    )
    from multimae_att.hub import CheckpointHashError, resolve_checkpoint

    try:
        path = os.fspath(resolve_checkpoint(spec))
    except (FileNotFoundError, CheckpointHashError, ValueError) as e:
        raise ConfigError(f"init.checkpoint={spec!r}: {e}") from e
    try:
        ckpt = load_checkpoint(path)
    except (UnreadableCheckpointError, UnsafeCheckpointError) as e:
        raise ConfigError(f"init.checkpoint: {e}") from e
    try:
        load_weights(model, model_state(ckpt, source=path))
    except (CheckpointKeyError, UnsafeCheckpointError, ValueError, TypeError) as e:
        raise ConfigError(f"init.checkpoint={path!r} does not fit the model of model.* "
                          f"(size={_size_hint(model)}): {e}") from e
    opt = ckpt.get("optimizer") if isinstance(ckpt, dict) else None
    return opt if isinstance(opt, dict) else None


def _size_hint(model: nn.Module) -> str:
    blocks = getattr(model, "encoder", [])
    dim = getattr(model, "dim_tokens", "?")
    return f"{len(blocks)} blocks x {dim}-d, inputs {list(getattr(model, 'input_adapters', {}))}"
