"""The timed cases of the benchmark, all on one model, one batch and one device.

Training steps go through the runner's own step (:func:`multimae_att.pretrain.step.forward_loss`
with a :class:`~multimae_att.masking.planner.MaskPlanner`), then backward and AdamW, as in
``run_pretrain.py`` minus Accelerate's bookkeeping (bf16 via ``torch.autocast``, as Accelerate does).

| case | what runs |
|---|---|
| ``random_step`` | full training step (adapters, budgets, ``random`` masks, masked encoder, decoders, loss,
  backward, AdamW) |
| ``attention_step`` | the same with a fresh scoring pass each step and ``high`` masks |
| ``scoring_pass`` | ``model.attention_scores`` over the step's (detached) tokens, alone |
| ``inference_forward`` | plain no-grad fused encoder forward over the same tokens (+ global token): the
  floor (fused whatever ``--attn``) |
| ``cached_step`` | ``high`` masks on scores read from the :class:`AttentionCache` (all hits: filled by a
  full-image refresh pass, as the runner) |
| ``amt_step`` | AMT (``throw_ratio`` 0.4, same K) on cached scores; thrown queries dropped from decoders |
| ``cache_lookup`` | the cache read alone (memory-mapped rows + crop/flip resampling) |
| ``hpm_step`` | ``hpm`` masks (HPM's final share, 0.5) on predicted losses from a fresh no-mask pass +
  loss-prediction head; the head's ranking loss trained in the step |
| ``cached_hpm_step`` | the same on predicted losses read from the cache (filled by a full-image
  refresh); no sample's no-mask pass for the head (its expected cost,
  ``masking.loss_predictor.cached_train_share`` of a pass, is added in a derived ratio) |
| ``upstream_random_step`` | with ``--vs-upstream``: the original MultiMAE's step on the same batch and
  weights (:mod:`multimae_att.bench.upstream`) |

The attention kernel of each pass follows ``attn`` (``auto``: the runner's default, chosen per
pass by :meth:`MultiMAE.set_attention`); ``compile`` compiles the encoder blocks and decoders as
``train.compile`` does.
"""
from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from multimae_att.bench.presets import MODALITIES, Preset, build_model, synthetic_batch
from multimae_att.bench.timing import median, synchronize
from multimae_att.masking import MaskingPolicy, make_masks, sample_budgets
from multimae_att.masking.planner import MaskPlanner
from multimae_att.model.attention import ATTENTION_MODES, set_fused
from multimae_att.model.compile import compile_model
from multimae_att.optim import build_adamw
from multimae_att.pretrain.config import LossConfig
from multimae_att.pretrain.setup import param_groups
from multimae_att.pretrain.step import PretrainModule, forward_loss
from multimae_att.scoring.cache import AttentionCache, refresh_cache
from multimae_att.scoring.loss_prediction import LossPredictor
from multimae_att.scoring.sources import PredictedLossScores

AMT_THROW_RATIO = 0.40


def full_image_batch(batch: dict) -> dict:
    """``batch`` as the runner's refresh loader yields it: each image is the whole source
    (``crop_box`` = (0, 0, H, W), no flip). Only the geometry matters for the timing."""
    src = batch["source_size"].float()
    zeros = torch.zeros_like(src)
    return {**batch, "crop_box": torch.cat([zeros, src], dim=1),
            "flip": torch.zeros_like(batch["flip"], dtype=torch.bool)}


class BenchCases:
    """Model, optimizer, batch and cache shared by every case (see the module table)."""

    def __init__(self, p: Preset, device: torch.device, dtype: str, cache_dir: str, seed: int = 0,
                 attn: str = "auto", compile: bool = False) -> None:
        if attn not in ATTENTION_MODES:
            raise ValueError(f"bench attn must be one of {ATTENTION_MODES}, got {attn!r}")
        torch.manual_seed(seed)
        self.p, self.device, self.dtype, self.attn = p, device, dtype, attn
        self.model = build_model(p).to(device).train()
        # Training steps and the scoring pass run with the chosen attention path; the floor
        # (inference_forward) is always fused.
        self.model.set_attention(attn)
        if compile:
            compile_model(self.model)
        self.module = PretrainModule(self.model)
        self.predictor = LossPredictor(MODALITIES, p.dim_tokens).to(device)
        self.lossp_module = PretrainModule(self.model, loss_predictor=self.predictor)
        self.opt = build_adamw(param_groups(self.model, 0.05, extra=self.predictor), device, lr=1e-4,
                               betas=(0.9, 0.95))  # as the runners
        self.loss_weights = LossConfig().weights
        self.batch = synthetic_batch(p, device, seed)
        self.inputs = {m: self.batch[m] for m in MODALITIES}
        self.grids = dict.fromkeys(MODALITIES, p.grid)
        self.num_tokens = [p.grid[0] * p.grid[1]] * len(MODALITIES)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.cache = AttentionCache.create(cache_dir, self.batch["sample_id"], MODALITIES, grid=p.cache_grid,
                                           refresh_every=40)
        with torch.no_grad(), self.autocast():
            self.tokens = self.model.embed(self.inputs)  # fixed tokens for the no-grad cases
            # Prefill as the runner does (masking.cache.refresh=full): a full-image refresh pass,
            # so the timed cached cases (random-resized crops, flips) are all hits.
            refresh_cache(self.cache, self.model, [full_image_batch(self.batch)], epoch=0,
                          inputs_fn=lambda b: {m: b[m] for m in MODALITIES})
            self.lossp_cache = AttentionCache.create(f"{cache_dir}/predicted_loss", self.batch["sample_id"],
                                                     MODALITIES, grid=p.cache_grid, refresh_every=40,
                                                     source="predicted_loss")
            refresh_cache(self.lossp_cache, self.model, [full_image_batch(self.batch)], epoch=0,
                          inputs_fn=lambda b: {m: b[m] for m in MODALITIES},
                          source=PredictedLossScores(self.predictor))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ steps
    def planner(self, strategy: str, cached: bool, **params) -> MaskPlanner:
        policy = MaskingPolicy(strategy, params, modalities=list(MODALITIES))
        return MaskPlanner(policy, self.p.num_encoded, cache=self.cache if cached else None)

    def hpm_planner(self, cached: bool) -> MaskPlanner:
        """``hpm`` on predicted losses at the end of its curriculum (epoch 1 of 1: share 0.5)."""
        policy = MaskingPolicy("hpm", modalities=list(MODALITIES))
        return MaskPlanner(policy, self.p.num_encoded, cache=self.lossp_cache if cached else None,
                           source=PredictedLossScores(self.predictor), total_epochs=1.0, cached_train_share=0.0)

    def train_step(self, planner: MaskPlanner, module: PretrainModule | None = None,
                   epoch: float = 0.0) -> torch.Tensor:
        """One optimizer step through the runner's own :func:`forward_loss`; returns the loss
        (a detached tensor: the runner reads losses every ``log.every`` steps, not every step)."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            res = forward_loss(module or self.module, self.batch, planner, epoch=epoch, generator=self.gen,
                               in_modalities=list(MODALITIES), standardize_depth=True,
                               loss_weights=self.loss_weights, device=self.device)
        res.loss.backward()
        self.opt.step()
        return res.loss.detach()

    @torch.no_grad()
    def scoring_pass(self) -> dict[str, torch.Tensor]:
        with self.autocast():
            return self.model.attention_scores(self.tokens)

    @torch.no_grad()
    def inference_forward(self) -> torch.Tensor:
        set_fused(self.model.encoder, True)  # the floor; every model pass sets its own kernel
        with self.autocast():
            z = torch.cat(list(self.tokens.values()), dim=1)
            g = self.model.global_tokens.expand(z.shape[0], -1, -1).to(z.dtype)
            return self.model.encoder(torch.cat([z, g], dim=1))

    def cases(self) -> dict[str, Callable[[], object]]:
        random, fresh = self.planner("random", False), self.planner("high", False)
        cached = self.planner("high", True)
        amt = self.planner("amt", True, throw_ratio=AMT_THROW_RATIO)
        hpm, cached_hpm = self.hpm_planner(False), self.hpm_planner(True)
        return {
            "random_step": lambda: self.train_step(random),
            "attention_step": lambda: self.train_step(fresh),
            "scoring_pass": self.scoring_pass,
            "inference_forward": self.inference_forward,
            "cached_step": lambda: self.train_step(cached),
            "amt_step": lambda: self.train_step(amt),
            "cache_lookup": lambda: self.cache.lookup(self.batch, self.grids, epoch=0, device=self.device),
            "hpm_step": lambda: self.train_step(hpm, self.lossp_module, epoch=1.0),
            "cached_hpm_step": lambda: self.train_step(cached_hpm, self.lossp_module, epoch=1.0),
        }

    def amt_split(self) -> dict[str, float]:
        """Mean visible / thrown / hidden fractions of the AMT masks (r, t of the AMT paper)."""
        with torch.no_grad(), self.autocast():
            masks = self.planner("amt", True, throw_ratio=AMT_THROW_RATIO)(
                self.model, self.tokens, self.batch, 0.0, self.gen)
        total = sum(self.num_tokens) * self.p.batch_size
        thrown = sum(float(t.sum()) for t in masks.thrown.values()) / total
        hidden = sum(float(h.sum()) for h in masks.hidden.values()) / total
        return {"visible": 1 - thrown - hidden, "thrown": thrown, "hidden": hidden}


def mask_throughput(p: Preset, device: torch.device, repeats: int = 5) -> dict[str, float]:
    """Samples/s of budgets + masks for ``mask_batch`` samples (random scores), per strategy."""
    g = torch.Generator(device=device).manual_seed(0)
    n = p.grid[0] * p.grid[1]
    scores = {m: torch.rand(p.mask_batch, n, device=device, generator=g) for m in MODALITIES}
    out = {}
    for name, params in (("random", {}), ("high", {}), ("amt", {"throw_ratio": AMT_THROW_RATIO})):
        times = []
        for _ in range(repeats + 1):
            synchronize(device)
            t0 = time.perf_counter()
            visible = sample_budgets([n] * len(MODALITIES), p.num_encoded, p.mask_batch, generator=g, device=device)
            make_masks(name, scores, visible, generator=g, **params)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        out[name] = p.mask_batch / median(times[1:])
    return out


def _encoded_sample(p: Preset, rng: np.random.Generator) -> dict[str, bytes]:
    """One synthetic source sample as stored files: rgb JPEG, 16-bit depth PNG, semseg PNG."""
    h, w = p.source_size
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    depth = Image.fromarray(rng.integers(0, 2**16, (h, w), dtype=np.uint16))
    semseg = Image.fromarray(rng.integers(0, p.semseg_classes, (h // 4, w // 4), dtype=np.uint8))
    files = {}
    for m, image, fmt in (("rgb", rgb, "JPEG"), ("depth", depth, "PNG"), ("semseg", semseg, "PNG")):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        files[m] = buf.getvalue()
    return files


def data_throughput(p: Preset) -> float:
    """Samples/s of the per-sample data path in this process: decode the stored files, one
    random-resized crop + flip for all modalities, tensors, collate (one worker; no disk I/O)."""
    from multimae_att.data.decode import decode_modality
    from multimae_att.data.sample import build_sample, collate
    from multimae_att.data.transforms import AugmentConfig

    cfg = AugmentConfig(image_size=(p.image_size, p.image_size))
    rng = np.random.default_rng(0)
    stored = [_encoded_sample(p, rng) for _ in range(min(8, p.data_samples))]
    t0 = time.perf_counter()
    samples = []
    for i in range(p.data_samples):
        files = stored[i % len(stored)]
        images = {m: decode_modality(m, data) for m, data in files.items()}
        samples.append(build_sample(images, None, f"s{i}", cfg, epoch=0))
    collate(samples)
    return p.data_samples / (time.perf_counter() - t0)


def cache_hit_rates(p: Preset, epochs: int = 8, samples: int = 256, seed: int = 0) -> list[float]:
    """Share of samples whose cached map is usable at each epoch of one refresh period, when the
    cache is filled only by the training step's own crop passes (no full-image refresh pass).

    Geometry only (constant scores): each epoch draws the data pipeline's random-resized crop and
    flip per sample, looks it up, and writes the missing ones back, as the runner's
    :class:`~multimae_att.masking.planner.MaskPlanner` does. Epoch 0 is all misses by definition.
    """
    import tempfile

    from multimae_att.data.transforms import AugmentConfig, make_geometry

    cfg = AugmentConfig(image_size=(p.image_size, p.image_size), seed=seed)
    ids = [f"s{i}" for i in range(samples)]
    src = p.source_size
    n = p.grid[0] * p.grid[1]
    rates = []
    with tempfile.TemporaryDirectory(prefix="mm_bench_hits_") as d:
        cache = AttentionCache.create(d, ids, MODALITIES, grid=p.cache_grid, refresh_every=None)
        for epoch in range(epochs):
            geoms = [make_geometry(cfg, src, sid, epoch) for sid in ids]
            batch = {"sample_id": ids, "crop_box": torch.tensor([g.box for g in geoms]),
                     "flip": torch.tensor([g.flip for g in geoms]),
                     "source_size": torch.tensor([src] * samples)}
            _, valid = cache.lookup(batch, dict.fromkeys(MODALITIES, p.grid), epoch)
            rates.append(float(valid.float().mean()))
            missing = (~valid).nonzero().squeeze(1)
            ones = {m: torch.ones(len(missing), n) for m in MODALITIES}
            cache.update(batch, ones, epoch, index=missing)
    return rates
