"""The run skeleton shared by the pretraining and finetuning runners.

Torch-free here (for tools that only look at run folders):

- :func:`run_status` / :class:`RunStatus` (:mod:`.folder`): is a run folder empty, in progress
  or finished, and where are its results;
- :mod:`.provenance`: init-checkpoint identity (path + SHA-256), config hash, code version.

The parts that train live in their own modules, imported where needed:

- :mod:`.trainer`: ``Run`` (the skeleton: accelerator, states, loop, logging, final outputs) and
  ``Job`` (what a runner plugs in: its step and evaluation);
- :mod:`.lifecycle`: ``RunFolder`` (fresh start, resume, finished, ``--overwrite``);
- :mod:`.trackers`: ``RunLogger`` (``metrics.jsonl``, Accelerate trackers, console).
"""
from multimae_att.run.folder import EMPTY, FINISHED, IN_PROGRESS, RunStatus, run_status

__all__ = ["run_status", "RunStatus", "EMPTY", "IN_PROGRESS", "FINISHED"]
