"""The run skeleton under both runners: finetune determinism and exact resume, the log window,
trackers and console output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from multimae_att.run.metrics_log import MetricsLogger

from helpers import REPO
from helpers.finetune import run_task as finetune
from helpers.finetune import synthetic_root
from helpers.pretrain import (
    ENV,
    _fresh_accelerate_state,
    _importable_entry_point,
    comparable_metrics,
    data_root,
    kill_once_logged,
    run_cli,
    tiny_config,
)

# RandAugment, Mixup/CutMix, drop-path, a fresh head: every random draw of a cls finetune
CLS = ["train.max_steps=6", "model.drop_path_rate=0.2", "train.eval_every=1", "log.every=1"]


def _weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


def _identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_seeded_cls_finetunes_are_bit_identical(synthetic_root, tmp_path):
    one = finetune("cls", synthetic_root, tmp_path / "one", *CLS)
    two = finetune("cls", synthetic_root, tmp_path / "two", *CLS)
    assert _identical(_weights(tmp_path / "one" / "checkpoint-last.pth"),
                      _weights(tmp_path / "two" / "checkpoint-last.pth"))
    assert comparable_metrics(tmp_path / "one") == comparable_metrics(tmp_path / "two")
    assert one["top1"] == two["top1"]
    other = finetune("cls", synthetic_root, tmp_path / "seed1", *CLS, "train.seed=1")   # the seed matters
    assert not _identical(_weights(tmp_path / "one" / "checkpoint-last.pth"),
                          _weights(tmp_path / "seed1" / "checkpoint-last.pth"))
    assert other["task"] == "cls"


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    """The synthetic set as WebDataset shards of 5 samples (24 train: 3 batches of 8 per epoch)."""
    out = tmp_path_factory.mktemp("synthetic_shards")
    subprocess.run([sys.executable, str(REPO / "data_prep/make_synthetic.py"), "--out", str(out),
                    "--num-train", "24", "--num-val", "12", "--size", "48", "--format", "shards",
                    "--shard-size", "5"], check=True, capture_output=True)
    return out


def test_killed_finetune_resumes_bit_exact_mid_epoch_with_shards(shard_root, tmp_path):
    def command(out):
        return [sys.executable, str(REPO / "run_finetune.py"), "--config",
                str(REPO / "configs/finetune/synthetic_cls.yaml"), f"data.root={shard_root}",
                "data.layout=shards", f"output_dir={out}", "data.image_size=32", "data.batch_size=8",
                "log.progress=false", "train.save_every=2", "train.keep_last=5", *CLS]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(command(ref), check=True, env=ENV, capture_output=True, timeout=600)
    kill_once_logged(command(cut), cut, step=5)      # states of steps 2 and 4 (mid-epoch) on disk
    assert not (cut / "metrics.json").exists()
    done = subprocess.run(command(cut), env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    assert _identical(_weights(ref / "checkpoint-last.pth"), _weights(cut / "checkpoint-last.pth"))
    assert _identical(_weights(ref / "checkpoint-best.pth"), _weights(cut / "checkpoint-best.pth"))
    assert comparable_metrics(cut) == comparable_metrics(ref)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, cut))
    assert {k: v for k, v in a.items() if k not in ("cost", "provenance")} == \
           {k: v for k, v in b.items() if k not in ("cost", "provenance")}


def _tensorboard(run, tag):
    """``(step, value)`` of a scalar as TensorBoard shows it: the run's folder read as a whole
    (its loader applies the purges of a resumed run)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0}).Reload()
    return [(e.step, pytest.approx(e.value)) for e in events.Scalars(tag)]


def test_log_window_survives_a_resume(tmp_path, data_root):
    # Logged every 2 steps, saved every 3: the state of step 3 holds half a window.
    cfg = tiny_config(tmp_path / "c.yaml", data_root, model={"drop_path_rate": 0.1},
                      masking={"strategy": "noisy"}, log={"every": 2},
                      train={"max_steps": 6, "epochs": 10, "save_every": 3, "keep_last": 3})
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli("--config", str(cfg), f"output_dir={ref}")
    run_cli("--config", str(cfg), f"output_dir={cut}")
    for name in ("metrics.json", "final.pth", "checkpoints/state_00000006.pth"):
        (cut / name).unlink()                             # as if killed after step 5
    run_cli("--config", str(cfg), f"output_dir={cut}")
    assert [r["step"] for r in comparable_metrics(ref)] == [2, 4, 6]
    assert comparable_metrics(cut) == comparable_metrics(ref)
    # TensorBoard (the default tracker): steps 4 and 6 of the killed run were purged, each step
    # shows once, with the resumed run's values.
    assert len(list((cut / "tb").glob("events.out.tfevents.*"))) == 2   # one file per run
    assert _tensorboard(cut, "loss") == [(r["step"], r["loss"]) for r in comparable_metrics(cut)]
    # a record is the mean of its window: step 4 = mean of steps 3 and 4 (brute force from log.every=1)
    single = tmp_path / "single"
    run_cli("--config", str(cfg), f"output_dir={single}", "log.every=1")
    per_step = {r["step"]: r["loss"] for r in comparable_metrics(single)}
    windowed = {r["step"]: r["loss"] for r in comparable_metrics(ref)}
    for s in (2, 4, 6):
        assert windowed[s] == pytest.approx((per_step[s - 1] + per_step[s]) / 2, rel=1e-6)


class _Boom(RuntimeError):
    pass


def test_a_failure_at_an_evaluation_step_keeps_that_steps_state(synthetic_root, tmp_path, monkeypatch):
    """The state of a step with an evaluation is written before the evaluation: an evaluation
    that fails (or a later failure before the next state) loses no training, and the resumed run
    evaluates that step once more, logs it once and ends as an uninterrupted run."""
    from multimae_att.finetune.engine import FinetuneJob

    # 3 steps per epoch: evaluations at steps 3 and 4 (the last), states at 3 and 4
    args = ("train.max_steps=4", "train.eval_every=1", "train.save_every=3", "train.report=best",
            "train.keep_last=3")
    ref = tmp_path / "ref"
    expected = finetune("cls", synthetic_root, ref, *args)
    evaluate, micro_step = FinetuneJob.evaluate, FinetuneJob.micro_step

    def failing_evaluate(self, step):
        if step == 3:
            raise _Boom("evaluation failed")
        return evaluate(self, step)

    def failing_step(self, batch, step, micro):
        if step == 3:   # the 4th step (0-based): after the evaluation of step 3 was logged
            raise _Boom("training failed")
        return micro_step(self, batch, step, micro)

    for hook, failing, logged in (("evaluate", failing_evaluate, []), ("micro_step", failing_step, [3])):
        cut = tmp_path / hook
        with monkeypatch.context() as m:
            m.setattr(FinetuneJob, hook, failing)
            with pytest.raises(_Boom):
                finetune("cls", synthetic_root, cut, *args)
        assert sorted(p.name for p in (cut / "checkpoints").glob("state_*.pth")) == ["state_00000003.pth"]
        assert [r["step"] for r in MetricsLogger.read(cut / "metrics.jsonl") if "val/top1" in r] == logged
        done = finetune("cls", synthetic_root, cut, *args)
        assert {k: v for k, v in done.items() if k not in ("cost", "provenance")} == \
               {k: v for k, v in expected.items() if k not in ("cost", "provenance")}
        assert comparable_metrics(cut) == comparable_metrics(ref)      # each evaluation logged once
        assert [r["step"] for r in comparable_metrics(cut) if "val/top1" in r] == [3, 4]
        for tag in ("val/top1", "loss"):                               # and once in TensorBoard
            assert _tensorboard(cut, tag) == [(r["step"], r[tag]) for r in comparable_metrics(cut) if tag in r]
        for name in ("checkpoint-best.pth", "checkpoint-last.pth"):
            assert _identical(_weights(ref / name), _weights(cut / name))


def test_log_checks_run_once_on_the_main_process_outside_step_time(monkeypatch):
    """``Job.log_checks`` (the held-out check of pretraining): called on the main process only,
    after the record's ``step_time`` is taken; the next window starts after it."""
    from multimae_att.run import trainer

    clock = [0.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])

    class Checked(trainer.Job):
        total_steps, steps_per_epoch = 10, 10.0

        def __init__(self):
            self.calls = 0

        def log_checks(self, step):
            self.calls += 1
            clock[0] += 100.0                        # a slow check
            return {"check": 0.5, "time/check_s": 100.0}

    class Acc:
        device, num_processes = torch.device("cpu"), 1

        def __init__(self, main):
            self.is_main_process = main

    class Logger:
        def __init__(self):
            self.records = []

        def log(self, record, line=None, always=False):
            self.records.append(record)

    for main in (True, False):
        run = trainer.Run.__new__(trainer.Run)      # only what logging a window reads
        run.acc, run.window, run.name, run.logger, run.last_record = Acc(main), trainer.LogWindow(), "t", Logger(), None
        job = Checked()
        for step in (2, 4):                          # two steps of 1 s per record
            for _ in range(2):
                clock[0] += 1.0
                run.window.add({"loss": torch.tensor(1.0)})
            run._log_window(job, step, 0.1, None)
        assert [r["step_time"] for r in run.logger.records] == [1.0, 1.0]
        assert job.calls == (2 if main else 0)
        assert all(("check" in r) == main and ("time/check_s" in r) == main for r in run.logger.records)


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no TensorBoard events under {folder}"
    accs = [EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0}) for f in files]
    for a in accs:
        a.Reload()
    scalars = {t: [e.value for e in a.Scalars(t)] for a in accs for t in a.Tags()["scalars"]}
    images = {t for a in accs for t in a.Tags()["images"]}
    return scalars, images


def test_trackers_get_scalars_and_pictures_and_the_log_stays_the_source(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 2}, log={"pictures_every": 2})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", "log.trackers=[tensorboard]")
    scalars, images = _events(out / "tb")
    log = MetricsLogger.read(out / "metrics.jsonl")
    assert scalars["loss"] == pytest.approx([r["loss"] for r in log])
    assert scalars["losses/rgb"] == pytest.approx([r["losses"]["rgb"] for r in log])
    assert {"pictures/rgb", "pictures/depth", "pictures/semseg"} <= images
    printed = capsys.readouterr().out                     # log.progress=false: a line per logged step
    assert "pretrain step 1/2: loss" in printed and "pretrain step 2/2: loss" in printed
    assert "pretrain finished at step 2" in printed
    # log.trackers=[] (or the deprecated log.tensorboard=false): no tracker output
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'quiet'}", "log.trackers=[]")
    run_cli("--config", str(cfg), f"output_dir={tmp_path / 'old'}", "log.tensorboard=false")
    assert not (tmp_path / "quiet" / "tb").exists() and not (tmp_path / "old" / "tb").exists()


def test_finetune_logs_to_trackers_and_prints_final_metrics(synthetic_root, tmp_path, capsys):
    result = finetune("cls", synthetic_root, tmp_path, "train.max_steps=3", "train.eval_every=1")
    scalars, _ = _events(tmp_path / "tb")
    log = MetricsLogger.read(tmp_path / "metrics.jsonl")
    assert scalars["loss"] == pytest.approx([r["loss"] for r in log if "loss" in r])
    assert scalars["val/top1"] == pytest.approx([r["val/top1"] for r in log if "val/top1" in r])
    printed = capsys.readouterr().out
    assert "finetune cls step 3/3: loss" in printed and "finetune cls step 3: top1" in printed
    assert f"finetune cls finished at step 3: top1 {result['top1']:.4g}" in printed


def test_missing_tracker_package_names_the_extra(tmp_path, data_root):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = tiny_config(tmp_path / "c.yaml", data_root)
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={tmp_path / 'run'}", "log.trackers=[wandb]")
    assert "pip install 'multimae_att[wandb]'" in str(err.value.code)
    assert not (tmp_path / "run").exists()


def test_randaugment_is_a_function_of_seed_epoch_and_sample():
    import random

    import numpy as np

    from multimae_att.finetune.augment import RandAugmentRGB

    sample = {"rgb": torch.linspace(-2, 2, 3 * 32 * 32).reshape(3, 32, 32), "sample_id": "scene_7"}
    aug = RandAugmentRGB("rand-m9-n3-mstd0.5-inc1", seed=3)
    random.seed(1)
    np.random.seed(1)
    before = (random.random(), np.random.rand())
    random.seed(1)
    np.random.seed(1)
    outs = [aug(sample, epoch)["rgb"] for epoch in range(6)]
    assert (random.random(), np.random.rand()) == before           # the global generators are untouched
    random.seed(99)                                                  # other global states: same result
    assert torch.equal(aug(sample, 2)["rgb"], outs[2])
    assert torch.equal(RandAugmentRGB("rand-m9-n3-mstd0.5-inc1", seed=3)(sample, 4)["rgb"], outs[4])
    assert len({o.sum().item() for o in outs}) > 1                   # epochs draw differently
    other = RandAugmentRGB("rand-m9-n3-mstd0.5-inc1", seed=4)
    assert any(not torch.equal(other(sample, e)["rgb"], outs[e]) for e in range(6))
