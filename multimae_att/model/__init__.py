"""MultiMAE-compatible model: adapters, shared encoder, decoders.

The attention readout of ``attention_scores`` is in :mod:`multimae_att.scoring.readout`
(``readout_attention`` is re-exported here).

Drop-in names (``MultiMAE``, ``MultiViT``, ``PatchedInputAdapter``, ``SemSegInputAdapter``,
``SpatialOutputAdapter``) plus the runner API ``embed`` / ``attention_scores`` /
``forward_masked`` on :class:`MultiMAE`. See README "Model API".
"""
from multimae_att.model.factory import (
    DECODER_SIZES,
    ENCODER_SIZES,
    SEMSEG_NUM_CLASSES,
    create_pretrain_model,
    make_adapters,
    multivit_base,
    multivit_large,
    multivit_tiny,
    pretrain_multimae_base,
    pretrain_multimae_large,
    pretrain_multimae_tiny,
)
from multimae_att.model.input_adapters import PatchedInputAdapter, SemSegInputAdapter
from multimae_att.model.multimae import MultiMAE, MultiViT, Tokens
from multimae_att.model.output_adapters import CrossAttention, SpatialOutputAdapter
from multimae_att.model.pos_emb import build_2d_sincos_posemb, resize_pos_emb
from multimae_att.scoring.readout import readout_attention

__all__ = [
    "MultiMAE", "MultiViT", "Tokens", "PatchedInputAdapter", "SemSegInputAdapter", "SpatialOutputAdapter",
    "CrossAttention", "build_2d_sincos_posemb", "resize_pos_emb", "readout_attention", "ENCODER_SIZES",
    "DECODER_SIZES", "SEMSEG_NUM_CLASSES", "make_adapters", "create_pretrain_model", "pretrain_multimae_tiny",
    "pretrain_multimae_base", "pretrain_multimae_large", "multivit_tiny", "multivit_base", "multivit_large",
]
