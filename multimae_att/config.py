"""Typed configs: dataclass schemas, YAML files, dotted ``key=value`` overrides.

The dataclass schema is the single source of defaults. A YAML file overrides some of them, and
command-line ``key=value`` pairs override the YAML. Everything is checked before any work
starts: an unknown key is an error naming the key and the closest valid one, a value of the
wrong type names the key, the expected type and the value.

Usage::

    @dataclass
    class Optim:
        lr: float = setting(1e-4, gt=0)                       # checked: > 0
        betas: tuple[float, float] = setting((0.9, 0.95), ge=0, lt=1)   # each item in [0, 1)

    @dataclass
    class Config:
        output_dir: str = "runs/x"
        optim: Optim = field(default_factory=Optim)

        def __post_init__(self):                     # cross-field checks: raise ValueError
            if self.optim.lr > 1:
                raise ValueError("optim.lr must be <= 1 for this model")

    cfg = load_config(Config, "configs/x.yaml", ["optim.lr=3e-4", "optim.betas=[0.9,0.99]"])
    save_config(cfg, "runs/x/config.yaml")           # resolved config, reloadable
    d = config_to_dict(cfg)                          # plain dict, e.g. for checkpoints
    cfg2 = config_from_dict(Config, d)               # strict inverse

YAML files may include others with a top-level ``base:`` (or ``defaults:``): a path relative to
the file, or a list of paths, merged in order; the including file wins. Mappings merge key by key, any
other value (lists included) is replaced whole.

Override values are parsed as YAML scalars/flow collections (``3``, ``1e-4``, ``true``,
``null``/``none``/empty, ``[1, 2]``, ``{rgb: 1.0}``), then converted to the field's annotated
type. Supported annotations: ``int``, ``float``, ``bool``, ``str``, ``Any``, ``Optional[X]``,
``Literal[...]`` (choices; a miss names the nearest choice), ``list[X]``, ``tuple[X, ...]``,
fixed ``tuple[X, Y]``, ``dict[str, X]``, and nested dataclasses. Overrides may reach inside a
``dict`` field (``loss.weights.rgb=0.5``); mapping-valued fields merge with their defaults.

Value constraints are declared next to each field with :func:`setting` (bounds such as ``gt=0``
or ``ge=0, le=1``, checked on every item of a list, tuple or dict; ``free=True`` says any value of
the type is valid), so the check and the field cannot drift apart; a value outside its bounds is
an error ``<key> must be ..., got <value>``. NaN is never a valid number. Cross-field
constraints live in each dataclass's ``__post_init__`` and raise ``ValueError`` naming the keys;
they surface as :class:`ConfigError`. :func:`config_help` lists every key with its type, default
and constraint (the runners' ``--help``).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import types
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

# The resume policy (which saved-vs-new config differences block a resume) is the run folder's;
# re-exported here for existing imports.
from multimae_att.run.resume import flatten_config, resume_config_changes

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "Check",
    "setting",
    "config_help",
    "describe_keys",
    "KeyDoc",
    "cli_args",
    "load_config",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "load_yaml",
    "parse_overrides",
    "apply_overrides",
    "config_keys",
    "cli_config",
    "add_config_args",
    "flatten_config",
    "resume_config_changes",
]


class ConfigError(ValueError):
    """A config file, override or value is invalid. The message names the key."""


# --------------------------------------------------------------------------- declared checks


@dataclass(frozen=True)
class Check:
    """The valid values of one field, declared with it (see :func:`setting`).

    Bounds apply to a number, or to every item of a list / tuple and every value of a dict;
    ``None`` (an ``Optional`` field left unset) is always valid. Bounded numbers must be finite.
    ``nonempty``: a list, tuple, dict or string may not be empty. ``free``: no constraint beyond
    the annotated type (declared, so a completeness test can tell "considered" from "forgotten").
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    nonempty: bool = False
    free: bool = False

    def bounds(self) -> str:
        """``'> 0'``, ``'>= 1'``, ``'in [0, 1)'``, ... (empty without bounds)."""
        lo = (f"[{_num(self.ge)}" if self.ge is not None
              else f"({_num(self.gt)}" if self.gt is not None else "")
        hi = (f"{_num(self.le)}]" if self.le is not None
              else f"{_num(self.lt)})" if self.lt is not None else "")
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""

    def describe(self) -> str:
        """The constraint in words for ``--help`` (empty when unconstrained)."""
        return ", ".join(t for t in (self.bounds(), "non-empty" if self.nonempty else "") if t)

    def validate(self, value: Any, key: str) -> None:
        """Raise :class:`ConfigError` naming ``key`` (or ``key[i]`` / ``key.name``) if ``value``
        breaks the constraint."""
        if value is None or self.free:
            return
        if self.nonempty and isinstance(value, (list, tuple, Mapping, str)) and not value:
            raise ConfigError(f"{key} must not be empty")
        if isinstance(value, Mapping):
            for k, v in value.items():
                self.validate(v, _join(key, str(k)))
            return
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                self.validate(v, f"{key}[{i}]")
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return
        if not self.bounds():
            return
        ok = (math.isfinite(value)
                             and (self.ge is None or value >= self.ge)
                             and (self.gt is None or value > self.gt)
                             and (self.le is None or value <= self.le)
                             and (self.lt is None or value < self.lt))
        if not ok:
            raise ConfigError(f"{key} must be {self.bounds()}, got {value!r}")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, nonempty: bool = False, free: bool = False) -> Any:
    """A dataclass field with its :class:`Check` (pass ``factory`` for list/dict defaults).

    ``batch_size: int = setting(256, ge=1)``; ``crop_scale: tuple[float, float] =
    setting((0.2, 1.0), gt=0, le=1)``; ``seed: int = setting(0, free=True)``.
    """
    check = Check(ge=ge, gt=gt, le=le, lt=lt, nonempty=nonempty, free=free)
    return dataclasses.field(default=default, default_factory=factory, metadata={"check": check})


def field_check(f: dataclasses.Field) -> Check | None:
    """The :class:`Check` declared with a field, or None."""
    return f.metadata.get("check")


# --------------------------------------------------------------------------- helpers


def _nearest(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    cands = list(candidates)
    match = difflib.get_close_matches(name, cands, n=1, cutoff=0.5)
    if not match:
        # Compare the last component too: 'optim.lrr' vs 'optim.lr'.
        tail = name.rsplit(".", 1)[-1]
        by_tail = {c.rsplit(".", 1)[-1]: c for c in cands}
        m2 = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)
        match = [by_tail[m2[0]]] if m2 else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_keys(schema_cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections and leaves (``['optim', 'optim.lr', ...]``)."""
    keys: list[str] = []
    hints = get_type_hints(schema_cls)
    for f in dataclasses.fields(schema_cls):
        if not f.init:
            continue
        full = _join(prefix, f.name)
        keys.append(full)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(config_keys(tp, full))
    return keys


# --------------------------------------------------------------------------- conversion


def _coerce(value: Any, tp: Any, key: str, root_keys: Sequence[str] = ()) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(tp, type) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' is a section; expected a mapping, got {value!r}")
        return config_from_dict(tp, value, prefix=key, _root_keys=root_keys)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key '{key}' may not be null (expected {_type_name(tp)})")
        errors = []
        options = [a for a in args if a is not type(None)]
        for arg in options:
            try:
                return _coerce(value, arg, key, root_keys)
            except ConfigError as e:
                errors.append(e)
        if len(options) == 1:  # Optional[X]: X's own message says what was expected
            raise errors[0]
        raise ConfigError(f"config key '{key}': {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        hint = _nearest(str(value), [str(a) for a in args])
        raise ConfigError(
            f"config key '{key}': {value!r} is not one of {list(args)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or math.isnan(number):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. data.root=2024 parsed as int by YAML
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(
                    f"config key '{key}' expects {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' expects a mapping, got {value!r}")
        k_tp, v_tp = args if args else (Any, Any)
        return {_coerce(k, k_tp, key): _coerce(v, v_tp, _join(key, str(k))) for k, v in value.items()}
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key '{key}' expects {tp.__name__}, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported annotation {tp!r} in the schema")


def config_from_dict(schema_cls: type[T], data: Mapping[str, Any], prefix: str = "",
                     _root_keys: Sequence[str] = ()) -> T:
    """Build ``schema_cls`` from a nested mapping, strictly (unknown keys and bad values raise)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix or '<root>'}' must be a mapping, got {data!r}")
    hints = get_type_hints(schema_cls)
    fields = {f.name: f for f in dataclasses.fields(schema_cls) if f.init}
    # Suggestions look across the whole schema: 'train.lr' may be meant as 'optim.lr'.
    top_keys = list(_root_keys) or config_keys(schema_cls)
    kwargs = {}
    for name, value in data.items():
        full = _join(prefix, str(name))
        if name not in fields:
            local = [_join(prefix, n) for n in fields]
            hint = _nearest(full, local) or _nearest(full, top_keys)
            raise ConfigError(f"unknown config key '{full}'{hint}")
        kwargs[name] = _coerce(value, hints[name], full, top_keys)
        check = field_check(fields[name])
        if check is not None:
            check.validate(kwargs[name], full)
    try:
        return schema_cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        # Cross-field messages name their keys ('optim.lr must ...'); others get the section.
        text = str(e)
        named = not prefix or f"{prefix}." in text
        raise ConfigError(text if named else f"{prefix}: {text}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that :func:`config_from_dict` turns back."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# --------------------------------------------------------------------------- YAML + overrides


def load_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config, resolving ``base:`` includes (relative to the including file)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    if p.resolve() in _seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, _seen + (p,)))}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse YAML file {p}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping at the top level")
    bases: Any = []
    for key in ("base", "defaults"):  # both spellings: a path or a list of paths
        value = data.pop(key, None) or []
        bases += [value] if isinstance(value, str) else list(value)
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, load_yaml(p.parent / b, _seen + (p.resolve(),)))
    return _deep_merge(merged, data)


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``['a.b=3', 'c=[1,2]']`` -> ``[('a.b', 3), ('c', [1, 2])]`` (values parsed as YAML)."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        if raw.strip().lower() in ("", "none", "null", "~"):
            value = None
        else:
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw  # e.g. a path with ':' -- keep the text, the type check decides
        out.append((key, value))
    return out


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted key in a copy of the nested dict (sections are created as needed)."""
    out = copy.deepcopy(dict(data))
    for key, value in overrides:
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"override '{key}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(schema_cls: type[T], path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                overrides: Iterable[str] = ()) -> T:
    """Schema defaults <- YAML file(s) <- ``key=value`` overrides; strict and typed.

    ``path``: one file or a list merged in order (a later file overrides an earlier one, key by key).
    """
    # Start from the defaults so that mappings merge key by key at every level
    # (``loss.weights.depth=2`` keeps the other modalities' default weights).
    data = config_to_dict(schema_cls())
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path or [])
    for p in paths:
        data = _deep_merge(data, load_yaml(p))
    data = apply_overrides(data, parse_overrides(overrides))
    return config_from_dict(schema_cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically), loadable again by :func:`load_config`."""
    from multimae_att.atomic import write_text_atomic

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- command line


def _field_comments(schema_cls: type) -> dict[str, str]:
    """Help text of the schema's fields: the comment lines right above a field and its trailing
    ``# comment``, joined; {} without source."""
    try:
        lines = inspect.getsource(schema_cls).splitlines()
    except (OSError, TypeError):
        return {}
    start = next((i + 1 for i, ln in enumerate(lines) if ln.lstrip().startswith("class ")), len(lines))
    body = next((ln for ln in lines[start:] if ln.strip()), "")
    indent = body[:len(body) - len(body.lstrip())]   # the class body's indentation
    comments: dict[str, str] = {}
    above: list[str] = []
    for line in lines[start:]:
        if not line.startswith(indent) or line[len(indent):len(indent) + 1].isspace():
            above = []   # a blank line, or a line inside a method
            continue
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.+))?$", text)
        if m and not text.startswith(("def ", "class ", "@")):
            parts = [*above, (m.group(2) or "").strip()]
            if any(parts):
                comments[m.group(1)] = " ".join(t for t in parts if t)
        above = []
    return comments


def _help_type(tp: Any) -> str:
    """``'tiny | base | large'``, ``'int | null'``, ``'list[str]'``: an annotation in words."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _help_type(a) for a in args)
    return _type_name(tp)


@dataclass(frozen=True)
class KeyDoc:
    """One key of a schema as the documentation shows it (:func:`describe_keys`).

    ``section``: True for a section (a nested dataclass; ``help`` = its docstring's first
    paragraph), False for a leaf key. ``annotation``: the field's type; ``check``: its declared
    :class:`Check` (None when it has none); ``default``: the default as plain data.
    """

    key: str
    section: bool
    help: str
    annotation: Any = None
    check: Check | None = None
    default: Any = None

    @property
    def default_yaml(self) -> str:
        """The default as one line of YAML (``[rgb, depth]``, ``null``, ``1.0e-08``)."""
        return yaml.safe_dump(self.default, default_flow_style=True, width=1 << 16).strip().removesuffix("\n...")


def describe_keys(schema_cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every key of a schema in declaration order, sections before their keys, with its type,
    check, default and help text (the field's comments; a section's docstring)."""
    docs: list[KeyDoc] = []
    hints = get_type_hints(schema_cls)
    comments = _field_comments(schema_cls)
    defaults = schema_cls()
    for f in dataclasses.fields(schema_cls):
        if not f.init:
            continue
        key, tp = _join(prefix, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = inspect.getdoc(tp) or ""
            intro = " ".join(doc.split("\n\n")[0].split()) if doc != inspect.getdoc(object) else ""
            docs.append(KeyDoc(key, True, comments.get(f.name) or intro))
            docs += describe_keys(tp, key)
            continue
        docs.append(KeyDoc(key, False, comments.get(f.name, ""), tp, field_check(f),
                           config_to_dict(getattr(defaults, f.name))))
    return docs


def config_help(schema_cls: type, prefix: str = "") -> list[str]:
    """One line per leaf key: ``key = default  (type; constraint) comment`` (the runners' --help)."""
    lines: list[str] = []
    for doc in describe_keys(schema_cls, prefix):
        if doc.section:
            continue
        kind = "; ".join(t for t in (_help_type(doc.annotation), doc.check.describe() if doc.check else "") if t)
        note = f"  {doc.help}" if doc.help else ""
        lines.append(f"{doc.key} = {doc.default_yaml}  ({kind}){note}")
    return lines


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config FILE`` (repeatable), ``--print-config`` and ``key=value`` overrides."""
    parser.add_argument("--config", "-c", action="append", metavar="FILE",
                        help="YAML config file; repeat it to merge several (later files override "
                             "earlier ones)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides anywhere on the line, e.g. optim.blr=1e-4 "
                             "masking.strategy=high; they override the config files")
    return parser


def cli_args(schema_cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
             parser: argparse.ArgumentParser | None = None) -> tuple[T, argparse.Namespace]:
    """Parse ``[--config FILE ...] [key=value ...]`` (in any order) into ``(config, args)``.

    ``parser``: a parser holding the runner's own options (the config options are added to it).
    An option may stand for overrides by appending them to ``config_overrides``, e.g.
    ``parser.add_argument('--overwrite', action='append_const', dest='config_overrides',
    const='init.overwrite=true')``; they apply before the ``key=value`` overrides of the line.
    ``--help`` lists every config key with its default (:func:`config_help`); ``--print-config``
    prints the resolved config and exits; a bad config exits with status 2 and
    ``config error: <key> ...``.
    """
    parser = parser or argparse.ArgumentParser(description=description)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "config keys (key = default  (type; valid values)):\n  " + "\n  ".join(
        config_help(schema_cls))
    add_config_args(parser)
    args = parser.parse_intermixed_args(argv)
    overrides = [*(getattr(args, "config_overrides", None) or []), *args.overrides]
    try:
        cfg = load_config(schema_cls, args.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"config error: {e}\n")
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        parser.exit(0)
    return cfg, args


def cli_config(schema_cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
               parser: argparse.ArgumentParser | None = None) -> T:
    """:func:`cli_args` without the parsed arguments: the config only."""
    return cli_args(schema_cls, argv, description, parser)[0]
