"""Benchmark: the cost of attention guidance, measured on one model, batch and device.

``python -m multimae_att.bench --preset {tiny,small,base} --out FILE.json`` (see
docs/BENCHMARKS.md). :func:`run_bench` returns the same dict that is written as JSON:

* top level, for the primary dtype (bf16 where supported, else fp32): the median seconds of
  ``random_step``, ``attention_step``, ``scoring_pass``, ``inference_forward``, ``cached_step``,
  ``amt_step`` (and ``cache_lookup``); ``ratios`` (ratios of medians) and ``paired_ratios``
  (medians of per-round ratios), ``min_ratios`` (ratios of best-of times), ``cpu_time_ratios``
  (ratios of median process-CPU times: the steadiest on a shared CPU); ``peak_memory_mib`` per case;
  ``data_pipeline_samples_per_s``;
  ``mask_generation_samples_per_s`` per strategy; ``amt_split``; ``cache_hit_rate_by_epoch``
  (share of cache hits per epoch of a refresh period filled by crop passes alone, the runner's
  ``masking.cache.refresh=crops``); every ratio block also holds ``cached_step+refresh/random_step``
  (the runner's default ``refresh=full``: cached steps plus one scoring pass per batch per 40)
  and ``cached_hpm_step+training+refresh/random_step`` (cached ``hpm`` steps plus the expected
  no-mask passes that train the loss predictor and refresh its maps);
* ``ab_ratios``: the ratios with targets (``AB_RATIOS``, and with ``--vs-upstream``
  ``AB_UPSTREAM_RATIOS``) measured again back to back (:func:`~multimae_att.bench.timing.measure_ab`:
  ``ab_repeats`` pairs, default ``repeats``, order alternating), the median of the per-pair
  ratios of ``ab_clock`` (process CPU time on a CPU, wall time on a GPU), with ``ab_quartiles``
  (first and third quartile); every run also holds the per-pair ratios of both clocks
  (``ab_pair_ratios``: ``{"a/b": {"cpu": [...], "wall": [...]}}``). The steadiest figure on a
  shared machine: read these against the targets;
* ``flops`` per case (one call, :func:`multimae_att.bench.flops.count_flops`) and ``efficiency``
  per case (achieved FLOP/s over ``matmul_peak_flops``, a large matrix product in the same dtype;
  timed by process CPU time on a CPU, wall time on a GPU);
* with ``vs_upstream=PATH`` (the original MultiMAE checkout): the case ``upstream_random_step``
  and ``vs_upstream``: ``{path, commit, clock, by_dtype: {dtype: {case: ours / upstream}}}`` for
  ``random_step``, ``attention_step``, ``cached_step`` and ``amt_step`` against their random
  step (``clock``: the CPU-time medians on a CPU, the wall medians on a GPU); the same ratios
  are in every ratio block as ``<case>/upstream_random_step``; ``ab_by_dtype``: the A/B figures
  of ``random_step`` and ``cached_step`` against it;
* ``runs``: the same block for every dtype measured (``--dtype both`` gives fp32 and bf16),
  with every timing; ``preset``, ``machine`` (with the load average at the start and the end),
  ``warmup``, ``repeats``, ``ab_repeats``, ``attn``, ``compile``, and ``malloc``: ``{mode, fixed}``
  (``--malloc``; ``fixed``: the glibc thresholds in force during the run, None where glibc's own
  dynamic ones applied: ``default`` in a fresh process, or no glibc).
"""
from __future__ import annotations

import os
import tempfile

import torch

from multimae_att.bench.cases import BenchCases, cache_hit_rates, data_throughput, mask_throughput
from multimae_att.bench.flops import count_flops, matmul_peak
from multimae_att.bench.presets import PRESETS, Preset
from multimae_att.bench.timing import (
    PeakMemory,
    bf16_supported,
    machine_info,
    measure,
    measure_ab,
    median,
    paired_ratio,
    quartiles,
)
from multimae_att.pretrain.config import LossPredictorConfig
from multimae_att.run.cpu_malloc import CPU_MALLOC_CHOICES, apply_cpu_malloc

__all__ = ["AB_RATIOS", "AB_UPSTREAM_RATIOS", "PRESETS", "Preset", "RATIOS", "UPSTREAM_RATIOS", "run_bench",
           "run_dtype"]

CASES = ("random_step", "attention_step", "scoring_pass", "inference_forward", "cached_step", "amt_step",
         "cache_lookup", "hpm_step", "cached_hpm_step")
RATIOS = (("scoring_pass", "inference_forward"), ("cached_step", "random_step"), ("amt_step", "random_step"),
          ("attention_step", "random_step"), ("hpm_step", "random_step"), ("hpm_step", "attention_step"),
          ("cached_hpm_step", "random_step"))
UPSTREAM = "upstream_random_step"
UPSTREAM_RATIOS = tuple((case, UPSTREAM) for case in ("random_step", "attention_step", "cached_step", "amt_step"))
# The ratios with targets (docs/BENCHMARKS.md), timed again back to back (measure_ab).
AB_RATIOS = (("scoring_pass", "inference_forward"), ("cached_step", "random_step"), ("amt_step", "random_step"),
             ("cached_hpm_step", "random_step"))
AB_UPSTREAM_RATIOS = (("random_step", UPSTREAM), ("cached_step", UPSTREAM))
REFRESH_EVERY = 40  # epochs per full-image cache refresh (masking.cache.refresh_every default)
# masking.loss_predictor.cached_train_share default: expected share of a no-mask pass per cached step
CACHED_TRAIN_SHARE = LossPredictorConfig().cached_train_share


def run_dtype(p: Preset, device: torch.device, dtype: str, warmup: int, repeats: int,
              attn: str = "auto", upstream=None, compile: bool = False, ab_repeats: int | None = None) -> dict:
    """Every timed case at one dtype: medians, all timings, ratios, peak memory, FLOPs and
    efficiency. ``upstream``: a :class:`multimae_att.bench.upstream.Upstream` (adds its step);
    ``ab_repeats``: back-to-back pairs per A/B ratio (default ``repeats``)."""
    with tempfile.TemporaryDirectory(prefix="mm_bench_cache_") as cache_dir:
        bench = BenchCases(p, device, dtype, cache_dir, attn=attn, compile=compile)
        cases = bench.cases()
        if upstream is not None:
            from multimae_att.bench.upstream import UpstreamStep

            # Same batch and the same initial weights as ours.
            cases[UPSTREAM] = UpstreamStep(upstream, p, device, dtype, bench.batch, bench.model.state_dict())
        times, cpu_times = measure(cases, device, warmup, repeats)
        ab = measure_ab(cases, AB_RATIOS + (AB_UPSTREAM_RATIOS if upstream is not None else ()), device,
                        repeats if ab_repeats is None else ab_repeats)
        peak = {}
        for name, fn in cases.items():  # after timing: one call each, memory only
            with PeakMemory(device) as mem:
                fn()
            peak[name] = mem.peak_mib
        flops = {name: count_flops(fn) for name, fn in cases.items()}
        block = {"dtype": dtype, "median_s": {n: median(t) for n, t in times.items()},
                 "min_s": {n: min(t) for n, t in times.items()}, "times_s": times,
                 "cpu_median_s": {n: median(t) for n, t in cpu_times.items()}, "cpu_times_s": cpu_times,
                 "peak_memory_mib": peak, "amt_split": bench.amt_split(), "cache_stats": dict(bench.cache.stats),
                 "flops": flops, "ab_pair_ratios": ab}
    ratios = RATIOS + (UPSTREAM_RATIOS if upstream is not None else ())
    med = block["median_s"]
    block["ratios"] = {f"{a}/{b}": med[a] / med[b] for a, b in ratios}
    block["paired_ratios"] = {f"{a}/{b}": paired_ratio(times, a, b) for a, b in ratios}
    # Best-of ratios: interference from other processes only ever adds time, so the minimum is
    # the least disturbed figure on a shared machine.
    block["min_ratios"] = {f"{a}/{b}": block["min_s"][a] / block["min_s"][b] for a, b in ratios}
    cpu = block["cpu_median_s"]
    block["cpu_time_ratios"] = {f"{a}/{b}": cpu[a] / max(cpu[b], 1e-9) for a, b in ratios}
    _amortized_refresh(block, times)
    _amortized_lossp(block, times)
    # The clock that means something here: CPU time on a (shared) CPU, wall time on a GPU.
    clock = block["cpu_median_s"] if device.type == "cpu" else block["median_s"]
    block["matmul_peak_flops"] = matmul_peak(device, dtype, max(p.matmul_size, 8192) if device.type == "cuda"
                                             else p.matmul_size)
    block["efficiency"] = {n: f / max(clock[n], 1e-12) / block["matmul_peak_flops"]
                           for n, f in flops.items() if f > 0}
    ab_clock = "cpu" if device.type == "cpu" else "wall"
    block["ab_clock"] = "cpu_time" if device.type == "cpu" else "wall"
    block["ab_ratios"] = {key: median(r[ab_clock]) for key, r in ab.items()}
    block["ab_quartiles"] = {key: quartiles(r[ab_clock]) for key, r in ab.items()}
    if upstream is not None:
        block["vs_upstream"] = {a: clock[a] / max(clock[b], 1e-12) for a, b in UPSTREAM_RATIOS}
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
              warmup: int | None = None, repeats: int | None = None, attn: str = "auto",
              vs_upstream: str | None = None, compile: bool = False, ab_repeats: int | None = None,
              malloc: str = "keep") -> dict:
    """Run the benchmark; ``dtype`` is ``fp32``, ``bf16``, ``both`` or ``auto`` (bf16 where the
    device supports it, else fp32); ``attn`` is the attention path of the training steps and
    the scoring pass (``MultiMAE.set_attention``: ``auto``, ``fused`` or ``explicit``);
    ``vs_upstream``: path of an original MultiMAE checkout to time its step too; ``compile``:
    ``torch.compile`` the blocks as ``train.compile`` does; ``ab_repeats``: back-to-back pairs per
    A/B ratio (default ``repeats``: more pairs narrow the A/B figures without lengthening the
    shuffled rounds); ``malloc``: ``keep`` fixes glibc's thresholds for the whole process, ours
    and upstream's steps alike, as ``train.cpu_malloc`` does on a CPU
    (:func:`multimae_att.run.cpu_malloc.keep_freed_memory`), ``default`` leaves glibc's. Returns
    the JSON-ready dict of the module doc."""
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
    ab_repeats = repeats if ab_repeats is None else ab_repeats
    if malloc not in CPU_MALLOC_CHOICES:
        raise ValueError(f"bench malloc must be one of {CPU_MALLOC_CHOICES}, got {malloc!r}")
    if repeats < 1 or warmup < 0 or ab_repeats < 1:
        raise ValueError(f"bench needs repeats >= 1, ab_repeats >= 1 and warmup >= 0, got {repeats}, {ab_repeats}, "
                         f"{warmup}")
    upstream = None
    if vs_upstream is not None:
        from multimae_att.bench.upstream import load_upstream

        upstream = load_upstream(vs_upstream)  # fails before any timing when the path is wrong
    out: dict = {"preset": p.as_dict(), "machine": machine_info(device), "warmup": warmup, "repeats": repeats,
                 "ab_repeats": ab_repeats,
                 "malloc": {"mode": malloc, "fixed": apply_cpu_malloc(
                     malloc, "bench --malloc default: this process fixed glibc's malloc thresholds before; they "
                     "stay fixed (the JSON's malloc.fixed says so)")},
                 "attn": attn, "compile": compile}
    runs = {d: run_dtype(p, device, d, warmup, repeats, attn, upstream, compile, ab_repeats) for d in dtypes}
    primary = runs[dtypes[0]]
    out.update({"dtype": dtypes[0], **{c: primary["median_s"][c] for c in CASES}})
    out.update({k: primary[k] for k in ("ratios", "paired_ratios", "min_ratios", "cpu_time_ratios", "ab_ratios",
                                          "ab_quartiles", "ab_clock", "peak_memory_mib", "amt_split", "flops",
                                          "efficiency", "matmul_peak_flops")})
    if upstream is not None:
        out["vs_upstream"] = {"path": upstream.path, "commit": upstream.commit,
                              "clock": "cpu_time" if device.type == "cpu" else "wall",
                              "by_dtype": {d: r["vs_upstream"] for d, r in runs.items()},
                              "ab_by_dtype": {d: {a: r["ab_ratios"][f"{a}/{b}"] for a, b in AB_UPSTREAM_RATIOS}
                                              for d, r in runs.items()}}
    out["mask_generation_samples_per_s"] = mask_throughput(p, device)
    out["data_pipeline_samples_per_s"] = data_throughput(p)
    out["cache_hit_rate_by_epoch"] = cache_hit_rates(p, epochs=10, samples=min(256, p.mask_batch))
    out["runs"] = runs
    out["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return out


def format_table(result: dict) -> str:
    """Human-readable table: one row per case and dtype (median s, CPU s, peak MiB, GFLOP,
    efficiency), then the ratios, then ours / upstream."""
    m = result["machine"]
    lines = [f"preset {result['preset']['name']}  device {m['device']}  threads {m['torch_threads']}  "
             f"torch {m['torch']}  warmup {result['warmup']}  repeats {result['repeats']}  attn {result['attn']}  "
             f"compile {result.get('compile', False)}  malloc {result.get('malloc', {}).get('mode')}  "
             f"load {m.get('load_average')} -> {m.get('load_average_end')}"]
    dtypes = list(result["runs"])
    cols = (("median s", "median_s", ".4f"), ("cpu s", "cpu_median_s", ".4f"), ("peak MiB", "peak_memory_mib", ".1f"))
    lines.append(f"{'case':<22}" + "".join(f"{d + ' ' + c:>14}" for d in dtypes for c, _, _ in cols)
                 + "".join(f"{d + ' GFLOP':>12}{d + ' eff':>10}" for d in dtypes))
    for case in result["runs"][dtypes[0]]["median_s"]:
        row = f"{case:<22}"
        for d in dtypes:
            run = result["runs"][d]
            row += "".join(f"{run[key][case]:>14{fmt}}" for _, key, fmt in cols)
        for d in dtypes:
            run = result["runs"][d]
            eff = run["efficiency"].get(case)
            row += f"{run['flops'][case] / 1e9:>12.1f}" + (f"{eff:>10.1%}" if eff is not None else f"{'-':>10}")
        lines.append(row)
    lines.append("matmul peak GFLOP/s: " + ", ".join(f"{d} {result['runs'][d]['matmul_peak_flops'] / 1e9:.1f}"
                                                    for d in dtypes))
    kinds = (("ratios", "medians"), ("paired_ratios", "paired"), ("min_ratios", "best-of"),
             ("cpu_time_ratios", "cpu-time"))
    lines.append(f"{'ratio':<40}" + "".join(f"{d + ' ' + label:>16}" for d in dtypes for _, label in kinds))
    for key in result["ratios"]:
        lines.append(f"{key:<40}" + "".join(f"{result['runs'][d][kind][key]:>16.3f}"
                                            for d in dtypes for kind, _ in kinds))
    pairs = result.get("ab_repeats", result["repeats"])
    lines.append(f"A/B ratios (back to back, {result['ab_clock'].replace('_', ' ')}; median [quartiles] of "
                 f"{pairs} pairs):")
    for key in result["ab_ratios"]:
        lines.append(f"  {key:<38}" + "".join(
            f"  {d} {result['runs'][d]['ab_ratios'][key]:.3f} [{result['runs'][d]['ab_quartiles'][key][0]:.3f}"
            f"-{result['runs'][d]['ab_quartiles'][key][1]:.3f}]" for d in dtypes))
    if "vs_upstream" in result:
        up = result["vs_upstream"]
        lines.append(f"ours / upstream ({up['clock']} medians; {up['path']} @ {up['commit']}):")
        for d, block in up["by_dtype"].items():
            lines.append(f"  {d}: " + ", ".join(f"{case} {r:.3f}" for case, r in block.items()))
            lines.append(f"  {d} A/B: " + ", ".join(f"{case} {r:.3f}" for case, r in up["ab_by_dtype"][d].items()))
    masks = ", ".join(f"{k} {v:,.0f}" for k, v in result["mask_generation_samples_per_s"].items())
    lines.append(f"mask generation samples/s: {masks}")
    lines.append(f"data pipeline samples/s (1 process): {result['data_pipeline_samples_per_s']:.1f}")
    hits = ", ".join(f"{h:.2f}" for h in result["cache_hit_rate_by_epoch"])
    lines.append(f"cache hit rate by epoch (crop passes only): {hits}")
    split = result["amt_split"]
    lines.append(f"amt split: visible {split['visible']:.3f}, thrown {split['thrown']:.3f}, "
                 f"hidden {split['hidden']:.3f}")
    return "\n".join(lines)
