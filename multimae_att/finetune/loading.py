"""Initialise a task model from a pretraining (or finetuned) checkpoint, with checked key sets.

Accepts ours or MultiMAE's files, in MultiMAE or timm-ViT layout (converted by
:mod:`multimae_att.checkpoint`). Rules, applied to the checkpoint's state dict:

* pretraining decoders (``output_adapters.*``) are dropped, unless the checkpoint holds the
  complete head this task builds (same names and shapes: a finetuned checkpoint), which is kept;
* input adapters the task does not use are dropped (e.g. depth/semseg when finetuning on RGB);
  input adapters the task uses but the checkpoint lacks start fresh (e.g. depth for RGB-D from
  an RGB-only MAE);
* positional grids are resized to the finetuning resolution and a semseg class embedding with
  fewer classes is padded (:func:`multimae_att.checkpoint.adapt_state_dict`).

Everything else must match exactly: :func:`multimae_att.checkpoint.load_weights` is called with
the declared missing / unexpected patterns and raises on any other difference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from torch import nn

from multimae_att.checkpoint import load_state_dict_file, load_weights
from multimae_att.finetune.heads import fill_dpt_aliases
from multimae_att.hub import resolve_checkpoint

__all__ = ["LoadReport", "load_pretrained"]


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. Key lists are sorted."""
    path: str
    missing: list[str] = field(default_factory=list)        # model keys left at their init
    unexpected: list[str] = field(default_factory=list)     # checkpoint keys not loaded
    head_loaded: bool = False

    def __str__(self) -> str:
        return (f"init from {self.path}: {len(self.missing)} keys start fresh "
                f"({_summary(self.missing)}), {len(self.unexpected)} checkpoint keys unused "
                f"({_summary(self.unexpected)}), head {'loaded' if self.head_loaded else 'new'}")


def _summary(keys: list[str]) -> str:
    prefixes = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(prefixes) if prefixes else "none"


def _adapter_names(keys, prefix: str) -> set:
    return {k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)}


def load_pretrained(model: nn.Module, path: str | os.PathLike, task) -> LoadReport:
    """Load ``path`` into ``model`` (a task model from :class:`TaskSpec.build`) and report.

    ``path``: a file, a URL or a published name (:func:`multimae_att.hub.resolve_checkpoint`).
    ``task.output`` names the head (``''`` when the model has none).
    """
    model = getattr(model, "module", model)
    path = resolve_checkpoint(path)
    original = load_state_dict_file(path, layout="multimae")
    state = original
    target = model.state_dict()
    head_prefix = f"output_adapters.{task.output}." if task.output else None
    head_keys = {k for k in target if head_prefix and k.startswith(head_prefix)}
    if head_keys:
        state = fill_dpt_aliases(state, head_prefix)
    head_loaded = bool(head_keys) and all(
        k in state and state[k].shape == target[k].shape for k in head_keys)

    missing_ok, unexpected_ok = [], ["output_adapters.*"]   # decoders never load into a task model
    if head_loaded:
        unexpected_ok = [f"output_adapters.{n}.*" for n in _adapter_names(state, "output_adapters.")
                         if n != task.output]
        state = {k: v for k, v in state.items()
                 if not k.startswith("output_adapters.") or k in head_keys}
    else:
        state = {k: v for k, v in state.items() if not k.startswith("output_adapters.")}
        if head_prefix:
            missing_ok.append(head_prefix + "*")
    ckpt_inputs = _adapter_names(state, "input_adapters.")
    model_inputs = _adapter_names(target, "input_adapters.")
    unexpected_ok += [f"input_adapters.{m}.*" for m in sorted(ckpt_inputs - model_inputs)]
    missing_ok += [f"input_adapters.{m}.*" for m in sorted(model_inputs - ckpt_inputs)]
    if not ckpt_inputs & model_inputs:
        raise ValueError(f"{os.fspath(path)}: no input adapter in common (checkpoint: "
                         f"{sorted(ckpt_inputs)}, model: {sorted(model_inputs)})")
    missing, _ = load_weights(model, state, expected_missing=missing_ok,
                              expected_unexpected=unexpected_ok)
    unused = sorted(k for k in original if k not in target or (k.startswith("output_adapters.")
                                                                and not head_loaded))
    return LoadReport(os.fspath(path), sorted(missing), unused, head_loaded)
