"""Checkpoint IO: safe loading, MultiMAE <-> timm-ViT layout conversion, checked loading with
declared key differences, pos-emb / class-embedding adaptation, export, atomic saving.

Layouts:
* **MultiMAE** — ``global_tokens [1, G, D]``, ``input_adapters.<m>.pos_emb [1, D, h, w]``,
  ``input_adapters.<m>.proj.*``, ``encoder.<i>.*``, ``output_adapters.<m>.*``.
* **timm ViT** — ``cls_token [1, 1, D]``, ``pos_embed [1, 1 + h*w, D]`` (first row: the class
  token's position; zero in exports), ``patch_embed.proj.*``, ``blocks.<i>.*`` (RGB encoder only).

Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)`` with an explicit
allow-list (``argparse.Namespace``, the ``args`` of MultiMAE's released files). A file that
needs anything else is refused with :class:`UnsafeCheckpointError`; nothing in it runs.
"""
from __future__ import annotations

import argparse
import fnmatch
import math
import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from multimae_att.atomic import save_atomic  # also this module's public name (README)

PathLike = str | os.PathLike
StateDict = dict[str, torch.Tensor]
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)
MODEL_KEYS = ("model", "state_dict", "module")  # where released files keep the weights, in order


class UnsafeCheckpointError(RuntimeError):
    """The file needs arbitrary unpickling (code objects, unknown classes): refused."""


class UnreadableCheckpointError(ValueError):
    """The file is not a checkpoint at all (text, random bytes, a truncated file, a foreign zip)."""


class CheckpointKeyError(KeyError):
    """A state dict's keys or shapes differ from the model's beyond the declared differences."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


# ---------------------------------------------------------------------------- loading
EXPECTED_FORMAT = "a file written by torch.save (a zip archive holding data.pkl) or a .safetensors file"
# torch.save's pre-1.6 format: a pickle whose first object is this magic number (protocol 2, LONG1).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _not_a_checkpoint(path: str) -> str | None:
    """Why ``path`` cannot be a checkpoint (a short phrase), or None when its structure is sound.

    Reads the head of the file and, for a zip archive, its central directory only: cheap enough
    to run before any work, also on large files.
    """
    if not os.path.exists(path):
        return "the file does not exist"
    if not os.path.isfile(path):
        return "it is not a file"
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty"
    with open(path, "rb") as f:
        head = f.read(512)
    if path.endswith(".safetensors"):
        header = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        return None if 0 < header <= size - 8 and head[8:9] == b"{" else "a damaged .safetensors header"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "a truncated or damaged zip archive"
        with zipfile.ZipFile(path) as z:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                return "a zip archive without data.pkl (not written by torch.save)"
        return None
    if head.startswith(_LEGACY_MAGIC):
        return None
    text = head.decode("utf-8", errors="replace").rstrip("\ufffd")   # a character cut at 512 bytes
    if all(c.isprintable() or c in "\n\r\t" for c in text):
        return f"a text file (starts with {text[:40].strip()!r})"
    return f"unknown binary data (starts with {head[:8]!r})"


def check_checkpoint_file(path: PathLike) -> None:
    """Raise :class:`UnreadableCheckpointError` (one line naming the file and the expected format)
    unless ``path`` is structurally a checkpoint; FileNotFoundError when it does not exist."""
    path = os.fspath(path)
    reason = _not_a_checkpoint(path)
    if reason == "the file does not exist":
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if reason is not None:
        raise UnreadableCheckpointError(f"{path} is not a readable checkpoint: expected "
                                        f"{EXPECTED_FORMAT}, got {reason}")


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu",
                    extra_safe_globals: Sequence[Any] = ()) -> Any:
    """Load a checkpoint file safely (``weights_only=True`` + allow-list ``SAFE_GLOBALS`` +
    ``extra_safe_globals``; ``.safetensors`` files through safetensors). Raises
    :class:`UnsafeCheckpointError` naming the file and the object the unpickler refused;
    there is no fallback to full unpickling."""
    path = os.fspath(path)
    check_checkpoint_file(path)
    try:
        if path.endswith(".safetensors"):  # timm / Hugging Face releases: tensors only, safe by design
            from safetensors.torch import load_file  # a dependency of timm

            return load_file(path, device=str(map_location))
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *extra_safe_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" not in str(err).lower():  # a broken pickle, not a refused object
            raise _unreadable(path, err) from None
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line),
                      reason[0] if reason else "")
        raise UnsafeCheckpointError(
            f"refusing to load {path}: it needs arbitrary unpickling, which could run code "
            f"({detail.strip()}). Only tensors, containers, numbers, strings and "
            f"{', '.join(g.__module__ + '.' + g.__qualname__ for g in SAFE_GLOBALS)} are allowed; "
            "if you trust the file, pass the needed classes as extra_safe_globals.") from None
    except (RuntimeError, OSError, EOFError, KeyError, IndexError, ValueError, zipfile.BadZipFile) as err:
        raise _unreadable(path, err) from None


def _unreadable(path: str, err: Exception) -> UnreadableCheckpointError:
    first = (str(err).strip().splitlines() or [""])[0]
    return UnreadableCheckpointError(f"{path} is not a readable checkpoint: expected {EXPECTED_FORMAT}; "
                                     f"loading failed ({type(err).__name__}: {first})")


def model_state(checkpoint: Any, source: str = "checkpoint") -> StateDict:
    """The weights inside a loaded checkpoint: its ``model`` (or ``state_dict``/``module``)
    entry, or the dict itself if it already maps names to tensors. A ``module.`` prefix
    (DistributedDataParallel) is stripped."""
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    state = checkpoint
    for key in MODEL_KEYS:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            state = checkpoint[key]
            break
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{source}: no model state dict found (entries that are not tensors: {bad[:5]})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def load_state_dict_file(path: PathLike, layout: str = "multimae") -> StateDict:
    """Weights of a checkpoint file in the requested layout (converted if the file has the
    other one)."""
    state = model_state(load_checkpoint(path), source=os.fspath(path))
    return to_layout(state, layout)


# ---------------------------------------------------------------------------- layouts
def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """``'timm'`` if the state dict has timm ViT names (``patch_embed``/``blocks``), else ``'multimae'``."""
    if any(k.startswith(("patch_embed.", "blocks.")) or k in ("cls_token", "pos_embed") for k in state):
        return "timm"
    return "multimae"


def to_layout(state: Mapping[str, torch.Tensor], layout: str) -> StateDict:
    """Convert ``state`` to ``layout`` (``'multimae'`` or ``'timm'``) if it is in the other one."""
    if layout not in ("multimae", "timm"):
        raise ValueError(f"unknown layout {layout!r}; expected 'multimae' or 'timm'")
    current = detect_layout(state)
    if current == layout:
        return dict(state)
    return multimae_to_timm(state) if layout == "timm" else timm_to_multimae(state)


def multimae_to_timm(state: Mapping[str, torch.Tensor], modality: str = "rgb") -> StateDict:
    """MultiMAE layout -> timm ViT layout of the ``modality`` encoder (decoders and other
    adapters are left out). ``pos_embed`` gets a zero first row for the class token."""
    prefix = f"input_adapters.{modality}."
    if "global_tokens" not in state or prefix + "pos_emb" not in state:
        raise KeyError(f"not a MultiMAE state dict with a {modality!r} input adapter "
                       f"(need 'global_tokens' and '{prefix}pos_emb')")
    if state["global_tokens"].shape[1] != 1:
        raise ValueError(f"timm layout holds one class token; this model has "
                         f"{state['global_tokens'].shape[1]} global tokens")
    pos = state[prefix + "pos_emb"].flatten(2).transpose(1, 2)  # [1, h*w, D]
    out: StateDict = {"cls_token": state["global_tokens"].clone(),
                      "pos_embed": torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)}
    for key, value in state.items():
        if key.startswith(prefix + "proj."):
            out["patch_embed.proj." + key[len(prefix + "proj."):]] = value.clone()
        elif key.startswith("encoder."):
            out["blocks." + key[len("encoder."):]] = value.clone()
    return out


def timm_to_multimae(state: Mapping[str, torch.Tensor], grid: tuple[int, int] | None = None,
                     modality: str = "rgb") -> StateDict:
    """timm ViT layout -> MultiMAE layout (``modality`` adapter + encoder). The class token's
    positional row is folded into ``global_tokens`` (MultiMAE adds no pos-emb to global
    tokens); ``grid`` = (h, w) of the patch grid, square if None. timm's final ``norm``,
    ``head`` and other extras are not part of MultiMAE's encoder and are left out."""
    for key in ("cls_token", "pos_embed"):
        if key not in state:
            raise KeyError(f"not a timm ViT state dict: missing {key!r}")
    pos = state["pos_embed"]
    n = pos.shape[1] - 1
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos_embed has {n} patch rows, not a square grid; pass grid=(h, w)")
        grid = (side, side)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold the {n} patch rows of pos_embed")
    prefix = f"input_adapters.{modality}."
    out: StateDict = {
        "global_tokens": state["cls_token"] + pos[:, :1],
        prefix + "pos_emb": pos[:, 1:].transpose(1, 2).reshape(1, pos.shape[2], *grid).clone()}
    for key, value in state.items():
        if key.startswith("patch_embed.proj."):
            out[prefix + "proj." + key[len("patch_embed.proj."):]] = value.clone()
        elif key.startswith("blocks."):
            out["encoder." + key[len("blocks."):]] = value.clone()
    return out


# ---------------------------------------------------------------------------- adapting + checked loading
def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / Accelerate wrapper."""
    return getattr(model, "module", model)


def _pos_emb_mode(model: nn.Module, key: str) -> str:
    """Interpolation the owning module uses on the fly: bicubic for patch adapters, bilinear
    for semseg adapters and decoders (MultiMAE's choices)."""
    try:
        owner = model.get_submodule(key.rsplit(".", 1)[0])
    except AttributeError:
        return "bilinear"
    return getattr(owner, "pos_emb_mode", "bilinear")


def adapt_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> StateDict:
    """Fit a MultiMAE-layout state dict to ``model``'s shapes where that is well defined:

    * ``*.pos_emb [1, D, h, w]`` of another grid: resized (bicubic for patch adapters, bilinear
      for semseg adapters and decoders — what the modules themselves do on the fly);
    * ``*.class_emb.weight [C, E]`` with fewer classes than the model: the missing rows are taken
      from the model's own (freshly initialised) embedding.
    Everything else is returned unchanged (mismatches are reported by :func:`load_weights`).
    """
    model = _unwrap(model)
    target = model.state_dict()
    out = dict(state)
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue
        want = target[key].shape
        if key.endswith("pos_emb") and value.ndim == 4 and value.shape[:2] == want[:2]:
            resized = F.interpolate(value.float(), size=tuple(want[-2:]), mode=_pos_emb_mode(model, key),
                                    align_corners=False)
            out[key] = resized.to(value.dtype)
        elif key.endswith("class_emb.weight") and value.shape[1] == want[1] and value.shape[0] < want[0]:
            extra = target[key][value.shape[0]:].to(device=value.device, dtype=value.dtype)
            out[key] = torch.cat([value, extra], dim=0)
    return out


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor] | PathLike,
                 expected_missing: Iterable[str] = (), expected_unexpected: Iterable[str] = (),
                 adapt: bool = True) -> tuple[list[str], list[str]]:
    """Load ``state`` (a state dict or a checkpoint file) into ``model``, checked.

    Strict by default: every model key must be present and every state key used, with equal
    shapes. ``expected_missing`` / ``expected_unexpected`` declare the allowed differences as
    glob patterns (e.g. ``"output_adapters.*"`` when finetuning drops the decoders, ``"head.*"``
    for a new head); any other difference raises :class:`CheckpointKeyError` naming the keys.
    A timm-layout state dict is converted first; with ``adapt`` pos-emb grids and semseg class
    embeddings are fitted (:func:`adapt_state_dict`). Returns (missing, unexpected) keys.
    """
    if not isinstance(state, Mapping):
        state = model_state(load_checkpoint(state), source=os.fspath(state))
    model = _unwrap(model)
    target = model.state_dict()
    if detect_layout(state) != detect_layout(target):
        state = to_layout(state, detect_layout(target))
    if adapt:
        state = adapt_state_dict(state, model)
    expected_missing, expected_unexpected = list(expected_missing), list(expected_unexpected)
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    problems = []
    bad = [k for k in missing if not _matches(k, expected_missing)]
    if bad:
        problems.append(f"missing keys: {bad}")
    bad = [k for k in unexpected if not _matches(k, expected_unexpected)]
    if bad:
        problems.append(f"unexpected keys: {bad}")
    bad = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(target[k].shape)}"
           for k in target if k in state and state[k].shape != target[k].shape]
    if bad:
        problems.append(f"shape mismatches: {bad}")
    if problems:
        raise CheckpointKeyError(f"state dict does not fit {type(model).__name__} "
                                 f"(declared missing={expected_missing}, unexpected={expected_unexpected}); "
                                 + "; ".join(problems))
    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)
    return missing, unexpected


# ---------------------------------------------------------------------------- export
def export_weights(model: nn.Module, path: PathLike, layout: str = "multimae",
                   extra: Mapping[str, Any] | None = None) -> None:
    """Save ``{'model': weights, **extra}`` atomically, weights on CPU in ``layout``:
    ``'multimae'`` (the full model, loads into MultiMAE code) or ``'timm'`` (RGB adapter +
    encoder as a timm ViT, for RGB-only use; other adapters and decoders are left out).
    ``extra`` may hold plain data (epoch, config dict, argparse.Namespace)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}
    if layout == "timm":
        state = multimae_to_timm(state)
    elif layout != "multimae":
        raise ValueError(f"unknown layout {layout!r}; expected 'multimae' or 'timm'")
    save_atomic({"model": state, **dict(extra or {})}, path)


if __name__ == "__main__":  # python -m multimae_att.checkpoint list | download NAME | inspect SPEC
    from multimae_att.hub import main

    raise SystemExit(main())
