"""Spatial output adapter: a small cross-attention decoder that rebuilds one modality.

Parameter names and shapes are MultiMAE's. The call convention is MultiMAE's as well
(``encoder_tokens, input_info, ids_keep, ids_restore``), with one addition, ``query_keep``, to
drop query positions (AMT's *thrown* tokens) from the decoder.

Conventions: ``encoder_tokens [B, K + G, D_enc]`` holds the K visible tokens followed by the G
global tokens; ``ids_keep [B, K]`` gives, for each visible encoder token, its position in the
canonical concatenation of all input modalities (``input_info['tasks'][m]['start_idx'] ..
end_idx``). The positions not in ``ids_keep`` are hidden. ``ids_restore`` is accepted for call
compatibility and not needed (``ids_keep`` determines everything).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from multimae_att.device_checks import check
from multimae_att.model.packed import PackedPrediction, unpatchify
from multimae_att.model.pos_emb import Size2, build_2d_sincos_posemb, flatten_grid, pair, resize_pos_emb


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per block, rising linearly from 0 to ``rate`` (plain floats, so
    models can be built on the meta device)."""
    return [rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


class CrossAttention(nn.Module):
    """Multi-head cross-attention ``x [B, N, C]`` -> context ``[B, M, C]`` with fused SDPA.

    Names ``q``, ``kv``, ``proj`` as in MultiMAE. ``fused_attn`` (per instance, like timm's
    ``Attention``) switches to an explicit softmax path, which is faster for bf16 training on
    CPU; both compute the same function.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"CrossAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_attn = True

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        M = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # [B, h, N, c]
        k, v = self.kv(context).reshape(B, M, 2, h, C // h).permute(2, 0, 3, 1, 4)  # [B, h, M, c] each
        p = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            probs = ((q * (C // h) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = F.dropout(probs, p) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class SpatialOutputAdapter(nn.Module):
    """Cross-attention decoder for a spatial output ``[B, num_channels, H/stride, W/stride]``.

    Queries (one per output patch): with ``use_task_queries`` and ``task`` among the inputs,
    the (projected) encoder tokens of that modality at visible positions and the mask token
    elsewhere; otherwise the mask token. Both get the decoder's positional embedding and the
    learned embedding of the modality (``task_embeddings``, for ``context_tasks``). Context:
    the projected visible tokens (+ same embeddings) and the global tokens. Then one
    cross-attention + MLP (``use_xattn``), ``depth`` self-attention blocks, a linear patch
    projection. Constructor keywords are MultiMAE's.

    Deviations from MultiMAE (defects there): works without ``context_tasks``; with
    ``learnable_pos_emb`` the table is ``[1, D, h, w]`` like the fixed one (MultiMAE stored
    ``[1, h, w, D]`` and then interpolated it as if it were channel-first).
    """

    def __init__(self, num_channels: int, stride_level: int, patch_size_full: Size2,
                 dim_tokens_enc: int | None = None, dim_tokens: int = 256, depth: int = 0,
                 learnable_pos_emb: bool = False, image_size: Size2 = 224, mlp_ratio: float = 4.0,
                 num_heads: int = 8, qkv_bias: bool = True, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 use_task_queries: bool = True, task: str | None = None,
                 context_tasks: Iterable[str] | None = None, use_xattn: bool = True) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.stride_level = stride_level
        self.patch_size_full = pair(patch_size_full)
        self.dim_tokens_enc = dim_tokens_enc
        self.dim_tokens = dim_tokens
        self.learnable_pos_emb = learnable_pos_emb
        self.image_size = pair(image_size)
        self.use_task_queries = use_task_queries
        self.task = task
        self.use_xattn = use_xattn
        self.P_H = max(1, self.patch_size_full[0] // stride_level)
        self.P_W = max(1, self.patch_size_full[1] // stride_level)

        self.task_embeddings: nn.ParameterDict | None = None
        if context_tasks is not None:
            self.task_embeddings = nn.ParameterDict(
                {t: nn.Parameter(torch.zeros(1, 1, dim_tokens)) for t in context_tasks})
            for emb in self.task_embeddings.values():
                nn.init.trunc_normal_(emb, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim_tokens))

        grid = (self.image_size[0] // (stride_level * self.P_H), self.image_size[1] // (stride_level * self.P_W))
        if learnable_pos_emb:
            self.pos_emb = nn.Parameter(torch.zeros(1, dim_tokens, *grid))
            nn.init.trunc_normal_(self.pos_emb, std=0.02)
        else:
            self.pos_emb = nn.Parameter(build_2d_sincos_posemb(*grid, embed_dim=dim_tokens), requires_grad=False)

        if use_xattn:
            self.decoder = CrossAttention(dim_tokens, num_heads=num_heads, qkv_bias=qkv_bias,
                                          attn_drop=attn_drop_rate, proj_drop=drop_rate)
            self.context_norm = LayerNorm6(dim_tokens)
            self.query_norm = LayerNorm6(dim_tokens)
            self.out_norm = LayerNorm6(dim_tokens)
            self.mlp = Mlp(in_features=dim_tokens, hidden_features=int(dim_tokens * mlp_ratio))
        dpr = drop_path_rates(drop_path_rate, depth)
        # A ModuleList (not Sequential) so the blocks can receive a key-padding mask.
        self.decoder_transformer = nn.ModuleList([
            Block(dim_tokens, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=LayerNorm6)
            for i in range(depth)])
        self.dim_patch = num_channels * self.P_H * self.P_W
        self.out_proj = nn.Linear(dim_tokens, self.dim_patch)
        if dim_tokens_enc is not None:
            self.init(dim_tokens_enc)

    def init(self, dim_tokens_enc: int = 768) -> None:
        """Create the encoder-width-dependent projection (called by :class:`MultiMAE`)."""
        self.dim_tokens_enc = dim_tokens_enc
        self.proj_context = nn.Linear(dim_tokens_enc, self.dim_tokens)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_emb", "mask_token", "task_embeddings"}

    def _grid(self, input_info: Mapping[str, Any]) -> tuple[int, int]:
        H, W = input_info["image_size"]
        return H // (self.stride_level * self.P_H), W // (self.stride_level * self.P_W)

    def _task_emb(self, task: str | None) -> torch.Tensor | None:
        if self.task_embeddings is not None and task in self.task_embeddings:
            return self.task_embeddings[task][0]  # [1, D]
        return None

    def _context_embeddings(self, input_info: Mapping[str, Any], pos: torch.Tensor) -> torch.Tensor:
        """Per-position embedding of the canonical token sequence: ``[N, D]`` (task emb + pos emb)."""
        parts = []
        for name, info in input_info["tasks"].items():
            if info["num_tokens"] != pos.shape[0]:
                raise ValueError(f"output adapter {self.task!r}: input {name!r} has {info['num_tokens']} tokens, "
                                 f"but the decoder grid has {pos.shape[0]}")
            emb = self._task_emb(name)
            parts.append(pos if emb is None else pos + emb)
        return torch.cat(parts, dim=0)

    def _queries_and_context(self, ctx: torch.Tensor, input_info: Mapping[str, Any],
                             ids_keep: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ctx [B, K+G, D]`` projected encoder tokens -> (queries ``[B, h*w, D]``, context ``[B, K+G, D]``)."""
        B, D = ctx.shape[0], ctx.shape[2]
        G = int(input_info.get("num_global_tokens", 0))
        K = ctx.shape[1] - G
        # Embeddings stay in their parameter dtype (float32): under autocast the sums are promoted
        # to float32 as in MultiMAE, rather than rounded to bf16.
        pos = flatten_grid(resize_pos_emb(self.pos_emb, grid, "bilinear"))[0]  # [h*w, D]
        emb = self._context_embeddings(input_info, pos)  # [N, D]
        visible = ctx[:, :K] + emb[ids_keep]  # [B, K, D]
        context = torch.cat([visible, ctx[:, K:]], dim=1)
        tasks = input_info["tasks"]
        if self.use_task_queries and self.task in tasks:
            # This modality's slice of the canonical sequence: the mask token everywhere, its own
            # visible tokens scattered into their slots. Visible tokens of the other modalities go
            # to one spare row that is dropped, so no [B, N_all, D] sequence is built per decoder
            # (MultiMAE builds it and slices; the values are the same).
            info = tasks[self.task]
            start, n = info["start_idx"], info["end_idx"] - info["start_idx"]
            base = (self.mask_token[0] + emb[start:start + n]).to(visible.dtype)  # [n, D]
            base = torch.cat([base, base.new_zeros(1, D)]).expand(B, -1, -1)  # + the spare row
            slot = ids_keep - start
            slot = torch.where((slot >= 0) & (slot < n), slot, n)  # [B, K]
            queries = base.scatter(1, slot.unsqueeze(-1).expand(-1, -1, D), visible)
            return queries[:, :n], context
        queries = self.mask_token[0] + pos
        task_emb = self._task_emb(self.task)
        if task_emb is not None:
            queries = queries + task_emb
        return queries.expand(B, -1, -1), context

    def _decode(self, queries: torch.Tensor, context: torch.Tensor,
                key_valid: torch.Tensor | None) -> torch.Tensor:
        """Cross-attention + MLP, decoder blocks, patch projection: ``[B, Q, D] -> [B, Q, C*P_H*P_W]``."""
        x = queries
        if self.use_xattn:
            # No residual around the cross-attention: MultiMAE's design (queries are mostly mask tokens).
            x = self.decoder(self.query_norm(x), self.context_norm(context))
            x = x + self.mlp(self.out_norm(x))
        attn_mask = None if key_valid is None else key_valid[:, None, None, :]
        for block in self.decoder_transformer:
            x = block(x, attn_mask=attn_mask)
        return self.out_proj(x)

    def forward(self, encoder_tokens: torch.Tensor, input_info: Mapping[str, Any],
                ids_keep: torch.Tensor | None = None, ids_restore: torch.Tensor | None = None,
                query_keep: torch.Tensor | None = None,
                kept_range: tuple[int, int] | None = None,
                packed: bool = False) -> torch.Tensor | PackedPrediction:
        """Decode ``encoder_tokens [B, K+G, D_enc]`` into ``[B, num_channels, h*P_H, w*P_W]``.

        ``ids_keep [B, K]``: canonical positions of the visible tokens (None = all tokens visible,
        in canonical order). ``query_keep`` bool ``[B, h*w]`` (True = decode): positions with
        False (thrown tokens) are dropped from the queries — they neither attend nor are attended
        to in the decoder blocks — and their predictions are **zero-filled**. ``kept_range``: the
        fewest and most kept rows of a sample (host ints): the rows are packed to the most without
        reading counts from ``query_keep`` (each read is a host sync on a GPU), and when both are
        equal no padding mask is needed. ``packed`` (with ``query_keep``): return the decoded rows
        as a :class:`~multimae_att.model.packed.PackedPrediction` instead of the zero-filled image.
        """
        if self.dim_tokens_enc is None:
            raise RuntimeError("SpatialOutputAdapter: call init(dim_tokens_enc) first")
        grid = self._grid(input_info)
        ctx = self.proj_context(encoder_tokens)
        if ids_keep is None:
            n = int(input_info["num_task_tokens"])
            ids_keep = torch.arange(n, device=ctx.device).expand(ctx.shape[0], n)
        queries, context = self._queries_and_context(ctx, input_info, ids_keep, grid)
        if query_keep is not None and (packed or kept_range is not None or not bool(query_keep.all())):
            rows = self._decode_subset(queries, context, query_keep, grid, kept_range)
            return rows if packed else rows.image()
        return unpatchify(self._decode(queries, context, None), grid, self.num_channels, (self.P_H, self.P_W))

    def _decode_subset(self, queries: torch.Tensor, context: torch.Tensor, keep: torch.Tensor,
                       grid: tuple[int, int], kept_range: tuple[int, int] | None = None) -> PackedPrediction:
        """Decode only the kept query rows; rows may differ per sample, so pack them to the most
        kept (``kept_range[1]``, else read from ``keep``) and mask the padding as keys (not
        needed when every sample keeps the same number)."""
        Q, D = queries.shape[1:]
        counts = keep.sum(1)
        if kept_range is None:
            width, uniform = int(counts.max()), False
        else:
            fewest, width = (max(0, min(int(x), Q)) for x in kept_range)
            uniform = fewest == width
            check((counts >= fewest) & (counts <= width),
                  f"decoder {self.task!r}: a sample keeps a number of queries outside kept_range={kept_range}")
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept rows first
        packed = queries.gather(1, order.unsqueeze(-1).expand(-1, -1, D))
        valid = None
        if uniform:  # no padding row: nothing to mask
            out = self._decode(packed, context, None)
        else:
            valid = torch.arange(width, device=keep.device)[None, :] < counts[:, None]  # [B, width]
            key_valid = valid | (counts == 0)[:, None]  # a sample with nothing kept must not attend to nothing
            out = self._decode(packed, context, key_valid)
        return PackedPrediction(out, order, valid, grid, self.num_channels, (self.P_H, self.P_W))
