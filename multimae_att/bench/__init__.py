"""Benchmark: the cost of attention guidance, measured on one model, batch and device.

``python -m multimae_att.bench --preset {tiny,small,base} --out FILE.json`` (see
docs/BENCHMARKS.md). :func:`run_bench` returns the same dict that is written as JSON:

* top level, for the primary dtype (bf16 where supported, else fp32): the median seconds of
  ``random_step``, ``attention_step``, ``scoring_pass``, ``inference_forward``, ``cached_step``,
  ``amt_step`` (and ``cache_lookup``); ``ratios`` (ratios of medians) and ``paired_ratios``
  (medians of per-round ratios), ``min_ratios`` (ratios of best-of times), ``cpu_time_ratios``
  (ratios of median process-CPU times: the steadiest on a shared CPU); ``peak_memory_mib`` per case; ``data_pipeline_samples_per_s``;
  ``mask_generation_samples_per_s`` per strategy; ``amt_split``; ``cache_hit_rate_by_epoch``
  (share of cache hits per epoch of a refresh period filled by crop passes alone, the runner's
  ``masking.cache.refresh=crops``); every ratio block also holds ``cached_step+refresh/random_step``
  (the runner's default ``refresh=full``: cached steps plus one scoring pass per batch per 40)
  and ``cached_hpm_step+training+refresh/random_step`` (cached ``hpm`` steps plus the expected
  no-mask passes that train the loss predictor and refresh its maps);
* ``runs``: the same block for every dtype measured (``--dtype both`` gives fp32 and bf16),
  with every timing; ``preset``, ``machine``.
"""
from __future__ import annotations

import tempfile

import torch

from multimae_att.bench.cases import BenchCases, cache_hit_rates, data_throughput, mask_throughput
from multimae_att.bench.presets import PRESETS, Preset
from multimae_att.bench.timing import PeakMemory, bf16_supported, machine_info, measure, median, paired_ratio
from multimae_att.pretrain.config import LossPredictorConfig

__all__ = ["PRESETS", "Preset", "RATIOS", "run_bench", "run_dtype"]

CASES = ("random_step", "attention_step", "scoring_pass", "inference_forward", "cached_step", "amt_step",
         "cache_lookup", "hpm_step", "cached_hpm_step")
RATIOS = (("scoring_pass", "inference_forward"), ("cached_step", "random_step"), ("amt_step", "random_step"),
          ("attention_step", "random_step"), ("hpm_step", "random_step"), ("hpm_step", "attention_step"),
          ("cached_hpm_step", "random_step"))
REFRESH_EVERY = 40  # epochs per full-image cache refresh (masking.cache.refresh_every default)
# masking.loss_predictor.cached_train_share default: expected share of a no-mask pass per cached step
CACHED_TRAIN_SHARE = LossPredictorConfig().cached_train_share


def run_dtype(p: Preset, device: torch.device, dtype: str, warmup: int, repeats: int,
              attn: str = "fused") -> dict:
    """Every timed case at one dtype: medians, all timings, ratios, peak memory."""
    with tempfile.TemporaryDirectory(prefix="mm_bench_cache_") as cache_dir:
        bench = BenchCases(p, device, dtype, cache_dir, attn=attn)
        cases = bench.cases()
        times, cpu_times = measure(cases, device, warmup, repeats)
        peak = {}
        for name, fn in cases.items():  # after timing: one call each, memory only
            with PeakMemory(device) as mem:
                fn()
            peak[name] = mem.peak_mib
        block = {"dtype": dtype, "median_s": {n: median(t) for n, t in times.items()},
                 "min_s": {n: min(t) for n, t in times.items()}, "times_s": times,
                 "cpu_median_s": {n: median(t) for n, t in cpu_times.items()}, "cpu_times_s": cpu_times,
                 "peak_memory_mib": peak, "amt_split": bench.amt_split(), "cache_stats": dict(bench.cache.stats)}
    med = block["median_s"]
    block["ratios"] = {f"{a}/{b}": med[a] / med[b] for a, b in RATIOS}
    block["paired_ratios"] = {f"{a}/{b}": paired_ratio(times, a, b) for a, b in RATIOS}
    # Best-of ratios: interference from other processes only ever adds time, so the minimum is
    # the least disturbed figure on a shared machine.
    block["min_ratios"] = {f"{a}/{b}": block["min_s"][a] / block["min_s"][b] for a, b in RATIOS}
    cpu = block["cpu_median_s"]
    block["cpu_time_ratios"] = {f"{a}/{b}": cpu[a] / max(cpu[b], 1e-9) for a, b in RATIOS}
    _amortized_refresh(block, times)
    _amortized_lossp(block, times)
    return block


def _amortized(block: dict, times: dict, key: str, case: str, pass_case: str, share: float) -> None:
    """Add ratio ``key`` = (``case`` + ``share`` x ``pass_case``) / ``random_step`` to every ratio
    block: a step plus, in expectation, a share of an extra pass spread over the steps."""
    def amortized(t: dict) -> float:
        return (t[case] + share * t[pass_case]) / max(t["random_step"], 1e-9)

    block["ratios"][key] = amortized(block["median_s"])
    block["min_ratios"][key] = amortized(block["min_s"])
    block["cpu_time_ratios"][key] = amortized(block["cpu_median_s"])
    rounds = zip(times[case], times[pass_case], times["random_step"])
    block["paired_ratios"][key] = median([amortized({case: c, pass_case: p, "random_step": r})
                                          for c, p, r in rounds])


def _amortized_refresh(block: dict, times: dict) -> None:
    """Add ``cached_step+refresh/random_step``: the runner's full-image refresh scores every sample
    once per window of ``REFRESH_EVERY`` epochs, i.e. one scoring pass per batch per
    ``REFRESH_EVERY`` steps over it, spread over those steps."""
    _amortized(block, times, "cached_step+refresh/random_step", "cached_step", "scoring_pass", 1 / REFRESH_EVERY)


def _amortized_lossp(block: dict, times: dict) -> None:
    """Add ``cached_hpm_step+training+refresh/random_step``: a cached ``hpm`` step plus, in
    expectation, ``CACHED_TRAIN_SHARE`` of a no-mask pass over the batch (the samples drawn to
    train the loss predictor) and ``1 / REFRESH_EVERY`` of one (the full-image refresh of the
    predicted-loss maps); ``inference_forward`` is that pass (the head on top is negligible)."""
    _amortized(block, times, "cached_hpm_step+training+refresh/random_step", "cached_hpm_step",
               "inference_forward", CACHED_TRAIN_SHARE + 1 / REFRESH_EVERY)


def run_bench(preset: str | Preset, dtype: str = "auto", device: str | torch.device | None = None,
              warmup: int | None = None, repeats: int | None = None, attn: str = "fused") -> dict:
    """Run the benchmark; ``dtype`` is ``fp32``, ``bf16``, ``both`` or ``auto`` (bf16 where the
    device supports it, else fp32); ``attn`` is the attention path of the training steps and
    the scoring pass (``MultiMAE.set_fused_attn``). Returns the JSON-ready dict of the module doc."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype == "auto":
        dtypes = ["bf16" if bf16_supported(device) else "fp32"]
    elif dtype == "both":
        dtypes = ["bf16", "fp32"] if bf16_supported(device) else ["fp32"]
    elif dtype in ("fp32", "bf16"):
        dtypes = [dtype]
    else:
        raise ValueError(f"bench dtype must be fp32, bf16, both or auto, got {dtype!r}")
    warmup = p.warmup if warmup is None else warmup
    repeats = p.repeats if repeats is None else repeats
    if repeats < 1 or warmup < 0:
        raise ValueError(f"bench needs repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    out: dict = {"preset": p.as_dict(), "machine": machine_info(device), "warmup": warmup, "repeats": repeats,
                 "attn": attn}
    runs = {d: run_dtype(p, device, d, warmup, repeats, attn) for d in dtypes}
    primary = runs[dtypes[0]]
    out.update({"dtype": dtypes[0], **{c: primary["median_s"][c] for c in CASES}})
    out.update({k: primary[k] for k in ("ratios", "paired_ratios", "min_ratios", "cpu_time_ratios", "peak_memory_mib",
                                          "amt_split")})
    out["mask_generation_samples_per_s"] = mask_throughput(p, device)
    out["data_pipeline_samples_per_s"] = data_throughput(p)
    out["cache_hit_rate_by_epoch"] = cache_hit_rates(p, epochs=10, samples=min(256, p.mask_batch))
    out["runs"] = runs
    return out


def format_table(result: dict) -> str:
    """Human-readable table: one row per case and dtype, then the ratios."""
    lines = [f"preset {result['preset']['name']}  device {result['machine']['device']}  "
             f"threads {result['machine']['torch_threads']}  torch {result['machine']['torch']}  "
             f"warmup {result['warmup']}  repeats {result['repeats']}  attn {result['attn']}"]
    dtypes = list(result["runs"])
    lines.append(f"{'case':<20}" + "".join(f"{d + ' median s':>16}{d + ' peak MiB':>16}" for d in dtypes))
    for case in CASES:
        row = f"{case:<20}"
        for d in dtypes:
            run = result["runs"][d]
            row += f"{run['median_s'][case]:>16.4f}{run['peak_memory_mib'][case]:>16.1f}"
        lines.append(row)
    kinds = (("ratios", "medians"), ("paired_ratios", "paired"), ("min_ratios", "best-of"),
             ("cpu_time_ratios", "cpu-time"))
    lines.append(f"{'ratio':<32}" + "".join(f"{d + ' ' + label:>16}" for d in dtypes for _, label in kinds))
    for key in result["ratios"]:
        lines.append(f"{key:<32}" + "".join(f"{result['runs'][d][kind][key]:>16.3f}"
                                            for d in dtypes for kind, _ in kinds))
    masks = ", ".join(f"{k} {v:,.0f}" for k, v in result["mask_generation_samples_per_s"].items())
    lines.append(f"mask generation samples/s: {masks}")
    lines.append(f"data pipeline samples/s (1 process): {result['data_pipeline_samples_per_s']:.1f}")
    hits = ", ".join(f"{h:.2f}" for h in result["cache_hit_rate_by_epoch"])
    lines.append(f"cache hit rate by epoch (crop passes only): {hits}")
    split = result["amt_split"]
    lines.append(f"amt split: visible {split['visible']:.3f}, thrown {split['thrown']:.3f}, hidden {split['hidden']:.3f}")
    return "\n".join(lines)
