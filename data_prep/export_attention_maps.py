#!/usr/bin/env python
"""Precompute one attention map per sample for AttG loss weighting (``loss.attg.source=data``).

Two methods (``--method``):

- ``attention`` (default): the model's :meth:`MultiMAE.attention_scores`, as below;
- ``tokencut``: TokenCut object discovery (:mod:`multimae_att.scoring.tokencut`; the AttG paper's best
  map source): the keys of the checkpoint's last attention layer (ours, or a timm / DINO ViT
  file with ``--modalities rgb``), each modality's keys L2-normalised and concatenated per token
  position (so the graph's similarity is the mean of the modalities' cosine similarities), a
  normalized cut of the binary similarity graph (``--tokencut-tau``, ``--tokencut-eps``), the
  foreground side chosen as TokenCut does (the side holding the largest-magnitude entry of the
  second eigenvector). ``--tokencut-map eigenvector`` (default) stores that eigenvector, signed
  foreground-positive and min-max normalised (a continuous map for AttG's min-max and exp);
  ``component`` stores TokenCut's binary object mask (the connected foreground component that
  holds the seed). Everything else below (whole image, grid, PNG, layout) is the same.

For every sample of a split, the model's :meth:`MultiMAE.attention_scores` is run on the WHOLE
source image (the loader's evaluation mode with ``eval_full_image``: the full source resized to
``--image-size``, aspect not kept, no flip), unmasked, in eval mode. The per-modality scores
``[B, N_m]`` (all modalities share one ``gh x gw`` token grid, ``gh = image_size / patch``) are
**averaged over the input modalities**, reshaped row-major to ``[gh, gw]`` (token ``i`` = row
``i // gw``, column ``i % gw``), min-max normalised per sample (AttG min-max normalises its
scores per image anyway, so nothing is lost; a constant map is stored as zeros) and stored as a
**16-bit greyscale PNG** of ``gh x gw`` pixels (value ``round(map * 65535)``). The loader crops
this map with the sample's box (scaled to the map's grid) and resizes it to the token grid of the
training crop, so training reads maps of the full image with the right crop and flip.

Output, in the layout the loader reads (``--out`` defaults to the dataset root itself):

- folders: ``OUT/<split>/att_map/<class>/<stem>.png`` (same class folder as the sample's other
  modalities, so the folder loader pairs it by stem);
- shards (``--format shards``, shard sources only): every shard is rewritten as
  ``OUT/shards/<name>.tar`` with the original members plus ``KEY.att_map.png``; the index
  ``<split>.json`` and ``<split>.keys.txt`` are copied. With ``--out`` = the dataset root the
  shards are replaced in place (each written to a temporary file, then renamed).

Model options come from ``--model-size`` etc. when given, else from the config stored in our
checkpoints (``config.model``), else they are inferred from the weights (width -> size, patch
size, number of global tokens, semseg classes). Deterministic: no randomness, fixed order.

Usage::

    python data_prep/export_attention_maps.py --data data/synthetic --checkpoint runs/demo/final.pth \\
        --image-size 96 [--split train] [--modalities rgb depth semseg] [--layer -1] \\
        [--query global|mean] [--batch-size 16] [--out DIR] [--format folder|shards] \\
        [--method attention|tokencut] [--tokencut-map eigenvector|component]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import multimae_att  # noqa: F401  (before torch/torchvision users: the CPU torchvision guard)
from multimae_att.checkpoint import load_checkpoint, load_weights, model_state, to_layout
from multimae_att.data import build_loader, robust_standardize_depth
from multimae_att.hub import resolve_checkpoint
from multimae_att.model import create_pretrain_model
from multimae_att.model.factory import ENCODER_SIZES
from multimae_att.scoring.tokencut import last_layer_keys, ncut_maps, seed_component

MODALITIES = ("rgb", "depth", "semseg")
SCALE = 65535  # 16-bit PNG


# ---------------------------------------------------------------------------- model
def infer_model_options(state: Mapping[str, torch.Tensor], stored: Mapping[str, Any]) -> dict[str, Any]:
    """Model options from the checkpoint's stored ``config.model`` or, failing that, its weights."""
    opts: dict[str, Any] = {k: stored[k] for k in ("size", "patch_size", "num_global_tokens",
                                                    "semseg_num_classes") if k in stored}
    if "global_tokens" in state:
        g = state["global_tokens"]
        opts.setdefault("num_global_tokens", int(g.shape[1]))
        by_dim = [s for s, v in ENCODER_SIZES.items() if v["dim_tokens"] == g.shape[-1]]
        if by_dim:
            opts.setdefault("size", by_dim[0])
    for m in ("rgb", "depth"):
        key = f"input_adapters.{m}.proj.weight"
        if key in state:
            opts.setdefault("patch_size", int(state[key].shape[-1]))
    key = "input_adapters.semseg.class_emb.weight"
    if key in state:
        opts.setdefault("semseg_num_classes", int(state[key].shape[0]))
    return opts


def load_model(path: str, modalities: Sequence[str], image_size: int | None,
               overrides: Mapping[str, Any]) -> tuple[torch.nn.Module, int, int]:
    """Encoder + the input adapters of ``modalities`` (decoders left out), weights loaded checked.

    Returns ``(model in eval mode, patch size, image size)``. ``overrides``: options given on the
    command line (None = not given). ``image_size`` None: the stored ``config.data.image_size``,
    else 224.
    """
    path = os.fspath(resolve_checkpoint(path))  # a published name or a URL -> the cached file
    checkpoint = load_checkpoint(path)
    state = to_layout(model_state(checkpoint, source=path), "multimae")
    config = checkpoint.get("config", {}) if isinstance(checkpoint, Mapping) else {}
    config = config if isinstance(config, Mapping) else {}
    stored = config.get("model", {}) if isinstance(config.get("model"), Mapping) else {}
    if image_size is None:
        data = config.get("data", {}) if isinstance(config.get("data"), Mapping) else {}
        image_size = int(data.get("image_size", 224))
    opts = infer_model_options(state, stored)
    opts.update({k: v for k, v in overrides.items() if v is not None})
    if "size" not in opts:
        raise SystemExit(f"{path}: cannot tell the model size; pass --model-size")
    opts.setdefault("patch_size", 16)
    model = create_pretrain_model(opts["size"], in_domains=list(modalities), out_domains=(),
                                  extra_norm_rgb=False, patch_size=opts["patch_size"],
                                  image_size=image_size,
                                  num_global_tokens=opts.get("num_global_tokens", 1),
                                  semseg_num_classes=opts.get("semseg_num_classes", 133))
    unused = ["output_adapters.*"] + [f"input_adapters.{m}.*" for m in MODALITIES if m not in modalities]
    load_weights(model, state, expected_unexpected=unused)
    return model.eval(), int(opts["patch_size"]), image_size


# ---------------------------------------------------------------------------- maps
def combine_scores(scores: Mapping[str, torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Per-modality scores ``[B, N]`` (N = gh * gw, row-major) -> one map ``[B, gh, gw]`` in [0, 1].

    Mean over modalities, then per-sample min-max normalisation (a constant map becomes zeros).
    """
    mean = torch.stack([s.float() for s in scores.values()]).mean(dim=0)
    if mean.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"scores have {mean.shape[1]} tokens per modality, expected {grid[0]}x{grid[1]}")
    lo = mean.amin(dim=1, keepdim=True)
    span = mean.amax(dim=1, keepdim=True) - lo
    norm = torch.where(span > 0, (mean - lo) / span.clamp_min(1e-30), torch.zeros_like(mean))
    return norm.view(-1, *grid)


def quantise(maps: torch.Tensor) -> np.ndarray:
    """``[B, gh, gw]`` float in [0, 1] -> uint16 ``[B, gh, gw]`` (what the loader divides by 65535)."""
    return (maps.clamp(0, 1) * SCALE).round().to(torch.int32).cpu().numpy().astype(np.uint16)


def png_bytes(array: np.ndarray) -> bytes:
    """16-bit greyscale PNG of a uint16 ``[h, w]`` array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def tokencut_map(model: torch.nn.Module, x: Mapping[str, torch.Tensor], grid: tuple[int, int],
                 tau: float = 0.2, eps: float = 1e-5, output: str = "eigenvector") -> torch.Tensor:
    """TokenCut map ``[B, gh, gw]`` in [0, 1] of the inputs ``x`` (see the module docstring)."""
    keys = last_layer_keys(model, x)
    feats = torch.cat([torch.nn.functional.normalize(k.float(), dim=-1) for k in keys.values()], dim=-1)
    eigvec, foreground = ncut_maps(feats, tau, eps)
    if output == "component":
        return seed_component(foreground, eigvec, grid).float().view(-1, *grid)
    if output != "eigenvector":
        raise ValueError(f"--tokencut-map must be eigenvector or component, got {output!r}")
    return combine_scores({"tokencut": eigvec}, grid)


@torch.inference_mode()
def compute_maps(model: torch.nn.Module, loader, modalities: Sequence[str], grid: tuple[int, int],
                 layer: int, query: str, standardize_depth: bool, device: torch.device,
                 desc: str = "attention maps", method: str = "attention",
                 tokencut: Mapping[str, Any] | None = None) -> dict[str, bytes]:
    """sample id -> PNG bytes of its map, for every sample the loader yields (eval, full image).

    ``method``: ``attention`` (``layer``, ``query``) or ``tokencut`` (``tokencut``: keywords of
    :func:`tokencut_map`)."""
    out: dict[str, bytes] = {}
    loader.set_epoch(0)
    for batch in tqdm(loader, desc=desc, unit="batch"):
        x = {}
        for m in modalities:
            t = batch[m].to(device)
            if m == "depth" and standardize_depth:  # as the pretraining step feeds depth
                t = robust_standardize_depth(t)
            x[m] = t.long() if m == "semseg" else t.float()
        if method == "tokencut":
            maps = tokencut_map(model, x, grid, **dict(tokencut or {}))
        else:
            scores = model.attention_scores(x, layer=layer, query=query)
            maps = combine_scores({m: scores[m] for m in modalities}, grid)
        arrays = quantise(maps)
        for sample_id, array in zip(batch["sample_id"], arrays):
            if sample_id in out:
                raise ValueError(f"sample id {sample_id!r} occurs twice in the data")
            out[sample_id] = png_bytes(array)
    return out


# ---------------------------------------------------------------------------- writers
def write_folder(maps: Mapping[str, bytes], dataset, out: Path, split: str) -> int:
    """``out/<split>/att_map/<class>/<stem>.png``, class folder = the sample's other modalities'."""
    ref = dataset.image_modalities[0]
    for stem, path in zip(dataset.stems, dataset.paths[ref]):
        target = out / split / "att_map" / path.parent.name / f"{stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(maps[stem])
        os.replace(tmp, target)
    return len(dataset.stems)


def _rewrite_shard(src: Path, dst: Path, maps: Mapping[str, bytes]) -> int:
    """Copy the tar ``src`` to ``dst`` adding ``KEY.att_map.png`` after each key's last member."""
    tmp = dst.with_name(dst.name + ".tmp")
    written = 0
    with tarfile.open(src) as tin, tarfile.open(tmp, "w") as tout:
        # Maps of an earlier export are dropped (and replaced) so that a re-run stays idempotent.
        members = [m for m in tin.getmembers() if m.isfile() and not m.name.endswith(".att_map.png")]
        for i, member in enumerate(members):
            key = member.name.split(".", 1)[0]
            tout.addfile(member, tin.extractfile(member))
            last = i + 1 == len(members) or members[i + 1].name.split(".", 1)[0] != key
            if last:
                if key not in maps:
                    raise KeyError(f"{src}: no attention map computed for key {key!r}")
                info = tarfile.TarInfo(f"{key}.att_map.png")
                info.size, info.mtime, info.mode = len(maps[key]), member.mtime, member.mode
                tout.addfile(info, io.BytesIO(maps[key]))
                written += 1
    os.replace(tmp, dst)
    return written


def write_shards(maps: Mapping[str, bytes], index: Path, out: Path, split: str) -> int:
    """Rewrite every shard of ``index`` (``<split>.json``) into ``out/shards/`` with the maps."""
    meta = json.loads(index.read_text())
    (out / "shards").mkdir(parents=True, exist_ok=True)
    written = sum(_rewrite_shard(index.parent / name, out / "shards" / Path(name).name, maps)
                  for name in tqdm(meta["shards"], desc="shards", unit="shard"))
    for extra in (index, index.with_name(f"{split}.keys.txt")):
        target = out / "shards" / extra.name
        if extra.is_file() and extra.resolve() != target.resolve():
            shutil.copyfile(extra, target)
    return written


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset root (folders ROOT/<split>/ or ROOT/shards/<split>.json)")
    p.add_argument("--checkpoint", required=True,
                   help="MultiMAE weights or our export (any layout the checkpoint module loads): a path, "
                        "a URL or a published name (python -m multimae_att.checkpoint list)")
    p.add_argument("--split", default="train")
    p.add_argument("--format", choices=("folder", "shards"), default=None,
                   help="output layout (default: the layout of --data)")
    p.add_argument("--out", default=None, help="output root (default: --data itself, beside the data)")
    p.add_argument("--modalities", nargs="+", default=list(MODALITIES), choices=MODALITIES,
                   help="model inputs whose scores are averaged into the map")
    p.add_argument("--image-size", type=int, default=None,
                   help="side the full image is resized to (default: the checkpoint's data.image_size, else 224)")
    p.add_argument("--layer", type=int, default=-1, help="readout block (Python index)")
    p.add_argument("--query", choices=("global", "mean"), default="global")
    p.add_argument("--method", choices=("attention", "tokencut"), default="attention",
                   help="attention: the model's attention scores; tokencut: a normalized cut of the "
                        "last layer's key similarities (TokenCut object discovery)")
    p.add_argument("--tokencut-tau", type=float, default=0.2, help="TokenCut: similarity threshold of the graph")
    p.add_argument("--tokencut-eps", type=float, default=1e-5, help="TokenCut: weight of the other edges")
    p.add_argument("--tokencut-map", choices=("eigenvector", "component"), default="eigenvector",
                   help="TokenCut: the foreground-positive eigenvector (continuous) or the seed's object mask")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--model-size", choices=sorted(ENCODER_SIZES), default=None)
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--num-global-tokens", type=int, default=None)
    p.add_argument("--semseg-num-classes", type=int, default=None)
    p.add_argument("--no-standardize-depth", action="store_true",
                   help="feed depth as stored / 2**16 (default: robust per-sample standardisation, as pretraining)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    overrides = {"size": args.model_size, "patch_size": args.patch_size,
                 "num_global_tokens": args.num_global_tokens, "semseg_num_classes": args.semseg_num_classes}
    model, patch, size = load_model(args.checkpoint, args.modalities, args.image_size, overrides)
    model.to(device)
    if size % patch:
        raise SystemExit(f"--image-size {size} is not a multiple of the patch size {patch}")
    grid = (size // patch, size // patch)
    loader = build_loader(args.data, list(args.modalities), batch_size=args.batch_size,
                          num_workers=args.num_workers, split=args.split, image_size=size,
                          train=False, eval_full_image=True, drop_last=False, semseg_scale=4,
                          att_map_stride=patch, layout=args.format or "auto")
    from multimae_att.data import FolderDataset

    is_folder = isinstance(loader.dataset, FolderDataset)
    fmt = args.format or ("folder" if is_folder else "shards")
    if (fmt == "folder") != is_folder:
        raise SystemExit(f"--format {fmt} needs a {'folder' if fmt == 'folder' else 'shard'} dataset "
                         f"(the loader reads att_map only from the layout it reads the images from)")
    maps = compute_maps(model, loader, args.modalities, grid, args.layer, args.query,
                        not args.no_standardize_depth, device, desc=f"{args.method} maps", method=args.method,
                        tokencut={"tau": args.tokencut_tau, "eps": args.tokencut_eps,
                                  "output": args.tokencut_map})
    out = Path(args.out or args.data)
    if fmt == "folder":
        n = write_folder(maps, loader.dataset, out, args.split)
    else:
        index = Path(args.data) / "shards" / f"{args.split}.json" if Path(args.data).is_dir() else Path(args.data)
        if index.suffix != ".json":
            raise SystemExit("--format shards needs a dataset root or a <split>.json index as --data")
        n = write_shards(maps, index, out, args.split)
    print(f"wrote {n} {args.method} maps ({grid[0]}x{grid[1]}, 16-bit PNG) for {args.split} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
