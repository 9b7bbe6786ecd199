"""Run-folder lifecycle through the CLIs: finished runs are left alone, changed init checkpoints
are caught, nothing is overwritten without --overwrite, unreadable states fall back."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from multimae_att.run import run_status
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.provenance import config_hash, file_sha256
from multimae_att.run.states import TrainStateStore

from helpers.finetune import run_task as finetune
from helpers.finetune import synthetic_root
from helpers.pretrain import _fresh_accelerate_state, _importable_entry_point, data_root, run_cli, tiny_config


def _tree(root) -> dict[str, float]:
    """Every file under ``root`` with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _exit_text(excinfo) -> str:
    return str(excinfo.value.code)


def _same_weights(a, b) -> bool:
    wa = torch.load(a, weights_only=True)["model"]
    wb = torch.load(b, weights_only=True)["model"]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _export_tiny(path, seed: int) -> None:
    from multimae_att.checkpoint import export_weights
    from multimae_att.model import create_pretrain_model

    torch.manual_seed(seed)
    export_weights(create_pretrain_model("tiny", image_size=32, semseg_num_classes=10), path)


def _finished_run(tmp_path, data_root, steps: int = 2, *extra: str):
    """A finished tiny pretraining run (a state every step): (config file, output_dir)."""
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": steps, "save_every": 1})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}", *extra)
    return cfg, out


# ------------------------------------------------------------------------------- finished runs

def test_finished_run_is_left_untouched_and_reports_its_results(tmp_path, data_root, capsys):
    cfg, out = _finished_run(tmp_path, data_root)
    status = run_status(out)
    assert status.finished and status.step == 2 and status.results == out / "metrics.json"
    before = _tree(out)
    capsys.readouterr()
    run_cli("--config", str(cfg), f"output_dir={out}", "log.every=2", "data.num_workers=0")  # harmless keys
    printed = capsys.readouterr().out
    assert "holds a finished run (step 2)" in printed and str(out / "metrics.json") in printed
    assert str(out / "final.pth") in printed
    assert _tree(out) == before                                   # not a byte rewritten


def test_finished_run_asked_for_fewer_steps_is_an_error(tmp_path, data_root):
    cfg, out = _finished_run(tmp_path, data_root, 3)
    before = _tree(out)
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={out}", "train.max_steps=2")
    assert "finished at step 3" in _exit_text(err) and "asks for 2 steps" in _exit_text(err)
    assert _tree(out) == before


def test_changed_init_checkpoint_in_a_finished_folder_is_an_error(tmp_path, synthetic_root):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    _export_tiny(a, 1)
    _export_tiny(b, 2)
    out = tmp_path / "knn"
    first = finetune("knn", synthetic_root, out, f"init.checkpoint={a}")
    prov = json.loads((out / "metrics.json").read_text())["provenance"]
    assert prov["init_checkpoint"] == {"path": str(a), "file": str(a.resolve()), "sha256": file_sha256(a)}
    before = _tree(out)
    # Another checkpoint into the same folder: an error naming the key, not A's numbers.
    with pytest.raises(SystemExit) as err:
        finetune("knn", synthetic_root, out, f"init.checkpoint={b}")
    assert "init.checkpoint:" in _exit_text(err) and str(b.resolve()) in _exit_text(err)
    assert "--overwrite" in _exit_text(err)
    # A different file behind the same path is caught by its hash.
    a.write_bytes(b.read_bytes())
    with pytest.raises(SystemExit) as err:
        finetune("knn", synthetic_root, out, f"init.checkpoint={a}")
    assert "a different file behind the same path" in _exit_text(err)
    assert _tree(out) == before
    # With --overwrite the old run moves aside and the new one runs.
    second = finetune("knn", synthetic_root, out, f"init.checkpoint={a}", "--overwrite")
    previous = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert len(previous) == 1
    assert json.loads((previous[0] / "metrics.json").read_text())["knn_top1"] == first["knn_top1"]
    assert second["provenance"]["init_checkpoint"]["sha256"] == file_sha256(b)


def test_changed_init_checkpoint_content_stops_a_resume(tmp_path, data_root):
    init = tmp_path / "init.pth"
    _export_tiny(init, 1)
    cfg, out = _finished_run(tmp_path, data_root, 2, f"init.checkpoint={init}")
    (out / "metrics.json").unlink()                                # as if killed after the last state
    assert run_status(out).in_progress
    _export_tiny(init, 2)                                          # same path, other weights
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={out}", f"init.checkpoint={init}")
    assert "init.checkpoint:" in _exit_text(err) and "a different file behind the same path" in _exit_text(err)


# ------------------------------------------------------------------------------- starting over

def test_resume_false_refuses_and_overwrite_keeps_the_old_run(tmp_path, data_root):
    cfg, out = _finished_run(tmp_path, data_root)
    before = _tree(out)
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={out}", "init.resume=false", "train.seed=1")
    assert "--overwrite" in _exit_text(err) and "init.overwrite=true" in _exit_text(err)
    assert _tree(out) == before
    # --overwrite: the old contents move to previous-<time>/, byte for byte; the new run starts fresh.
    run_cli("--config", str(cfg), f"output_dir={out}", "init.resume=false", "train.seed=1", "--overwrite")
    (previous,) = [p for p in out.iterdir() if p.name.startswith("previous-")]
    assert set(_tree(previous)) == set(before)
    assert yaml.safe_load((previous / "config.yaml").read_text())["train"]["seed"] == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 1
    assert [s for s, _ in TrainStateStore(out / "checkpoints").list()] == [1, 2]
    assert not _same_weights(previous / "final.pth", out / "final.pth")


# ------------------------------------------------------------------------------- training states

def test_truncated_newest_state_falls_back_bit_exact(tmp_path, data_root, capsys):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, model={"drop_path_rate": 0.1}, data={"batch_size": 2},
                      masking={"strategy": "noisy", "adaptive": {"enabled": True}},
                      train={"max_steps": 6, "epochs": 10, "save_every": 2, "keep_last": 3})
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_cli("--config", str(cfg), f"output_dir={ref}")
    run_cli("--config", str(cfg), f"output_dir={cut}", "train.max_steps=4")
    (cut / "metrics.json").unlink()                                # killed after saving step 4
    newest = cut / "checkpoints" / "state_00000004.pth"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])   # half written
    orphans = [cut / "checkpoints" / ".tmp_state_00000006.pth.x1y2z3", cut / ".metrics.json.tmp4242"]
    for p in orphans:
        p.write_bytes(b"\0" * 64)
    capsys.readouterr()
    run_cli("--config", str(cfg), f"output_dir={cut}")
    printed = capsys.readouterr().out
    assert f"training state {newest} is unreadable" in printed and "resuming from" in printed
    assert "state_00000002.pth (step 2)" in printed
    assert (cut / "checkpoints" / "state_00000004.pth.corrupt").is_file()   # kept for inspection
    assert not any(p.exists() for p in orphans)
    assert _same_weights(ref / "final.pth", cut / "final.pth")
    def strip(run):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in MetricsLogger.read(run / "metrics.jsonl")]

    assert strip(cut) == strip(ref)


def test_no_readable_state_is_a_clear_error(tmp_path, data_root):
    cfg, out = _finished_run(tmp_path, data_root)
    (out / "metrics.json").unlink()
    for _, p in TrainStateStore(out / "checkpoints").list():
        p.write_bytes(b"not a zip file")
    with pytest.raises(SystemExit) as err:
        run_cli("--config", str(cfg), f"output_dir={out}")
    text = _exit_text(err)
    assert "no readable training state" in text and "state_00000001.pth" in text and "state_00000002.pth" in text


def test_pruning_keeps_the_new_state_and_newer_ones(tmp_path):
    store = TrainStateStore(tmp_path, keep_last=2)
    for step in (2, 4, 6, 8):
        store.save({"step": step}, step)
    assert [s for s, _ in store.list()] == [6, 8]
    store.save({"step": 3}, 3)           # a run resumed from an older state: 6 and 8 are not its to prune
    assert [s for s, _ in store.list()] == [3, 6, 8]
    store.keep_last = 1
    store.save({"step": 5}, 5)
    assert [s for s, _ in store.list()] == [5, 6, 8]


def test_fallback_renames_the_unreadable_state(tmp_path):
    store = TrainStateStore(tmp_path, keep_last=3)
    for step in (1, 2):
        store.save({"step": step, "w": torch.ones(3) * step}, step)
    (tmp_path / "state_00000002.pth").write_bytes(b"garbage")
    said = []
    loaded = store.load_newest(warn=said.append)
    assert loaded.step == 1 and torch.equal(loaded.state["w"], torch.ones(3))
    assert len(said) == 1 and "state_00000002.pth" in said[0] and "unreadable" in said[0]
    assert sorted(os.listdir(tmp_path)) == ["state_00000001.pth", "state_00000002.pth.corrupt"]


# ------------------------------------------------------------------------------- provenance

def test_provenance_in_results_and_exports(tmp_path, data_root):
    cfg = tiny_config(tmp_path / "c.yaml", data_root, train={"max_steps": 2})
    out = tmp_path / "run"
    run_cli("--config", str(cfg), f"output_dir={out}")
    results = json.loads((out / "metrics.json").read_text())
    final = torch.load(out / "final.pth", weights_only=True)
    saved_config = yaml.safe_load((out / "config.yaml").read_text())
    for prov in (results["provenance"], final["provenance"]):
        assert prov["step"] == 2 and prov["init_checkpoint"] is None
        assert prov["config_hash"] == config_hash(saved_config)
        assert prov["version"] == __import__("multimae_att").__version__
    assert results["step"] == 2 and results["loss"] == MetricsLogger.read(out / "metrics.jsonl")[-1]["loss"]


def test_a_run_missing_a_listed_output_is_not_finished(tmp_path, data_root):
    cfg, out = _finished_run(tmp_path, data_root)
    assert json.loads((out / "metrics.json").read_text())["outputs"] == ["final.pth"]
    reference = torch.load(out / "final.pth", weights_only=True)["model"]
    (out / "final.pth").unlink()
    assert run_status(out).in_progress
    run_cli("--config", str(cfg), f"output_dir={out}")          # re-exports from the last state
    assert run_status(out).finished
    again = torch.load(out / "final.pth", weights_only=True)["model"]
    assert all(torch.equal(again[k], v) for k, v in reference.items())


def test_init_checkpoint_identity_of_a_url_is_its_cached_copy(tmp_path, monkeypatch):
    from multimae_att.hub import cached_path, resolve_checkpoint
    from multimae_att.run.provenance import checkpoint_identity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    plain = tmp_path / "weights.pth"
    _export_tiny(plain, 1)
    # a file:// URL without a hash in its name is the file itself (nothing to verify, no copy)
    assert checkpoint_identity(plain.as_uri())["file"] == str(plain.resolve())
    source = plain.rename(tmp_path / f"weights-{file_sha256(plain)[:8]}.pth")   # torch.hub's naming
    url = source.as_uri()
    assert checkpoint_identity(url) == {"path": url, "file": None, "sha256": None}   # nothing downloaded
    assert not cached_path(url).exists()
    resolve_checkpoint(url, progress=False)                                          # the runner's load
    assert checkpoint_identity(url) == {"path": url, "file": str(cached_path(url).resolve()),
                                        "sha256": file_sha256(source)}


def test_checkpoint_hash_is_read_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    import hashlib

    from multimae_att.run import provenance
    from multimae_att.run.provenance import checkpoint_identity

    reads, real = [], provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    f = tmp_path / "init.pth"
    f.write_bytes(b"one")
    first = checkpoint_identity(str(f))
    assert checkpoint_identity(str(f)) == first and len(reads) == 1
    assert first["sha256"] == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"other")                                   # another file behind the same path
    assert checkpoint_identity(str(f))["sha256"] == hashlib.sha256(b"other").hexdigest() and len(reads) == 2


_IDENTITY_SCRIPT = '''
import json, sys
from pathlib import Path
from accelerate import Accelerator
from multimae_att.run import provenance

acc = Accelerator(cpu=True)
reads, real = [], provenance.sha256_file
provenance.sha256_file = lambda p, *a: reads.append(str(p)) or real(p, *a)
out = {"identity": provenance.checkpoint_identity(sys.argv[1], acc), "reads": len(reads)}
provenance._DIGESTS.clear()

def unreadable(p, *a):
    raise PermissionError(f"cannot read {p}")

provenance.sha256_file = unreadable if acc.is_main_process else real   # only the main process fails
try:
    provenance.checkpoint_identity(sys.argv[1], acc)
    out["error"] = None
except PermissionError as e:
    out["error"] = str(e)
Path(sys.argv[2], f"{acc.process_index}.json").write_text(json.dumps(out))
# as the runners end: gloo's threads still alive at exit abort the process now and then
from multimae_att.run.trainer import end_distributed
end_distributed()
'''


@pytest.mark.slow
def test_several_processes_hash_the_init_checkpoint_once(tmp_path):
    """The main process reads and hashes ``init.checkpoint``, the others receive its identity; an
    error there is raised in every process with its message."""
    import socket
    import subprocess
    import sys

    from multimae_att.run.provenance import checkpoint_identity

    ckpt, script = tmp_path / "init.pth", tmp_path / "identity.py"
    ckpt.write_bytes(os.urandom(1 << 16))
    script.write_text(_IDENTITY_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:   # a free rendezvous port, not a fixed one another suite may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "multimae_att.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", str(port), str(script), str(ckpt), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert main["identity"] == other["identity"] == checkpoint_identity(str(ckpt))
    assert (main["reads"], other["reads"]) == (1, 0)
    assert main["error"] == other["error"] == f"cannot read {ckpt.resolve()}"


def test_resolving_and_recording_a_hub_checkpoint_read_it_once(tmp_path, monkeypatch):
    """The hub's check of a cached file (its sha256 against the prefix its name promises) and the
    run's record of ``init.checkpoint`` share one read of the file per process."""
    import multimae_att.hub as hub
    from multimae_att.run import provenance
    from multimae_att.run.provenance import checkpoint_identity

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    plain = tmp_path / "weights.pth"
    _export_tiny(plain, 1)
    url = plain.rename(tmp_path / f"weights-{provenance.sha256_file(plain)[:8]}.pth").as_uri()
    hub.resolve_checkpoint(url, progress=False)            # downloaded and checked by torch.hub
    reads, real = [], provenance.sha256_file
    monkeypatch.setattr(provenance, "sha256_file", lambda p, *a: reads.append(p) or real(p, *a))
    provenance._DIGESTS.clear()
    cached = hub.resolve_checkpoint(url, progress=False)   # a later load: the cached copy is checked
    ident = checkpoint_identity(url)
    hub.resolve_checkpoint(url, progress=False)
    assert ident["file"] == str(cached.resolve()) and ident["sha256"] == real(cached)
    assert reads == [cached.resolve()]
