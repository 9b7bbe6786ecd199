"""Smoke test of the benchmark: it runs end to end and writes every documented key (no timings asserted)."""
import json

import pytest
import torch

from multimae_att.bench import AB_RATIOS, CASES, RATIOS
from multimae_att.bench.__main__ import main

KEYS = {"random_step", "attention_step", "scoring_pass", "inference_forward", "cached_step", "amt_step",
        "ratios", "paired_ratios", "min_ratios", "cpu_time_ratios", "peak_memory_mib", "data_pipeline_samples_per_s",
        "mask_generation_samples_per_s", "machine", "preset", "runs", "dtype", "amt_split", "cache_hit_rate_by_epoch",
        "flops", "efficiency", "matmul_peak_flops", "ab_ratios", "ab_quartiles", "ab_clock"}


@pytest.fixture(autouse=True)
def _restore_threads():
    """The bench runs with --threads 1 here (two threads on a loaded 2-core machine spin-wait);
    the flag sets torch's threads for the whole process, so put them back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "micro.json"
    threads = torch.get_num_threads()
    try:
        assert main(["--preset", "micro", "--dtype", "fp32", "--warmup", "0", "--repeats", "1", "--threads", "1",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_json_has_every_key(result, capsys):
    import platform

    from multimae_att.run.cpu_malloc import MMAP_THRESHOLD, TRIM_THRESHOLD

    assert KEYS <= set(result)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert result["malloc"] == {"mode": "keep", "fixed": {"mmap_threshold": MMAP_THRESHOLD,
                                                          "trim_threshold": TRIM_THRESHOLD} if glibc else None}
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


def test_targeted_ratios_are_also_timed_back_to_back(result):
    run = result["runs"]["fp32"]
    keys = [f"{a}/{b}" for a, b in AB_RATIOS]
    assert list(result["ab_ratios"]) == keys and result["ab_clock"] == "cpu_time"
    for key in keys:
        pairs = run["ab_pair_ratios"][key]
        assert len(pairs["cpu"]) == len(pairs["wall"]) == result["repeats"]
        assert pairs["cpu"][0] > 0 and result["ab_ratios"][key] == pytest.approx(pairs["cpu"][0])  # one pair
        assert result["ab_quartiles"][key] == [pytest.approx(pairs["cpu"][0])] * 2


def test_measure_ab_alternates_the_order_and_divides_each_pair(monkeypatch):
    """A fake clock that only the cases advance: case ``a`` costs 3 s, ``b`` 2 s, ``c`` 1 s."""
    from multimae_att.bench import timing

    clock = [0.0]
    calls = []

    def case(name, cost):
        def fn():
            calls.append(name)
            clock[0] += cost
        return fn

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(timing.time, "process_time", lambda: 2 * clock[0])
    cases = {"a": case("a", 3.0), "b": case("b", 2.0), "c": case("c", 1.0)}
    out = timing.measure_ab(cases, [("a", "b"), ("c", "a")], torch.device("cpu"), repeats=3)
    assert calls == ["a", "b", "b", "a", "a", "b", "c", "a", "a", "c", "c", "a"]
    assert out["a/b"] == {"wall": [1.5] * 3, "cpu": [1.5] * 3}
    assert out["c/a"]["cpu"] == pytest.approx([1 / 3] * 3)
    assert timing.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == [2.0, 4.0]
    assert timing.quartiles([0.7]) == [0.7, 0.7]


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


def test_explicit_attention_keeps_a_fused_floor(tmp_path):
    from multimae_att.bench.cases import BenchCases
    from multimae_att.bench.presets import PRESETS
    from multimae_att.model.attention import attention_modules

    bench = BenchCases(PRESETS["micro"], torch.device("cpu"), "fp32", str(tmp_path), attn="explicit")
    seen = []
    for m in attention_modules(bench.model):
        m.register_forward_pre_hook(lambda mod, args: seen.append(mod.fused_attn))
    cases = bench.cases()
    cases["random_step"]()
    assert seen and not any(seen)  # the training step runs the chosen path
    seen.clear()
    cases["inference_forward"]()
    assert seen and all(seen)  # the floor is fused
    with pytest.raises(ValueError, match="attn"):
        BenchCases(PRESETS["micro"], torch.device("cpu"), "fp32", str(tmp_path), attn="flash")


# --------------------------------------------------------------------------- --vs-upstream, flops

STANDIN = {
    # The shims are exercised too: utils/__init__ must not run, torch._six is gone from torch 2.
    "utils/__init__.py": "raise ImportError('utils/__init__ must not be imported by the bench')\n",
    "utils/registry.py": "def register_model(fn):\n    return fn\n",
    "utils/optim_factory.py": (
        "import torch\n"
        "CALLS = []\n"
        "def create_optimizer(args, model):\n"
        "    CALLS.append(args.opt)\n"
        "    return torch.optim.AdamW(model['model'].parameters(), lr=args.lr, weight_decay=args.weight_decay)\n"),
    "utils/native_scaler.py": (
        "import torch\n"
        "from torch._six import inf\n"
        "STEPS = []\n"
        "class NativeScalerWithGradNormCount:\n"
        "    def __init__(self, enabled=True):\n"
        "        self.enabled = enabled\n"
        "    def __call__(self, loss, optimizer, clip_grad=None, skip_grad=None, parameters=None,"
        " create_graph=False):\n"
        "        loss.backward()\n"
        "        optimizer.step()\n"
        "        STEPS.append(float(loss))\n"
        "        return torch.tensor(inf)\n"),
    "utils/task_balancing.py": (
        "import torch\n"
        "class NoWeightingStrategy(torch.nn.Module):\n"
        "    def forward(self, losses):\n"
        "        return losses\n"),
    # A stand-in for their model and criterion: our drop-in classes and plain losses.
    "multimae/__init__.py": (
        "import torch\n"
        "import torch.nn.functional as F\n"
        "from utils.registry import register_model\n"
        "from multimae_att.model import MultiMAE, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter\n"
        "class MaskedMSELoss(torch.nn.Module):\n"
        "    def __init__(self, patch_size=16, stride=1, norm_pix=False):\n"
        "        super().__init__()\n"
        "    def forward(self, input, target, mask=None):\n"
        "        return (input - target).square().mean()\n"
        "MaskedL1Loss = MaskedMSELoss\n"
        "class MaskedCrossEntropyLoss(torch.nn.Module):\n"
        "    def __init__(self, patch_size=16, stride=1, label_smoothing=0.0):\n"
        "        super().__init__()\n"
        "    def forward(self, input, target, mask=None):\n"
        "        return F.cross_entropy(input, target)\n"),
}


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    root = tmp_path_factory.mktemp("MultiMAE")
    for rel, text in STANDIN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_vs_upstream_times_their_step_and_reports_ours_over_theirs(standin, tmp_path):
    import contextlib
    import sys

    from multimae_att.run.cpu_malloc import fixed_thresholds

    out = tmp_path / "vs.json"
    # --malloc default after an earlier keep in this process: the thresholds stay, with a warning
    said = pytest.warns(UserWarning, match="--malloc default") if fixed_thresholds() else contextlib.nullcontext()
    with said:
        assert main(["--preset", "micro", "--dtype", "fp32", "--warmup", "0", "--repeats", "2", "--threads", "1",
                     "--ab-repeats", "3", "--malloc", "default", "--vs-upstream", str(standin), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    # default leaves glibc's thresholds alone, and says so when an earlier run here fixed them
    assert (res["repeats"], res["ab_repeats"]) == (2, 3)
    assert res["malloc"] == {"mode": "default", "fixed": fixed_thresholds()}
    run = res["runs"]["fp32"]
    assert len(run["cpu_times_s"]["upstream_random_step"]) == 2 and run["flops"]["upstream_random_step"] > 0
    up = res["vs_upstream"]
    assert up["path"] == str(standin) and up["commit"] is None and up["clock"] == "cpu_time"
    cpu = run["cpu_median_s"]
    for case in ("random_step", "attention_step", "cached_step", "amt_step"):
        assert up["by_dtype"]["fp32"][case] == pytest.approx(cpu[case] / cpu["upstream_random_step"])
        assert run["cpu_time_ratios"][f"{case}/upstream_random_step"] == pytest.approx(up["by_dtype"]["fp32"][case])
    for key in run["ab_pair_ratios"]:  # and back to back: --ab-repeats pairs of every A/B ratio
        assert len(run["ab_pair_ratios"][key]["cpu"]) == 3
    for case in ("random_step", "cached_step"):
        pairs = run["ab_pair_ratios"][f"{case}/upstream_random_step"]["cpu"]
        assert up["ab_by_dtype"]["fp32"][case] == pytest.approx(sorted(pairs)[1])
    assert "utils" not in sys.modules and "multimae" not in sys.modules  # nothing of theirs left behind


def test_upstream_step_runs_their_optimizer_and_scaler_on_our_weights(standin):
    from multimae_att.bench.presets import PRESETS, build_model, synthetic_batch
    from multimae_att.bench.upstream import UpstreamStep, load_upstream

    up = load_upstream(standin)
    p = PRESETS["micro"]
    ours = build_model(p)
    step = UpstreamStep(up, p, torch.device("cpu"), "fp32", synthetic_batch(p, torch.device("cpu")), ours.state_dict())
    assert up.optim_factory.CALLS == ["adamw"]
    before = {k: v.clone() for k, v in step.model.state_dict().items()}
    for k, v in ours.state_dict().items():
        assert torch.equal(before[k], v)  # their model starts from our weights
    loss = step()
    assert up.native_scaler.STEPS == [pytest.approx(loss)]
    assert any(not torch.equal(before[k], v) for k, v in step.model.state_dict().items())  # it trained


def test_vs_upstream_names_what_is_missing(tmp_path, capsys):
    from multimae_att.bench.upstream import load_upstream

    with pytest.raises(FileNotFoundError, match="multimae/__init__.py"):
        load_upstream(tmp_path)
    with pytest.raises(SystemExit):
        main(["--preset", "micro", "--vs-upstream", str(tmp_path)])
    assert "EPFL-VILAB/MultiMAE" in capsys.readouterr().err


def test_flops_count_fused_attention_like_the_explicit_product():
    import torch.nn.functional as F

    from multimae_att.bench.flops import count_flops

    q, k, v = (torch.randn(2, 3, 10, 8, requires_grad=True) for _ in range(3))

    def fused():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    def explicit():
        ((q @ k.transpose(-2, -1) / 8 ** 0.5).softmax(-1) @ v).sum().backward()

    # forward 2 products of 2*B*H*S*S*D each; backward twice that
    assert count_flops(fused) == count_flops(explicit) == 3 * 2 * (2 * 2 * 3 * 10 * 10 * 8)


def test_efficiency_is_counted_work_over_the_matmul_peak(result):
    run = result["runs"]["fp32"]
    assert run["matmul_peak_flops"] > 1e8
    for case, eff in run["efficiency"].items():
        assert eff == pytest.approx(run["flops"][case] / run["cpu_median_s"][case] / run["matmul_peak_flops"])
    assert set(run["efficiency"]) >= {"random_step", "scoring_pass", "inference_forward"}


def _hand_written_batch(p, seed):
    """The synthetic batch as it was written by hand before it read the modality table (the
    reference: the same draws in the same order, shapes spelled out)."""
    g = torch.Generator().manual_seed(seed)
    B, S = p.batch_size, p.image_size
    src_h, src_w = p.source_size
    scale = torch.empty(B).uniform_(0.3, 1.0, generator=g)
    height, width = scale * src_h, scale * src_w * torch.empty(B).uniform_(0.75, 1.0, generator=g)
    top = torch.rand(B, generator=g) * (src_h - height)
    left = torch.rand(B, generator=g) * (src_w - width)
    return {"rgb": torch.randn(B, 3, S, S, generator=g), "depth": torch.rand(B, 1, S, S, generator=g),
            "semseg": torch.randint(0, p.semseg_classes, (B, S // 4, S // 4), generator=g),
            "crop_box": torch.stack([top, left, height, width], 1), "flip": torch.rand(B, generator=g) < 0.5,
            "source_size": torch.tensor([[src_h, src_w]] * B)}


@pytest.mark.parametrize("preset,seed", [("micro", 0), ("micro", 5), ("tiny", 1)])
def test_synthetic_batch_reads_the_modality_table_and_draws_as_before(preset, seed):
    from multimae_att.bench.presets import MODALITIES, PRESETS, synthetic_batch
    from multimae_att.modalities import get_modality

    p = PRESETS[preset]
    got, want = synthetic_batch(p, torch.device("cpu"), seed), _hand_written_batch(p, seed)
    assert set(got) == set(want) | {"sample_id"} and len(got["sample_id"]) == p.batch_size
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    for m in MODALITIES:                      # the table's shapes: channels (or labels), stride level
        mod = get_modality(m)
        side = p.image_size // mod.stride
        assert got[m].shape == ((p.batch_size, side, side) if mod.labels else (p.batch_size, mod.channels, side, side))
    assert 0 <= got["depth"].min() and got["depth"].max() < 1 and got["semseg"].max() < p.semseg_classes


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--ab-repeats", "0"), ("--warmup", "-1")])
def test_counts_below_their_least_are_usage_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--preset", "micro", flag, value])
    assert exc.value.code == 2 and f"argument {flag}: must be >= " in capsys.readouterr().err
