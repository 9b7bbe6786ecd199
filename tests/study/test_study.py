"""Studies: the aggregation on hand-made metrics, the plan (--dry-run), stale cells, a micro study
through the CLI (killed mid-way, resumed, re-run; a worker's cell equals a fresh run of its printed
command), and the submitit path with submitit's local executor."""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from multimae_att.config import save_config
from multimae_att.study.cli import main as study_main
from multimae_att.study.collect import BOOKKEEPING_COLUMNS, FIXED_COLUMNS
from multimae_att.study.config import load_study_config
from multimae_att.study.plan import build_plan
from multimae_att.study.report import write_report
from multimae_att.study.stats import fmt, paired, summarize
from multimae_att.study.status import cell_status

from helpers import REPO
from helpers.pretrain import make_synthetic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("study_data") / "data")


def micro_study(path: Path, data: Path, study_dir: Path, **top) -> Path:
    """2 variants x 2 seeds x 1 eval (k-NN) after a 3-step warm start; 32 px, 3-step runs."""
    cfg = {
        "study_dir": str(study_dir),
        "pretrain": {"config": str(REPO / "configs/pretrain/demo.yaml"), "overrides": [
            f"data.root={data}", "data.image_size=32", "data.batch_size=4", "masking.num_encoded_tokens=6",
            "train.max_steps=3", "train.save_every=2", "log.every=1", "log.pictures_every=0",
            "log.progress=false", "log.tensorboard=false"]},
        "warm_start": {"overrides": ["masking.strategy=random"]},
        "variants": {"random": ["masking.strategy=random"], "high": []},
        "seeds": [0, 1],
        "evals": {"knn": {"config": str(REPO / "configs/finetune/synthetic_knn.yaml"),
                          "overrides": [f"data.root={data}", "data.image_size=32", "log.progress=false"],
                          "metrics": ["knn_top1"]}},
        "threads_per_cell": 1,
    }
    cfg.update(top)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_study(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run_study.py"), *argv], env=env, cwd=REPO,
                          capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------ aggregation

def test_summary_and_paired_difference_by_hand():
    s = summarize([1.0, 2.0, 4.0, float("nan"), None])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(7 / 3), pytest.approx(statistics.stdev([1, 2, 4])))
    assert math.isnan(summarize([5.0]).std)
    p = paired({0: 10.0, 1: 12.0, 2: 9.0, 3: 100.0}, {0: 9.0, 1: 10.0, 2: 10.0})   # seed 3 unpaired
    assert (p.n, p.agree) == (3, 2)                          # d = +1, +2, -1; mean > 0
    assert p.mean == pytest.approx(2 / 3)
    assert p.se == pytest.approx(statistics.stdev([1, 2, -1]) / math.sqrt(3))
    assert paired({0: 1.0}, {1: 1.0}).n == 0
    assert fmt(52.0, 2.8284271) == "52.00 ± 2.83" and fmt(0.1234, 0.01) == "0.123 ± 0.010"
    assert fmt(2.0, 1.0, signed=True) == "+2.00 ± 1.00" and fmt(float("nan"), 1.0) == "–"


def _results(step: int, outputs: list[str], **metrics) -> str:
    """A metrics.json as the runners write it: the metrics, then the run's bookkeeping."""
    return json.dumps({**metrics, "step": step, "outputs": outputs,
                       "cost": {"seconds_per_step": 0.5, "timed_steps": step, "peak_memory_mb": None},
                       "provenance": {"step": step, "config_hash": "0" * 16, "init_checkpoint": None}})


def _fake_finished(cells, values: dict, s_per_step: dict) -> None:
    """Write what finished runs leave behind, with hand-made numbers."""
    for c in cells:
        out = Path(c.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if c.kind in ("warm_start", "pretrain"):
            save_config(c.config, out / "config.yaml")
            t = s_per_step.get(c.variant, 0.1)
            lines = [{"step": i, "loss": 2.0 - 0.1 * i, "step_time": t * (1 + 0.1 * (i - 2)),   # median t
                      "mask/hidden_fg_share": 0.2 if c.variant == "high" else 0.1} for i in (1, 2, 3)]
            if c.variant == "high":   # seed 0 written before the scores' diagnostics had their name
                key = "attn/fg_auroc.rgb" if c.seed == 0 else "scores/fg_auroc.rgb"
                for x, v in zip(lines, (0.5, 0.6, 0.7)):
                    x[key] = v + 0.2 * c.seed          # means 0.6 (seed 0) and 0.8 (seed 1)
            (out / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
            (out / "final.pth").write_bytes(b"weights")
            (out / "metrics.json").write_text(_results(3, ["final.pth"], task="pretrain", loss=1.7))
        elif c.kind == "eval":
            save_config(c.config, out / "config.yaml")
            (out / "metrics.json").write_text(_results(
                12, [], task="knn", knn_top1=values[c.variant, c.seed], per_class=[1, 2],
                skipped_eval_samples=["val/3"] if c.seed == 1 else [],
                report="best", report_epoch=2, report_step=8))
        else:
            (out / "diagnose.json").write_text(json.dumps(
                {"configured": {"auroc": {"rgb": 0.25 + 0.5 * (c.variant == "high")}},
                 "fg_token_share": {"rgb": 0.1}}))


def test_report_on_hand_made_metrics(tmp_path, data_root):
    study = load_study_config(str(micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")))
    cells = build_plan(study)
    values = {("random", 0): 50.0, ("random", 1): 54.0, ("high", 0): 53.0, ("high", 1): 55.0}
    _fake_finished(cells, values, {"random": 0.10, "high": 0.15})
    states = {c.id: cell_status(c).state for c in cells}
    assert set(states.values()) == {"finished"}
    report = write_report(study, cells, states, "s.yaml").read_text()
    assert "| knn · knn_top1 ↑ | 52.00 ± 2.83 | 54.00 ± 1.41 |" in report     # mean ± sample std
    assert "| knn · knn_top1 ↑ | +2.00 ± 1.00 (2/2) |" in report               # d = 3, 1
    assert "| × baseline | 1.00x | 1.50x |" in report                         # median step time ratio
    assert "| hidden tokens on foreground (share) | 0.100 ± 0.000 | 0.200 ± 0.000 |" in report
    assert "| fg AUROC rgb, final weights | 0.250 ± 0.000 | 0.750 ± 0.000 |" in report
    assert "| fg AUROC rgb, during training | – | 0.700 ± 0.141 |" in report    # old and new key
    assert "Warm start, before any variant: fg AUROC rgb 0.250." in report
    with open(tmp_path / "study" / "results.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert len(rows) == len(cells)
    row = next(r for r in rows if r["cell"] == "eval/knn/high/seed1")
    assert (row["variant"], row["seed"], row["eval"], float(row["knn_top1"])) == ("high", "1", "knn", 55.0)
    assert float(row["pretrain_s_per_step"]) == pytest.approx(0.15)
    for name in ("summary.png", "pretrain_loss.png", "knn.knn_top1.png"):
        assert (tmp_path / "study" / "figures" / name).stat().st_size > 1000

    # Only the model's metrics are metric columns; the run's bookkeeping has its own, after them.
    columns = (tmp_path / "study" / "results.csv").read_text().splitlines()[0].split(",")
    metric_columns = columns[len(FIXED_COLUMNS):columns.index("step")]
    assert metric_columns == ["fg_auroc.rgb", "fg_token_share.rgb", "hidden_fg_share", "knn_top1", "loss"]
    assert columns[len(FIXED_COLUMNS) + len(metric_columns):][:4] == BOOKKEEPING_COLUMNS
    assert (row["step"], row["report_epoch"], row["report_step"], row["skipped_eval_samples"]) == ("12", "2", "8", "1")
    pre = next(r for r in rows if r["cell"] == "pretrain/high/seed1")
    assert pre["step"] == "3" and pre["report_step"] == ""
    assert "report_step" not in report and "Missing" not in report


def test_report_names_a_metric_no_cell_wrote_and_refuses_bookkeeping_as_metric(tmp_path, data_root):
    from multimae_att.config import ConfigError

    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")
    study = load_study_config(str(cfg), ["evals.knn.metrics=[knn_top1,knn_top5]"])
    cells = build_plan(study)
    _fake_finished(cells, {(v, s): 1.0 for v in ("random", "high") for s in (0, 1)}, {})
    report = write_report(study, cells, {c.id: cell_status(c).state for c in cells}).read_text()
    assert "**Missing:** no finished `knn` cell has `knn_top5` in its metrics.json (they have: knn_top1)" in report
    assert "`knn_top1` in its" not in report
    with pytest.raises(ConfigError, match=r"evals.knn.metrics: \['report_step'\] describe the run"):
        load_study_config(str(cfg), ["evals.knn.metrics=[knn_top1,report_step]"])


def test_cell_status_is_the_run_folders_lifecycle_status(tmp_path, data_root):
    """A run cell's status is :func:`multimae_att.run.run_status` of its folder, plus the study's
    staleness (another config, a replaced starting checkpoint)."""
    from multimae_att.run import run_status

    cells = {c.id: c for c in build_plan(load_study_config(
        str(micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study"))))}
    warm, cell = cells["warm_start"], cells["pretrain/high/seed0"]
    out = Path(cell.out_dir)

    def both() -> tuple[str, str]:
        return cell_status(cell).state, run_status(out).status

    assert both() == ("empty", "empty")                       # no folder
    out.mkdir(parents=True)
    save_config(cell.config, out / "config.yaml")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert both() == ("empty", "empty")                       # nothing to resume: the runner starts fresh
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "state_00000002.pth").write_bytes(b"state")
    assert both() == ("in_progress", "in_progress")
    (out / "metrics.json").write_text(_results(3, ["final.pth"], loss=1.5))
    assert both() == ("in_progress", "in_progress")           # metrics.json without the final.pth it lists
    (out / "final.pth").write_bytes(b"weights")
    assert both() == ("finished", "finished")

    # The warm start (this cell's init) rewritten after the run: stale unless its content is the
    # one recorded in the run's provenance.
    Path(warm.out_dir).mkdir(parents=True)
    Path(warm.output).write_bytes(b"warm weights")
    from multimae_att.run.provenance import file_sha256

    ident = {"path": str(warm.output), "file": str(warm.output), "sha256": file_sha256(warm.output)}
    results = json.loads(_results(3, ["final.pth"], loss=1.5))
    results["provenance"]["init_checkpoint"] = ident
    (out / "metrics.json").write_text(json.dumps(results))
    os.utime(out / "metrics.json", (1, 1))                    # the init checkpoint is newer ...
    assert both() == ("finished", "finished")                 # ... but the same file (a copy, a touch)
    Path(warm.output).write_bytes(b"other warm weights")
    status = cell_status(cell)
    assert status.state == "stale" and "was replaced" in status.reason
    os.utime(Path(warm.output), (0, 0))                       # older than the results: trusted
    assert cell_status(cell).state == "finished"
    save_config(cells["pretrain/random/seed0"].config, out / "config.yaml")
    status = cell_status(cell)
    assert status.state == "stale" and "masking.strategy" in status.reason


def test_changed_variant_makes_its_finished_cells_stale(tmp_path, data_root, capsys):
    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")
    cells = build_plan(load_study_config(str(cfg)))
    _fake_finished(cells, {(v, s): 1.0 for v in ("random", "high") for s in (0, 1)}, {})
    with pytest.raises(SystemExit) as e:
        study_main(["--config", str(cfg), "variants.high=[masking.strategy=low]"])
    assert "pretrain/high/seed0" in str(e.value) and "masking.strategy: 'high' -> 'low'" in str(e.value)
    assert "pretrain/random/seed0" not in str(e.value)


def test_config_errors_name_the_cell_or_key(tmp_path, data_root):
    from multimae_att.config import ConfigError

    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")
    with pytest.raises(ConfigError, match="cell pretrain/high/seed0: unknown config key 'masking.stratgy'"):
        build_plan(load_study_config(str(cfg), ["variants.high=[masking.stratgy=low]"]))
    with pytest.raises(ConfigError, match="output_dir is set by the study"):
        load_study_config(str(cfg), ["variants.high=[output_dir=x]"])
    with pytest.raises(ConfigError, match="baseline 'rnd' is not a variant"):
        load_study_config(str(cfg), ["baseline=rnd"])


def test_dry_run_lists_cells_in_order_with_commands(tmp_path, data_root, capsys):
    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")
    assert study_main(["--config", str(cfg), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    ids = [line.split()[1] for line in out if line[:5].strip().rstrip(".").isdigit()]
    assert len(ids) == 1 + 1 + 2 * 2 * 3 and ids[:3] == ["warm_start", "diagnose/warm_start", "pretrain/random/seed0"]
    commands = [line.strip() for line in out if line.startswith("      python")]
    assert len(commands) == len(ids)
    for cid, cmd in zip(ids, commands):
        if not cid.startswith("diagnose"):
            assert f"output_dir={tmp_path / 'study' / 'cells' / cid}" in cmd
    assert "train.seed=1" in commands[ids.index("eval/knn/high/seed1")]
    assert not (tmp_path / "study").exists()


# ------------------------------------------------------------------------- end to end

def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.2)


def test_micro_study_killed_resumed_rerun_and_equal_to_fresh_runs(tmp_path, data_root):
    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study")
    study = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "run_study.py"), "--config", str(cfg), "--jobs", "1"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    record = study / "records" / "pretrain" / "random" / "seed0.json"
    _wait_for(record, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    worker = json.loads(record.read_text())["attempts"][-1]["pid"]
    for _ in range(100):          # the worker dies with the launcher (parent-death signal)
        if not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the worker outlived the killed launcher")
    warm = study / "cells" / "warm_start" / "final.pth"
    warm_mtime = warm.stat().st_mtime_ns

    done = run_study("--config", str(cfg), "--jobs", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert warm.stat().st_mtime_ns == warm_mtime                      # finished cells untouched
    runs = [json.loads(x) for x in (study / "invocations.jsonl").read_text().splitlines()]
    assert len(runs) == 2 and runs[0]["ended"] is None                  # the killed invocation
    assert 0 < runs[1]["cells_run"] < 14 and runs[1]["failed"] == 0
    report = (study / "REPORT.md").read_text()
    assert "14/14 cells finished" in report and "| knn · knn_top1 ↑ |" in report
    assert (study / "figures" / "summary.png").is_file()

    again = run_study("--config", str(cfg))
    assert again.returncode == 0 and "0 to run" in again.stdout, again.stdout + again.stderr

    # A cell that ran in a worker after other cells equals a fresh run of its printed command.
    cells = {c.id: c for c in build_plan(load_study_config(str(cfg)))}
    for cid in ("pretrain/high/seed1", "eval/knn/high/seed1"):
        cell = cells[cid]
        argv = [a for a in cell.argv if not a.startswith("output_dir=")] + [f"output_dir={tmp_path / 'fresh' / cid}"]
        cmd = [sys.executable] + cell.command()[1:len(cell.command()) - len(cell.argv)] + argv
        subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
        if cell.kind == "pretrain":
            a = torch.load(tmp_path / "fresh" / cid / "final.pth", weights_only=True)["model"]
            b = torch.load(cell.output, weights_only=True)["model"]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert json.loads((tmp_path / "fresh" / cid / "metrics.json").read_text()) == \
                json.loads(cell.output.read_text())


def test_submitit_local_executor(tmp_path, data_root):
    cfg = micro_study(tmp_path / "s.yaml", data_root, tmp_path / "study", warm_start=None,
                      variants={"high": []}, seeds=[0], launcher="submitit",
                      diagnose={"enabled": False},
                      gpus_per_cell=0, submitit={"cluster": "local", "time_min": 20})
    done = run_study("--config", str(cfg))
    assert done.returncode == 0, done.stdout + done.stderr
    study = tmp_path / "study"
    assert "submitted eval/knn/high/seed0" in done.stdout
    for cid in ("pretrain/high/seed0", "eval/knn/high/seed0"):
        rec = json.loads((study / "records" / f"{cid}.json").read_text())
        assert rec["attempts"][-1]["ok"]
        log = (study / "logs" / f"{cid}.log").read_text()
        assert "multimae_att.launch --cpu --num_processes 1" in log      # each cell an Accelerate launch
    assert (study / "cells" / "eval" / "knn" / "high" / "seed0" / "metrics.json").is_file()
    assert "2/2 cells finished" in (study / "REPORT.md").read_text()


@pytest.mark.parametrize("name,cells", [("attention_masking_synthetic", 2 + 42 * 8),
                                        ("attention_masking_multimae-b", 33 * 8)])
def test_shipped_studies_resolve(name, cells, monkeypatch):
    monkeypatch.chdir(REPO)                           # study paths are relative to the repository root
    study = load_study_config(f"configs/study/{name}.yaml")
    required = {"random", "high", "low", "noisy", "heads", "hint", "amt", "attg", "adaptive", "lr_x10", "restart"}
    assert required <= set(study.variants) and study.baseline_name() == "random" and len(study.seeds) == 3
    assert {"cls", "cls_10pct", "knn", "linear_probe"} <= set(study.evals)
    plan = build_plan(study)                          # every cell's run config resolves
    assert len(plan) == cells
    runs = {c.variant: c.config for c in plan if c.kind == "pretrain" and c.seed == 0}
    assert runs["random"].masking.strategy == "random" and runs["high"].masking.strategy == "high"
    assert runs["lr_x10"].optim.lr_scale == 10 and runs["restart"].schedule.start_epoch == 0
    if name == "attention_masking_synthetic":   # HPM, on either score source, and AttG on TokenCut maps
        assert (runs["hpm"].masking.strategy, runs["hpm"].masking.score_source) == ("hpm", "predicted_loss")
        assert runs["hpm_attention"].masking.score_source == "attention"
        assert runs["attg_tokencut"].loss.attg.source == "data"


# ------------------------------------------------------------------- stopping a study

_FAKE_CELL = '''
"""A stand-in runner: burns CPU, writing its own CPU seconds to FOLDER/cpu, until stopped
("spin"; then FOLDER/stopped from its finally) or until it SIGKILLs its own process ("die")."""
import os, signal, time
from pathlib import Path


def main(argv):
    mode, folder = argv[0], Path(argv[1])
    folder.mkdir(parents=True, exist_ok=True)
    start = time.process_time()
    try:
        while True:
            sum(i * i for i in range(100_000))
            used = time.process_time() - start
            (folder / "cpu.tmp").write_text(repr(used))
            os.replace(folder / "cpu.tmp", folder / "cpu")
            if mode == "die" and used > 0.3:
                os.kill(os.getpid(), signal.SIGKILL)
    finally:
        (folder / "stopped").write_text("")
'''

_LAUNCHER = '''
import sys
from multimae_att.study.local import record_path, run_local
from multimae_att.study.plan import Cell
from multimae_att.study.records import append_record

if __name__ == "__main__":
    study = sys.argv[1]
    cells = [Cell(id=f"fake/{m}", kind="pretrain", entry="fake_cell", argv=(m, f"{study}/{m}"),
                  out_dir=f"{study}/{m}") for m in ("die", "spin")]
    try:
        run_local(cells, cells, study, 2, 1, lambda c, a: append_record(record_path(study, c), c.id, a))
    except KeyboardInterrupt as e:
        print("interrupted", e.args, flush=True)
        sys.exit(143)
'''


def test_sigterm_stops_a_study_cleanly_and_every_attempt_keeps_its_cost(tmp_path):
    """``kill <pid>`` of a local study (here started with SIGINT ignored, as ``&`` does): the running
    cell unwinds and its attempt is recorded with CPU and wall seconds; a cell whose worker died is
    recorded too, measured by the launcher. CPU seconds: at least what each cell measured itself."""
    (tmp_path / "fake_cell.py").write_text(_FAKE_CELL)
    (tmp_path / "launch.py").write_text(_LAUNCHER)
    study = tmp_path / "study"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(tmp_path / "launch.py"), str(study)], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    died = study / "records" / "fake" / "die.json"
    _wait_for(died, proc)
    _wait_for(study / "spin" / "cpu", proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "interrupted ('SIGTERM',)" in out, out

    (die,) = json.loads(died.read_text())["attempts"]
    assert die["ok"] is False and die["interrupted"] == "died" and die["measured_by"] == "launcher"
    assert die["cpu_s"] >= float((study / "die" / "cpu").read_text()) - 0.05 and die["wall_s"] > 0
    (spin,) = json.loads((study / "records" / "fake" / "spin.json").read_text())["attempts"]
    assert spin["ok"] is False and spin["interrupted"] == "stopped" and "CellStopped" in spin["error"]
    assert spin["cpu_s"] >= float((study / "spin" / "cpu").read_text()) and spin["wall_s"] > 0
    assert (study / "spin" / "stopped").is_file()                       # the cell's own clean-up ran
    assert not (study / "die" / "stopped").exists()
    for _ in range(50):                                                 # no worker outlives the launcher
        if not Path(f"/proc/{spin['pid']}").exists():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the stopped cell's worker is still running")

    from multimae_att.study.records import read_record
    total = read_record(study / "records" / "fake" / "spin.json")
    assert (total["interrupted_attempts"], total["unmeasured_attempts"], total["cpu_s"]) == (1, 0, spin["cpu_s"])


def test_cost_rows_count_interrupted_attempts_and_say_so(tmp_path):
    from multimae_att.study.records import append_record, read_record
    from multimae_att.study.report import _attempts_note

    rec = tmp_path / "a.json"
    for attempt in ({"ok": False, "interrupted": "stopped", "cpu_s": 2.0, "wall_s": 3.0},
                    {"ok": True, "cpu_s": 5.0, "wall_s": 6.0}):
        append_record(rec, "pretrain/high/seed0", attempt)
    total = read_record(rec)
    assert (total["cpu_s"], total["wall_s"], total["attempts"]) == (7.0, 9.0, 2)
    assert (total["interrupted_attempts"], total["unmeasured_attempts"]) == (1, 0)
    append_record(rec, "pretrain/high/seed0", {"ok": False, "interrupted": "killed", "cpu_s": None, "wall_s": 1.0})
    rows = [{"cell": "pretrain/high/seed0", "kind": "pretrain", **read_record(rec)},
            {"cell": "eval/knn/high/seed0", "kind": "eval", "interrupted_attempts": 5}]
    note = "\n".join(_attempts_note(rows))
    assert "2 of them interrupted" in note and "lower bounds: pretrain/high/seed0" in note
    assert _attempts_note([{"cell": "x", "kind": "pretrain", "interrupted_attempts": 0}]) == []


# The cell's runner: writes its pid, then "trains" (sleeps); started through the real launcher.
_RUNNER = ("import os, pathlib, sys, time; p = pathlib.Path(sys.argv[1]); t = p.with_suffix('.tmp'); "
           "t.write_text(str(os.getpid())); t.rename(p); time.sleep(300)")
_COMMAND_WORKER = '''
import sys
from multimae_att.study.cellrun import run_command
from multimae_att.study.plan import launch_args
runner, pid_file, log = sys.argv[1:]
run_command("cell", [sys.executable, "-m", "multimae_att.launch", *launch_args(0), runner, pid_file], log)
'''


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _start_worker(tmp_path: Path, script: str) -> tuple[subprocess.Popen, Path]:
    """A stand-in study worker (``script``) running one cell: the real launcher over ``_RUNNER``;
    returns the worker and the file the runner writes its pid to."""
    runner, pid_file = tmp_path / "runner.py", tmp_path / "runner.pid"
    runner.write_text(_RUNNER)
    (tmp_path / "worker.py").write_text(script)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(runner), str(pid_file),
                               str(tmp_path / "cell.log")], env=env, stdout=subprocess.PIPE, text=True)
    return worker, pid_file


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux only")
def test_a_killed_worker_takes_its_cells_launch_and_runner_with_it(tmp_path):
    """A worker that runs a cell as an Accelerate launch (a multi-GPU cell; any cell on Slurm) and
    is SIGKILLed (the launcher's last resort) must leave neither the launch nor the runner it
    started training on (Accelerate's single-process launcher does not pass a SIGTERM on)."""
    worker, pid_file = _start_worker(tmp_path, _COMMAND_WORKER)
    pid = launch = None
    try:
        _wait_for(pid_file, worker, timeout=300)
        pid = int(pid_file.read_text())
        launch = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])   # its parent
        assert _alive(pid) and _alive(launch) and launch != worker.pid
        worker.kill()
        worker.wait(timeout=60)
        for _ in range(300):
            if not (_alive(pid) or _alive(launch)):
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"still running after their worker was killed: runner {_alive(pid)}, launch "
                        f"{_alive(launch)}; log: {(tmp_path / 'cell.log').read_text()}")
    finally:
        if worker.poll() is None:
            worker.kill()
        for left in (pid, launch):
            if left is not None and _alive(left):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(left, signal.SIGKILL)


_STOPPING_WORKER = '''
import json, signal, sys
from multimae_att.study.cellrun import CellStopped, run_command
from multimae_att.study.plan import launch_args

def stop(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise CellStopped("stopped by the test")

signal.signal(signal.SIGTERM, stop)
runner, pid_file, log = sys.argv[1:]
record = run_command("cell", [sys.executable, "-m", "multimae_att.launch", *launch_args(0), runner, pid_file], log)
print(json.dumps(record))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups as on Linux")
def test_a_stopped_cell_stops_its_launchs_runner_too(tmp_path):
    """The launcher stops a cell run as an Accelerate launch (SIGTERM to its worker): the launch
    and the runner it started both end, and the attempt is recorded as stopped."""
    worker, pid_file = _start_worker(tmp_path, _STOPPING_WORKER)
    pid = None
    try:
        _wait_for(pid_file, worker, timeout=300)
        pid = int(pid_file.read_text())
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=120)
        record = json.loads(out.strip().splitlines()[-1])
        assert record["ok"] is False and record["interrupted"] == "stopped", record
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the stopped cell's runner is still running")
    finally:
        if worker.poll() is None:
            worker.kill()
        if pid is not None and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
