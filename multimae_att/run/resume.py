"""The resume policy: which differences between a saved run's config and the resuming run's
config block the resume (torch-free).

Each runner's schema declares its own harmless keys (``RESUME_FREE_KEYS`` in
:mod:`multimae_att.pretrain.config` and :mod:`multimae_att.finetune.config`); this module compares
two config dicts under such a declaration. Keys nobody classified block, so a new key errs on the
safe side.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["flatten_config", "resume_config_changes"]


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def flatten_config(d: Mapping[str, Any], whole: Sequence[str] = (), prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': 1}}`` -> ``{'a.b': 1}``; mapping values whose dotted key matches a glob in
    ``whole`` stay one value (e.g. a free-form params dict compares as a whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and not _matches(key, whole):
            out.update(flatten_config(v, whole, f"{key}."))
        else:
            out[key] = v
    return out


def resume_config_changes(saved: Mapping[str, Any], now: Mapping[str, Any], harmless: Sequence[str],
                          blocking: Sequence[str] = (), quiet_missing: Sequence[str] = (),
                          whole: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """Compare a saved run's config dict with the resuming run's (both from :func:`config_to_dict`).

    A differing key is harmless when it matches a glob of ``harmless`` and none of ``blocking``
    (``blocking`` carves exceptions out of ``harmless``); every other differing key blocks, so a
    key nobody classified errs on the safe side. A key on one side only (an older or newer
    schema) is a note, or nothing when it matches ``quiet_missing``. Returns ``(blocking, notes)``,
    sorted lines ``key: old -> new`` (``key: not in ...`` for one-sided keys).
    """
    old, new = flatten_config(saved, whole), flatten_config(now, whole)
    stop, notes = [], []
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new:
            if not _matches(key, quiet_missing):
                side = "the saved state" if key not in old else "this version's schema"
                notes.append(f"{key}: not in {side}")
        elif old[key] != new[key]:
            line = f"{key}: {old[key]!r} -> {new[key]!r}"
            free = _matches(key, harmless) and not _matches(key, blocking)
            (notes if free else stop).append(line)
    return stop, notes
