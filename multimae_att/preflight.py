"""Checks a run makes before any work: nothing is written, nothing large is built or loaded.

:func:`check_pretrain` and :func:`check_finetune` are the first thing the runners do with a
loaded config (the config's own per-key and cross-field checks ran when it was loaded). They
look at what the config points to and at what depends on the model size:

* ``data.root``: a local root must hold the split(s) in the chosen layout;
* ``init.checkpoint``: the file must exist and be structurally a checkpoint (its head and zip
  directory are read, not its tensors), so a text file or a truncated download is one line
  naming the file, not a traceback after ``config.yaml`` was written;
* pretraining masking: ``masking.score_layer`` within the encoder depth, decoder width and heads,
  the strategy's parameters (masks drawn once on dummy scores) and ``heads``' ``k`` against the
  encoder's head count (a default that does not fit is clamped with a note, an explicit value
  is an error with a hint);
* finetuning: ``task.randaug`` must be a RandAugment spec timm understands.

Each failure is a :class:`~multimae_att.config.ConfigError` naming the key.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from multimae_att.config import ConfigError

__all__ = ["check_checkpoint", "check_data_root", "check_finetune", "check_pretrain"]

_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://")


def check_data_root(root: str, splits: Mapping[str, str], layout: str, key: str = "data.root") -> None:
    """A local ``root`` must exist and hold every split (``splits``: config key -> split name) as
    a folder ``root/<split>/`` or a shard index ``root/shards/<split>.json`` (``layout``: auto,
    folder or shards); remote and pattern specs are left to the loader."""
    if root.startswith(_REMOTE) or "{" in root:
        return
    path = Path(root)
    if not path.exists():
        raise ConfigError(f"{key}={root!r} does not exist (generate the synthetic set with "
                          "`python data_prep/make_synthetic.py --out DIR` or point data.root at your data)")
    if not path.is_dir():
        return  # a shard list file or a single shard: resolved by the loader
    for split_key, split in splits.items():
        where = {"folder": path / split, "shards": path / "shards" / f"{split}.json"}
        found = [name for name, p in where.items() if (p.is_dir() if name == "folder" else p.is_file())]
        if (layout == "auto" and not found) or (layout != "auto" and layout not in found):
            wanted = " or ".join(str(where[n]) for n in (where if layout == "auto" else [layout]))
            raise ConfigError(f"{key}={root!r} has no {split_key}={split!r} split: expected {wanted}")


def _layout(root: str, split: str, layout: str) -> str:
    """The layout the loader will use for ``split`` of ``root`` (after :func:`check_data_root`)."""
    if layout != "auto":
        return layout
    return "folder" if (Path(root) / split).is_dir() else "shards"


def check_checkpoint(spec: str, key: str = "init.checkpoint") -> None:
    """``spec`` (a published name, a URL or a path: :func:`multimae_att.hub.resolve_checkpoint`,
    which downloads once into the hub cache) names a file that is structurally a checkpoint
    (cheap: no tensor is read)."""
    from multimae_att.checkpoint import UnreadableCheckpointError, check_checkpoint_file
    from multimae_att.hub import CheckpointHashError, resolve_checkpoint

    try:
        path = os.fspath(resolve_checkpoint(spec))
    except (FileNotFoundError, CheckpointHashError, ValueError) as e:
        raise ConfigError(f"{key}={spec!r}: {e}") from None
    try:
        check_checkpoint_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{key}={spec!r}: {path} does not exist") from None
    except UnreadableCheckpointError as e:
        raise ConfigError(f"{key}: {e}") from None


def _print_once(text: str) -> None:
    """Print on the first process only (the runners check before the accelerator exists)."""
    if os.environ.get("RANK", "0") == "0":
        print(text)


def check_pretrain(cfg, print_fn: Callable[[str], None] = _print_once) -> None:
    """Everything a pretraining run can check before work (see the module docstring).

    May fill in ``masking.params.k`` for a per-head strategy whose default does not fit the model
    (printing a note), so that the saved config records the value used.
    """
    from multimae_att.model.factory import DECODER_SIZES, ENCODER_SIZES

    splits = {"data.split": cfg.data.split}
    if cfg.log.heldout_split is not None and cfg.masking.score_source == "predicted_loss":
        splits["log.heldout_split"] = cfg.log.heldout_split    # the loss predictor's held-out images
    check_data_root(cfg.data.root, splits, cfg.data.layout)
    if cfg.init.checkpoint:
        check_checkpoint(cfg.init.checkpoint)
    enc = ENCODER_SIZES[cfg.model.size]
    depth, heads = enc["depth"], enc["num_heads"]
    if not -depth <= cfg.masking.score_layer < depth:
        raise ConfigError(f"masking.score_layer={cfg.masking.score_layer} is not a block of the "
                          f"{depth}-block encoder of model.size={cfg.model.size!r} (use -{depth}..{depth - 1})")
    dec = {k: v if v is not None else DECODER_SIZES[cfg.model.size][k]
           for k, v in (("decoder_dim", cfg.model.decoder_dim), ("decoder_heads", cfg.model.decoder_heads))}
    if dec["decoder_dim"] % dec["decoder_heads"]:
        raise ConfigError(f"model.decoder_dim={dec['decoder_dim']} must be a multiple of "
                          f"model.decoder_heads={dec['decoder_heads']} (model.size={cfg.model.size!r})")
    _fit_head_count(cfg, heads, print_fn)
    check_masking(cfg, heads)


def _fit_head_count(cfg, heads: int, print_fn: Callable[[str], None]) -> None:
    """``k`` heads of a per-head strategy must exist: clamp a default, reject an explicit value."""
    from multimae_att.masking import STRATEGIES

    strategy = STRATEGIES[cfg.masking.strategy]
    if not strategy.per_head or "k" not in strategy.defaults:
        return
    k = cfg.masking.params.get("k", strategy.defaults["k"])
    if isinstance(k, bool) or not isinstance(k, int) or 1 <= k <= heads:
        return  # a wrong type is reported by the dry run of check_masking
    if "k" in cfg.masking.params:
        raise ConfigError(f"masking.params.k={k}: model.size={cfg.model.size!r} has {heads} attention "
                          f"heads; choose masking.params.k in [1, {heads}]")
    cfg.masking.params["k"] = heads
    print_fn(f"note: masking.strategy={cfg.masking.strategy!r} defaults to k={k} heads but "
             f"model.size={cfg.model.size!r} has {heads}; using masking.params.k={heads}")


def check_masking(cfg, heads: int) -> None:
    """Draw masks once on dummy scores, so that shape-dependent strategy parameters fail before
    training, naming the config keys."""
    import torch

    from multimae_att.pretrain.setup import build_policy

    n = (cfg.data.image_size // cfg.model.patch_size) ** 2
    policy = build_policy(cfg)
    shape = (1, heads, n) if policy.per_head else (1, n)
    scores = {m: torch.rand(shape) for m in cfg.model.in_modalities}
    try:
        visible = policy.budgets([n] * len(scores), cfg.masking.num_encoded_tokens, 1)
        policy(scores, visible, float("inf"), num_tokens=dict.fromkeys(scores, n), progress=1.0)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"masking.strategy={cfg.masking.strategy!r}, masking.params="
                          f"{cfg.masking.params}: {e}") from e


def check_finetune(cfg) -> None:
    """Everything a finetuning run can check before work (see the module docstring)."""
    check_data_root(cfg.data.root, {"data.train_split": cfg.data.train_split,
                                    "data.val_split": cfg.data.val_split}, cfg.data.layout)
    if cfg.init.checkpoint:
        check_checkpoint(cfg.init.checkpoint)
    if cfg.data.max_eval_samples is not None and _layout(cfg.data.root, cfg.data.val_split,
                                                         cfg.data.layout) == "shards":
        raise ConfigError(f"data.max_eval_samples={cfg.data.max_eval_samples} needs the folder layout "
                          f"(sorted file stems); data.root={cfg.data.root!r} is read from shards")
    if cfg.task_facts().augments and cfg.task.randaug:
        from multimae_att.finetune.augment import RandAugmentRGB

        try:
            RandAugmentRGB(cfg.task.randaug)
        except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:  # timm's ways of saying "bad spec"
            raise ConfigError(f"task.randaug={cfg.task.randaug!r} is not a timm RandAugment spec "
                              f"such as 'rand-m9-mstd0.5-inc1' ({type(e).__name__}: {e})") from None
