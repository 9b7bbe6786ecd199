"""The runner's side of the attention cache (``masking.cache.*``): creation and full-image refreshes.

With ``masking.cache.refresh=full`` (default) the maps come from a full-image scoring pass over
the training split (:func:`multimae_att.scoring.cache.refresh_cache`, an evaluation-mode loader
with ``eval_full_image=True``: crop box = the whole source, no flip) at the start of every
refresh window. Every later lookup in that window hits, so training writes nothing to the cache.

Refresh windows (:func:`refresh_point`): epoch ``e`` belongs to the window that starts at
``K * (e // K) + A * ((e % K) // A)`` (K = ``refresh_every``, A = ``max_age``; a missing one
drops its term), so a window never outlives either limit and every cell read is fresh.

Skipped windows: a window where nothing reads the cache gets no refresh pass (and no state save
before it): no step of it needs scores for masking (``masking.strategy=random``, the whole window
inside ``masking.warmup_epochs``, ``masking.prob=0``, or a per-head strategy, whose scores never
come from the cache), and AttG does not take this step's scores (``loss.attg.source=scores``).
Pictures read scores too, but only of a few samples: they get them from a scoring pass on a
cache miss (:meth:`AttentionCache.fill`), which is why they do not need a refresh. The decision
depends on the config and the window only, so a resumed run takes the same one.

Exact resume: a refresh is a deterministic function of the weights at the step where it runs
(no grad, eval mode, fixed loader order and batches). The runner therefore saves a training
state at that step *before* refreshing (unless one was just saved), and records the finished
refresh in ``<cache>/refresh.json`` (window, step). A restarted run whose window matches that
record, with a record step <= its own, reuses the cache (it was written from the same weights
as in the uninterrupted run); otherwise it refreshes again from its restored weights, which are
those of the window's start, because the newest state is never older than the newest refresh.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from multimae_att.atomic import write_text_atomic
from multimae_att.pretrain.config import PretrainConfig

__all__ = ["build_cache", "refresh_point", "window_end", "window_reads_cache", "CacheRefresher",
           "REFRESH_RECORD"]

REFRESH_RECORD = "refresh.json"


def build_cache(cfg: PretrainConfig, loader: Any, accelerator: Any):
    """The run's :class:`AttentionCache` (created by the main process on first use) or None."""
    c = cfg.masking.cache
    if not c.enabled:
        return None
    from multimae_att.scoring.cache import AttentionCache

    path = Path(c.path or Path(cfg.output_dir) / "attention_cache")
    if accelerator.is_main_process and not (path / "meta.json").exists():
        ids = loader.sample_ids()
        if ids is None:
            raise ValueError("masking.cache needs the list of sample ids (folder layout or a "
                             "<split>.keys.txt next to the shard index)")
        AttentionCache.create(path, ids, cfg.model.in_modalities, grid=c.grid, dtype=c.dtype,
                              normalize=c.normalize, source=cfg.masking.score_source)
    accelerator.wait_for_everyone()
    cache = AttentionCache(path, refresh_every=c.refresh_every, max_age=c.max_age)
    if cache.source != cfg.masking.score_source:
        from multimae_att.config import ConfigError

        raise ConfigError(f"masking.cache.path={str(path)!r} holds {cache.source} scores, but "
                          f"masking.score_source={cfg.masking.score_source!r}; use another cache path")
    return cache


def refresh_point(epoch: int, refresh_every: int | None, max_age: int | None) -> int:
    """First epoch of the refresh window holding ``epoch`` (see the module docstring)."""
    base, rest = 0, epoch
    if refresh_every is not None:
        base, rest = refresh_every * (epoch // refresh_every), epoch % refresh_every
    if max_age is not None:
        base += max_age * (rest // max_age)
    return base


def window_end(point: int, refresh_every: int | None, max_age: int | None) -> float:
    """First epoch after the window that starts at ``point`` (``inf`` without either limit)."""
    ends = [math.inf]
    if refresh_every is not None:
        ends.append(refresh_every * (point // refresh_every + 1))
    if max_age is not None:
        ends.append(point + max_age)
    return min(ends)


def window_reads_cache(policy: Any, start: float, end: float, attg_scores: bool) -> bool:
    """Whether any step with epoch in ``[start, end)`` reads the cache for masking or AttG.

    ``policy``: the run's :class:`multimae_att.masking.MaskingPolicy`; its ``needs_scores`` only
    changes over the run at ``warmup_epochs`` (guided from then on), so checking ``start`` and
    the end of the warm-up covers every epoch of the window. Per-head strategies score afresh.
    """
    if policy.per_head:
        return False
    if attg_scores:
        return True
    return any(policy.needs_scores(e) for e in (start, max(start, policy.warmup_epochs)) if e < end)


class CacheRefresher:
    """Runs the full-image refresh at the start of each window (``masking.cache.refresh=full``).

    ``maybe_refresh(step, epoch, save_fn)`` is called by every process before each step;
    ``save_fn()`` saves the training state of ``step`` (all processes call it together).
    ``policy`` (the run's masking policy) and ``last_epoch`` (the epoch of the run's last step)
    let it skip windows that nothing reads (see the module docstring); without ``policy`` every
    window is refreshed. ``source``: the run's score source (:mod:`multimae_att.scoring`), so the
    refresh writes the scores the steps would compute (``masking.score_source``, ``score_norm``).
    """

    def __init__(self, cfg: PretrainConfig, cache: Any, model: Any, accelerator: Any,
                 resumed_step: int | None, policy: Any = None, last_epoch: float = math.inf,
                 source: Any = None) -> None:
        self.cfg, self.cache, self.model, self.accelerator = cfg, cache, model, accelerator
        self.source = source  # the run's score source (None: attention at masking.score_layer/query)
        self.policy, self.last_epoch = policy, last_epoch
        self.c = cfg.masking.cache
        self.record_file = Path(cache.path) / REFRESH_RECORD
        self.done: int | None = None   # window refreshed (or verified) in this process
        self.resumed_step = resumed_step  # None: a fresh start (never trust an old record)
        self.last_saved: int | None = resumed_step

    def _record(self) -> dict | None:
        try:
            return json.loads(self.record_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def maybe_refresh(self, step: int, epoch: float, save_fn) -> bool:
        """Refresh if ``epoch`` starts a new window; returns True when a refresh pass ran."""
        point = refresh_point(int(epoch), self.c.refresh_every, self.c.max_age)
        if point == self.done:
            return False
        if not self._window_reads_cache(point):
            self.done = point  # same decision in every process and after a resume: no barrier
            self.accelerator.print(f"attention cache: no refresh at step {step} (epoch {int(epoch)}): "
                                   "no step of this window reads the cache")
            return False
        if self.done is None and self.resumed_step is not None:
            rec = self._record()  # every process reads the same file: same decision
            # No process may touch the record (a refresh unlinks it) before all have read it.
            self.accelerator.wait_for_everyone()
            if rec is not None and rec.get("point") == point and rec.get("step", step + 1) <= step:
                self.done = point
                return False
        if step > 0 and step != self.last_saved:
            save_fn()  # the weights this refresh uses are now in a training state
            self.last_saved = step
        self._refresh(step, int(epoch), point)
        self.done = point
        return True

    def _window_reads_cache(self, point: int) -> bool:
        if self.policy is None:
            return True
        end = min(window_end(point, self.c.refresh_every, self.c.max_age), self.last_epoch + 1e-9)
        attg = self.cfg.loss.attg.enabled and self.cfg.loss.attg.source == "scores"
        return window_reads_cache(self.policy, point, end, attg)

    def _refresh(self, step: int, epoch: int, point: int) -> None:
        import torch

        from multimae_att.pretrain.setup import build_refresh_loader
        from multimae_att.pretrain.step import model_inputs
        from multimae_att.scoring.cache import refresh_cache

        acc = self.accelerator
        if acc.is_main_process:
            self.record_file.unlink(missing_ok=True)  # an interrupted refresh leaves no record
        # Each process scores a disjoint share of the samples of its node (the cache directory
        # is per node, see multimae_att.scoring.cache): local rank / local world size.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        loader = build_refresh_loader(self.cfg, acc.local_process_index, local_world)
        loader.set_epoch(0)
        mods = list(self.cfg.model.in_modalities)
        device = acc.device

        def inputs_fn(batch):
            return model_inputs(batch, mods, self.cfg.data.standardize_depth, device)

        with torch.no_grad(), acc.autocast():  # same precision as the training scoring pass
            n = refresh_cache(self.cache, self.model, loader, epoch, inputs_fn=inputs_fn,
                              source=self.source, layer=self.cfg.masking.score_layer,
                              query=self.cfg.masking.score_query)
        acc.wait_for_everyone()  # every row written before any process reads
        if acc.is_main_process:
            write_text_atomic(self.record_file, json.dumps({"point": point, "step": step, "epoch": epoch}))
        acc.wait_for_everyone()
        acc.print(f"attention cache: full-image refresh at step {step} (epoch {epoch}): "
                  f"{n} samples on process {acc.process_index}")
