"""Published checkpoints by name, and their verified download into the torch hub cache.

Wherever a checkpoint is accepted (pretraining and finetuning ``init.checkpoint``,
``data_prep/export_attention_maps.py --checkpoint``) the value goes through
:func:`resolve_checkpoint`, which takes

* a **name** from :data:`PUBLISHED` (``multimae-b``, ``multimae-b-timm``, ``mae-b``,
  ``mae-b-timm``: the files of MultiMAE's release page). Names win over a local file of the same
  name; write ``./multimae-b`` for such a file;
* a **URL** (``http://``, ``https://``, ``file://``);
* a **path** to a local file.

URLs (and names, through their URL) are downloaded once with
``torch.hub.download_url_to_file`` into ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub``,
default ``~/.cache/torch/hub``), the same place and file name as
``torch.hub.load_state_dict_from_url``, with a progress bar. When the file name follows torch.hub's
convention ``<name>-<hex>.<ext>`` (at least 8 hex digits, the start of the file's sha256; all four
published files do), the download is checked against it and a mismatch is refused: nothing is left
in the cache. A cached file with such a name is checked too before its first use in a process (a
file put there by hand gets the same check). Other URLs are not verified and are cached under
``by-url/<sha256 of the URL>/`` (two URLs ending in ``final.pth`` never share a file); a
``file://`` URL without a hash in its name is the file itself, not a copy. Offline
(``HF_HUB_OFFLINE=1``, or no network) a cached file is used; a missing one is an error naming the
exact path to put it at. ``file://`` URLs need no network and work offline.

What the published files hold is stated in each entry as far as MultiMAE's public code and README
tell; nobody here could open the files (no network), so those statements are marked *unverified*.
``python -m multimae_att.checkpoint inspect NAME`` prints what a copy really holds.

Command line: ``python -m multimae_att.checkpoint list`` (the registry and what is cached),
``... download NAME|URL`` (fetch and verify now), ``... inspect NAME|URL|PATH`` (top-level
entries and weight groups of a file).

Based on timm's ``pretrained_cfg`` (weights metadata apart from the architecture) and torch.hub's
cache and hash conventions.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

import torch.hub

from multimae_att.run.provenance import file_sha256  # torch-free; re-exported

__all__ = ["PublishedCheckpoint", "PUBLISHED", "RELEASE_URL", "CheckpointUnavailableError",
           "CheckpointHashError", "resolve_checkpoint", "local_path", "cache_dir", "cached_path", "hash_prefix_of",
           "file_sha256", "is_offline", "main"]

RELEASE_URL = "https://github.com/EPFL-VILAB/MultiMAE/releases/download/pretrained-weights/"
URL_SCHEMES = ("http", "https", "file")
# torch.hub's check_hash convention, made strict: "-<hex>." right before the last extension, and
# at least 8 digits (torch's own regex accepts any "-<hex>." anywhere in the name).
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[^.]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of HF_HUB_OFFLINE


class CheckpointUnavailableError(FileNotFoundError):
    """The checkpoint is neither on disk nor downloadable now (offline, no network, no such file)."""


class CheckpointHashError(RuntimeError):
    """A file's sha256 does not start with the prefix its name (or the registry) promises."""


@dataclass(frozen=True)
class PublishedCheckpoint:
    """One published file: where it is, how to check it, what it is for.

    ``layout``: ``'multimae'`` (MultiViT names: ``global_tokens``, ``input_adapters.<m>.*``,
    ``encoder.<i>.*``, ``output_adapters.<m>.*``) or ``'timm'`` (``cls_token``, ``pos_embed``,
    ``patch_embed.*``, ``blocks.<i>.*``). ``in_modalities`` / ``decoders``: the input adapters
    and pretraining decoders (output adapters) the file is expected to hold; ``holds`` says how
    sure that is; ``continuation`` what continual pretraining from it needs.
    """

    name: str
    file_name: str
    title: str
    layout: str
    size: str                      # multimae_att.model.ENCODER_SIZES key
    patch_size: int
    image_size: int
    in_modalities: tuple[str, ...]
    decoders: tuple[str, ...]
    holds: str
    continuation: str
    semseg_num_classes: int | None = None
    base_url: str = RELEASE_URL

    @property
    def url(self) -> str:
        return self.base_url + self.file_name

    @property
    def hash_prefix(self) -> str:
        prefix = hash_prefix_of(self.file_name)
        assert prefix is not None, self.file_name  # every published name carries one
        return prefix


_MULTIMAE_FILE = "multimae-b_98_rgb+-depth-semseg_1600e_multivit-afff3f8c.pth"
PUBLISHED: dict[str, PublishedCheckpoint] = {c.name: c for c in (
    PublishedCheckpoint(
        name="multimae-b", file_name=_MULTIMAE_FILE,
        title="MultiMAE-B: ViT-B/16 pretrained 1600 epochs on ImageNet-1K RGB + pseudo-label depth "
              "+ semseg (98 visible tokens), MultiViT layout with decoders",
        layout="multimae", size="base", patch_size=16, image_size=224,
        in_modalities=("rgb", "depth", "semseg"), decoders=("rgb", "depth", "semseg", "norm_rgb"),
        semseg_num_classes=133,
        holds="'model': 1 global token, input adapters rgb, depth, semseg (133 COCO-panoptic "
              "classes, 64-d class embedding), encoder blocks 0-11, decoders rgb, depth, semseg "
              "(256-d, 2 blocks, task queries). Known from MultiMAE's demo notebook, which builds "
              "exactly that model and reconstructs with its decoders after loading 'model' with "
              "strict=False. Unverified: the norm_rgb decoder (trained: the recipe sets "
              "extra_norm_pix_loss; the notebook does not build it, so strict=False would hide "
              "its presence or absence) and the other entries MultiMAE's save_model writes "
              "('optimizer', 'epoch', 'scaler', 'args').",
        continuation="configs/pretrain/multimae-b_continue_100e.yaml (model.size=base, rgb+depth"
                     "+semseg in and out, extra_norm_rgb=true) loads it strictly. If the norm_rgb "
                     "decoder is missing, the load stops naming the output_adapters.norm_rgb.* "
                     "keys: continue with model.extra_norm_rgb=false (no norm_rgb loss). Without "
                     "an 'optimizer' entry AdamW starts from zero moments."),
    PublishedCheckpoint(
        name="multimae-b-timm", file_name="multimae-b_98_rgb+-depth-semseg_1600e_timm-bafa5499.pth",
        title="MultiMAE-B encoder, RGB only, timm ViT layout",
        layout="timm", size="base", patch_size=16, image_size=224,
        in_modalities=("rgb",), decoders=(),
        holds="'model': cls_token, pos_embed [1, 197, 768] (zero first row), patch_embed.proj.*, "
              "blocks.0-11.*: the keys MultiMAE's tools/multimae2vit_converter.py writes (it keeps "
              "the RGB adapter and the encoder only). Unverified: that the release was made with "
              "that converter, and which other top-level entries it kept.",
        continuation="Not a starting point for continual pretraining: it lacks the depth / semseg "
                     "adapters and all decoders, which would have to start fresh, and pretraining "
                     "loads init.checkpoint strictly. Use multimae-b. For RGB finetuning, k-NN and "
                     "linear probes it should equal multimae-b (same encoder weights)."),
    PublishedCheckpoint(
        name="mae-b", file_name="mae-b_dec512d8b_1600e_multivit-c477195b.pth",
        title="MAE-B baseline: ViT-B/16 pretrained 1600 epochs on ImageNet-1K RGB with MAE's code "
              "(decoder 512-d, 8 blocks), MultiViT layout",
        layout="multimae", size="base", patch_size=16, image_size=224,
        in_modalities=("rgb",), decoders=(),
        holds="Expected 'model': global_tokens, input_adapters.rgb.{pos_emb, proj.*}, encoder.0-11.*"
              " (the keys MultiMAE's tools/vit2multimae_converter.py writes from a timm/MAE file; "
              "MAE's decoder, final norm and mask token have no MultiViT name). Unverified.",
        continuation="Not a starting point for continual pretraining as it stands: an RGB+D+S "
                     "continuation would start the depth / semseg adapters and every decoder fresh, "
                     "and pretraining loads init.checkpoint strictly. Finetune RGB tasks from it "
                     "(the MAE baseline of MultiMAE's tables)."),
    PublishedCheckpoint(
        name="mae-b-timm", file_name="mae-b_dec512d8b_1600e_timm-f74f3a8d.pth",
        title="MAE-B baseline encoder, timm ViT layout",
        layout="timm", size="base", patch_size=16, image_size=224,
        in_modalities=("rgb",), decoders=(),
        holds="Expected 'model': cls_token, pos_embed, patch_embed.proj.*, blocks.0-11.*, perhaps "
              "MAE's final norm.* (MultiMAE's encoder has none). Unverified, as is whether MAE's "
              "decoder_* / mask_token were kept; the timm -> MultiViT conversion on loading keeps "
              "only the patch embedding, positions, class token and blocks.",
        continuation="As mae-b."),
)}


# ----------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where downloads go (torch.hub's own choice)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _file_name(url: str) -> str:
    name = unquote(os.path.basename(urlparse(url).path))
    if not name:
        raise ValueError(f"{url!r} names no file (nothing after the last '/')")
    return name


def cached_path(name_or_url: str) -> Path:
    """Where a published name or URL lives in the cache (whether or not it is there): the file
    name, as torch.hub keeps it, when it carries a hash; else under ``by-url/<sha256(url)[:16]>/``
    so that two URLs ending in the same name (``.../final.pth``) never share a cached file."""
    url = PUBLISHED[name_or_url].url if name_or_url in PUBLISHED else name_or_url
    name = _file_name(url)
    if hash_prefix_of(name) is not None:
        return cache_dir() / name
    return cache_dir() / "by-url" / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def hash_prefix_of(file_name: str) -> str | None:
    """The sha256 prefix a torch.hub-style file name ends with (``x-afff3f8c.pth`` -> ``afff3f8c``)."""
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match else None


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` set to 1/on/yes/true (the switch the tests and demos use)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE


# ----------------------------------------------------------------------------- resolving
def local_path(spec: str | os.PathLike) -> Path:
    """The local file ``spec`` stands for, without downloading or checking anything (it may not
    exist): a path as is, a published name or URL its place in the cache, a ``file://`` URL
    without a hash in its name the file itself. What :func:`resolve_checkpoint` returns once the
    file is there (run provenance identifies ``init.checkpoint`` by this file's hash)."""
    if isinstance(spec, os.PathLike):
        return Path(spec)
    spec = str(spec)
    parsed = urlparse(spec)
    if spec not in PUBLISHED and parsed.scheme == "file" and hash_prefix_of(_file_name(spec)) is None:
        return Path(url2pathname(parsed.path))
    if spec in PUBLISHED or parsed.scheme in URL_SCHEMES:
        return cached_path(spec)
    return Path(spec).expanduser()


def resolve_checkpoint(spec: str | os.PathLike, progress: bool = True) -> Path:
    """A published name, a URL or a path -> the local file to load (see the module docstring).

    Raises :class:`CheckpointUnavailableError` (a ``FileNotFoundError``) when the file is not on
    disk and cannot be downloaded now, and :class:`CheckpointHashError` when a download or a
    cached published file does not match its sha256 prefix.
    """
    if isinstance(spec, os.PathLike):
        return _local(Path(spec))
    spec = str(spec)
    if spec in PUBLISHED:
        entry = PUBLISHED[spec]
        return _fetch(entry.url, entry.hash_prefix, progress, label=f"published checkpoint {spec!r}")
    scheme = urlparse(spec).scheme
    if scheme in URL_SCHEMES:
        prefix = hash_prefix_of(_file_name(spec))
        if scheme == "file" and prefix is None:  # nothing to verify: the file itself, not a copy
            return _local(local_path(spec))
        return _fetch(spec, prefix, progress, label=spec)
    if "://" in spec:
        raise ValueError(f"checkpoint {spec!r}: unsupported URL scheme {scheme!r} "
                         f"(use {', '.join(s + '://' for s in URL_SCHEMES)}, a path or a published name)")
    return _local(Path(spec).expanduser())


def _local(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointUnavailableError(
            f"{path} does not exist or is not a file (published names: {', '.join(PUBLISHED)}; "
            f"URLs: {', '.join(s + '://' for s in URL_SCHEMES)})")
    return path


def _fetch(url: str, hash_prefix: str | None, progress: bool, label: str) -> Path:
    """The cached copy of ``url``, downloaded (and checked) first if it is missing."""
    dst = cached_path(url)
    if not dst.is_file():
        if is_offline() and urlparse(url).scheme != "file":
            raise CheckpointUnavailableError(
                f"{label} is not in the cache and downloads are off (HF_HUB_OFFLINE=1). Download "
                f"{url} elsewhere and put it at {dst} (or unset HF_HUB_OFFLINE).")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with _download_lock(dst):  # one download when several processes start together
            if not dst.is_file():
                _download(url, dst, hash_prefix, progress, label)
        return dst
    if hash_prefix is not None:
        _check_cached(dst, hash_prefix, label)
    return dst


def _download(url: str, dst: Path, hash_prefix: str | None, progress: bool, label: str) -> None:
    print(f"downloading {label}: {url} -> {dst}", file=sys.stderr)
    try:
        # writes <dst>.<uuid>.partial, checks the hash, then moves it to dst; the partial file
        # is removed on any failure, so a refused download leaves nothing in the cache
        torch.hub.download_url_to_file(url, os.fspath(dst), hash_prefix=hash_prefix, progress=progress)
    except RuntimeError as err:
        if "invalid hash value" not in str(err):
            raise
        raise CheckpointHashError(
            f"refused {label}: the downloaded file's sha256 does not start with {hash_prefix} "
            f"(the prefix its name {dst.name!r} promises): {err}. Nothing was kept in {dst.parent}; "
            "the file is not the published one (or the download was altered).") from None
    except (URLError, OSError) as err:
        raise CheckpointUnavailableError(
            f"could not download {label} from {url} ({getattr(err, 'reason', err)}). Download it "
            f"elsewhere and put it at {dst}.") from None


def _check_cached(path: Path, hash_prefix: str, label: str) -> None:
    """Hash a cached file (once per process, again if it changes: :func:`file_sha256`): a file
    put there by hand gets the check a download gets."""
    digest = file_sha256(path)
    if not digest.startswith(hash_prefix):
        raise CheckpointHashError(
            f"{label}: the cached file {path} has sha256 {digest}, not the published prefix "
            f"{hash_prefix}. Delete it (it is not the published file) and resolve the name again, "
            "or put the right file there.")


@contextlib.contextmanager
def _download_lock(dst: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``<cache>/.locks/<file>.lock`` (POSIX; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent downloads still end in one complete file
        yield
        return
    lock_dir = dst.parent / ".locks"
    lock_dir.mkdir(exist_ok=True)
    with open(lock_dir / (dst.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- command line
def _describe(entry: PublishedCheckpoint) -> str:
    path = cached_path(entry.name)
    if path.is_file():
        cached = f"{path} ({path.stat().st_size / 2**20:.0f} MiB)"
    else:
        cached = (f"no (download: python -m multimae_att.checkpoint download {entry.name}; "
                  f"offline: put the file at {path})")
    decoders = ", ".join(entry.decoders) or "none"
    classes = f", semseg {entry.semseg_num_classes} classes" if entry.semseg_num_classes else ""
    return "\n".join([
        f"{entry.name}: {entry.title}",
        f"  file:        {entry.file_name}  (sha256 {entry.hash_prefix}...)",
        f"  url:         {entry.url}",
        (f"  model:       size={entry.size}, patch {entry.patch_size}, {entry.image_size} px, "
         f"layout {entry.layout}, inputs {', '.join(entry.in_modalities)}{classes}; decoders {decoders}"),
        f"  holds:       {entry.holds}",
        f"  continuing:  {entry.continuation}",
        f"  cached:      {cached}"])


def _inspect(spec: str) -> str:
    from multimae_att.checkpoint import detect_layout, load_checkpoint, model_state

    path = resolve_checkpoint(spec)
    obj = load_checkpoint(path)
    lines = [f"{path} (sha256 {file_sha256(path)})"]
    if isinstance(obj, dict):
        lines.append("top-level entries: " + ", ".join(f"{k} ({type(v).__name__})" for k, v in obj.items()))
    state = model_state(obj, source=os.fspath(path))
    groups: dict[str, list[int]] = {}
    for key, value in state.items():
        parts = key.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("input_adapters", "output_adapters") else parts[0]
        count = groups.setdefault(group, [0, 0])
        count[0] += 1
        count[1] += value.numel()
    lines.append(f"weights ({detect_layout(state)} layout, {len(state)} tensors):")
    lines += [f"  {g:32s} {n:4d} tensors {p / 1e6:9.2f} M values" for g, (n, p) in sorted(groups.items())]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimae_att.checkpoint",
                                     description="Published checkpoints: list, download, inspect.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the registry and what is cached")
    get = sub.add_parser("download", help="download and verify a published name or URL into the cache")
    get.add_argument("spec", help=f"one of {', '.join(PUBLISHED)}, or a URL")
    show = sub.add_parser("inspect", help="top-level entries and weight groups of a checkpoint")
    show.add_argument("spec", help="a published name, a URL or a path")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            offline = " (offline: HF_HUB_OFFLINE=1, downloads are off)" if is_offline() else ""
            print(f"Published checkpoints; cache: {cache_dir()}{offline}\n")
            print("\n\n".join(_describe(e) for e in PUBLISHED.values()))
        elif args.command == "download":
            print(resolve_checkpoint(args.spec))
        else:
            print(_inspect(args.spec))
    except (CheckpointUnavailableError, CheckpointHashError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
