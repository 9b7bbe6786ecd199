"""Former home of :mod:`multimae_att.scoring.cache`, kept so that existing imports keep working."""
import warnings

from multimae_att.scoring.cache import AttentionCache, crop_affine, invert_affine, refresh_cache, sample_maps

__all__ = ["crop_affine", "invert_affine", "sample_maps", "AttentionCache", "refresh_cache"]

# Nothing in the package imports this module any more; tell the code that still does.
warnings.warn("multimae_att.attention_cache is deprecated: import from multimae_att.scoring.cache",
              DeprecationWarning, stacklevel=2)
