"""multimae_att: continual pretraining of MultiMAE with attention-guided masking.

Importing the package makes torchvision (and so timm) importable on CPU-only torch, without
importing torch itself; see :mod:`multimae_att._torchvision_guard`.
"""
from multimae_att import _torchvision_guard

_torchvision_guard.install_before_torchvision()

__version__ = "0.1.0"
