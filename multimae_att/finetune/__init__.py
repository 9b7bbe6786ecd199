"""Finetuning and frozen-feature evaluation (cls, semseg, depth, k-NN, linear probe).

Entry point: ``python run_finetune.py --config FILE [key=value ...]`` (README "Finetuning").

* :mod:`~multimae_att.finetune.config` -- ``FinetuneConfig`` schema, ``load_finetune_config``;
* :mod:`~multimae_att.finetune.tasks` -- one ``TaskSpec`` per task, ``FinetuneViT``;
* :mod:`~multimae_att.finetune.heads` -- MultiMAE-compatible ``ConvNeXtAdapter``,
  ``DPTOutputAdapter``, ``LinearOutputAdapter``;
* :mod:`~multimae_att.finetune.metrics` -- whole-set additive metrics (conventions there);
* :mod:`~multimae_att.finetune.native` -- evaluation at label resolution (padded targets,
  per-sample bilinear upsampling);
* :mod:`~multimae_att.finetune.knn` -- weighted k-NN and few-shot k-NN;
* :mod:`~multimae_att.finetune.loading` -- checked initialisation from checkpoints;
* :mod:`~multimae_att.finetune.engine` -- the training / evaluation loop (``run``).
"""
