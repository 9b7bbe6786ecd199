"""Studies: variants x seeds x evaluations, every cell an ordinary run folder (docs/STUDY.md).

- :mod:`~multimae_att.study.config`: the study schema (``configs/study/*.yaml``);
- :mod:`~multimae_att.study.plan`: the cells, their folders, dependencies and commands;
- :mod:`~multimae_att.study.status`: is a cell finished (read from its run folder);
- :mod:`~multimae_att.study.local` / :mod:`~multimae_att.study.cellrun`: the local launcher
  (worker processes, cells in-process); :mod:`~multimae_att.study.slurm`: submitit / Slurm;
- :mod:`~multimae_att.study.collect`, :mod:`~multimae_att.study.stats`,
  :mod:`~multimae_att.study.report`, :mod:`~multimae_att.study.figures`: results.csv, REPORT.md, PNGs.

Entry point: ``python run_study.py --config FILE`` (:func:`multimae_att.study.cli.main`).
"""
