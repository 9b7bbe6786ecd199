"""The modality table: every fact about a modality in one place (the typed ``DOMAIN_CONF``).

MultiMAE keeps one ``DOMAIN_CONF`` dict (channels, stride level, adapters, loss per domain). This
is its typed successor: a frozen :class:`Modality` per stored image modality and an
:class:`Output` per decoder. Everything else reads it: the data pipeline (decoding rule,
resampling, tensor conversion), the model factory (channels, stride level, class embedding), the
losses (:class:`LossSpec` per output), the pictures (colouring) and the config checks (which
modalities and outputs exist).

Torch-free, so the config schemas can import it without pulling in torch.

Adding a modality (e.g. surface normals, as MultiMAE's follow-ups do) is one :class:`Modality`
entry, one :class:`Output` entry if it is reconstructed, and its data decoding when none of the
existing ``encoding`` rules fits (:mod:`multimae_att.data.decode` reads the file,
:func:`multimae_att.data.transforms.to_tensors` makes the tensor)::

    "normal": Modality("normal", channels=3, stride=1, resample="bilinear", encoding="rgb8",
                       picture="image", model=True),
    ...
    "normal": Output("normal", target="normal", loss=LossSpec("l1")),
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = ["LossKind", "LossSpec", "Modality", "Output", "MODALITIES", "OUTPUTS", "MODEL_MODALITIES",
           "SEMSEG_NUM_CLASSES", "get_modality", "get_output", "output_names", "target_of"]

LossKind = Literal["mse", "l1", "ce"]
#: Pillow resampling filter of a crop + resize (labels are never interpolated).
Resample = Literal["bicubic", "bilinear", "nearest"]
#: How a stored file is decoded and turned into a tensor (rules in :mod:`multimae_att.data`):
#: ``rgb8``: any image mode, converted to RGB -> float ``[3, H, W]`` ImageNet-normalised;
#: ``depth16``: a 16-bit single-channel PNG (an 8-bit one is an error) -> float ``[1, H, W]`` =
#: stored / 2**16; ``labels``: 8/16-bit single channel (palette allowed) -> int64 ``[h, w]``;
#: ``mask``: as labels -> bool ``[1, H, W]`` (non-zero = valid); ``map``: 8/16-bit greyscale (no
#: palette) -> float ``[h, w]`` in [0, 1].
Encoding = Literal["rgb8", "depth16", "labels", "mask", "map"]
#: How a picture shows the modality: ``image`` (de-normalised RGB), ``colormap`` (one channel
#: through a colour map), ``palette`` (one fixed colour per class); None: not drawn.
Picture = Literal["image", "colormap", "palette"]

SEMSEG_NUM_CLASSES = 133  # COCO panoptic classes of MultiMAE's pseudo labels


@dataclass(frozen=True)
class LossSpec:
    """How one output is scored (:mod:`multimae_att.pretrain.losses`): ``mse``, ``l1`` or ``ce`` per
    pixel, averaged per token patch; ``norm_pix``: the target is standardised per patch first
    (MAE's normalised pixels); ``ignore_index``: ``ce`` pixels with this label count as 0."""

    kind: LossKind
    norm_pix: bool = False
    ignore_index: int = -100


@dataclass(frozen=True)
class Modality:
    """One stored image modality.

    ``channels``: tensor channels of an image modality; None for class labels, whose model
    channels are the number of classes (``classes``: the default, a config key overrides it).
    ``stride``: MultiMAE's stride level: the modality enters and leaves the model at
    ``image_size // stride`` (its patches are ``patch_size // stride`` pixels); None: one value
    per token (``image_size // patch_size``). ``resample``: the filter of the shared crop +
    resize. ``encoding``: the decoding and tensor rule (see :data:`Encoding`). ``picture``: the
    colouring of training pictures. ``model``: the model can take it as input and reconstruct it
    (it has adapters); the others are auxiliary data (validity masks, precomputed maps).
    ``class_dim``: width of the class embedding of a label input (MultiMAE: 64).
    """

    name: str
    channels: int | None
    stride: int | None
    resample: Resample
    encoding: Encoding
    picture: Picture | None = None
    model: bool = False
    classes: int | None = None
    class_dim: int | None = None

    @property
    def labels(self) -> bool:
        """Class labels (a class embedding in, logits out), not image channels."""
        return self.channels is None


@dataclass(frozen=True)
class Output:
    """One decoder: it reconstructs ``target`` (and uses that input modality's mask and scores),
    scored by ``loss``. ``norm_rgb`` reconstructs rgb with normalised-pixel targets."""

    name: str
    target: str
    loss: LossSpec


# Order matters: the first modality of a sample that is present fixes its source size.
MODALITIES: Mapping[str, Modality] = MappingProxyType({
    "rgb": Modality("rgb", channels=3, stride=1, resample="bicubic", encoding="rgb8",
                    picture="image", model=True),
    "depth": Modality("depth", channels=1, stride=1, resample="bilinear", encoding="depth16",
                      picture="colormap", model=True),
    "semseg": Modality("semseg", channels=None, stride=4, resample="nearest", encoding="labels",
                       picture="palette", model=True, classes=SEMSEG_NUM_CLASSES, class_dim=64),
    "mask_valid": Modality("mask_valid", channels=1, stride=1, resample="nearest", encoding="mask"),
    # precomputed attention maps (data_prep/export_attention_maps.py), one value per token;
    # bilinear with Pillow's antialiasing is an area average when shrinking
    "att_map": Modality("att_map", channels=1, stride=None, resample="bilinear", encoding="map"),
})

OUTPUTS: Mapping[str, Output] = MappingProxyType({
    "rgb": Output("rgb", target="rgb", loss=LossSpec("mse")),
    "norm_rgb": Output("norm_rgb", target="rgb", loss=LossSpec("mse", norm_pix=True)),
    "depth": Output("depth", target="depth", loss=LossSpec("l1")),
    "semseg": Output("semseg", target="semseg", loss=LossSpec("ce")),
})

#: Modalities the model can take in and reconstruct, in table order.
MODEL_MODALITIES: tuple[str, ...] = tuple(m.name for m in MODALITIES.values() if m.model)


def _unknown(kind: str, name: str, known: Iterable[str]) -> KeyError:
    known = list(known)
    near = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return KeyError(f"unknown {kind} {name!r}{hint}; known: {known}")


def get_modality(name: str) -> Modality:
    """The table entry of ``name``; a ``KeyError`` naming the nearest known modality."""
    if name not in MODALITIES:
        raise _unknown("modality", name, MODALITIES)
    return MODALITIES[name]


def get_output(name: str) -> Output:
    """The table entry of output ``name``; a ``KeyError`` naming the nearest known output."""
    if name not in OUTPUTS:
        raise _unknown("output", name, OUTPUTS)
    return OUTPUTS[name]


def target_of(output: str) -> str:
    """The input modality whose mask, scores and data an output uses (``norm_rgb`` -> ``rgb``;
    an output not in the table is its own target)."""
    return OUTPUTS[output].target if output in OUTPUTS else output


def output_names(out_modalities: Iterable[str], extra_norm_rgb: bool = False) -> list[str]:
    """The decoders of a model: one per reconstructed modality, plus ``norm_rgb`` (MultiMAE's
    extra normalised-pixel rgb decoder) when ``extra_norm_rgb``."""
    return list(out_modalities) + (["norm_rgb"] if extra_norm_rgb else [])
