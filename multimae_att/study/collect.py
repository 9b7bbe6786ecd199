"""Read the finished cells' outputs into one row per cell (``results.csv``).

Per kind, the metric columns:

- ``pretrain`` / ``warm_start`` (``metrics.jsonl``): ``loss`` (mean of the last quarter of the
  logged steps) and the means over the logged steps of ``mask/hidden_fg_share`` and
  ``scores/fg_auroc.<modality>`` (column ``fg_auroc.<modality>``; older runs logged it as
  ``attn/fg_auroc.<modality>``, read the same) when the run logged them;
- ``diagnose`` (``diagnose.json``): ``fg_auroc.<modality>`` at the run's configured readout and
  ``fg_token_share.<modality>``;
- ``eval`` (``metrics.json``): every scalar metric of the model (lists such as ``per_class_iou``
  stay in the file). The run's bookkeeping in the same file (:data:`BOOKKEEPING_KEYS`: ``step``,
  ``report_epoch``, ``report_step``, ``skipped_eval_samples``, provenance, ...) is no metric.

Bookkeeping columns, after the metrics: ``step`` (the step of the results; for pretraining the
last logged step), ``report_epoch``, ``report_step`` (which evaluation ``train.report`` chose) and
``skipped_eval_samples`` (how many corrupt samples the evaluation left out). Cost columns, last:
the cell's cost from the study records (``cpu_s``, ``wall_s``, ``peak_rss_mb``, ``peak_cuda_mb``),
``s_per_step`` of a pretraining run (median of the logged ``step_time``), and for eval / diagnose
rows the cost of the pretraining run they evaluate (``pretrain_s_per_step``,
``pretrain_peak_rss_mb``, ``pretrain_cpu_s``).
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from multimae_att.study.local import record_path
from multimae_att.study.plan import Cell
from multimae_att.study.records import read_record

__all__ = ["collect_rows", "write_csv", "loss_curve", "FIXED_COLUMNS", "BOOKKEEPING_KEYS", "BOOKKEEPING_COLUMNS",
           "COST_COLUMNS"]

FIXED_COLUMNS = ["cell", "kind", "variant", "seed", "eval", "status"]
# Keys of a run's metrics.json that describe the run, not the model: the run skeleton's
# (multimae_att.run.trainer.Run.finish: step, outputs, cost, provenance), the finetuning report's
# (task, report, report_epoch, report_step) and the evaluation's count of corrupt samples left out.
BOOKKEEPING_KEYS = frozenset({"task", "step", "epoch", "outputs", "cost", "provenance", "report", "report_epoch",
                              "report_step", "skipped_eval_samples", "skipped_samples"})
BOOKKEEPING_COLUMNS = ["step", "report_epoch", "report_step", "skipped_eval_samples"]
COST_COLUMNS = ["s_per_step", "cpu_s", "wall_s", "peak_rss_mb", "peak_cuda_mb", "interrupted_attempts",
                "unmeasured_attempts", "pretrain_s_per_step", "pretrain_peak_rss_mb", "pretrain_cpu_s"]
_RECORD_KEYS = ("cpu_s", "wall_s", "peak_rss_mb", "peak_cuda_mb", "interrupted_attempts", "unmeasured_attempts")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:   # a line cut by a kill; the runner rewrites it on resume
            continue
    return out


def _mean_of(records: list[dict], key: str) -> float | None:
    vals = [r[key] for r in records if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return sum(vals) / len(vals) if vals else None


def pretrain_metrics(run_dir: Path) -> dict[str, Any]:
    recs = [r for r in _jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    if not recs:
        return {}
    times = [r["step_time"] for r in recs if isinstance(r.get("step_time"), (int, float))]
    tail = recs[-max(1, len(recs) // 4):]          # one batch's loss is noisy: the last quarter's mean
    out: dict[str, Any] = {"loss": sum(r["loss"] for r in tail) / len(tail), "step": recs[-1].get("step"),
                           "s_per_step": statistics.median(times) if times else None}
    # "attn/": the scores' diagnostics of runs written before they were named for every source
    keys = sorted({k for r in recs for k in r if k.startswith(("mask/", "scores/", "attn/"))})
    for k in keys:
        out[k.split("/", 1)[1]] = _mean_of(recs, k)
    return out


def loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    recs = [r for r in _jsonl(Path(run_dir) / "metrics.jsonl") if "loss" in r and "step" in r]
    return [r["step"] for r in recs], [r["loss"] for r in recs]


def _diagnose_metrics(path: Path) -> dict[str, Any]:
    d = json.loads(path.read_text())
    out = {f"fg_auroc.{m}": v for m, v in d["configured"]["auroc"].items()}
    out.update({f"fg_token_share.{m}": v for m, v in d["fg_token_share"].items()})
    return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _eval_metrics(path: Path) -> dict[str, Any]:
    """The model's scalar metrics, and the bookkeeping columns, of a finetuning ``metrics.json``."""
    d = json.loads(path.read_text())
    out = {k: v for k, v in d.items() if k not in BOOKKEEPING_KEYS and _number(v)}
    out.update({k: d[k] for k in BOOKKEEPING_COLUMNS if _number(d.get(k))})
    if isinstance(d.get("skipped_eval_samples"), list):   # the ids of the samples left out: their count
        out["skipped_eval_samples"] = len(d["skipped_eval_samples"])
    return out


def collect_rows(cells: list[Cell], states: dict[str, str], study_dir: str) -> list[dict[str, Any]]:
    """One row per cell; metrics only for finished cells (``states``: cell id -> state)."""
    rows, by_id = [], {}
    for cell in cells:
        row: dict[str, Any] = {"cell": cell.id, "kind": cell.kind, "variant": cell.variant,
                               "seed": cell.seed, "eval": cell.eval, "status": states[cell.id]}
        rec = read_record(record_path(study_dir, cell))
        row.update({k: rec.get(k) for k in _RECORD_KEYS})
        if states[cell.id] == "finished":
            if cell.kind in ("pretrain", "warm_start"):
                row.update(pretrain_metrics(Path(cell.out_dir)))
            elif cell.kind == "diagnose":
                row.update(_diagnose_metrics(cell.output))
            else:
                row.update(_eval_metrics(cell.output))
        by_id[cell.id] = row
        rows.append(row)
    for cell, row in zip(cells, rows):
        if cell.kind in ("eval", "diagnose") and cell.deps:
            run = by_id.get(cell.deps[0], {})
            row["pretrain_s_per_step"] = run.get("s_per_step")
            row["pretrain_peak_rss_mb"] = run.get("peak_rss_mb")
            row["pretrain_cpu_s"] = run.get("cpu_s")
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> list[str]:
    """Write ``rows`` (union of their keys as columns: fixed, metrics sorted, bookkeeping, cost);
    returns the columns."""
    keys = {k for r in rows for k in r}
    metrics = sorted(keys - set(FIXED_COLUMNS) - set(BOOKKEEPING_COLUMNS) - set(COST_COLUMNS))
    columns = FIXED_COLUMNS + metrics + [c for c in BOOKKEEPING_COLUMNS + COST_COLUMNS if c in keys]
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    tmp.replace(path)
    return columns
