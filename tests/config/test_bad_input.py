"""Bad input through the command lines: one line naming the key or file, before any work and
without touching what a run folder already holds; corrupt samples skipped and counted in
training, never substituted in evaluation."""
from __future__ import annotations

import json
import logging
import random
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from multimae_att.run.metrics_log import MetricsLogger

from helpers import REPO
from helpers.finetune import SMALL, run_finetune
from helpers.prep import data
from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, run_cli


def _pretrain_config(path: Path, data: Path) -> Path:
    path.write_text(f"""
model: {{size: tiny, semseg_num_classes: 10}}
data: {{root: {data}, image_size: 32, batch_size: 4, num_workers: 0}}
masking: {{num_encoded_tokens: 6}}
optim: {{lr: 1.0e-3}}
schedule: {{warmup_epochs: 1, total_epochs: 10, start_epoch: 0}}
train: {{epochs: 1, max_steps: 2, cpu: true, mixed_precision: "no", save_every: 100}}
log: {{every: 1, pictures_every: 0, progress: false}}
""")
    return path


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _exit_text(excinfo, capsys) -> str:
    code = excinfo.value.code
    return (code if isinstance(code, str) else "") + capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data) -> Path:
    """A finished pretraining run folder: what a bad rerun must leave untouched."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_cli("--config", str(_pretrain_config(out.parent / "c.yaml", data)), f"output_dir={out}")
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(True)
    return out


# ------------------------------------------------------------------ 1. config values
@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "config error: optim.lr must be > 0, got -1.0"),
    ("train.max_steps=-1", "config error: train.max_steps must be >= 0, got -1"),
    ("masking.num_encoded_tokens=12", "config error: masking.num_encoded_tokens=12 must be below the 12 tokens"),
    ("data.batch_size=-4", "config error: data.batch_size must be >= 1, got -4"),
    ("masking.prob=1.5", "config error: masking.prob must be in [0, 1], got 1.5"),
])
def test_bad_values_stop_before_any_work(tmp_path, data, finished_run, capsys, override, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = _snapshot(run)
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(_pretrain_config(tmp_path / "c.yaml", data)), f"output_dir={run}", override)
    assert _exit_text(e, capsys).startswith(message)
    assert _snapshot(run) == before


def test_bad_finetune_value_names_the_key(tmp_path, data, capsys):
    with pytest.raises(SystemExit) as e:
        run_finetune.main(["--config", str(REPO / "configs/finetune/synthetic_semseg.yaml"),
                           f"data.root={data}", f"output_dir={tmp_path / 'run'}", "optim.layer_decay=0"])
    assert "config error: optim.layer_decay must be in (0, 1], got 0.0" in _exit_text(e, capsys)
    assert not (tmp_path / "run").exists()


def test_heads_default_k_is_clamped_to_the_model_with_a_note(tmp_path, data, capsys):
    """The strategy's default k=4 does not fit the tiny model's 3 heads: clamped, noted, saved."""
    out = tmp_path / "run"
    run_cli("--config", str(_pretrain_config(tmp_path / "c.yaml", data)), f"output_dir={out}",
            "masking.strategy=heads", "train.max_steps=1")
    assert "using masking.params.k=3" in capsys.readouterr().out
    assert "k: 3" in (out / "config.yaml").read_text()
    assert [r["step"] for r in MetricsLogger.read(out / "metrics.jsonl")] == [1]


# ------------------------------------------------------------------ 2. data
def _copy_data(data: Path, to: Path) -> Path:
    shutil.copytree(data, to)
    return to


def _first(folder: Path) -> Path:
    return min(folder.rglob("*.png"))


def _poke_label(png: Path, value: int) -> None:
    labels = np.array(Image.open(png))
    labels[0, 0] = value
    Image.fromarray(labels).save(png)


def test_training_label_out_of_range_is_skipped_counted_and_named(tmp_path, data, caplog):
    root = _copy_data(data, tmp_path / "data")
    bad = _first(root / "train" / "semseg")
    _poke_label(bad, 200)                                   # 10 classes: 200 cannot be embedded
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="multimae_att.data"):
        run_cli("--config", str(_pretrain_config(tmp_path / "c.yaml", root)), f"output_dir={out}",
                "train.max_steps=4")                        # one epoch: every sample drawn once
    assert f"{bad}: semseg label values [200] outside [0, 10)" in caplog.text
    assert MetricsLogger.read(out / "metrics.jsonl")[-1]["skipped_samples"] == 1
    assert (out / "final.pth").is_file()


def _finetune(root: Path, out: Path, *extra: str) -> dict:
    return run_finetune.main(["--config", str(REPO / "configs/finetune/synthetic_semseg.yaml"),
                              f"data.root={root}", f"output_dir={out}", "data.layout=folder", *SMALL, *extra])


@pytest.fixture(scope="module")
def corrupt_val(tmp_path_factory, data) -> tuple[Path, Path, list[str]]:
    """(data with two corrupt validation samples, the same data without them, their ids)."""
    base = tmp_path_factory.mktemp("corrupt_val")
    root = _copy_data(data, base / "corrupt")
    clean = _copy_data(data, base / "clean")
    labels = sorted((root / "val" / "semseg").rglob("*.png"))
    rgbs = sorted((root / "val" / "rgb").rglob("*.png"))
    _poke_label(labels[1], 12)                              # a label outside [0, 10)
    rgbs[4].write_bytes(rgbs[4].read_bytes()[:100])         # a truncated image
    ids = sorted([labels[1].stem, rgbs[4].stem])
    for stem in ids:                                        # the reference: the set without them
        for f in (clean / "val").rglob(f"{stem}.png"):
            f.unlink()
    return root, clean, ids


def test_corrupt_evaluation_sample_is_an_error_naming_the_file(tmp_path, corrupt_val, capsys):
    root, _, ids = corrupt_val
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _finetune(root, out)
    text = _exit_text(e, capsys)
    assert text.startswith("data error: 2 evaluation sample(s) could not be used")
    assert "outside [0, 10) (ignore index 255)" in text and "cannot decode rgb" in text
    assert all(stem in text for stem in ids) and "data.eval_on_corrupt=skip" in text
    assert not (out / "metrics.json").exists()              # no number from a partial set


def test_skipped_evaluation_samples_are_listed_never_substituted(tmp_path, corrupt_val, capsys):
    """skip: the metrics are those of the set without the corrupt samples (no other sample
    stands in for them), metrics.json lists them, and the run exits non-zero after writing it."""
    root, clean, ids = corrupt_val
    with pytest.raises(SystemExit) as e:
        _finetune(root, tmp_path / "skip", "data.eval_on_corrupt=skip")
    text = _exit_text(e, capsys)
    assert text.startswith("data error: the evaluation left out 2 corrupt sample(s)")
    skipped = json.loads((tmp_path / "skip" / "metrics.json").read_text())
    assert skipped["skipped_eval_samples"] == ids
    reference = _finetune(clean, tmp_path / "clean")
    assert reference["skipped_eval_samples"] == []
    for key in ("miou", "pixel_acc", "macc", "per_class_iou"):
        assert skipped[key] == reference[key], key
    accepted = _finetune(root, tmp_path / "ok", "data.eval_on_corrupt=skip_ok")   # exit status 0
    assert accepted["skipped_eval_samples"] == ids and accepted["miou"] == reference["miou"]


@pytest.mark.parametrize("protocol", ["ours", "multimae"])
def test_placeholders_batch_with_readable_samples(corrupt_val, protocol):
    """A corrupt sample's placeholder has the keys, shapes and dtypes of a readable one under
    every evaluation transform (MultiMAE's letterbox recipe included), so batches collate."""
    from multimae_att.data import build_dataset
    from multimae_att.finetune.config import load_finetune_config
    from multimae_att.finetune.native import native_collate
    from multimae_att.finetune.protocols import make_recipe

    root, _, ids = corrupt_val
    cfg = load_finetune_config(str(REPO / "configs/finetune/synthetic_semseg.yaml"),
                               [f"data.root={root}", f"data.protocol={protocol}", "data.image_size=32"])
    native = ["semseg"] if cfg.eval_mode() == "full" else []
    ds = build_dataset(root, ["rgb", "semseg"], split="val", train=False, image_size=32, semseg_scale=1,
                       native_modalities=native, recipe=make_recipe(cfg, train=False),
                       label_ranges=cfg.label_ranges(), on_corrupt="mark")
    samples = [ds[i] for i in range(len(ds))]
    assert [s["sample_id"] for s in samples if not s["valid"]] == ids
    assert [s["sample_id"] for s in samples] == ds.sample_ids()         # nothing substituted
    good = next(s for s in samples if s["valid"])
    for bad in (s for s in samples if not s["valid"]):
        assert bad.keys() == good.keys() and bad["skip_reason"]
        for key, value in good.items():
            if torch.is_tensor(value) and not key.endswith("_native"):
                assert (bad[key].shape, bad[key].dtype) == (value.shape, value.dtype), key
    batch = native_collate(samples, cfg.task.ignore_index)
    assert batch["valid"].tolist() == [s["sample_id"] not in ids for s in samples]


def _cut_shard(shards: Path, keep: int, mid_member: bool) -> None:
    """Truncate the only training shard after ``keep`` complete samples: at the next member's
    header (the archive just ends) or in the middle of its data (a tar read error)."""
    tar_path = shards / "train-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    keys = sorted({m.name.split(".")[0] for m in members})
    first = next(m for m in members if m.name.startswith(keys[keep] + "."))
    cut = first.offset_data + first.size // 2 if mid_member else first.offset
    tar_path.write_bytes(tar_path.read_bytes()[:cut])


@pytest.mark.parametrize("mid_member", [False, True])
def test_a_cut_shard_counts_every_lost_sample(tmp_path, data, mid_member):
    """Read and lost samples add up to the shard index's count, wherever the archive was cut."""
    from multimae_att.data import build_dataset

    root = _copy_data(data, tmp_path / "data")
    _cut_shard(root / "shards", keep=10, mid_member=mid_member)
    ds = build_dataset(root, ["rgb", "depth", "semseg"], split="train", image_size=32, layout="shards")
    assert sum(1 for _ in ds) == 10 and ds.skipped.value == 6


def test_truncated_shard_counts_the_samples_it_lost(tmp_path, data):
    """16 samples in one shard, cut after 10 (a tar read error): every epoch loses 6 samples and
    counts 6 (it counted 3: two tar errors and the incomplete sample)."""
    root = _copy_data(data, tmp_path / "data")
    _cut_shard(root / "shards", keep=10, mid_member=True)
    out = tmp_path / "run"
    # 10 readable samples = 2 batches of 4 per epoch: steps 1-2 in epoch 0, 3-4 in epoch 1. The
    # shuffle buffer reads the whole shard before the first batch of an epoch.
    run_cli("--config", str(_pretrain_config(tmp_path / "c.yaml", root)), f"output_dir={out}",
            "data.layout=shards", "train.max_steps=4")
    records = MetricsLogger.read(out / "metrics.jsonl")
    assert [r["skipped_samples"] for r in records] == [6, 6, 12, 12]


# ------------------------------------------------------------------ 3. augmentation
def test_randaugment_never_asks_pillow_for_zero_posterize_bits():
    """``rand-m9-mstd0.5-inc1`` draws magnitudes around 9 with std 0.5; at >= 10 timm's
    PosterizeIncreasing asks for 0 bits, which Pillow >= 13 rejects. Same seeded draws: timm's
    own transform fails, ours does not."""
    from timm.data import rand_augment_transform

    from multimae_att.finetune.augment import RandAugmentRGB

    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8))
    raw = rand_augment_transform("rand-m9-mstd0.5-inc1", {"translate_const": 100, "img_mean": (124, 116, 104)})
    ours = RandAugmentRGB("rand-m9-mstd0.5-inc1").transform

    def failures(transform) -> int:
        random.seed(0)
        count = 0
        for _ in range(5000):
            try:
                transform(image)
            except ValueError as err:
                assert "bits" in str(err)
                count += 1
        return count

    assert failures(raw) > 0            # the edge exists with this Pillow (the test can fail)
    assert failures(ours) == 0
    posterize = next(op for op in ours.ops if op.name == "PosterizeIncreasing")
    assert posterize.level_fn(10.0, {}) == (1,) and posterize.level_fn(0.0, {}) == (4,)


# ------------------------------------------------------------------ 4. checkpoints
def _bad_checkpoint(kind: str, folder: Path) -> tuple[Path, str]:
    path = folder / f"{kind}.pth"
    if kind == "text":
        path.write_text("hello world\n")
        return path, "got a text file"
    if kind == "random":
        path.write_bytes(np.random.RandomState(0).bytes(5000))
        return path, "got unknown binary data"
    if kind == "truncated":
        torch.save({"model": {"w": torch.zeros(64, 64)}}, path)
        path.write_bytes(path.read_bytes()[:4000])
        return path, "got a truncated or damaged zip archive"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not weights")
        return path, "got a zip archive without data.pkl"
    return path, "does not exist"


@pytest.mark.parametrize("runner", ["pretrain", "finetune"])
@pytest.mark.parametrize("kind", ["text", "random", "truncated", "zip", "missing"])
def test_unreadable_checkpoint_is_one_line_before_any_output(tmp_path, data, finished_run, capsys,
                                                             runner, kind):
    path, reason = _bad_checkpoint(kind, tmp_path)
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)                      # config.yaml etc. of an earlier run
    before = _snapshot(run)
    with pytest.raises(SystemExit) as e:
        if runner == "pretrain":
            run_cli("--config", str(_pretrain_config(tmp_path / "c.yaml", data)), f"output_dir={run}",
                    "init.resume=false", f"init.checkpoint={path}")
        else:
            run_finetune.main(["--config", str(REPO / "configs/finetune/synthetic_knn.yaml"),
                               f"data.root={data}", f"output_dir={run}", f"init.checkpoint={path}"])
    text = _exit_text(e, capsys).strip()
    assert text.startswith("config error: init.checkpoint") and str(path) in text and reason in text
    assert "\n" not in text
    if kind != "missing":
        assert "expected a file written by torch.save (a zip archive holding data.pkl)" in text
    assert _snapshot(run) == before


# ------------------------------------------------------------------ 5. command line
def test_repeated_config_overrides_anywhere_and_help(tmp_path, data, capsys):
    from multimae_att.config import config_help
    from multimae_att.pretrain.config import PretrainConfig

    first = _pretrain_config(tmp_path / "a.yaml", data)
    (tmp_path / "b.yaml").write_text("optim: {lr: 0.002}\ntrain: {max_steps: 5}\n")
    with pytest.raises(SystemExit) as e:
        run_cli("--config", str(first), "masking.strategy=low", "--config", str(tmp_path / "b.yaml"),
                "--print-config", "train.max_steps=7")
    assert e.value.code == 0
    import yaml
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["optim"]["lr"] == 0.002 and resolved["train"]["max_steps"] == 7    # later wins
    assert resolved["masking"]["strategy"] == "low" and resolved["model"]["size"] == "tiny"
    with pytest.raises(SystemExit) as e:
        run_cli("--help")
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--config FILE" in out
    keys = config_help(PretrainConfig)
    assert len(keys) > 80 and all(line in out for line in keys)
    assert "masking.num_encoded_tokens = 98  (int; >= 1)" in out and "optim.lr = null  (float | null; > 0)" in out
