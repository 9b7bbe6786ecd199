"""``--launcher submitit``: one job per cell (as MAE's and DINOv2's submitit launchers), each an
Accelerate launch of the cell's runner, with the cells' dependencies as Slurm dependencies.

Parameters: the study's ``gpus_per_cell`` (the processes of each cell's ``accelerate launch``;
0 = one CPU process) and its ``submitit`` section: ``partition``, ``account``,
``cpus_per_cell``, ``mem_gb``, ``time_min``, ``slurm_args`` (further sbatch options). A job that
times out or is preempted is requeued (submitit's checkpoint hook) and its run resumes from its
latest training state. On Slurm the launcher submits every unfinished cell at once
(``--dependency=afterok:<jobs the cell needs>``) plus a final report job (``afterany``) and
returns; job ids go to ``<study_dir>/submitit/jobs.json``, and a second invocation does not
resubmit a cell whose job is still pending or running. ``cluster: local`` / ``debug`` (submitit's
executors for testing) have no dependencies: the launcher waits for a cell's inputs before
submitting it, then waits for every job and writes the report itself.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from multimae_att.study.cellrun import run_command
from multimae_att.study.config import StudyConfig
from multimae_att.study.local import log_path, record_path
from multimae_att.study.plan import Cell, cell_job_command
from multimae_att.study.records import append_record

__all__ = ["CellJob", "cell_job_command", "run_submitit"]

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


class CellJob:
    """The picklable job: run ``command`` (output appended to ``log``), record the attempt."""

    def __init__(self, cell_id: str, command: list[str], log: str, record: str, cwd: str) -> None:
        self.cell_id, self.command, self.log, self.record, self.cwd = cell_id, command, log, record, cwd

    def __call__(self) -> dict[str, Any]:
        attempt = run_command(self.cell_id, self.command, self.log, self.cwd)
        append_record(self.record, self.cell_id, attempt)
        if not attempt["ok"]:
            raise RuntimeError(f"cell {self.cell_id} failed ({attempt['error']}); log: {self.log}")
        return attempt

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Timeout or preemption: requeue the same job; the runner resumes its run folder."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def _executor(study: StudyConfig):
    import submitit

    s = study.submitit
    folder = s.folder or str(Path(study.study_dir) / "submitit" / "%j")
    ex = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params: dict[str, Any] = dict(timeout_min=s.time_min, gpus_per_node=study.gpus_per_cell, tasks_per_node=1,
                                  cpus_per_task=s.cpus_per_cell, nodes=1, mem_gb=s.mem_gb,
                                  slurm_partition=s.partition, slurm_account=s.account)
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def _active_jobs(study: StudyConfig, jobs_file: Path) -> dict[str, str]:
    """cell id -> job id of jobs from an earlier invocation that are still pending or running."""
    if not jobs_file.is_file():
        return {}
    import submitit

    active = {}
    folder = study.submitit.folder or str(Path(study.study_dir) / "submitit" / "%j")
    for cell_id, job_id in json.loads(jobs_file.read_text()).items():
        try:
            state = submitit.SlurmJob(folder=folder, job_id=job_id).state
        except Exception:   # noqa: BLE001 -- unknown to sacct: not active
            continue
        if state.split()[0] in ACTIVE:
            active[cell_id] = job_id
    return active


def run_submitit(study: StudyConfig, todo: list[Cell], report_command: list[str],
                 print_fn: Callable[..., None] = print) -> dict[str, str]:
    """Submit ``todo`` (plan order); returns cell id -> 'ok' | 'failed' | 'skipped' | 'submitted'."""
    ex = _executor(study)
    slurm = ex.cluster == "slurm"
    wait = study.submitit.wait if study.submitit.wait is not None else not slurm
    jobs_file = Path(study.study_dir) / "submitit" / "jobs.json"
    jobs_file.parent.mkdir(parents=True, exist_ok=True)
    active = _active_jobs(study, jobs_file) if slurm else {}
    job_ids: dict[str, str] = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    jobs: dict[str, Any] = {}
    outcome: dict[str, str] = {}
    extra = dict(study.submitit.slurm_args)
    for cell in todo:
        if cell.id in active:
            print_fn(f"{cell.id}: job {active[cell.id]} from an earlier invocation is still active")
            jobs[cell.id] = active[cell.id]
            continue
        deps = [jobs[d] for d in cell.deps if d in jobs]
        if slurm:
            if deps:
                ids = ":".join(d if isinstance(d, str) else d.job_id for d in deps)
                ex.update_parameters(slurm_additional_parameters={**extra, "dependency": f"afterok:{ids}"})
            else:
                ex.update_parameters(slurm_additional_parameters=extra)
        else:   # no dependencies outside Slurm: wait for the inputs
            failed = [d for d in cell.deps if outcome.get(d) in ("failed", "skipped")]
            for dep_id, job in ((d, jobs[d]) for d in cell.deps if d in jobs and d not in outcome):
                outcome[dep_id] = _result(job, dep_id, print_fn)
                failed += [dep_id] if outcome[dep_id] == "failed" else []
            if failed:
                outcome[cell.id] = "skipped"
                print_fn(f"skipped {cell.id} (needs {failed[0]}, which failed)")
                continue
        ex.update_parameters(name=f"study:{cell.id}")
        job = ex.submit(CellJob(cell.id, cell_job_command(cell, study.gpus_per_cell),
                                str(log_path(study.study_dir, cell)), str(record_path(study.study_dir, cell)),
                                os.getcwd()))
        jobs[cell.id] = job
        job_ids[cell.id] = job.job_id
        print_fn(f"submitted {cell.id}: job {job.job_id}")
    from multimae_att.atomic import write_text_atomic

    write_text_atomic(jobs_file, json.dumps(job_ids, indent=1) + "\n")
    if not wait:
        ids = [j if isinstance(j, str) else j.job_id for j in jobs.values()]
        if ids and slurm:
            ex.update_parameters(name="study:report", gpus_per_node=0,
                                 slurm_additional_parameters={**extra, "dependency": f"afterany:{':'.join(ids)}"})
            rep = ex.submit(CellJob("report", report_command, str(Path(study.study_dir) / "logs" / "report.log"),
                                    str(Path(study.study_dir) / "records" / "report.json"), os.getcwd()))
            print_fn(f"submitted the report: job {rep.job_id} (runs when every cell has ended)")
        return dict.fromkeys(jobs, "submitted") | outcome
    for cell_id, job in jobs.items():
        if cell_id not in outcome and not isinstance(job, str):
            outcome[cell_id] = _result(job, cell_id, print_fn)
    return outcome


def _result(job, cell_id: str, print_fn) -> str:
    try:
        job.result()
        print_fn(f"done {cell_id}")
        return "ok"
    except Exception as e:   # noqa: BLE001 -- submitit re-raises the job's error
        print_fn(f"FAILED {cell_id}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
        return "failed"
