"""Crop-aware attention cache: per-sample token scores kept on a canonical grid over the SOURCE image.

Why: a scoring pass runs the encoder over all tokens (588 at 224 px) while the training pass sees
98, so a fresh pass each step costs more than the step itself. AMT's code refreshes one map per
image every 40 epochs from a pass over the whole image (resized to 224 x 224), but every training
crop reads it by slicing the 14 x 14 map with pixel offsets divided by the image size, i.e. the
top-left 2-3 cells whatever the crop (README: "Where AMT here differs"). Here the scores are
stored in *source-image* coordinates and every read resamples them through the crop box and flip,
so a cached map follows the image content. The maps hold whatever the run's score source gives
(``masking.score_source``: attention or predicted losses; recorded as ``source`` in meta.json).

Storage (one directory, created once by the main process with :meth:`AttentionCache.create`)::

    meta.json    {"version", "modalities", "grid", "dtype", "normalize", "num_rows", "source"}
    ids.txt      one sample id per line; the id on line i (0-based) owns row i of the arrays
    scores.npy   [R, M, G, G] float16/float32, memory-mapped: per-modality maps over the source
                 image; cell (i, j) covers source rows [i H/G, (i+1) H/G), cols [j W/G, (j+1) W/G)
    stamps.npy   [R, G, G] int16, memory-mapped: epoch at which the cell was last written,
                 ``MISSING`` (-32768) when never written

Sample ids are the batch's stable ``sample_id`` strings (file stems / shard keys, see
docs/INTERFACES.md). The id list is fixed at creation (a dataset lists its ids), so every process
maps an id to the same row without coordination; ids that are not in the list are treated as
missing by :meth:`lookup` and skipped by :meth:`update` (counted in :attr:`stats`).

Geometry (batch keys ``crop_box`` = (top, left, height, width) in source pixels, ``flip``,
``source_size`` = (H, W)): a token grid of h x w tokens tiles the crop; the crop is flipped
horizontally after cropping, so token column j sits at crop column ``w - 1 - j`` before the flip.
Both directions are one batched affine ``grid_sample`` per modality (no loop over samples):
``lookup`` samples the canonical map at the token centres of the new crop, ``update`` samples the
token map at the canonical cell centres (the inverse affine map) and writes the cells under the
crop. Maps are written from whatever pass the runner has: a crop pass fills the part of the map
under that crop (cells within one cell of the crop, so a later read of the same crop is complete);
a full-image pass (``crop_box`` = the whole source, ``flip`` False) fills it all. A full-image pass
is the better source (complete coverage, one pass per refresh, as AMT does every 40 epochs): the
runner runs :func:`refresh_cache` over whole training images at the start of each refresh window
(``masking.cache.refresh=full``, default; :mod:`multimae_att.scoring.refresh`). With
``refresh=crops`` it runs no such pass and the training step's own crop passes fill the cache.

Freshness: a cell is fresh at epoch e when it was written at epoch s with ``e - s < max_age``
(if set) and in the same refresh period, ``s // refresh_every == e // refresh_every`` (if set;
AMT-style refresh of every map every K epochs). A sample is valid when every cell that its token
grids read (bilinear neighbours included) is fresh; invalid samples need a fresh scoring pass
(:meth:`fill` does that and writes the result back).

Scale: softmax scores of different passes differ in scale (the softmax runs over different
token sets). With ``normalize=True`` each written map is divided by its mean over the crop's
tokens, so partial overwrites of a map stay consistent; rankings (``high``/``low``), AMT's Gumbel
top-k on log-weights and AttG's min-max normalisation are all invariant to that scale.

Processes: arrays are opened lazily per process (and reopened after a fork), so DataLoader workers
and DDP ranks can share one cache on one node. Writes go to the shared page cache; each rank
writes only the rows of its own samples (a distributed sampler gives ranks disjoint samples), so
no two processes write one row at once. Across nodes the memory maps are not coherent: give each
node its own cache directory (or gather scores to one writer). Call :meth:`flush` at epoch ends.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from multimae_att.atomic import write_text_atomic

MISSING = -32768  # stamp of a cell that was never written (int16 minimum)
_FORMAT_VERSION = 1
_DTYPES = {"float16": np.float16, "float32": np.float32}


def _norm_flip(flip: torch.Tensor | Sequence[bool], batch: int, device: torch.device) -> torch.Tensor:
    flip = torch.as_tensor(flip, device=device).reshape(-1)
    if flip.numel() != batch:
        raise ValueError(f"batch['flip'] has {flip.numel()} entries, expected {batch}")
    return flip.bool()


def crop_affine(batch: Mapping, device: torch.device | None = None) -> torch.Tensor:
    """Affine maps from crop-frame to source-frame normalised coordinates, ``[B, 2, 3]`` float32.

    Coordinates follow ``F.affine_grid(..., align_corners=False)``: -1 and +1 are the outer edges
    of the image. Row 0 maps the crop's x (after the flip) to the source's x, row 1 maps y.
    Reads batch keys ``crop_box`` [B, 4] (top, left, height, width, source pixels), ``flip`` [B]
    and ``source_size`` [B, 2] (H, W).
    """
    for key in ("crop_box", "flip", "source_size"):
        if key not in batch:
            raise KeyError(f"attention cache needs batch key '{key}' (see docs/INTERFACES.md)")
    box = torch.as_tensor(batch["crop_box"], dtype=torch.float32, device=device).reshape(-1, 4)
    size = torch.as_tensor(batch["source_size"], dtype=torch.float32, device=box.device).reshape(-1, 2)
    if size.shape[0] != box.shape[0]:
        raise ValueError(f"batch['source_size'] has {size.shape[0]} rows, crop_box has {box.shape[0]}")
    flip = _norm_flip(batch["flip"], box.shape[0], box.device)
    top, left, height, width = box.unbind(1)
    src_h, src_w = size.unbind(1)
    theta = torch.zeros(box.shape[0], 2, 3, device=box.device)
    # x_src = sx * x_crop + tx with sx = +-width/W (a flip mirrors the crop), tx = crop centre.
    theta[:, 0, 0] = torch.where(flip, -width / src_w, width / src_w)
    theta[:, 0, 2] = (2 * left + width) / src_w - 1
    theta[:, 1, 1] = height / src_h
    theta[:, 1, 2] = (2 * top + height) / src_h - 1
    return theta


def invert_affine(theta: torch.Tensor) -> torch.Tensor:
    """Inverse of the diagonal affine maps made by :func:`crop_affine` (``[B, 2, 3]``)."""
    inv = torch.zeros_like(theta)
    sx, sy = theta[:, 0, 0], theta[:, 1, 1]
    inv[:, 0, 0], inv[:, 0, 2] = 1 / sx, -theta[:, 0, 2] / sx
    inv[:, 1, 1], inv[:, 1, 2] = 1 / sy, -theta[:, 1, 2] / sy
    return inv


def sample_maps(maps: torch.Tensor, theta: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling ``[B, C, h_in, w_in] -> [B, C, h, w]`` at ``theta``-mapped cell centres.

    Border padding: points up to half a cell outside the map take the edge value.
    """
    grid = F.affine_grid(theta, [maps.shape[0], maps.shape[1], *out_hw], align_corners=False)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False)


class AttentionCache:
    """Per-sample attention scores on a canonical source-image grid; see the module docstring.

    Typical use in a training step (the runner owns this, behind ``masking.cache.enabled``)::

        scores, valid = cache.lookup(batch, token_grids, epoch)      # cached part
        scores = cache.fill(batch, scores, valid, score_fn, epoch)   # fresh pass for the rest
    """

    def __init__(self, path: str | os.PathLike, refresh_every: int | None = None,
                 max_age: int | None = None) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no attention cache at {self.path} (missing {meta_file}); "
                                    "create it with AttentionCache.create(path, sample_ids, ...)")
        meta = json.loads(meta_file.read_text())
        if meta.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{meta_file}: cache format version {meta.get('version')}, "
                             f"this code reads version {_FORMAT_VERSION}")
        self.modalities: list[str] = list(meta["modalities"])
        self.grid: int = int(meta["grid"])
        self.normalize: bool = bool(meta["normalize"])
        # what the maps hold (masking.score_source); caches written before this key held attention
        self.source: str = str(meta.get("source", "attention"))
        ids = (self.path / "ids.txt").read_text().splitlines()
        if len(ids) != meta["num_rows"]:
            raise ValueError(f"{self.path / 'ids.txt'} has {len(ids)} ids, meta.json says {meta['num_rows']}")
        self.row_of: dict[str, int] = {sid: i for i, sid in enumerate(ids)}
        for value, name in ((refresh_every, "refresh_every"), (max_age, "max_age")):
            if value is not None and value < 1:
                raise ValueError(f"AttentionCache {name} must be >= 1 or None, got {value}")
        self.refresh_every, self.max_age = refresh_every, max_age
        self.stats = {"hits": 0, "misses": 0, "unknown_ids": 0, "writes": 0}
        self._pid: int | None = None
        self._scores: np.memmap | None = None
        self._stamps: np.memmap | None = None

    # ------------------------------------------------------------------ creation / files
    @classmethod
    def create(cls, path: str | os.PathLike, sample_ids: Sequence[str], modalities: Sequence[str],
               grid: int = 32, dtype: str = "float16", normalize: bool = True,
               overwrite: bool = False, source: str = "attention", **kwargs) -> AttentionCache:
        """Create an empty cache (all cells ``MISSING``) for ``sample_ids``; main process only.

        ``sample_ids`` fixes the rows (row i = ``sample_ids[i]``); duplicates are an error.
        ``source``: what the maps will hold (``masking.score_source``), kept in meta.json.
        ``kwargs`` go to the constructor (``refresh_every``, ``max_age``).
        """
        path = Path(path)
        if (path / "meta.json").exists() and not overwrite:
            raise FileExistsError(f"attention cache already exists at {path} (pass overwrite=True)")
        if dtype not in _DTYPES:
            raise ValueError(f"attention cache dtype '{dtype}' not in {sorted(_DTYPES)}")
        ids = [str(s) for s in sample_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("attention cache sample_ids contain duplicates")
        bad = [s for s in ids if "\n" in s or "\r" in s]
        if bad:
            raise ValueError(f"sample id {bad[0]!r} contains a line break")
        path.mkdir(parents=True, exist_ok=True)
        shape = (len(ids), len(modalities), grid, grid)
        scores = np.lib.format.open_memmap(path / "scores.npy", mode="w+", dtype=_DTYPES[dtype], shape=shape)
        stamps = np.lib.format.open_memmap(path / "stamps.npy", mode="w+", dtype=np.int16,
                                           shape=(len(ids), grid, grid))
        stamps[:] = MISSING
        scores.flush(), stamps.flush()
        del scores, stamps
        (path / "ids.txt").write_text("".join(s + "\n" for s in ids))
        meta = {"version": _FORMAT_VERSION, "modalities": list(modalities), "grid": grid,
                "dtype": dtype, "normalize": normalize, "num_rows": len(ids), "source": source}
        # meta last: a cache without meta.json is incomplete
        write_text_atomic(path / "meta.json", json.dumps(meta, indent=1))
        return cls(path, **kwargs)

    def _arrays(self) -> tuple[np.memmap, np.memmap]:
        # Lazy, per process: a memmap inherited through fork still works, but reopening keeps
        # each process's file handles its own (and lets spawn-started workers pickle the object).
        if self._scores is None or self._pid != os.getpid():
            self._scores = np.load(self.path / "scores.npy", mmap_mode="r+")
            self._stamps = np.load(self.path / "stamps.npy", mmap_mode="r+")
            self._pid = os.getpid()
        return self._scores, self._stamps

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_scores"] = state["_stamps"] = state["_pid"] = None
        return state

    def flush(self) -> None:
        """Write dirty pages to disk (call at epoch ends and before checkpoints)."""
        if self._scores is not None:
            self._scores.flush()
            self._stamps.flush()

    # ------------------------------------------------------------------ rows and freshness
    def rows(self, sample_ids: Sequence[str]) -> torch.Tensor:
        """Row of each id, ``[B]`` int64, -1 for ids not in the cache."""
        return torch.tensor([self.row_of.get(str(s), -1) for s in sample_ids], dtype=torch.int64)

    def fresh(self, stamps: torch.Tensor, epoch: int) -> torch.Tensor:
        """Bool mask of fresh cells for stamps (any shape) at ``epoch``."""
        ok = stamps != MISSING
        if self.max_age is not None:
            ok &= (epoch - stamps.long()) < self.max_age
        if self.refresh_every is not None:
            ok &= torch.div(stamps.long(), self.refresh_every, rounding_mode="floor") == epoch // self.refresh_every
        return ok

    def _read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, stamps = self._arrays()
        idx = rows.clamp_min(0).numpy()
        return (torch.from_numpy(np.ascontiguousarray(scores[idx])).float(),
                torch.from_numpy(np.ascontiguousarray(stamps[idx])))

    def _check_grids(self, grids: Mapping[str, tuple[int, int]]) -> None:
        unknown = [m for m in grids if m not in self.modalities]
        if unknown:
            raise KeyError(f"modality '{unknown[0]}' is not in the attention cache at {self.path} "
                           f"(it holds {self.modalities})")

    # ------------------------------------------------------------------ read
    def lookup(self, batch: Mapping, token_grids: Mapping[str, tuple[int, int]], epoch: int,
               device: torch.device | str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Cached scores resampled to the token grids of this batch's crops.

        Args:
            batch: needs ``sample_id`` (list[str], B), ``crop_box``, ``flip``, ``source_size``.
            token_grids: modality -> (h, w) tokens of that modality over the crop (e.g. 14 x 14
                at 224 px with 16-px patches); tokens are row-major, as the adapters emit them.
            epoch: current epoch, for freshness.
            device: where the returned tensors go (default CPU).
        Returns:
            ``scores``: modality -> float32 ``[B, h*w]`` (zeros for invalid samples) and
            ``valid``: bool ``[B]``, True where the id is known and every cell read is fresh.
        """
        self._check_grids(token_grids)
        rows = self.rows(batch["sample_id"])
        canon, stamps = self._read(rows)  # [B, M, G, G], [B, G, G]
        theta = crop_affine(batch, device=torch.device("cpu"))  # the maps live on the CPU
        # Freshness travels as one more channel so each token grid needs one grid_sample call.
        maps = torch.cat([canon, self.fresh(stamps, epoch).float()[:, None]], dim=1)
        valid = rows >= 0
        out: dict[str, torch.Tensor] = {}
        for hw in {tuple(v) for v in token_grids.values()}:
            mods = [m for m in token_grids if tuple(token_grids[m]) == hw]
            chans = [self.modalities.index(m) for m in mods] + [maps.shape[1] - 1]
            sampled = sample_maps(maps[:, chans], theta, hw).flatten(2)  # [B, len(mods)+1, h*w]
            # Bilinear weights > 0 only on the (up to) 4 neighbour cells: all must be fresh.
            valid &= sampled[:, -1].amin(dim=1) > 1 - 1e-4
            for i, m in enumerate(mods):
                out[m] = sampled[:, i]
        for m in out:
            out[m] = torch.where(valid[:, None], out[m], torch.zeros(())).to(device)
        n_valid = int(valid.sum())
        self.stats["hits"] += n_valid
        self.stats["misses"] += len(rows) - n_valid
        self.stats["unknown_ids"] += int((rows < 0).sum())
        return out, valid.to(device)

    # ------------------------------------------------------------------ write
    def update(self, batch: Mapping, scores: Mapping[str, torch.Tensor], epoch: int,
               index: torch.Tensor | None = None,
               token_grids: Mapping[str, tuple[int, int]] | None = None) -> int:
        """Write scores from a scoring pass over the crops of ``batch`` into the source grid.

        Args:
            batch: as for :meth:`lookup`.
            scores: modality -> ``[b, h*w]`` token scores of the crop (every cache modality).
            epoch: stamp for the written cells (0 <= epoch < 32767).
            index: int64 ``[b]`` rows of ``batch`` the scores belong to (default: all B).
            token_grids: modality -> (h, w); default: square grids inferred from ``h*w``.
        Returns:
            the number of samples written (unknown ids are skipped).
        """
        missing = [m for m in self.modalities if m not in scores]
        if missing:  # stamps are per cell, shared by the modalities: a partial write would lie
            raise KeyError(f"AttentionCache.update needs scores for every cached modality; missing {missing}")
        if not 0 <= epoch < 32767:
            raise ValueError(f"AttentionCache epoch must be in [0, 32767), got {epoch}")
        ids = list(batch["sample_id"])
        theta = crop_affine(batch, device=torch.device("cpu"))  # the maps live on the CPU
        if index is not None:
            index = torch.as_tensor(index, dtype=torch.int64).cpu()
            ids, theta = [ids[i] for i in index.tolist()], theta[index]
        rows = self.rows(ids)
        keep = rows >= 0
        self.stats["unknown_ids"] += int((~keep).sum())
        if not bool(keep.any()):
            return 0
        rows, theta = rows[keep], theta[keep]
        inv = invert_affine(theta)
        G = self.grid
        new = []
        for m in self.modalities:
            s = scores[m].detach().float().cpu()[keep]
            h, w = self._grid_of(m, s.shape[1], token_grids)
            if self.normalize:
                s = s / s.mean(dim=1, keepdim=True).clamp_min(1e-12)
            new.append(sample_maps(s.reshape(-1, 1, h, w), inv, (G, G)))
        new_maps = torch.cat(new, dim=1)  # [b, M, G, G]
        # Cells whose centre lies within one cell of the crop: every cell a bilinear read inside
        # this crop touches (values just outside the crop are the border value, a small error).
        where = F.affine_grid(inv, [len(rows), 1, G, G], align_corners=False)  # crop coords
        margin = torch.stack([(2.0 / G) / theta[:, 0, 0].abs(), (2.0 / G) / theta[:, 1, 1].abs()], -1)
        covered = (where.abs() <= 1 + margin[:, None, None, :]).all(dim=-1)  # [b, G, G]
        old_maps, old_stamps = self._read(rows)
        merged = torch.where(covered[:, None], new_maps, old_maps)
        stamps = torch.where(covered, torch.tensor(epoch, dtype=torch.int16), old_stamps)
        arr_scores, arr_stamps = self._arrays()
        idx = rows.numpy()
        arr_scores[idx] = merged.numpy().astype(arr_scores.dtype)
        arr_stamps[idx] = stamps.numpy()
        self.stats["writes"] += len(idx)
        return len(idx)

    @staticmethod
    def _grid_of(m: str, n: int, token_grids: Mapping[str, tuple[int, int]] | None) -> tuple[int, int]:
        if token_grids is not None and m in token_grids:
            h, w = token_grids[m]
        else:
            h = w = int(round(n ** 0.5))
        if h * w != n:
            raise ValueError(f"scores['{m}'] has {n} tokens, not a {h}x{w} grid; pass token_grids")
        return int(h), int(w)

    def fill(self, batch: Mapping, scores: dict[str, torch.Tensor], valid: torch.Tensor,
             score_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]], epoch: int,
             token_grids: Mapping[str, tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
        """Complete a :meth:`lookup` result: score the invalid samples, write them back.

        ``score_fn(index)`` gets the int64 ``[b]`` batch rows that need a scoring pass and returns
        modality -> ``[b, N_m]`` scores for them (e.g. ``model.attention_scores`` on
        ``tokens[m][index]``). Returns modality -> ``[B, N_m]`` with cached rows where valid and
        fresh rows elsewhere (mean-normalised like the cache when ``normalize`` is on).
        """
        if bool(valid.all()):
            return scores
        index = (~valid).nonzero().squeeze(1)
        fresh = score_fn(index)
        self.update(batch, fresh, epoch, index=index.cpu(), token_grids=token_grids)
        out = {}
        for m, s in scores.items():
            f = fresh[m].to(s.device, s.dtype)
            if self.normalize:
                f = f / f.mean(dim=1, keepdim=True).clamp_min(1e-12)
            out[m] = s.index_put((index.to(s.device),), f)
        return out


@torch.no_grad()
def refresh_cache(cache: AttentionCache, model: torch.nn.Module, batches: Iterable[Mapping], epoch: int,
                  inputs_fn: Callable[[Mapping], Mapping[str, torch.Tensor]] | None = None,
                  token_grids: Mapping[str, tuple[int, int]] | None = None,
                  source: Callable | None = None, **score_kwargs) -> int:
    """Full-image refresh: score every batch with ``model.attention_scores`` (or with the score
    source ``source``, see :mod:`multimae_att.scoring`) and write it.

    ``batches``: batches whose ``crop_box`` is the whole source and ``flip`` False (the data
    pipeline's evaluation mode with ``AugmentConfig(train=False, eval_full_image=True)``), so
    one pass fills every cell of every map; run it at the start of each refresh period (each
    rank over its own share of the samples). ``inputs_fn(batch)`` gives the model inputs
    (default: the cache's modalities from the batch, on the model's device); ``score_kwargs``
    go to ``attention_scores`` (``layer``, ``query``). Returns the number of samples written.
    """
    device = next(model.parameters()).device
    written = 0
    for batch in batches:
        inputs = inputs_fn(batch) if inputs_fn is not None else {m: batch[m].to(device) for m in cache.modalities}
        scores = (source(model, inputs).scores if source is not None
                  else model.attention_scores(inputs, **score_kwargs))
        written += cache.update(batch, scores, epoch, token_grids=token_grids)
    cache.flush()
    return written
