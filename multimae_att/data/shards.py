"""WebDataset tar shards: one sample = ``KEY.<modality>.<ext>`` members.

Format (written by ``data_prep/shard_writer.py``)::

    KEY.rgb.jpg | KEY.rgb.png     RGB image
    KEY.depth.png                 16-bit depth (decoded value / 2**16 in the batch)
    KEY.semseg.png                8- or 16-bit labels
    KEY.mask_valid.png            optional, 8-bit, >0 = valid (NYUv2)
    KEY.cls                       optional, image-level class index as decimal text
    KEY.json                      optional metadata (ignored by the loader)

Shard lists: a brace pattern (``/data/train-{000000..000099}.tar``), a ``.txt`` file with one
URL per line, a ``.json`` index (``{"shards": [...], "num_samples": N}``, names relative to it),
or a list; ``pipe:`` URLs (``pipe:aws s3 cp s3://bucket/x.tar -``) stream from object storage.
An index may also give each shard's sample count (``"shard_samples": [...]``, written by
``ShardSink``): a shard that breaks off (truncated, unreadable) then counts every sample it lost,
not the tar errors.

Distribution: shards are split by rank (explicit ``rank``/``world_size``, the same split as
``webdataset.split_by_node``) and by DataLoader worker (``webdataset.split_by_worker``). With
``resampled=True`` every (rank, worker) instead draws shards with replacement from its own seeded
stream and stops after a fixed number of samples (WebDataset's ``resampled=True`` +
``with_epoch(n)``), so every rank yields the same number of batches per epoch and DDP never hangs
at an epoch end. Without resampling, ranks see disjoint shards and may yield different counts
(fine for evaluation, not for DDP training).
"""
from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from multimae_att.data.decode import IMAGE_MODALITIES, CorruptSample, decode_modality
from multimae_att.data.sample import SkipCounter, build_sample, mark_valid, placeholder_sample
from multimae_att.data.transforms import AugmentConfig

__all__ = ["ShardDataset", "resolve_shards", "read_shard_index"]

_GIVE_UP_AFTER = 200  # consecutive failures before any success: the shard list is unreadable


def read_shard_index(path: Path) -> dict[str, Any]:
    """``{"shards": [absolute paths], "num_samples": int | None, "shard_samples": {url: count}}``
    from a ``<split>.json`` index (``shard_samples`` empty when the index has no per-shard counts)."""
    index = json.loads(Path(path).read_text())
    shards = [str(Path(path).parent / s) if not _is_remote(s) else s for s in index["shards"]]
    counts = index.get("shard_samples") or []
    return {"shards": shards, "num_samples": index.get("num_samples"),
            "shard_samples": dict(zip(shards, counts)) if len(counts) == len(shards) else {}}


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def resolve_shards(shards: str | Sequence[str]) -> tuple[list[str], int | None]:
    """Expand a shard spec to a URL list (and the sample count when an index says it).

    Local files must exist (checked here, so a typo fails at start-up, not in a worker).
    """
    num_samples = None
    if isinstance(shards, (list, tuple)):
        urls = [str(s) for s in shards]
    elif str(shards).endswith(".json") and not _is_remote(str(shards)):
        index = read_shard_index(Path(shards))
        urls, num_samples = index["shards"], index["num_samples"]
    elif str(shards).endswith(".txt") and not _is_remote(str(shards)):
        lines = Path(shards).read_text().splitlines()
        urls = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    else:
        urls = expand_urls(str(shards))
    if not urls:
        raise ValueError(f"shard spec {shards!r} names no shards")
    missing = [u for u in urls if not _is_remote(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards do not exist, e.g. {missing[:3]}")
    return urls, num_samples


class ShardDataset(IterableDataset):
    """Iterable dataset over WebDataset shards yielding sample dicts (see docs/INTERFACES.md).

    ``samples_per_epoch``: per-rank sample quota with ``resampled`` (required), spread over the
    workers in whole batches of ``batch_size`` so that no worker emits a partial batch; without
    resampling only the reported length (the shards are read to their end).
    ``shuffle_buffer``: samples held for shuffling (0 = keep shard order; evaluation).
    Corrupt or incomplete samples are counted in ``skipped``, and so is every sample of a shard
    lost after it breaks off, when ``shard_samples`` (url -> sample count) says how many it
    holds (else the break counts once, a lower bound). ``on_corrupt="mark"`` (evaluation):
    nothing is left out silently; each corrupt sample (and each lost one) yields a
    :func:`~multimae_att.data.sample.placeholder_sample` (``valid`` False, ``skip_reason``).
    """

    def __init__(self, urls: Sequence[str], modalities: Sequence[str], augment: AugmentConfig,
                 *, batch_size: int = 1, shuffle_buffer: int = 0, resampled: bool = False,
                 samples_per_epoch: int | None = None, shuffle_shards: bool = False, seed: int = 0,
                 rank: int = 0, world_size: int = 1, skipped: SkipCounter | None = None,
                 shard_samples: dict[str, int] | None = None, on_corrupt: str = "skip") -> None:
        super().__init__()
        if on_corrupt not in ("skip", "mark"):
            raise ValueError(f"on_corrupt must be 'skip' or 'mark', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.modalities = list(modalities)
        self.shard_samples = dict(shard_samples or {})
        unknown = set(modalities) - set(IMAGE_MODALITIES) - {"cls"}
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; "
                             f"expected a subset of {IMAGE_MODALITIES + ('cls',)}")
        if resampled and not samples_per_epoch:
            raise ValueError("resampled shards need samples_per_epoch (the stream is endless)")
        self.urls = list(urls)
        self.image_modalities = [m for m in modalities if m != "cls"]
        self.with_cls = "cls" in modalities
        self.augment = augment
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.resampled, self.shuffle_shards = resampled, shuffle_shards
        self.samples_per_epoch = samples_per_epoch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.skipped = skipped if skipped is not None else SkipCounter()
        self.epoch = 0
        self.start_batch = 0
        self.keys_file: Path | None = None  # optional list of all keys (``<split>.keys.txt``)

    def sample_ids(self) -> list[str] | None:
        """All keys of the shard set when a keys file is known, else None (streams are not listed)."""
        return self.keys_file.read_text().split() if self.keys_file is not None else None

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (it seeds shard order, shuffling and augmentation); ``start_batch`` > 0
        resumes mid-epoch by dropping, undecoded, the samples of the batches already consumed."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Per-rank samples per epoch: exact (whole batches) with resampling, else the index's
        count for this rank (an upper bound when shards are uneven over ranks/workers)."""
        if not self.samples_per_epoch:
            raise TypeError("length unknown: pass samples_per_epoch (or a .json shard index)")
        if self.resampled:
            return self.samples_per_epoch // self.batch_size * self.batch_size
        return self.samples_per_epoch

    def _stream_seed(self, worker: int) -> int:
        return zlib.crc32(f"{self.seed}/{self.epoch}/{self.rank}/{worker}".encode())

    def _shard_stream(self, worker: int, num_workers: int) -> Iterator[dict[str, str]]:
        if self.resampled:
            rng = random.Random(self._stream_seed(worker))
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle_shards:  # same order on every rank, then split: ranks stay disjoint
            random.Random(zlib.crc32(f"{self.seed}/{self.epoch}".encode())).shuffle(urls)
        if self.shuffle_shards and self.world_size > 1 and len(urls) < self.world_size:
            raise ValueError(f"{len(urls)} shards cannot be split over {self.world_size} ranks; "
                             "use resampled=True or write smaller shards")
        mine = urls[self.rank::self.world_size]
        yield from ({"url": u} for u in mine[worker::num_workers])

    def _quota(self, worker: int, num_workers: int) -> int | None:
        """This worker's sample count with resampling: whole batches, spread as evenly as possible.
        Without resampling (None) every assigned shard is read to its end (full evaluation sets)."""
        if not self.resampled:
            return None
        batches = self.samples_per_epoch // self.batch_size
        return (batches // num_workers + (worker < batches % num_workers)) * self.batch_size

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any]:
        key = raw.get("__key__", "?")
        where = f"{raw.get('__url__', '?')}:{key}"
        images, files = {}, {"cls": f"{where}.cls"}
        for modality in self.image_modalities:
            member = next((k for k in raw if k.split(".")[0] == modality and not k.startswith("__")), None)
            if member is None:
                members = sorted(k for k in raw if not k.startswith("__"))
                raise CorruptSample(f"{where}: no {modality} member (has {members})")
            files[modality] = f"{where}.{member}"
            images[modality] = decode_modality(modality, raw[member], files[modality])
        cls = None
        if self.with_cls:
            try:
                cls = int(raw["cls"].decode().strip())
            except (KeyError, ValueError, AttributeError) as exc:
                raise CorruptSample(f"{where}: missing or invalid cls member ({exc!r})") from exc
        return build_sample(images, cls, key, self.augment, self.epoch, files)

    def _read(self, shards: Iterator[dict[str, str]], on_break) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard after the other. A shard that breaks off (a tar error, or
        fewer samples than ``shard_samples`` says: a tar cut at a member boundary reads as a
        shorter archive) calls ``on_break(url, samples_read, reason)`` once, after its readable
        samples."""
        for shard in shards:
            errors: list[Exception] = []
            read = 0
            def keep_going(exc: Exception, errors: list[Exception] = errors) -> bool:
                errors.append(exc)
                return True  # go on with the next member (after a break: the next shard)

            for raw in wds.tarfile_to_samples(handler=keep_going)(iter([shard])):
                read += 1
                yield raw
            expected = self.shard_samples.get(shard["url"])
            if errors:
                exc = errors[0]
                yield from on_break(shard["url"], read, f"{type(exc).__name__}: "
                                    f"{(str(exc).splitlines() or [''])[0]}")
            elif expected is not None and read < expected:
                yield from on_break(shard["url"], read, "the archive ends early")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = self._quota(worker, num_workers)
        # DataLoader takes batch i from worker i % num_workers: count this worker's consumed batches.
        done = self.start_batch // num_workers + (worker < self.start_batch % num_workers)
        to_drop = done * self.batch_size
        if quota is not None:
            quota = max(quota - to_drop, 0)
        produced = failures = 0

        def give_up() -> RuntimeError:
            shown = f"{self.urls[:3]}{'...' if len(self.urls) > 3 else ''}"
            return RuntimeError(f"no readable sample in shards {shown} (rank {self.rank}, worker {worker}, "
                                f"{failures} failures; first errors are in the log)")

        def on_break(url: str, read: int, why: str) -> Iterator[dict[str, Any]]:
            """Count (training) or mark (evaluation) the samples a broken shard lost."""
            nonlocal failures
            expected = self.shard_samples.get(url)
            lost = max(expected - read, 0) if expected is not None else None
            reason = (f"{url}: unreadable after {read} samples ({why}); "
                      + (f"{lost} of its {expected} samples lost" if lost is not None
                         else "samples lost: unknown, the shard index has no shard_samples counts"))
            failures += 1
            if self.on_corrupt == "mark":   # evaluation reports every lost sample instead
                for i in range(lost if lost is not None else 1):
                    yield {"__placeholder__": (f"{url}#{read + i}", reason)}
            else:
                self.skipped.add(reason, count=lost if lost is not None else 1)
                if produced == 0 and failures >= _GIVE_UP_AFTER:
                    raise give_up()

        raw = self._read(self._shard_stream(worker, num_workers), on_break)
        if self.shuffle_buffer > 0:
            rng = random.Random(self._stream_seed(worker))
            raw = wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)(raw)
        for item in raw:
            if to_drop > 0:
                to_drop -= 1
                continue
            if quota is not None and produced >= quota:
                return
            if "__placeholder__" in item:   # a sample lost with its shard (evaluation)
                self.skipped.add(item["__placeholder__"][1])
                yield placeholder_sample(self.modalities, self.augment, *item["__placeholder__"])
                continue
            try:
                sample = self._decode(item)
            except CorruptSample as exc:
                self.skipped.add(str(exc))
                failures += 1
                if self.on_corrupt == "mark":
                    yield placeholder_sample(self.modalities, self.augment, item.get("__key__", "?"), str(exc))
                    continue
                if produced == 0 and failures >= _GIVE_UP_AFTER:
                    raise give_up() from exc
                continue
            produced += 1
            yield mark_valid(sample) if self.on_corrupt == "mark" else sample
        if produced == 0 and failures > 0 and self.on_corrupt == "skip":
            raise give_up()
