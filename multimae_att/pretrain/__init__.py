"""Continual pretraining runner (``run_pretrain.py``): one step and what runs it.

- :mod:`multimae_att.pretrain.config`: the typed schema (:class:`PretrainConfig`),
  ``load_pretrain_config``; imports without torch;
- :mod:`multimae_att.pretrain.step`: one step (:class:`PretrainModule`, :func:`forward_loss`), also
  used by the benchmark; its masks come from :class:`multimae_att.masking.planner.MaskPlanner`;
- :mod:`multimae_att.pretrain.losses`: masked per-patch losses of each output, AttG weights;
- :mod:`multimae_att.pretrain.setup`: data, model, optimizer groups, init checkpoint;
- :mod:`multimae_att.pretrain.loop`: :func:`train` and ``PretrainJob`` (the step under the run
  skeleton of :mod:`multimae_att.run`);
- :mod:`multimae_att.pretrain.pictures`: pictures of input / scores / mask / reconstruction.

Submodules are imported lazily by their users (the step module does not need Accelerate). Map
of the whole step: docs/ARCHITECTURE.md.
"""
