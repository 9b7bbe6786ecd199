"""Where does the attention point? ``python -m multimae_att.diagnose --checkpoint CKPT --data ROOT``.

For every readout layer and query (``global``, ``mean``) of the scoring pass, per input modality,
the AUROC of the attention scores for foreground vs background tokens
(:mod:`multimae_att.diagnostics`; foreground = semantic labels not in ``data.background_classes``),
averaged over the images of a split, for the checkpoint and for the same architecture with random
weights (the reference row). Use it to choose ``masking.score_layer`` / ``masking.score_query``
before a long run: with AUROC > 0.5 the most-attended tokens lie on objects and ``high`` masking
hides objects first; below 0.5 it hides background first.

The model (size, modalities, image size, depth standardisation, background classes, the configured
readout) comes from the checkpoint's stored pretraining config, or from ``--config FILE
[key=value ...]`` (a pretraining config) for files without one (e.g. MultiMAE's releases). The
data needs a ``semseg`` modality (the labels that define foreground). Prints a table and writes
JSON (``--out``, default ``diagnose-<split>.json`` next to the checkpoint).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["diagnose", "main"]

QUERIES = ("global", "mean")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m multimae_att.diagnose", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="pretraining checkpoint (final.pth, a training "
                   "state, or a MultiMAE file with --config): a path, a URL or a published name")
    p.add_argument("--data", required=True, help="dataset root or shard spec with rgb/depth/semseg")
    p.add_argument("--split", default="val")
    p.add_argument("--config", default=None, help="pretraining config describing the model, for "
                   "checkpoints without a stored config")
    p.add_argument("--background-classes", type=int, nargs="+", default=None,
                   help="semseg labels that are background (default: data.background_classes)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-images", type=int, default=None, help="score only the first N images")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-weights reference")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=None, help="JSON output (default: CKPT_DIR/diagnose-<split>.json; "
                   "./diagnose-<split>.json for a URL or a published name)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of --config")
    return p.parse_args(argv)


def _pretrain_config(ckpt: dict[str, Any], path: str, config: str | None, overrides: list[str]):
    from multimae_att.config import ConfigError, config_from_dict, load_config
    from multimae_att.pretrain.config import PretrainConfig

    if config is not None:
        return load_config(PretrainConfig, config, overrides)
    stored = ckpt.get("config") if isinstance(ckpt, dict) else None
    if not isinstance(stored, dict):
        raise ConfigError(f"{path} holds no pretraining config: pass --config FILE describing its model")
    from multimae_att.config import apply_overrides, parse_overrides
    try:
        return config_from_dict(PretrainConfig, apply_overrides(stored, parse_overrides(overrides)))
    except ConfigError as e:
        raise ConfigError(f"the config stored in {path} does not load ({e}); pass --config FILE") from e


@torch.no_grad()
def diagnose(model_cfg, checkpoint: str, data: str, split: str = "val",
             background_classes: list[int] | None = None, batch_size: int = 32,
             max_images: int | None = None, seed: int = 0, device: str | None = None,
             loaded: Any = None) -> dict[str, Any]:
    """AUROC table (see the module docstring) as a JSON-ready dict. ``model_cfg``: a
    :class:`~multimae_att.pretrain.config.PretrainConfig`; ``loaded``: the checkpoint already
    loaded with :func:`~multimae_att.checkpoint.load_checkpoint` (else read from ``checkpoint``)."""
    from multimae_att.checkpoint import load_checkpoint, load_weights, model_state
    from multimae_att.config import ConfigError
    from multimae_att.data import build_loader
    from multimae_att.diagnostics import mean_fg_auroc, token_foreground
    from multimae_att.masking.planner import token_grids
    from multimae_att.pretrain.setup import build_model
    from multimae_att.pretrain.step import model_inputs

    cfg = model_cfg
    bg = background_classes if background_classes is not None else cfg.data.background_classes
    if not bg:
        raise ConfigError("no background classes: set data.background_classes in the config or pass "
                          "--background-classes (synthetic scenes: 0 1 = wall, floor)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mods = list(cfg.model.in_modalities)
    models = {}
    torch.manual_seed(seed)
    models["random"] = build_model(cfg).to(dev).eval()
    trained = build_model(cfg)
    loaded = load_checkpoint(checkpoint) if loaded is None else loaded
    load_weights(trained, model_state(loaded, source=checkpoint))
    models["checkpoint"] = trained.to(dev).eval()
    depth = len(trained.encoder)
    loader = build_loader(data, sorted(set(mods) | {"semseg"}), batch_size=batch_size, num_workers=0,
                          split=split, image_size=cfg.data.image_size, train=False,
                          eval_full_image=True, drop_last=False, layout=cfg.data.layout)
    sums: dict[tuple, torch.Tensor] = {}
    counts: dict[tuple, torch.Tensor] = {}
    fg_tokens = {m: torch.zeros((), dtype=torch.float64) for m in mods}
    all_tokens = dict.fromkeys(mods, 0)
    images = 0
    for batch in loader:
        if max_images is not None and images >= max_images:
            break
        if max_images is not None:
            batch = {k: v[:max_images - images] if torch.is_tensor(v) else v for k, v in batch.items()}
        inputs = model_inputs(batch, mods, cfg.data.standardize_depth, dev)
        labels = batch["semseg"].to(dev)
        images += labels.shape[0]
        fg = None
        for name, model in models.items():
            tokens = model.embed(inputs)
            if fg is None:
                fg = {m: token_foreground(labels, hw, bg) for m, hw in token_grids(model, tokens).items()}
                for m in mods:
                    fg_tokens[m] += fg[m].double().sum().cpu()
                    all_tokens[m] += fg[m].numel()
            for layer in range(depth):
                for query in QUERIES:
                    scores = model.attention_scores(tokens, layer=layer, query=query)
                    for m in mods:
                        total, n = mean_fg_auroc(scores[m], fg[m])
                        key = (name, layer, query, m)
                        sums[key] = sums.get(key, 0) + total.cpu()
                        counts[key] = counts.get(key, 0) + n.cpu()
    if images == 0:
        raise ValueError(f"{data}: split {split!r} has no images")
    rows = []
    for name in ("checkpoint", "random"):
        for layer in range(depth):
            for query in QUERIES:
                keys = [(name, layer, query, m) for m in mods]
                rows.append({"weights": name, "layer": layer, "query": query,
                             "auroc": {k[3]: _mean(sums[k], counts[k]) for k in keys},
                             "images": {k[3]: int(counts[k]) for k in keys}})
    layer = cfg.masking.score_layer % depth
    chosen = next(r for r in rows if r["weights"] == "checkpoint" and r["layer"] == layer
                  and r["query"] == cfg.masking.score_query)
    return {"checkpoint": str(checkpoint), "data": str(data), "split": split, "images": images,
            "background_classes": list(bg),
            "fg_token_share": {m: float(fg_tokens[m]) / max(all_tokens[m], 1) for m in mods},
            "configured": {"layer": layer, "query": cfg.masking.score_query, "auroc": chosen["auroc"]},
            "rows": rows}


def _mean(total: torch.Tensor, count: torch.Tensor) -> float:
    return float(total) / int(count) if int(count) else math.nan


def format_table(result: dict[str, Any]) -> str:
    """The rows as a fixed-width table; ``*`` marks the configured readout."""
    mods = list(result["fg_token_share"])
    conf = result["configured"]
    lines = [f"foreground-vs-background AUROC of the attention scores, {result['images']} images of "
             f"{result['data']} ({result['split']}), background classes {result['background_classes']}",
             "share of foreground tokens: " + ", ".join(f"{m} {v:.3f}" for m, v in result["fg_token_share"].items()),
             f"{'weights':<11}{'layer':>6}  {'query':<7}" + "".join(f"{m:>9}" for m in mods)]
    for r in result["rows"]:
        mark = "*" if (r["weights"] == "checkpoint" and r["layer"] == conf["layer"]
                       and r["query"] == conf["query"]) else " "
        lines.append(f"{r['weights']:<11}{r['layer']:>6}{mark} {r['query']:<7}"
                     + "".join(f"{r['auroc'][m]:>9.3f}" for m in mods))
    lines.append("* = the configured masking.score_layer / masking.score_query; 0.5 = no separation, "
                 "> 0.5: objects are attended most")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import multimae_att  # noqa: F401  (torchvision guard before timm)
    from multimae_att.atomic import write_text_atomic
    from multimae_att.checkpoint import load_checkpoint
    from multimae_att.config import ConfigError
    from multimae_att.hub import CheckpointHashError, resolve_checkpoint

    args = _parse(argv)
    try:
        path = str(resolve_checkpoint(args.checkpoint))  # a path, a URL or a published name
        ckpt = load_checkpoint(path)
        cfg = _pretrain_config(ckpt, path, args.config, args.overrides)
        result = diagnose(cfg, path, args.data, args.split, args.background_classes,
                          args.batch_size, args.max_images, args.seed, args.device, loaded=ckpt)
    except (ConfigError, FileNotFoundError, ValueError, CheckpointHashError) as e:
        sys.exit(f"diagnose: {e}")
    print(format_table(result))
    # next to a local checkpoint; a downloaded one lives in the torch hub cache: write here instead
    local = Path(args.checkpoint).is_file()
    out = Path(args.out) if args.out else (Path(args.checkpoint).parent if local else Path(".")) / \
        f"diagnose-{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
