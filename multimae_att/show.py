"""``python -m multimae_att.show RUN_DIR [--json]``: what a run folder holds, without loading weights.

Prints the lifecycle status (empty / in progress / finished), the step, where a restart would
resume, the last logged losses, the final metrics and their provenance, and earlier runs moved
aside by ``--overwrite``. ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multimae_att.run.folder import LOG_FILE, PREVIOUS_PREFIX, run_status

__all__ = ["summarize", "main"]

_NOT_METRICS = ("task", "step", "outputs", "provenance", "epoch")


def _last_records(log: Path) -> tuple[dict | None, dict | None]:
    """(last training record, last evaluation record) of ``metrics.jsonl`` (cut lines skipped)."""
    train = evaluation = None
    if not log.is_file():
        return None, None
    for line in log.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            train = rec
        if any(k.startswith("val/") for k in rec):
            evaluation = rec
    return train, evaluation


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The facts :func:`main` prints, as plain data."""
    st = run_status(run_dir)
    train, evaluation = _last_records(st.output_dir / LOG_FILE)
    out: dict[str, Any] = {"run_dir": str(st.output_dir), "status": st.status, "step": st.step,
                           "resume_from": None, "states": [s for s, _ in st.states],
                           "last_logged": train, "last_evaluation": evaluation, "results": None,
                           "metrics": None, "provenance": None, "outputs": [str(p) for p in st.outputs],
                           "previous_runs": sorted(str(p) for p in st.output_dir.glob(PREVIOUS_PREFIX + "*"))}
    if st.states:
        out["resume_from"] = {"state": str(st.latest_state), "step": st.states[-1][0]}
    if st.finished:
        out["results"] = str(st.results)
        out["metrics"] = {k: v for k, v in st.metrics.items() if k not in _NOT_METRICS}
        out["provenance"] = st.metrics.get("provenance")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and len(v) > 8:
        return f"[{len(v)} values]"
    return str(v)


def _lines(s: dict[str, Any]) -> list[str]:
    status = s["status"].replace("_", " ")
    lines = [f"run folder:  {s['run_dir']}",
             f"status:      {status}" + (f" (step {s['step']})" if s["step"] is not None else "")]
    if s["status"] == "finished":
        lines.append(f"results:     {s['results']}")
    if s["resume_from"]:
        r = s["resume_from"]
        what = "a restart resumes from" if s["status"] == "in_progress" else "newest training state"
        lines.append(f"{what}: {r['state']} (step {r['step']}); states kept: {s['states']}")
    if s["last_logged"]:
        rec = s["last_logged"]
        parts = [f"{k} {_fmt(rec[k])}" for k in ("loss", "lr", "epoch") if k in rec]
        lines.append(f"last logged: step {rec.get('step')}: " + ", ".join(parts))
        if isinstance(rec.get("losses"), dict):
            lines.append("             losses " + _fmt(rec["losses"]))
    if s["last_evaluation"] and s["status"] != "finished":
        ev = s["last_evaluation"]
        lines.append(f"last evaluation: step {ev.get('step')}: "
                     + ", ".join(f"{k[4:]} {_fmt(v)}" for k, v in ev.items() if k.startswith("val/")))
    if s["metrics"]:
        lines.append("final metrics:")
        lines += [f"  {k}: {_fmt(v)}" for k, v in s["metrics"].items()]
    if s["provenance"]:
        p = s["provenance"]
        init = p.get("init_checkpoint")
        init_text = "none" if not init else \
            f"{init.get('file') or init.get('path')} (sha256 {str(init.get('sha256'))[:12]}...)"
        lines.append(f"provenance:  config {p.get('config_hash')}, init checkpoint {init_text}, "
                     f"multimae_att {p.get('version')}, git {p.get('git_commit') or 'unknown'}"
                     + (" (uncommitted changes)" if p.get("git_dirty") else ""))
    if s["outputs"]:
        lines.append("outputs:     " + ", ".join(s["outputs"]))
    if s["previous_runs"]:
        lines.append("earlier runs (moved aside by --overwrite): " + ", ".join(s["previous_runs"]))
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m multimae_att.show", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run folder (output_dir of run_pretrain.py or run_finetune.py)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).exists():
        parser.exit(2, f"error: {args.run_dir} does not exist\n")
    summary = summarize(args.run_dir)
    print(json.dumps(summary, indent=2) if args.json else "\n".join(_lines(summary)))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
