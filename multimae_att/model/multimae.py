"""MultiMAE and MultiViT: shared ViT encoder over the tokens of several input modalities.

Drop-in surface (README "Model API"): classes, constructor keywords, state-dict names and
``forward`` semantics are MultiMAE's. On top of it, the fast internal API used by the
pretraining runner (docs/INTERFACES.md):

* :meth:`MultiMAE.embed` — adapter outputs, once per step, with grad;
* :meth:`MultiMAE.attention_scores` — no-grad scoring pass over all tokens;
* :meth:`MultiMAE.forward_masked` — masked encoder + decoders over the SAME cached tokens.

Token conventions: the *canonical order* of modalities is the order of ``input_adapters``
(restricted to the modalities present); inside a modality tokens are row-major over the
patch grid; the ``G = num_global_tokens`` global tokens are appended LAST. Masks: bool/int
``[B, N_m]`` per modality, 1 = hidden, 0 = visible.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from multimae_att.device_checks import check
from multimae_att.model.attention import check_attention_mode, set_fused, use_fused
from multimae_att.model.output_adapters import drop_path_rates
from multimae_att.scoring.readout import readout_attention

TensorDict = dict[str, torch.Tensor]


class Tokens(dict):
    """dict modality -> adapter tokens ``[B, N_m, D]`` (pos-emb added), in canonical order,
    carrying ``image_size`` = (H, W) of the full-resolution input (the decoders need the grid).
    Returned by :meth:`MultiMAE.embed`; a plain dict of such tensors is accepted too (see
    :meth:`MultiMAE.is_token_dict`)."""

    def __init__(self, data: Mapping[str, torch.Tensor], image_size: tuple[int, int]) -> None:
        super().__init__(data)
        self.image_size = (int(image_size[0]), int(image_size[1]))


class MultiMAE(nn.Module):
    """Multi-modal masked autoencoder (MultiMAE's architecture and state-dict layout).

    Args: ``input_adapters`` / ``output_adapters`` (dicts modality -> adapter; outputs may be
    None), ``num_global_tokens``, ``dim_tokens``, ``depth``, ``num_heads``, ``mlp_ratio``,
    ``qkv_bias``, ``drop_rate``, ``attn_drop_rate``, ``drop_path_rate``, ``norm_layer``.
    Encoder blocks are timm ``Block``s: ``encoder.<i>.{norm1, attn.qkv, ...}``. Their attention
    kernel (fused SDPA or explicit softmax) is chosen per pass, see :meth:`set_attention`.
    """

    def __init__(self, input_adapters: Mapping[str, nn.Module],
                 output_adapters: Mapping[str, nn.Module] | None, num_global_tokens: int = 1,
                 dim_tokens: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6)) -> None:
        super().__init__()
        for adapter in input_adapters.values():
            adapter.init(dim_tokens=dim_tokens)
        self.input_adapters = nn.ModuleDict(input_adapters)
        self.output_adapters: nn.ModuleDict | None = None
        if output_adapters is not None:
            for adapter in output_adapters.values():
                adapter.init(dim_tokens_enc=dim_tokens)
            self.output_adapters = nn.ModuleDict(output_adapters)
        self.num_global_tokens = num_global_tokens
        self.dim_tokens = dim_tokens
        self.num_heads = num_heads
        self.global_tokens = nn.Parameter(torch.zeros(1, num_global_tokens, dim_tokens))
        dpr = drop_path_rates(drop_path_rate, depth)  # stochastic depth decay rule
        self.encoder = nn.Sequential(*[
            Block(dim_tokens, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.attention = "auto"  # see set_attention (a run setting, not part of the state dict)
        self._init_weights()

    # ------------------------------------------------------------------ set-up
    def _init_weights(self) -> None:
        """MultiMAE's (MAE's) initialisation: xavier Linear (q, k, v treated as separate
        matrices), patch convolutions initialised like Linear, LayerNorm 1/0, N(0, 0.02) tokens."""
        nn.init.trunc_normal_(self.global_tokens, std=0.02)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                fused = 3 if name.endswith("qkv") else 2 if name.endswith(".kv") else 1
                bound = math.sqrt(6.0 / float(m.weight.shape[0] // fused + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d) and ".proj" in name:
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))

    def set_attention(self, mode: str) -> None:
        """Attention kernel of every encoder and decoder block: ``'auto'`` (default), ``'fused'``
        (SDPA) or ``'explicit'`` (softmax of the materialised logits); the same function either way.

        ``auto`` decides per pass from the device, the compute dtype and whether the pass builds a
        graph (:func:`multimae_att.model.attention.auto_fused`: explicit only for bf16/fp16
        training on a CPU, where the flash-attention backward is slow). The scoring pass
        (:meth:`attention_scores`, no grad) therefore stays fused while the training pass of the
        same step may run explicit. The scoring pass's readout layer always computes its one
        softmax row explicitly (it reads the probabilities).
        """
        self.attention = check_attention_mode(mode)

    def set_fused_attn(self, enabled: bool) -> None:
        """``set_attention('fused' if enabled else 'explicit')`` (timm's flag name)."""
        self.set_attention("fused" if enabled else "explicit")

    def _select_attention(self, x: torch.Tensor, grad: bool | None = None) -> None:
        """Set every block's ``fused_attn`` for the pass about to run over ``x``."""
        set_fused(self, use_fused(self.attention, x, grad))

    def get_num_layers(self) -> int:
        return len(self.encoder)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        skip = {"global_tokens"}
        for prefix, adapters in (("input_adapters", self.input_adapters), ("output_adapters", self.output_adapters)):
            for name, adapter in (adapters or {}).items():
                if hasattr(adapter, "no_weight_decay"):
                    skip |= {f"{prefix}.{name}.{p}" for p in adapter.no_weight_decay()}
        return skip

    # ------------------------------------------------------------------ tokens
    def is_token_dict(self, x: Mapping[str, torch.Tensor]) -> bool:
        """True if ``x`` holds adapter tokens rather than raw inputs.

        Rule: a :class:`Tokens` instance, or a dict whose values are all floating tensors
        ``[B, N, dim_tokens]`` under input-adapter names. Raw inputs never look like that:
        images are 4-D ``[B, C, H, W]`` and label maps are integer ``[B, H, W]``.
        """
        if isinstance(x, Tokens):
            return True
        return len(x) > 0 and all(
            k in self.input_adapters and torch.is_tensor(v) and v.is_floating_point()
            and v.ndim == 3 and v.shape[-1] == self.dim_tokens for k, v in x.items())

    def _canonical(self, x: Mapping[str, Any]) -> list[str]:
        names = [m for m in self.input_adapters if m in x]
        if not names:
            raise ValueError(f"no input modality among {list(x)}; the model's inputs are {list(self.input_adapters)}")
        return names

    def embed(self, x: Mapping[str, torch.Tensor] | torch.Tensor) -> Tokens:
        """Adapter outputs: dict modality -> ``[B, N_m, D]`` (pos-emb added), canonical order.

        ``x``: dict modality -> raw input (``rgb [B, 3, H, W]``, ``depth [B, 1, H, W]``,
        ``semseg [B, H/4, W/4]`` int64), or a tensor meaning RGB. Keys without an input adapter
        are ignored (as in MultiMAE). Runs with grad: call it once per step and hand the result
        to :meth:`attention_scores` (which detaches) and :meth:`forward_masked`.
        """
        x = {"rgb": x} if torch.is_tensor(x) else x
        names = self._canonical(x)
        image_size = self.input_adapters[names[0]].full_image_size(x[names[0]])
        return Tokens({m: self.input_adapters[m](x[m]) for m in names}, image_size)

    def _as_tokens(self, tokens: Mapping[str, torch.Tensor]) -> Tokens:
        """Accept a plain token dict: order it canonically and infer the image size from the
        adapter's stored grid (or a square grid)."""
        if isinstance(tokens, Tokens) and list(tokens) == self._canonical(tokens):
            return tokens
        names = self._canonical(tokens)
        image_size = getattr(tokens, "image_size", None)
        if image_size is None:
            adapter = self.input_adapters[names[0]]
            n = tokens[names[0]].shape[1]
            gh, gw = adapter.grid_size
            if n != gh * gw:
                side = math.isqrt(n)
                if side * side != n:
                    raise ValueError(f"cannot infer the patch grid of {n} {names[0]!r} tokens; "
                                     "pass the Tokens returned by embed()")
                gh = gw = side
            image_size = (gh * adapter.patch_size_full[0], gw * adapter.patch_size_full[1])
        return Tokens({m: tokens[m] for m in names}, image_size)

    def input_info(self, tokens: Tokens) -> OrderedDict[str, Any]:
        """MultiMAE's ``input_info`` (what output adapters read): per modality ``num_tokens``,
        ``start_idx``, ``end_idx`` in the canonical concatenation; ``image_size``;
        ``num_task_tokens``; ``num_global_tokens``."""
        info: OrderedDict[str, Any] = OrderedDict()
        info["tasks"] = {}
        start = 0
        for m, t in tokens.items():
            n = t.shape[1]
            info["tasks"][m] = {"num_tokens": n, "has_2d_posemb": True, "start_idx": start, "end_idx": start + n}
            start += n
        info["image_size"] = tokens.image_size
        info["num_task_tokens"] = start
        info["num_global_tokens"] = self.num_global_tokens
        return info

    def _with_global(self, z: torch.Tensor) -> torch.Tensor:
        """Append the global tokens LAST: ``[B, N, D] -> [B, N + G, D]``."""
        return torch.cat([z, self.global_tokens.to(z.dtype).expand(z.shape[0], -1, -1)], dim=1)

    # ------------------------------------------------------------------ scoring pass
    @torch.no_grad()
    def attention_scores(self, x: Mapping[str, torch.Tensor], layer: int = -1, query: str = "global",
                         per_head: bool = False) -> TensorDict:
        """Per-token attention scores of an unmasked pass; no grad.

        ``x``: raw input dict or the cached tokens of the same step (:meth:`embed`'s output;
        told apart by :meth:`is_token_dict`; tokens are detached here). ``layer``: readout
        block (Python index, default last). ``query``: ``'global'`` = the global token's
        attention row over patch tokens (rows of several global tokens averaged); ``'mean'`` =
        attention received, averaged over all query rows. Softmax over all N + G keys.
        The encoder runs in eval mode here (no dropout / stochastic depth) even while training.
        Returns dict modality -> ``[B, N_m]`` (head average) or ``[B, H, N_m]`` (``per_head``),
        float32, in canonical order.
        """
        tokens = self._as_tokens(x) if self.is_token_dict(x) else self.embed(x)
        z = self._with_global(torch.cat([t.detach() for t in tokens.values()], dim=1))
        self._select_attention(z, grad=False)
        training = self.encoder.training
        if training:  # scores must not depend on dropout / stochastic depth draws
            self.encoder.eval()
        try:
            probs = readout_attention(self.encoder, z, layer, self.num_global_tokens, query)  # [B, H, N]
        finally:
            if training:
                self.encoder.train()
        if not per_head:
            probs = probs.mean(dim=1)
        sizes = [t.shape[1] for t in tokens.values()]
        return dict(zip(tokens.keys(), probs.split(sizes, dim=-1)))

    @torch.no_grad()
    def encoder_features(self, x: Mapping[str, torch.Tensor]) -> TensorDict:
        """Last-layer encoder features of an unmasked pass (every block in full); no grad.

        ``x``: raw inputs or tokens, as for :meth:`attention_scores`; eval mode likewise.
        Returns dict modality -> ``[B, N_m, D]`` (global tokens dropped), canonical order.
        The cost of a plain inference forward (what the loss-prediction score source reads).
        """
        tokens = self._as_tokens(x) if self.is_token_dict(x) else self.embed(x)
        z = self._with_global(torch.cat([t.detach() for t in tokens.values()], dim=1))
        training = self.encoder.training
        if training:
            self.encoder.eval()
        try:
            z = self.encoder(z)
        finally:
            if training:
                self.encoder.train()
        sizes = [t.shape[1] for t in tokens.values()]
        return dict(zip(tokens.keys(), z[:, :sum(sizes)].split(sizes, dim=1)))

    # ------------------------------------------------------------------ masked pass
    def _visible_ids(self, tokens: Tokens, hidden: Mapping[str, torch.Tensor],
                     thrown: Mapping[str, torch.Tensor] | None, num_visible: int | None = None) -> torch.Tensor:
        """Canonical positions of the visible tokens ``[B, K]`` (ascending); checks the masks.

        ``num_visible``: K when the caller knows it (the pretraining step does): the count check
        then runs without a host sync (:func:`multimae_att.device_checks.check`); otherwise K is
        read from the masks (one sync on a GPU)."""
        parts = []
        for m, t in tokens.items():
            if m not in hidden:
                raise KeyError(f"no mask for input modality {m!r} (masks given: {list(hidden)})")
            mask = hidden[m].bool()
            if thrown is not None and m in thrown:
                mask = mask | thrown[m].bool()
            if tuple(mask.shape) != tuple(t.shape[:2]):
                raise ValueError(f"mask of {m!r} has shape {list(mask.shape)}, tokens need {list(t.shape[:2])}")
            parts.append(mask)
        not_visible = torch.cat(parts, dim=1)
        counts = (~not_visible).sum(dim=1)
        if num_visible is None:
            k, k_max = torch.stack([counts.min(), counts.max()]).tolist()  # one host sync, not two
            if k != k_max:
                raise ValueError(f"every sample needs the same number of visible tokens, got {counts.tolist()}")
        else:
            k = int(num_visible)
            check(counts == k, f"every sample needs exactly {k} visible tokens",
                  detail=lambda: f"got {counts.tolist()}")
        # Stable sort on the 0/1 mask: visible positions first, in canonical order. No per-sample loop.
        return torch.argsort(not_visible.to(torch.int8), dim=1, stable=True)[:, :k]

    def encode_visible(self, tokens: Mapping[str, torch.Tensor], ids_keep: torch.Tensor) -> torch.Tensor:
        """Encoder over the visible tokens: gathers ``ids_keep [B, K]`` from the canonical
        concatenation of ``tokens``, appends the global tokens -> ``[B, K + G, D]``."""
        z = torch.cat(list(tokens.values()), dim=1)
        z = z.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, z.shape[-1]))
        return self.encoder(self._with_global(z))

    def decode(self, encoder_tokens: torch.Tensor, input_info: Mapping[str, Any], ids_keep: torch.Tensor,
               thrown: Mapping[str, torch.Tensor] | None = None,
               fp32_output_adapters: Iterable[str] = (),
               kept_range: Mapping[str, tuple[int, int]] | None = None, packed: bool = False) -> TensorDict:
        """Run every output adapter; ``thrown[m]`` (bool ``[B, N_m]``) drops those query rows of
        the decoder whose ``task`` (or, without one, whose name) is ``m`` (predictions there are zero).
        ``kept_range[m]``: (fewest, most) rows a sample keeps (host ints), so no count is read from
        the mask. ``packed``: such a decoder returns its decoded rows
        (:class:`~multimae_att.model.packed.PackedPrediction`) instead of the zero-filled image."""
        fp32 = set(fp32_output_adapters)
        preds = {}
        for name, adapter in self.output_adapters.items():
            task = getattr(adapter, "task", None) or name
            drop = None if thrown is None else thrown.get(task)
            keep = None if drop is None else ~drop.bool()
            kwargs = {"input_info": input_info, "ids_keep": ids_keep}
            if keep is not None:
                kwargs["query_keep"] = keep
                if packed:
                    kwargs["packed"] = True
                if kept_range is not None and task in kept_range:
                    kwargs["kept_range"] = kept_range[task]
            if name in fp32:
                with torch.autocast(device_type=encoder_tokens.device.type, enabled=False):
                    preds[name] = adapter(encoder_tokens.float(), **kwargs)
            else:
                preds[name] = adapter(encoder_tokens, **kwargs)
        return preds

    def forward_masked(self, tokens: Mapping[str, torch.Tensor], hidden: Mapping[str, torch.Tensor],
                       thrown: Mapping[str, torch.Tensor] | None = None, *,
                       fp32_output_adapters: Iterable[str] = (),
                       return_encoder: bool = False, num_visible: int | None = None,
                       kept_range: Mapping[str, tuple[int, int]] | None = None, packed: bool = False
                       ) -> TensorDict | tuple[TensorDict, torch.Tensor]:
        """Masked encoder + decoders over the cached ``tokens`` (no second adapter pass).

        ``hidden[m]`` bool/int ``[B, N_m]`` (1 = hidden) for every input modality; ``thrown[m]``
        (optional, AMT) marks tokens that are neither visible nor reconstructed. Visible =
        not hidden and not thrown; every sample must have the same count K (error otherwise).
        Visible tokens are gathered in canonical order (vectorised), the global tokens
        appended, the encoder run; each decoder cross-attends to the visible + global tokens.
        Decoder queries at thrown positions are dropped and their predictions are zero-filled.
        ``num_visible``: K and ``kept_range`` (modality -> fewest and most tokens a sample keeps,
        i.e. does not throw), when known, spare reading counts from the masks (each a host sync
        on a GPU). ``packed``: a decoder that drops thrown queries returns its decoded rows
        (:class:`~multimae_att.model.packed.PackedPrediction`, what the pretraining losses read)
        instead of the zero-filled image.
        Returns preds: dict output name -> ``[B, C, H_m, W_m]`` (or a ``PackedPrediction``; and
        the encoder output ``[B, K + G, D]`` with ``return_encoder``).
        """
        tokens = self._as_tokens(tokens)
        self._select_attention(next(iter(tokens.values())))
        ids_keep = self._visible_ids(tokens, hidden, thrown, num_visible)
        encoded = self.encode_visible(tokens, ids_keep)
        preds = {} if self.output_adapters is None else self.decode(
            encoded, self.input_info(tokens), ids_keep, thrown, fp32_output_adapters, kept_range, packed)
        return (preds, encoded) if return_encoder else preds

    # ------------------------------------------------------------------ MultiMAE's forward
    def random_masks(self, tokens: Mapping[str, torch.Tensor], num_encoded_tokens: int,
                     alphas: float | Sequence[float] = 1.0, sample_tasks_uniformly: bool = False,
                     generator: torch.Generator | None = None) -> TensorDict:
        """MultiMAE's random masking through the masking engine: Dirichlet budgets per sample
        (exactly ``num_encoded_tokens`` visible in total) then uniform choice per modality.
        Returns dict modality -> bool ``[B, N_m]`` (True = hidden)."""
        from multimae_att.masking import make_masks, sample_budgets  # lazy: masking imports nothing from here

        first = next(iter(tokens.values()))
        sizes = [t.shape[1] for t in tokens.values()]
        visible = sample_budgets(sizes, num_encoded_tokens, first.shape[0], alphas, generator,
                                 sample_tasks_uniformly=sample_tasks_uniformly, device=first.device)
        scores = {m: t.new_zeros(t.shape[:2]) for m, t in tokens.items()}  # values unused by 'random'
        return dict(make_masks("random", scores, visible, generator=generator).hidden)

    def forward(self, x: Mapping[str, torch.Tensor] | torch.Tensor, mask_inputs: bool = True,
                task_masks: Mapping[str, torch.Tensor] | None = None,
                num_encoded_tokens: int | None = 128, alphas: float | Sequence[float] = 1.0,
                sample_tasks_uniformly: bool = False,
                fp32_output_adapters: Iterable[str] = ()) -> tuple[Any, TensorDict]:
        """MultiMAE's forward: adapters, masking, encoder, decoders -> ``(preds, task_masks)``.

        ``mask_inputs=False``: every token visible, canonical order (returned masks all 0).
        ``task_masks`` (dict modality -> ``[B, N_m]``, 1 = hidden, the same visible count in
        every sample, any batch size): used as given and returned unchanged. Otherwise random
        masks with ``num_encoded_tokens`` visible per sample (None = all tokens), Dirichlet
        ``alphas`` and ``sample_tasks_uniformly`` as in MultiMAE; returned as int64 0/1.
        ``fp32_output_adapters``: output names decoded with autocast disabled.
        ``preds``: dict output name -> ``[B, C, H_m, W_m]``; without output adapters the
        encoder output ``[B, K + G, D]`` is returned instead.
        """
        tokens = self.embed(x)
        total = sum(t.shape[1] for t in tokens.values())
        if not mask_inputs:
            hidden = {m: torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device) for m, t in tokens.items()}
            task_masks = {m: h.long() for m, h in hidden.items()}
        elif task_masks is not None:
            hidden = task_masks
        else:
            k = total if num_encoded_tokens is None else num_encoded_tokens
            hidden = self.random_masks(tokens, k, alphas, sample_tasks_uniformly)
            task_masks = {m: h.long() for m, h in hidden.items()}
        self._select_attention(next(iter(tokens.values())))
        ids_keep = self._visible_ids(tokens, hidden, None)
        encoded = self.encode_visible(tokens, ids_keep)
        if self.output_adapters is None:
            return encoded, task_masks
        return self.decode(encoded, self.input_info(tokens), ids_keep, None, fp32_output_adapters), task_masks


class MultiViT(MultiMAE):
    """MultiMAE without masking (downstream use): all tokens, canonical order, global tokens last.

    Output adapters are called MultiMAE-style: ``adapter(encoder_tokens=..., input_info=...)``.
    """

    def process_input(self, x: Mapping[str, torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Raw inputs -> (encoder input ``[B, N + G, D]``, ``input_info``)."""
        tokens = self.embed(x)
        z = self._with_global(torch.cat(list(tokens.values()), dim=1))
        self._select_attention(z)  # the pass that follows runs on z (see set_attention)
        return z, self.input_info(tokens)

    def forward(self, x: Mapping[str, torch.Tensor] | torch.Tensor, return_all_layers: bool = False,
                **kwargs: Any) -> Any:
        """Encoder output ``[B, N + G, D]`` (a list of every block's output with
        ``return_all_layers``), or, with output adapters, dict name -> adapter output."""
        z, info = self.process_input(x)
        if return_all_layers:
            encoded: torch.Tensor | list[torch.Tensor] = []
            for block in self.encoder:
                z = block(z)
                encoded.append(z)
        else:
            encoded = self.encoder(z)
        if self.output_adapters is None:
            return encoded
        return {name: adapter(encoder_tokens=encoded, input_info=info)
                for name, adapter in self.output_adapters.items()}
