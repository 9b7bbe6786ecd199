"""Smoke test of the benchmark: it runs end to end and writes every documented key (no timings asserted)."""
import json

import pytest

from multimae_att.bench import CASES, RATIOS
from multimae_att.bench.__main__ import main

KEYS = {"random_step", "attention_step", "scoring_pass", "inference_forward", "cached_step", "amt_step",
        "ratios", "paired_ratios", "min_ratios", "cpu_time_ratios", "peak_memory_mib", "data_pipeline_samples_per_s",
        "mask_generation_samples_per_s", "machine", "preset", "runs", "dtype", "amt_split", "cache_hit_rate_by_epoch"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "micro.json"
    assert main(["--preset", "micro", "--dtype", "fp32", "--warmup", "0", "--repeats", "1", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_has_every_key(result, capsys):
    assert KEYS <= set(result)
    for name in ("scoring_pass/inference_forward", "cached_step/random_step", "amt_step/random_step"):
        assert result["ratios"][name] > 0
    for case in CASES:
        assert result[case] > 0 and result["runs"]["fp32"]["times_s"][case]
    assert set(result["mask_generation_samples_per_s"]) == {"random", "high", "amt"}
    assert result["data_pipeline_samples_per_s"] > 0
    assert {"torch", "torch_threads", "cpu", "device"} <= set(result["machine"])
    assert len(RATIOS) + 2 == len(result["ratios"])
    # The runner's default (full-image refresh every 40 epochs) amortised over the window.
    med = result["runs"]["fp32"]["median_s"]
    assert result["ratios"]["cached_step+refresh/random_step"] == pytest.approx(
        (med["cached_step"] + med["scoring_pass"] / 40) / med["random_step"])
    assert result["ratios"]["cached_hpm_step+training+refresh/random_step"] == pytest.approx(
        (med["cached_hpm_step"] + (0.0625 + 1 / 40) * med["inference_forward"]) / med["random_step"])
    for name in ("hpm_step/random_step", "hpm_step/attention_step", "cached_hpm_step/random_step"):
        assert result["ratios"][name] > 0


def test_amt_split_and_cache_hits(result):
    split = result["amt_split"]
    assert split["visible"] + split["thrown"] + split["hidden"] == pytest.approx(1.0)
    assert split["thrown"] > 0.3  # throw ratio 0.4, floor per modality
    stats = result["runs"]["fp32"]["cache_stats"]
    assert stats["misses"] == 0 and stats["hits"] > 0  # the cached cases read the cache, never miss
    hits = result["cache_hit_rate_by_epoch"]
    assert hits[0] == 0.0 and all(0.0 <= h <= 1.0 for h in hits) and hits[-1] > 0  # empty at first, fills up


def test_bad_dtype_is_rejected():
    from multimae_att.bench import run_bench

    with pytest.raises(ValueError, match="dtype"):
        run_bench("micro", dtype="fp8")


def test_explicit_attention_keeps_a_fused_floor():
    from multimae_att.bench import run_bench

    result = run_bench("micro", dtype="fp32", warmup=0, repeats=1, attn="explicit")
    assert result["attn"] == "explicit" and result["inference_forward"] > 0
    with pytest.raises(ValueError, match="attn"):
        run_bench("micro", dtype="fp32", warmup=0, repeats=1, attn="flash")
