"""Former home of :mod:`multimae_att.pretrain.losses`, kept so that existing imports keep working."""
import warnings

from multimae_att.pretrain.losses import (
    DEFAULT_SPECS,
    GATHER_UP_TO,
    LossSpec,
    attg_weights,
    counted_patch_losses,
    input_modality_of,
    masked_loss,
    masked_mean,
    multimodal_loss,
)

__all__ = ["LossSpec", "DEFAULT_SPECS", "GATHER_UP_TO", "counted_patch_losses", "masked_mean",
           "attg_weights", "masked_loss", "multimodal_loss", "input_modality_of"]

# Nothing in the package imports this module any more; tell the code that still does.
warnings.warn("multimae_att.losses is deprecated: import from multimae_att.pretrain.losses",
              DeprecationWarning, stacklevel=2)
