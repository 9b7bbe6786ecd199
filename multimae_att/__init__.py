"""multimae_att: continual pretraining of MultiMAE with attention-guided masking.

Importing the package first makes torchvision (and so timm) importable on CPU-only torch;
see :mod:`multimae_att._torchvision_guard`.
"""
from multimae_att import _torchvision_guard

_torchvision_guard.install()

__version__ = "0.1.0"
