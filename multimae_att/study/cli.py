"""``python run_study.py --config configs/study/FILE.yaml [key=value ...] [--dry-run] [--jobs N]
[--launcher local|submitit] [--report-only]``: plan, run and report a study (see docs/STUDY.md)."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from multimae_att.config import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_study.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", "-c", required=True, help="study YAML (configs/study/*.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the study config, e.g. study_dir=runs/x seeds=[0,1]")
    p.add_argument("--dry-run", action="store_true", help="print the cells, their order and commands; run nothing")
    p.add_argument("--jobs", type=int, default=None, help="local launcher: cells at once (config key jobs)")
    p.add_argument("--launcher", choices=("local", "submitit"), default=None, help="config key launcher")
    p.add_argument("--report-only", action="store_true", help="write the report from the finished cells; run nothing")
    return p


def _print_plan(cells, states, study, prepare, threads) -> None:
    from multimae_att.study.plan import cell_job_command, shell

    launched = study.launcher == "submitit" or study.gpus_per_cell >= 2

    todo = sum(1 for c in cells if states[c.id].state != "finished")
    where = (f"local, {study.jobs} at once x {threads} threads" if study.launcher == "local"
             else f"submitit ({study.submitit.cluster or 'auto'})") + f", {study.gpus_per_cell} GPU(s) per cell"
    print(f"study {study.study_dir}: {len(cells)} cells, {todo} to run ({where})")
    for step in prepare:
        print(f"prepare (unless {step.creates} exists): {shell(step.command)}")
    for i, c in enumerate(cells, 1):
        deps = f"  after {', '.join(c.deps)}" if c.deps else ""
        print(f"{i:4d}. {c.id}  [{states[c.id]}]{deps}")
        cmd = cell_job_command(c, study.gpus_per_cell, "python", display=True) if launched else c.command()
        print(f"      {shell(cmd)}")


def _prepare(steps) -> None:
    import subprocess

    for step in steps:
        if Path(step.creates).exists():
            continue
        cmd = [sys.executable if i == 0 and w == "python" else w for i, w in enumerate(step.command)]
        print(f"prepare: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"prepare step failed: {' '.join(cmd)}")
        if not Path(step.creates).exists():
            raise SystemExit(f"prepare step {' '.join(cmd)} did not create {step.creates}")


def main(argv: list[str] | None = None) -> int:
    import multimae_att  # noqa: F401  (torchvision guard before timm)
    from multimae_att.study.cellrun import cpu_seconds
    from multimae_att.study.config import load_study_config
    from multimae_att.study.local import default_threads, record_path, run_local
    from multimae_att.study.plan import build_plan
    from multimae_att.study.records import append_invocation, append_record, update_invocation
    from multimae_att.study.report import write_report
    from multimae_att.study.status import cell_status

    args = _parser().parse_args(argv)
    extra = list(args.overrides)
    if args.jobs is not None:
        extra.append(f"jobs={args.jobs}")
    if args.launcher is not None:
        extra.append(f"launcher={args.launcher}")
    try:
        study = load_study_config(args.config, extra)
        cells = build_plan(study)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    states = {c.id: cell_status(c) for c in cells}
    threads = study.threads_per_cell or default_threads(study.jobs)
    if args.dry_run:
        _print_plan(cells, states, study, study.prepare, threads)
        return 0
    if args.report_only:
        path = write_report(study, cells, {k: s.state for k, s in states.items()}, args.config)
        print(f"wrote {path}")
        return 0
    stale = [f"  {c.id}: {states[c.id].reason}" for c in cells if states[c.id].state == "stale"]
    if stale:
        sys.exit("these cells are finished but do not match the study any more (nothing was run):\n"
                 + "\n".join(stale) + "\nRestore the study's values, use another study_dir, or move "
                 "those cell folders away to run them again.")
    _prepare(study.prepare)
    todo = [c for c in cells if states[c.id].state != "finished"]
    print(f"study {study.study_dir}: {len(cells)} cells, {len(cells) - len(todo)} finished, "
          f"{len(todo)} to run", flush=True)
    t0, c0 = time.perf_counter(), cpu_seconds()   # the prepare steps before are not this run's cells
    run_index = append_invocation(study.study_dir, {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "ended": None, "launcher": study.launcher,
        "jobs": study.jobs, "threads": threads, "cores": os.cpu_count(), "load_before": os.getloadavg()[0],
        "cells_to_run": len(todo)})

    def on_record(cell, attempt):
        append_record(record_path(study.study_dir, cell), cell.id, attempt)

    def log(*a, **k):
        print(*a, **k, flush=True)

    outcome: dict[str, str] = {}
    interrupted: str | None = None   # the signal that stopped this invocation
    try:
        if study.launcher == "local":
            run_local(cells, todo, study.study_dir, study.jobs, threads, on_record, log,
                      study.gpus_per_cell, outcome)
        else:
            from multimae_att.study.slurm import run_submitit

            report_cmd = [sys.executable, str(Path(__file__).resolve().parents[2] / "run_study.py"),
                          "--config", args.config, *extra, "--report-only"]
            outcome = run_submitit(study, todo, report_cmd, log)
    except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM under the local launcher
        interrupted = "SIGTERM" if e.args == ("SIGTERM",) else "SIGINT"
    finally:
        update_invocation(study.study_dir, run_index, {
            "ended": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(time.perf_counter() - t0, 1),
            "cpu_s": round(cpu_seconds() - c0, 1),
            "load_after": os.getloadavg()[0], "cells_run": len(outcome),
            "failed": sum(1 for v in outcome.values() if v == "failed"), "stopped_by": interrupted})
    if interrupted:
        print(f"stopped ({interrupted}); run the same command again to continue (finished cells are "
              "kept, interrupted ones resume)", file=sys.stderr)
        return 143 if interrupted == "SIGTERM" else 130
    if any(v == "submitted" for v in outcome.values()):
        print(f"submitted; the report job writes {study.study_dir}/REPORT.md when every cell has ended")
        return 0
    states = {c.id: cell_status(c).state for c in cells}
    path = write_report(study, cells, states, args.config)
    failed = [k for k, v in outcome.items() if v == "failed"]
    skipped = [k for k, v in outcome.items() if v == "skipped"]
    print(f"wrote {path} and {Path(study.study_dir) / 'results.csv'}")
    if failed or skipped:
        print(f"{len(failed)} cells failed ({', '.join(failed)}), {len(skipped)} skipped; logs in "
              f"{Path(study.study_dir) / 'logs'}; fix and run the same command again", file=sys.stderr)
        return 1
    return 0
