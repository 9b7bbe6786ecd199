"""Former home of the run-state utilities, kept as a re-export for existing imports.

Each job has its module now: atomic writes :mod:`multimae_att.atomic`; training states
:mod:`multimae_att.run.states`; position-derived seeds :mod:`multimae_att.seeds`; the metrics log
:mod:`multimae_att.run.metrics_log`.
"""
import warnings

from multimae_att.atomic import save_atomic, write_text_atomic
from multimae_att.run.metrics_log import MetricsLogger
from multimae_att.run.states import LoadedState, TrainStateStore, load_state
from multimae_att.seeds import step_seed

__all__ = ["save_atomic", "write_text_atomic", "load_state", "LoadedState", "TrainStateStore", "step_seed",
           "MetricsLogger"]

# Nothing in the package imports this module any more; tell the code that still does.
warnings.warn("multimae_att.runstate is deprecated: import from multimae_att.atomic, multimae_att.run.states, "
              "multimae_att.seeds or multimae_att.run.metrics_log", DeprecationWarning, stacklevel=2)
