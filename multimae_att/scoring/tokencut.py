"""TokenCut object discovery: a normalized cut of the patch-similarity graph of a ViT.

Based on TokenCut (Wang et al., "Self-Supervised Transformers for Unsupervised Object Discovery
using Normalized Cut", CVPR 2022), the attention-map source the AttG paper found best. Per image:

1. features ``f_i`` of the ``N`` patch tokens, L2-normalised (TokenCut: the keys of the last
   attention layer, all heads concatenated; :func:`last_layer_keys`);
2. a graph ``W_ij = 1`` where the cosine similarity ``f_i . f_j > tau`` (0.2), else ``eps``
   (1e-5), degrees ``d_i = sum_j W_ij``;
3. the second-smallest generalized eigenvector ``x`` of ``(D - W) x = lambda D x`` (computed as
   ``D^-1/2 y`` from the symmetric ``I - D^-1/2 W D^-1/2``, the same vector up to sign and with
   TokenCut's ``x^T D x = 1``);
4. the foreground side as TokenCut chooses it: split at the mean of ``x``; the side that holds
   the token with the largest ``|x|`` (the seed) is the foreground (``x`` is negated otherwise).

:func:`ncut_maps` returns the oriented eigenvector (foreground positive) and the bipartition;
TokenCut's box and mask then keep only the connected component of the bipartition that holds
the seed (:func:`seed_component`). Batched over images with ``torch.linalg.eigh`` (float64).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["last_layer_keys", "ncut_maps", "seed_component"]


@torch.no_grad()
def last_layer_keys(model, x: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keys of the last encoder block over an unmasked pass (eval mode, no grad).

    ``model``: a :class:`~multimae_att.model.MultiMAE`; ``x``: raw inputs. Every block but the
    last runs in full; the last one only its ``norm1`` and the key slice of ``qkv``. Returns dict
    modality -> ``[B, N_m, D]`` (all heads concatenated, as TokenCut's ``k`` features).
    """
    tokens = model.embed(x)
    z = torch.cat([t.detach() for t in tokens.values()], dim=1)
    z = torch.cat([z, model.global_tokens.to(z.dtype).expand(z.shape[0], -1, -1)], dim=1)
    blocks = model.encoder
    training = blocks.training
    blocks.eval()
    try:
        for block in blocks[:-1]:
            z = block(z)
        last = blocks[-1]
        D = z.shape[-1]
        w, b = last.attn.qkv.weight[D:2 * D], None if last.attn.qkv.bias is None else last.attn.qkv.bias[D:2 * D]
        k = F.linear(last.norm1(z), w, b)
    finally:
        blocks.train(training)
    sizes = [t.shape[1] for t in tokens.values()]
    return dict(zip(tokens.keys(), k[:, :sum(sizes)].split(sizes, dim=1)))


def ncut_maps(features: Tensor, tau: float = 0.2, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """TokenCut's normalized cut of each image's patch graph (module docstring, steps 2-4).

    ``features``: ``[B, N, C]`` (normalised here). Returns ``(eigvec, foreground)``: float32
    ``[B, N]`` second-smallest generalized eigenvector, signed so that the foreground lies above
    its mean, and bool ``[B, N]`` that foreground side (``eigvec > mean``, the seed's side).
    """
    f = F.normalize(features.double(), dim=-1)
    sim = f @ f.transpose(1, 2)                                        # [B, N, N]
    W = torch.where(sim > tau, torch.ones_like(sim), torch.full_like(sim, eps))
    d = W.sum(-1)                                                      # [B, N]
    s = d.rsqrt()
    L = torch.eye(W.shape[-1], dtype=W.dtype, device=W.device) - s[:, :, None] * W * s[:, None, :]
    _, vecs = torch.linalg.eigh(L)                                     # ascending eigenvalues
    x = s * vecs[..., 1]                                               # second smallest, D^-1/2 y
    fg = x > x.mean(-1, keepdim=True)
    seed = x.abs().argmax(-1, keepdim=True)
    flip = ~fg.gather(-1, seed)                                        # seed not on the '>' side
    x = torch.where(flip, -x, x)
    fg = torch.where(flip, ~fg, fg)
    return x.float(), fg


def seed_component(foreground: Tensor, eigvec: Tensor, grid: tuple[int, int]) -> Tensor:
    """TokenCut's object mask: the 4-connected component of ``foreground`` (bool ``[B, N]``,
    row-major on ``grid``) that holds the seed (the token with the largest ``|eigvec|``)."""
    from scipy import ndimage

    out = torch.zeros_like(foreground)
    seeds = eigvec.abs().argmax(-1)
    for b in range(foreground.shape[0]):                               # offline export: per image
        labels, _ = ndimage.label(foreground[b].view(*grid).cpu().numpy())
        seed = labels.reshape(-1)[int(seeds[b])]
        out[b] = torch.from_numpy(labels.reshape(-1) == seed).to(out.device)
    return out
