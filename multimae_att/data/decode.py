"""Decoding of stored modality files (paths or bytes) into PIL images with checked modes.

WebDataset's built-in image decoders convert to 8 bits (a 16-bit depth PNG would be clipped), so
every modality is decoded here with Pillow: 16-bit PNGs open as mode ``I;16`` (uint16) and stay
16-bit through crop/resize. Images are opened lazily; ``load()`` forces the decode so that a
truncated file fails here (and is counted as corrupt) rather than inside a transform.
"""
from __future__ import annotations

import io
import os

from PIL import Image

from multimae_att.modalities import MODALITIES as TABLE

__all__ = ["MODALITIES", "IMAGE_MODALITIES", "decode_modality", "CorruptSample"]

IMAGE_MODALITIES = tuple(TABLE)   # the modality table's image modalities
MODALITIES = IMAGE_MODALITIES + ("cls",)
_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I")
_LABEL_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")

Source = bytes | str | os.PathLike


class CorruptSample(Exception):
    """A sample that cannot be decoded or is incomplete; skipped and counted by the datasets."""


def _open(source: Source) -> Image.Image:
    image = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    image.load()
    return image


def decode_modality(modality: str, source: Source, where: str = "") -> Image.Image:
    """Decode one stored image of ``modality`` by its table ``encoding``
    (:data:`multimae_att.modalities.Encoding`).

    ``rgb8`` -> mode RGB (grey/CMYK/palette converted); ``depth16`` must be 16-bit (modes
    I;16*/I): an 8-bit depth file is an error, since the value scale would be wrong by 256x;
    ``labels`` and ``mask`` keep their integer values (L, P, I;16, I); ``map`` is greyscale (no
    palette). Raises :class:`CorruptSample` naming ``where`` on any failure.
    """
    if modality not in TABLE:
        raise KeyError(f"unknown image modality {modality!r}; expected one of {IMAGE_MODALITIES}")
    encoding = TABLE[modality].encoding
    try:
        image = _open(source)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise CorruptSample(f"{where or modality}: cannot decode {modality} ({type(exc).__name__}: {exc})") from exc
    if encoding == "rgb8":
        return image if image.mode == "RGB" else image.convert("RGB")
    if encoding == "depth16":
        if image.mode not in _DEPTH_MODES:
            raise CorruptSample(f"{where}: {modality} must be a 16-bit PNG, got mode {image.mode}")
        return image
    if image.mode not in _LABEL_MODES:
        raise CorruptSample(f"{where}: {modality} must be a single-channel 8/16-bit image, got mode {image.mode}")
    if encoding == "map" and image.mode == "P":
        raise CorruptSample(f"{where}: {modality} must be a greyscale image, got a palette image")
    return image
