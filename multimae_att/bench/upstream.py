"""The original MultiMAE's training step, imported from a user's own checkout and timed next to ours.

``python -m multimae_att.bench --vs-upstream PATH``: PATH is a checkout of EPFL-VILAB/MultiMAE
(its ``multimae/`` and ``utils/`` folders). Nothing of it is vendored here (it is CC-BY-NC):
:func:`load_upstream` imports it from PATH at run time, and :class:`UpstreamStep` runs its model,
criterion, optimizer factory, loss balancer and gradient scaler through the body of its
``train_one_epoch`` (``run_pretraining_multimae.py``), restated below for one fixed batch: the
script itself cannot be imported (it imports the whole ``utils`` package, datasets included).

Import shims (applied only while importing, undone afterwards):

* ``utils`` is entered as a bare package object whose ``__path__`` is PATH/utils, so that
  ``from utils.registry import register_model`` loads that one file instead of running
  ``utils/__init__.py`` (which imports datasets, augmentations and timm internals that modern
  versions lack);
* ``torch._six`` (removed from torch 2) is provided with its ``inf`` when missing, for
  ``utils/native_scaler.py``.

Same preset, batch, weights (our state dict loaded into theirs, strict) and dtype as our cases.
Differences that are the comparison's, not the code's: bf16 runs their forward under
``torch.autocast(device, bfloat16)`` where their script uses ``torch.cuda.amp.autocast()``
(fp16, CUDA only), and their gradient scaler is disabled (fp32 and bf16 need no loss scaling;
on a CPU their script's scaler disables itself too).
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from multimae_att.bench.presets import MODALITIES, Preset

__all__ = ["Upstream", "UpstreamStep", "load_upstream", "upstream_model"]

#: Top-level names the checkout brings; they are removed from ``sys.modules`` after the import
#: (``utils`` is a common name: no other package's ``utils`` may be shadowed or kept shadowed).
_NAMES = ("multimae", "utils")


@dataclass
class Upstream:
    """The pieces of an original MultiMAE checkout that the comparison uses."""

    path: str
    commit: str | None
    multimae: ModuleType          # the ``multimae`` package (model, adapters, criterion)
    optim_factory: ModuleType     # ``utils.optim_factory`` (create_optimizer)
    native_scaler: ModuleType     # ``utils.native_scaler`` (NativeScalerWithGradNormCount)
    task_balancing: ModuleType    # ``utils.task_balancing`` (NoWeightingStrategy)


def _owned(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in _NAMES)


def _git_commit(path: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def load_upstream(path: str | os.PathLike) -> Upstream:
    """Import MultiMAE's ``multimae`` package and three ``utils`` modules from the checkout at ``path``.

    Raises ``FileNotFoundError`` naming the missing file when ``path`` is not such a checkout.
    ``sys.modules`` and ``sys.path`` are left as they were (the returned modules keep working).
    """
    path = os.path.abspath(os.fspath(path))
    needed = ("multimae/__init__.py", "utils/optim_factory.py", "utils/native_scaler.py", "utils/task_balancing.py")
    for rel in needed:
        if not os.path.isfile(os.path.join(path, rel)):
            raise FileNotFoundError(f"--vs-upstream {path}: no {rel} there; point it at a checkout of "
                                    "https://github.com/EPFL-VILAB/MultiMAE")
    saved = {k: v for k, v in sys.modules.items() if _owned(k)}
    for k in saved:
        del sys.modules[k]
    shim = types.ModuleType("utils")
    shim.__path__ = [os.path.join(path, "utils")]
    sys.modules["utils"] = shim
    six = None
    try:
        import torch._six  # noqa: F401
    except ImportError:
        six = types.ModuleType("torch._six")
        six.inf = math.inf
        sys.modules["torch._six"] = six
    sys.path.insert(0, path)
    try:
        import importlib

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mods = {name: importlib.import_module(name) for name in
                    ("multimae", "utils.optim_factory", "utils.native_scaler", "utils.task_balancing")}
    finally:
        sys.path.remove(path)
        if six is not None and sys.modules.get("torch._six") is six:
            del sys.modules["torch._six"]
        for k in [k for k in sys.modules if _owned(k)]:
            del sys.modules[k]
        sys.modules.update(saved)
    return Upstream(path, _git_commit(path), mods["multimae"], mods["utils.optim_factory"],
                    mods["utils.native_scaler"], mods["utils.task_balancing"])


def upstream_model(up: Upstream, p: Preset) -> nn.Module:
    """Their ``MultiMAE`` with the adapters of their ``get_model`` (rgb, depth, semseg in; rgb,
    depth, semseg and the extra ``norm_rgb`` out) at the preset's sizes."""
    mm = up.multimae
    common = dict(patch_size_full=p.patch_size, image_size=p.image_size)
    inputs = {"rgb": mm.PatchedInputAdapter(num_channels=3, stride_level=1, **common),
              "depth": mm.PatchedInputAdapter(num_channels=1, stride_level=1, **common),
              "semseg": mm.SemSegInputAdapter(num_classes=p.semseg_classes, stride_level=4, dim_class_emb=64,
                                              interpolate_class_emb=False, **common)}
    dec = dict(dim_tokens=p.decoder_dim, depth=p.decoder_depth, num_heads=p.decoder_heads, use_task_queries=True,
               context_tasks=list(MODALITIES), use_xattn=True, **common)
    outputs = {name: mm.SpatialOutputAdapter(num_channels=ch, stride_level=st, task=task, **dec)
               for name, task, ch, st in (("rgb", "rgb", 3, 1), ("depth", "depth", 1, 1),
                                          ("semseg", "semseg", p.semseg_classes, 4), ("norm_rgb", "rgb", 3, 1))}
    return mm.MultiMAE(inputs, outputs, num_global_tokens=1, dim_tokens=p.dim_tokens, depth=p.depth,
                       num_heads=p.num_heads, mlp_ratio=4.0, qkv_bias=True)


class UpstreamStep:
    """One training step of the original code on the bench batch (call it; returns the loss value).

    ``state_dict``: our model's weights, loaded strictly into theirs (same layout), so both sides
    start from the same parameters. The optimizer is built as their ``main`` builds it
    (``create_optimizer(args, {'model': ..., 'balancer': ...})`` with their pretraining defaults:
    AdamW, weight decay 0.05, betas (0.9, 0.95), eps 1e-8).
    """

    def __init__(self, up: Upstream, p: Preset, device: torch.device, dtype: str, batch: Mapping[str, Any],
                 state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        mm = up.multimae
        self.p, self.device, self.dtype = p, device, dtype
        self.model = upstream_model(up, p)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        self.model.to(device).train()
        ps = p.patch_size
        self.loss_fns = {"rgb": mm.MaskedMSELoss(patch_size=ps, stride=1),
                         "depth": mm.MaskedL1Loss(patch_size=ps, stride=1),
                         "semseg": mm.MaskedCrossEntropyLoss(patch_size=ps, stride=4, label_smoothing=0.0),
                         "norm_rgb": mm.MaskedMSELoss(patch_size=ps, stride=1, norm_pix=True)}
        self.balancer = up.task_balancing.NoWeightingStrategy().to(device)
        args = types.SimpleNamespace(opt="adamw", weight_decay=0.05, lr=1e-4, opt_eps=1e-8, opt_betas=[0.9, 0.95],
                                     balancer_lr_scale=1.0, momentum=0.9)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
            self.optimizer = up.optim_factory.create_optimizer(args, {"model": self.model, "balancer": self.balancer})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp.GradScaler is deprecated
            self.scaler = up.native_scaler.NativeScalerWithGradNormCount(enabled=False)
        self.tasks = {m: batch[m] for m in MODALITIES}

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def __call__(self) -> float:
        """Their ``train_one_epoch`` loop body for one batch (learning-rate schedule and logging
        writers aside): truncated depth standardisation by a full sort, forward with random
        masking, masked losses, ``.item()`` of every loss, backward, gradient norm, AdamW."""
        with warnings.catch_warnings():  # their code calls APIs that torch now deprecates
            warnings.simplefilter("ignore")
            return self._step()

    def _step(self) -> float:
        tasks = dict(self.tasks)
        depth = tasks["depth"]
        flat = torch.sort(depth.flatten(1), dim=1)[0]
        n = flat.shape[1]
        trunc = flat[:, int(0.1 * n): int(0.9 * n)]
        tasks["depth"] = (depth - trunc.mean(dim=1)[:, None, None, None]) / torch.sqrt(
            trunc.var(dim=1)[:, None, None, None] + 1e-6)
        inputs = {m: tasks[m] for m in MODALITIES}
        with self.autocast():
            preds, masks = self.model(inputs, num_encoded_tokens=self.p.num_encoded, alphas=1.0,
                                      sample_tasks_uniformly=False, fp32_output_adapters=[])
            tasks["norm_rgb"] = tasks["rgb"]
            masks["norm_rgb"] = masks.get("rgb", None)
            task_losses = {t: self.loss_fns[t](preds[t].float(), tasks[t], mask=masks.get(t, None)) for t in preds}
            weighted = self.balancer(task_losses)
            loss = sum(weighted.values())
        loss_value = sum(task_losses.values()).item()
        _ = {t: v.item() for t, v in task_losses.items()}
        _ = {t: v.item() for t, v in weighted.items()}
        self.optimizer.zero_grad()
        grad_norm = self.scaler(loss, self.optimizer, clip_grad=None, skip_grad=None,
                                parameters=self.model.parameters(), create_graph=False)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        float(grad_norm)  # their metric logger reads it
        return loss_value
