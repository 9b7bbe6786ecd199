"""Former home of :mod:`multimae_att.scoring.cache`, kept so that existing imports keep working."""
from multimae_att.scoring.cache import AttentionCache, crop_affine, invert_affine, refresh_cache, sample_maps

__all__ = ["crop_affine", "invert_affine", "sample_maps", "AttentionCache", "refresh_cache"]
