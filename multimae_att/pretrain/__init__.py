"""Continual pretraining runner (``run_pretrain.py``).

- :mod:`multimae_att.pretrain.config`: the typed schema (:class:`PretrainConfig`), ``load_pretrain_config``;
- :mod:`multimae_att.pretrain.step`: one step (:class:`MaskPlanner`, :class:`PretrainModule`,
  :func:`forward_loss`), also used by the benchmark;
- :mod:`multimae_att.pretrain.setup`: accelerator, data, model, optimizer groups, init checkpoint;
- :mod:`multimae_att.pretrain.loop`: :func:`train` (Accelerate loop, exact resume, metrics, export);
- :mod:`multimae_att.pretrain.pictures`: PNGs of input / attention / mask / reconstruction.

Submodules are imported lazily by their users (the step module does not need Accelerate).
"""
