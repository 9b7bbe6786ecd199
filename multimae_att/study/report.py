"""``results.csv``, ``REPORT.md`` and ``figures/*.png`` of a study from its finished cells.

The table has the shape of the MultiMAE attention-masking study: one row per metric, one column per
variant, mean ± std over seeds; a second table gives the paired difference to the baseline (mean
difference ± its standard error, seeds agreeing in sign, :mod:`multimae_att.study.stats`); then the
masking diagnostics and the pretraining cost relative to the baseline. Nothing is computed from
unfinished cells: their entries are ``–`` and the means use the seeds that finished.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from multimae_att.study.collect import (
    BOOKKEEPING_COLUMNS,
    COST_COLUMNS,
    FIXED_COLUMNS,
    collect_rows,
    loss_curve,
    write_csv,
)
from multimae_att.study.config import StudyConfig
from multimae_att.study.plan import Cell
from multimae_att.study.records import read_invocations
from multimae_att.study.stats import fmt, paired, summarize

__all__ = ["write_report", "values_by_variant"]

Values = dict[str, dict[int, float]]   # variant -> seed -> value


def values_by_variant(rows: list[dict[str, Any]], kind: str, key: str, eval_name: str | None = None) -> Values:
    out: Values = {}
    for r in rows:
        if r["kind"] != kind or r.get("eval") != eval_name or r.get(key) is None or r["variant"] is None:
            continue
        out.setdefault(r["variant"], {})[r["seed"]] = float(r[key])
    return out


def _direction(metric: str) -> str:
    from multimae_att.finetune.tasks import LOWER_IS_BETTER

    return "↓" if metric in LOWER_IS_BETTER else "↑"


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def _scale(vals: Values) -> float:
    xs = [abs(x) for seeds in vals.values() for x in seeds.values() if not math.isnan(x)]
    return max(xs) if xs else math.nan


def _summary_row(label: str, vals: Values, variants: list[str]) -> list[str]:
    scale = _scale(vals)
    cells = []
    for v in variants:
        s = summarize(vals.get(v, {}).values())
        cells.append(fmt(s.mean, s.std, scale))
    return [label] + cells


def _paired_row(label: str, vals: Values, variants: list[str], baseline: str) -> list[str]:
    scale = _scale(vals)
    cells = []
    for v in variants:
        p = paired(vals.get(v, {}), vals.get(baseline, {}))
        cells.append("–" if p.n == 0 else f"{fmt(p.mean, p.se, scale, signed=True)} ({p.agree}/{p.n})")
    return [label] + cells


def _ratio_row(label: str, vals: Values, variants: list[str], baseline: str) -> list[str]:
    base = summarize(vals.get(baseline, {}).values()).mean
    out = []
    for v in variants:
        m = summarize(vals.get(v, {}).values()).mean
        out.append("–" if math.isnan(m) or math.isnan(base) or base == 0 else f"{m / base:.2f}x")
    return [label] + out


def _metric_panels(study: StudyConfig, rows) -> list[tuple[str, str, str, Values]]:
    """(eval, metric, label, values) of every reported metric, in config order."""
    out = []
    for name, ev in study.evals.items():
        for metric in ev.metrics:
            out.append((name, metric, f"{name} · {metric} {_direction(metric)}",
                        values_by_variant(rows, "eval", metric, name)))
    return out


def _modalities(rows, prefix: str) -> list[str]:
    return sorted({k[len(prefix):] for r in rows for k in r if k.startswith(prefix) and r.get(k) is not None})


def write_report(study: StudyConfig, cells: list[Cell], states: dict[str, str],
                 study_file: str | None = None) -> Path:
    """Write ``results.csv``, ``figures/`` and ``REPORT.md`` under ``study_dir``; returns REPORT.md."""
    from multimae_att.study import figures

    root = Path(study.study_dir)
    root.mkdir(parents=True, exist_ok=True)
    rows = collect_rows(cells, states, study.study_dir)
    write_csv(rows, root / "results.csv")
    variants, baseline = list(study.variants), study.baseline_name()
    others = [v for v in variants if v != baseline]
    head = [f"{v} (baseline)" if v == baseline else v for v in variants]
    figdir = root / "figures"
    figdir.mkdir(exist_ok=True)

    panels = _metric_panels(study, rows)
    finished = sum(1 for s in states.values() if s == "finished")
    lines = [f"# Study report: {root.name}", "",
             f"`python run_study.py --config {study_file or '<config>'}` · written "
             f"{time.strftime('%Y-%m-%d %H:%M')} · {finished}/{len(cells)} cells finished · "
             f"seeds {list(study.seeds)} · baseline **{baseline}**", ""]
    if finished < len(cells):
        lines += [f"**Incomplete:** {len(cells) - finished} cells are not finished; their entries are "
                  "`–` and the means use the seeds that finished.", ""]
    if study.warm_start is not None:
        start = ("the common warm start (`cells/warm_start`)" if study.warm_start.checkpoint is None
                 else f"`{study.warm_start.checkpoint}`")
        lines += [f"Every variant continues pretraining from {start} with its overrides (listed at the "
                  "end); every evaluation finetunes or probes that run's `final.pth` with the same seed.", ""]

    lines += ["## Results", "", "Mean ± std over seeds (sample std); ↑ / ↓: higher / lower is better.", ""]
    lines += _table(["metric"] + head, [_summary_row(label, vals, variants) for _, _, label, vals in panels])
    lines += _missing_metrics(panels, rows)
    if others:
        lines += ["", "## Difference to the baseline", "",
                  f"Paired over seeds (variant − {baseline}, same seed): mean difference ± its standard "
                  "error, and in brackets the seeds whose difference has the sign of the mean. With 3 "
                  "seeds, |mean| < 2 SE is well within noise.", ""]
        lines += _table(["metric"] + others,
                        [_paired_row(label, vals, others, baseline) for _, _, label, vals in panels])

    lines += _diagnostics_section(study, rows, variants, head)
    lines += _cost_section(rows, variants, head, baseline)

    # figures
    pics = []
    for name, metric, label, vals in panels:
        pics.append(figures.bar_chart(figdir / f"{name}.{metric}.png", label, variants, vals, baseline))
    curves = {v: [] for v in variants}
    warm = None
    for c in cells:
        if c.kind == "pretrain" and states[c.id] == "finished":
            curves[c.variant].append(loss_curve(Path(c.out_dir)))
        if c.kind == "warm_start" and states[c.id] == "finished":
            warm = loss_curve(Path(c.out_dir))
    curves = {v: runs for v, runs in curves.items() if runs}
    if curves:
        figures.loss_curves(figdir / "pretrain_loss.png", curves, baseline, warm)
    auroc = [(f"fg AUROC {m} (final weights)", values_by_variant(rows, "diagnose", f"fg_auroc.{m}"))
             for m in _modalities([r for r in rows if r["kind"] == "diagnose"], "fg_auroc.")]
    grid = [(label, vals) for _, _, label, vals in panels] + auroc
    if grid:
        figures.summary_grid(figdir / "summary.png", grid, variants, baseline)
    lines += ["", "## Figures", ""]
    if grid:
        lines += ["Bars: mean over seeds, error bars: std, dots: seeds, dark bar: the baseline; the value "
                  "axes are zoomed on the differences (they do not start at zero).", "",
                  "![every metric](figures/summary.png)", ""]
    if curves:
        lines += ["![pretraining loss of every variant](figures/pretrain_loss.png)", ""]
    lines += ["Per metric: " + ", ".join(f"[{p.stem}](figures/{p.name})" for p in pics), ""]

    lines += ["## Variants", ""]
    lines += _table(["variant", "overrides of the continuation run"],
                    [[v, " ".join(f"`{o}`" for o in study.variants[v]) or "(none)"] for v in variants])
    lines += _invocations_section(study.study_dir)
    out = root / "REPORT.md"
    from multimae_att.atomic import write_text_atomic

    write_text_atomic(out, "\n".join(lines) + "\n")
    return out


def _missing_metrics(panels, rows) -> list[str]:
    """A line per reported metric that no finished cell of its eval wrote (a typo in the study
    file, or another task's metric), naming the metrics those cells have."""
    lines = []
    for name, metric, _, vals in panels:
        done = [r for r in rows if r["kind"] == "eval" and r["eval"] == name and r["status"] == "finished"]
        if done and not vals:
            have = sorted({k for r in done for k in r} - set(FIXED_COLUMNS + BOOKKEEPING_COLUMNS + COST_COLUMNS))
            lines.append(f"**Missing:** no finished `{name}` cell has `{metric}` in its metrics.json "
                         f"(they have: {', '.join(have)}); check `evals.{name}.metrics`.")
    return ["", *lines] if lines else []


def _diagnostics_section(study: StudyConfig, rows, variants, head) -> list[str]:
    diag = [r for r in rows if r["kind"] == "diagnose"]
    train = [r for r in rows if r["kind"] == "pretrain"]
    body = []
    for m in _modalities(diag, "fg_auroc."):
        body.append(_summary_row(f"fg AUROC {m}, final weights", values_by_variant(rows, "diagnose", f"fg_auroc.{m}"),
                                 variants))
    for m in _modalities(train, "fg_auroc."):
        body.append(_summary_row(f"fg AUROC {m}, during training", values_by_variant(rows, "pretrain", f"fg_auroc.{m}"),
                                 variants))
    if any(r.get("hidden_fg_share") is not None for r in train):
        body.append(_summary_row("hidden tokens on foreground (share)",
                                 values_by_variant(rows, "pretrain", "hidden_fg_share"), variants))
    share = [r.get(k) for r in diag for k in r if k.startswith("fg_token_share.") and r.get(k) is not None]
    if not body:
        return []
    lines = ["", "## Masking diagnostics", "",
             "AUROC of the scores for foreground vs background tokens (per image, averaged; "
             "0.5 = no separation, above 0.5 the highest-scored tokens lie on objects, so `high` masking "
             "hides objects first). *Final weights*: the attention scores, by `python -m multimae_att.diagnose` "
             "on each run's `final.pth` at its configured readout (the full table per layer and query is in "
             "`cells/diagnose/*/*/diagnose.json`); *during training*: the scores the masking ranked by "
             "(the variant's `masking.score_source`: attention, or predicted losses), mean over the "
             "logged steps (`scores/fg_auroc.<modality>`)."]
    if share:
        lines += [f"Share of foreground tokens in the data: {sum(share) / len(share):.3f} (what random "
                  "masking hides on average)."]
    warm = next((r for r in diag if r["variant"] is None), None)
    if warm is not None:
        lines += ["Warm start, before any variant: " + ", ".join(
            f"fg AUROC {m} {warm[f'fg_auroc.{m}']:.3f}" for m in _modalities([warm], "fg_auroc.")) + "."]
    return lines + [""] + _table(["diagnostic"] + head, body)


def _cost_section(rows, variants, head, baseline) -> list[str]:
    step = values_by_variant(rows, "pretrain", "s_per_step")
    cpu = values_by_variant(rows, "pretrain", "cpu_s")
    if not step and not cpu:
        return []
    body = [_summary_row("seconds per step (median, wall)", step, variants),
            _ratio_row("× baseline", step, variants, baseline),
            _summary_row("CPU seconds per run", cpu, variants),
            _ratio_row("× baseline", cpu, variants, baseline),
            _summary_row("peak memory (MB, resident)", values_by_variant(rows, "pretrain", "peak_rss_mb"), variants),
            _summary_row("final pretraining loss", values_by_variant(rows, "pretrain", "loss"), variants)]
    return ["", "## Pretraining cost", "",
            "Per continuation run: median wall seconds of a logged step, CPU seconds of the whole run "
            "(data loading included, process start-up not), peak resident memory. Wall time depends on "
            "what else ran on the machine, CPU time much less. The final loss (mean of the last quarter "
            "of the logged steps) sums the outputs' losses on the hidden tokens; it is not comparable "
            "across masking strategies, which hide different tokens.", ""] \
        + _table(["cost"] + head, body) + _attempts_note(rows)


def _attempts_note(rows) -> list[str]:
    """Say when the CPU seconds include interrupted attempts or miss some (records/<cell>.json)."""
    runs = [r for r in rows if r["kind"] == "pretrain"]
    interrupted = sum(r.get("interrupted_attempts") or 0 for r in runs)
    unmeasured = [r["cell"] for r in runs if r.get("unmeasured_attempts")]
    lines = []
    if interrupted:
        lines.append(f"CPU seconds per run are the sum over each run's attempts, {interrupted} of them "
                     "interrupted (stopped, killed or died; measured up to then, `interrupted` in "
                     "`records/<cell>.json`) and then resumed.")
    if unmeasured:
        lines.append(f"{len(unmeasured)} run(s) have an attempt without a CPU measurement, so their CPU "
                     f"seconds are lower bounds: {', '.join(unmeasured)}.")
    return ["", *lines] if lines else []


def _invocations_section(study_dir: str) -> list[str]:
    runs = read_invocations(study_dir)
    if not runs:
        return []
    body = []
    for r in runs:
        where = f"{r.get('launcher', '?')}, {r.get('jobs', '?')} x {r.get('threads', '?')} threads"
        if r.get("ended") is None:    # killed: only its start is known
            body.append([r.get("started", "?"), "killed", "?", where, f"{r.get('load_before', math.nan):.1f} → ?",
                         f"? of {r.get('cells_to_run', '?')}"])
            continue
        stopped = f"; stopped by {r['stopped_by']}" if r.get("stopped_by") else ""
        body.append([r["started"], f"{r['wall_s'] / 60:.1f}", f"{r['cpu_s'] / 60:.1f}", where,
                     f"{r['load_before']:.1f} → {r['load_after']:.1f}",
                     f"{r['cells_run']} of {r['cells_to_run']} ({r['failed']} failed{stopped})"])
    return ["", "## Runs of this study", "",
            "Each `run_study.py` invocation: wall and CPU minutes (this process and its workers, "
            f"start-up included, the `prepare` steps not) on {runs[-1].get('cores', '?')} cores, and "
            "the machine's 1-minute load average at start and end (other users' work included). One "
            "stopped by Ctrl-C or SIGTERM records its time and that of its running cells; one killed "
            "with SIGKILL only its start. Finished cells are kept, interrupted ones resumed.", ""] + _table(
        ["started", "wall min", "CPU min", "launcher", "load", "cells run"], body)
