"""Params files: ``params/<profile>/<NN_name>.yaml`` checked against ``params/schema/<NN_name>.yaml``.

Every notebook's params are validated before anything runs. The schema is a
YAML mapping from key to a spec::

    epochs:      {type: int, min: 1, max: 10000, help: "training epochs"}
    lr:          {type: float, min: 0, max: 1}
    markers:     {type: list, items: str, choices: [gfap, iba1, neun, olig2, pecam]}
    cohort_dir:  {type: path, input: true, help: "tiles folder; hashed into the manifest"}
    diameter_px: {type: float, min: 1, nullable: true, default: null}

Types: ``int``, ``float`` (an int is accepted), ``str``, ``bool``, ``path`` (a
string, relative to the project root), ``list`` (``items`` gives the element
type; ``min_len``/``max_len`` its length), ``mapping`` (a free dict of scalars).
``min``/``max`` bound numbers (and each list item), ``choices`` lists the
allowed values. A key without ``default`` must be given by the profile. With
``input: true`` the file or folder the value names is hashed into the run
manifest, so ``run-all`` reruns the notebook when it changes.

Keys that several schemas share are declared once, in a block file
``params/schema/_<name>.yaml`` (same format; its name starts with ``_`` so it
is not a notebook), and taken in with a top-level ``include`` list::

    include: [_shared]          # the keys of params/schema/_shared.yaml
    markers: {type: list, items: str}

The included keys take the place of the ``include`` line, in their file's
order. A key declared twice (by a schema and a block it includes, or by two
blocks) is an error naming both files; an unknown block name is an error
naming the schema and the blocks there are. Blocks do not include others.

A profile folder may hold ``defaults.yaml``: values shared by several
notebooks; each notebook takes the keys its schema declares. A key in
``defaults.yaml`` that no schema declares is an error too (a typo there would
otherwise be ignored silently). Each profile has a file for every notebook of the chain
(``params/<profile>/<NN_name>.yaml``); a missing one is refused as missing, with the command that
copies it from another profile.

Every error names the file that holds the bad key: ``defaults.yaml``, the notebook's own file, or
the command line (``seglab run NN --set key=value``), see :func:`resolve_params`.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from seglab import SeglabError
from seglab.core import paths
from seglab.core.io import sha256_text

SPEC_KEYS = {"type", "help", "default", "min", "max", "choices", "items", "nullable",
             "input", "min_len", "max_len"}
TYPES = {"int", "float", "str", "bool", "path", "list", "mapping"}
_REQUIRED = object()


class ParamsError(SeglabError):
    """A params or schema file is wrong; the message names the file, the key and the fix."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML keeps the last one silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ParamsError(
                f"{getattr(loader, 'name', '?')}: key '{key}' is given twice "
                f"(lines {seen[key] + 1} and {key_node.start_mark.line + 1}); keep one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping from ``path`` (empty file -> {}), with file and line in every error (one line each)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:   # a file saved as Latin-1 / Windows-1252 by an editor
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ParamsError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#x} on line {line}); "
                          "save the file as UTF-8") from None
    except OSError as exc:   # a folder, no permission, an I/O error
        raise ParamsError(f"{path}: cannot be read ({exc.strerror or exc}); check the path") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML{_yaml_place(exc)}; fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of key: value, got {type(data).__name__}")
    return data


def _yaml_place(exc: yaml.YAMLError) -> str:
    """`` at line L, column C: problem (context)`` of a YAML error, on one line (PyYAML's own text
    spans several lines with a caret drawing, which the one-line error would cut apart)."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f" at {at(mark)}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, start = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and start is not None and start is not mark:   # e.g. the '[' left open lines above
        context += f" that starts at {at(start)}"
    return f"{where}: {problem}" + (f" ({context})" if context else "")


@dataclass(frozen=True)
class Spec:
    """One key of a schema."""

    key: str
    type: str
    help: str = ""
    default: Any = _REQUIRED
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None
    items: str | None = None
    nullable: bool = False
    input: bool = False
    min_len: int | None = None
    max_len: int | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def describe(self) -> str:
        parts = [self.items and f"list of {self.items}" or self.type]
        if self.min is not None or self.max is not None:
            parts.append(f"range [{'-inf' if self.min is None else self.min}, "
                         f"{'inf' if self.max is None else self.max}]")
        if self.choices:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        if self.nullable:
            parts.append("or null")
        return ", ".join(parts)


@dataclass(frozen=True)
class Schema:
    name: str
    source: Path
    specs: dict[str, Spec] = field(default_factory=dict)
    includes: tuple[Path, ...] = ()

    def input_keys(self) -> list[str]:
        return [k for k, s in self.specs.items() if s.input]


INCLUDE_KEY = "include"
# ``default: library`` in a spec: the default of the settings object field of that name
# (MaskSettings, TrainSettings), so that a default such as flow_threshold's is written once.
LIBRARY_DEFAULT = "library"


def library_default(key: str, source: Path):
    """The default of ``key`` as a field of :class:`MaskSettings` or :class:`TrainSettings`."""
    from seglab.config.settings import MaskSettings, TrainSettings

    for cls in (MaskSettings, TrainSettings):
        if key in cls.keys():
            return getattr(cls, key)
    raise ParamsError(f"{source}: key '{key}' has 'default: {LIBRARY_DEFAULT}' but is no field of MaskSettings "
                      f"({', '.join(MaskSettings.keys())}) or TrainSettings ({', '.join(TrainSettings.keys())}); "
                      "give its default here")


def schema_dir(root: Path | None = None) -> Path:
    return (root or paths.project_root()) / "params" / "schema"


def include_names(root: Path | None = None) -> list[str]:
    """Names a schema may list under ``include``: the ``_<name>.yaml`` block files of params/schema/."""
    return sorted(p.stem for p in schema_dir(root).glob("_*.yaml"))


def _spec(key, spec, source: Path) -> Spec:
    if not isinstance(spec, dict):
        raise ParamsError(f"{source}: key '{key}' needs a mapping like {{type: int}}")
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise ParamsError(f"{source}: key '{key}' has unknown spec field(s) {sorted(unknown)}; "
                          f"allowed: {sorted(SPEC_KEYS)}")
    if spec.get("type") not in TYPES:
        raise ParamsError(f"{source}: key '{key}' has type {spec.get('type')!r}; "
                          f"allowed: {sorted(TYPES)}")
    if "choices" in spec:
        spec = {**spec, "choices": tuple(spec["choices"])}
    if spec.get("default") == LIBRARY_DEFAULT:
        spec = {**spec, "default": library_default(key, source)}
    out = Spec(key=key, **spec)
    if not out.required:
        _check_value(out, out.default, source)
    return out


def _included(value, source: Path, root: Path) -> list[tuple[Path, dict]]:
    """The block files an ``include`` value names, each with its raw mapping."""
    allowed = include_names(root)
    listing = ", ".join(allowed) or f"none (no _<name>.yaml in {schema_dir(root)})"
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ParamsError(f"{source}: '{INCLUDE_KEY}' must be a list of block names, e.g. "
                          f"include: [_shared]; got {value!r}; blocks: {listing}")
    out = []
    for name in value:
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            raise ParamsError(f"{source}: include '{name}' is not a block"
                              + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f"; blocks (params/schema/_<name>.yaml): {listing}")
        if value.count(name) > 1:
            raise ParamsError(f"{source}: include '{name}' is listed twice; keep one")
        path = schema_dir(root) / f"{name}.yaml"
        raw = read_yaml(path)
        if INCLUDE_KEY in raw:
            raise ParamsError(f"{path}: a block cannot include others ('{INCLUDE_KEY}' is allowed in "
                              f"notebook schemas only); list every block in {source} instead")
        out.append((path, raw))
    return out


def load_schema(name: str, root: Path | None = None) -> Schema:
    """The schema of notebook ``name`` from ``params/schema/<name>.yaml``, its includes resolved."""
    root = root or paths.project_root()
    source = schema_dir(root) / f"{name}.yaml"
    if name.startswith("_"):
        raise ParamsError(f"{source}: '{name}' is a block for '{INCLUDE_KEY}', not a notebook's schema")
    if not source.is_file():
        known = sorted(p.stem for p in schema_dir(root).glob("*.yaml") if not p.stem.startswith("_"))
        raise ParamsError(f"{source}: file missing: notebook {name} has no schema (schemas: {', '.join(known)}); "
                          f"write one (the keys its notebook's parameters cell takes) or correct the name")
    raw = read_yaml(source)
    specs: dict[str, Spec] = {}
    declared_in: dict[str, Path] = {}
    includes: list[Path] = []

    def add(key, spec, file: Path) -> None:
        if key in declared_in:
            raise ParamsError(f"{source}: key '{key}' is declared twice, in {declared_in[key]} and in {file}; "
                              f"a schema must not repeat a key of a block it includes: keep one")
        specs[key] = _spec(key, spec, file)
        declared_in[key] = file

    for key, spec in raw.items():
        if key == INCLUDE_KEY:
            for path, block in _included(spec, source, root):
                includes.append(path)
                for k, s in block.items():
                    add(k, s, path)
        else:
            add(key, spec, source)
    return Schema(name=name, source=source, specs=specs, includes=tuple(includes))


def _fail(source, key, message, spec: Spec | None = None) -> None:
    hint = f" (expected {spec.describe()})" if spec else ""
    help_ = f"; {spec.help}" if spec and spec.help else ""
    raise ParamsError(f"{source}: key '{key}': {message}{hint}{help_}")


def _check_scalar(spec: Spec, type_: str, value, source, key) -> Any:
    if type_ == "bool":
        if not isinstance(value, bool):
            _fail(source, key, f"{value!r} is not true/false", spec)
        return value
    if type_ in ("int", "float"):
        ok = isinstance(value, int) if type_ == "int" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            _fail(source, key, f"{value!r} is not {'an integer' if type_ == 'int' else 'a number'}", spec)
        if isinstance(value, float) and not math.isfinite(value):
            _fail(source, key, f"{value!r} is not finite", spec)
        if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
            _fail(source, key, f"{value!r} is out of range", spec)
        return float(value) if type_ == "float" else value
    if type_ in ("str", "path"):
        if not isinstance(value, str) or not value:
            _fail(source, key, f"{value!r} is not a non-empty string", spec)
        return value
    if type_ == "mapping":
        if not isinstance(value, dict):
            _fail(source, key, f"{value!r} is not a mapping", spec)
        return value
    raise AssertionError(type_)


def _check_value(spec: Spec, value, source) -> Any:
    key = spec.key
    if value is None:
        if spec.nullable:
            return None
        _fail(source, key, "null is not allowed", spec)
    if spec.type == "list":
        if not isinstance(value, list):
            _fail(source, key, f"{value!r} is not a list", spec)
        if spec.min_len is not None and len(value) < spec.min_len:
            _fail(source, key, f"has {len(value)} items, fewer than {spec.min_len}", spec)
        if spec.max_len is not None and len(value) > spec.max_len:
            _fail(source, key, f"has {len(value)} items, more than {spec.max_len}", spec)
        out = [_check_scalar(spec, spec.items or "str", v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        if spec.choices:
            bad = [v for v in out if v not in spec.choices]
            if bad:
                _fail(source, key, f"{bad} not allowed", spec)
        return out
    out = _check_scalar(spec, spec.type, value, source, key)
    if spec.choices and out not in spec.choices:
        close = difflib.get_close_matches(str(out), [str(c) for c in spec.choices], n=1)
        _fail(source, key, f"{out!r} is not allowed" + (f" (did you mean {close[0]!r}?)" if close else ""), spec)
    return out


def validate(raw: dict, schema: Schema, source: str | Path, origin: dict | None = None) -> dict:
    """Check ``raw`` against ``schema``; return a new dict with defaults filled in.

    ``origin`` maps a key to the file (or "command-line override") its value came from; an
    error about that key names it, any other error names ``source`` (the notebook's own file).
    Raises ParamsError naming the file, the key and the allowed keys, type or range.
    """
    origin = origin or {}
    unknown = [k for k in raw if k not in schema.specs]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(schema.specs), n=1)
        raise ParamsError(
            f"{origin.get(key, source)}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "")
            + f"; allowed keys for {schema.name}: {', '.join(sorted(schema.specs))} "
            f"(schema: {schema.source})")
    out = {}
    for key, spec in schema.specs.items():
        if key in raw:
            out[key] = _check_value(spec, raw[key], origin.get(key, source))
        elif spec.required:
            raise ParamsError(f"{source}: key '{key}' is required ({spec.describe()})"
                              + (f"; {spec.help}" if spec.help else ""))
        else:
            out[key] = spec.default
    return out


def all_schemas(root: Path | None = None) -> dict[str, Schema]:
    root = root or paths.project_root()
    return {p.stem: load_schema(p.stem, root) for p in sorted(schema_dir(root).glob("*.yaml"))
            if not p.stem.startswith("_")}


OVERRIDE = "command-line override"   # where a value given with ``--set key=value`` came from


@dataclass(frozen=True)
class Resolved:
    """The validated params of one notebook in one profile, and where each value came from.

    params : key -> value (schema defaults filled in).
    sources : the params files read (defaults.yaml, then the notebook's own file).
    origin : key -> the file that set it, or :data:`OVERRIDE`; keys at their schema default are absent.
    own_file : ``params/<profile>/<name>.yaml``, where a key left at its default would be set.
    """

    params: dict
    sources: list[Path]
    origin: dict
    own_file: Path

    def where(self, key: str) -> str:
        """The file to name in an error about ``key``: the one that set it, else the notebook's own
        file (the key is not set there: the schema's default is used)."""
        if key in self.origin:
            return str(self.origin[key])
        return f"{self.own_file} (key '{key}' not set there: the schema default {self.params.get(key)!r} is used)"


def _profiles(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "params").iterdir() if p.is_dir() and p.name != "schema")


def _missing_file(own: Path, name: str, profile: str, schema: Schema, root: Path, given: set) -> ParamsError:
    """The error for a profile without ``<name>.yaml``: the file named as missing, with the required
    keys that defaults.yaml does not give (``given``) and the copy command (from the demo profile
    when it has the file, else from another profile)."""
    having = [p for p in _profiles(root) if p != profile and (root / "params" / p / f"{name}.yaml").is_file()]
    required = [k for k, s in schema.specs.items() if s.required and k not in given]
    need = f" (its required keys: {', '.join(required)})" if required else ""
    if having:
        src = "demo" if "demo" in having else having[0]
        fix = (f"copy it from another profile and edit it: `cp params/{src}/{name}.yaml params/{profile}/` "
               f"(profiles with it: {', '.join(having)})")
    else:
        fix = f"write it with the keys of {schema.source}"
    return ParamsError(f"{own}: file missing: profile '{profile}' has no params for notebook {name}{need}; {fix}")


def resolve_params(name: str, profile: str, overrides: dict | None = None,
                   root: Path | None = None) -> Resolved:
    """Resolved, validated params of notebook ``name`` in ``profile``, with each value's file.

    Precedence: schema defaults < ``params/<profile>/defaults.yaml`` (keys this
    schema declares) < ``params/<profile>/<name>.yaml`` < ``overrides``. Every
    error names the file that holds the bad key (see :class:`Resolved`); a
    profile without ``<name>.yaml`` is refused with the copy command.
    """
    root = root or paths.project_root()
    profile_dir = root / "params" / profile
    if not profile_dir.is_dir():
        raise ParamsError(f"profile '{profile}' not found: no folder {profile_dir}; profiles: "
                          f"{', '.join(_profiles(root))}")
    schema = load_schema(name, root)
    merged: dict = {}
    origin: dict = {}
    sources: list[Path] = []
    defaults_file = profile_dir / "defaults.yaml"
    if defaults_file.is_file():
        defaults = read_yaml(defaults_file)
        declared = set().union(*(s.specs for s in all_schemas(root).values()))
        stray = [k for k in defaults if k not in declared]
        if stray:
            close = difflib.get_close_matches(str(stray[0]), sorted(declared), n=1)
            raise ParamsError(f"{defaults_file}: unknown key '{stray[0]}'"
                              + (f" (did you mean '{close[0]}'?)" if close else "")
                              + f"; no notebook's schema declares it; declared keys: {', '.join(sorted(declared))}")
        mine = {k: v for k, v in defaults.items() if k in schema.specs}
        merged.update(mine)
        origin.update(dict.fromkeys(mine, defaults_file))
        sources.append(defaults_file)
    own = profile_dir / f"{name}.yaml"
    if not own.is_file():
        raise _missing_file(own, name, profile, schema, root, set(merged))
    given = read_yaml(own)
    merged.update(given)
    origin.update(dict.fromkeys(given, own))
    sources.append(own)
    params = validate(merged, schema, own, origin)
    if overrides:
        origin.update(dict.fromkeys(overrides, OVERRIDE))
        params = validate({**params, **overrides}, schema, OVERRIDE, origin)
    return Resolved(params=params, sources=sources, origin=origin, own_file=own)


def load_params(name: str, profile: str, overrides: dict | None = None,
                root: Path | None = None) -> tuple[dict, list[Path]]:
    """Resolved, validated params of notebook ``name`` in ``profile``: (params, the files read).
    See :func:`resolve_params` (which also says where each value came from)."""
    resolved = resolve_params(name, profile, overrides, root)
    return resolved.params, resolved.sources


def shared_params(profile: str, block: str = "_shared", root: Path | None = None) -> dict:
    """The validated values of an include block's keys in ``profile`` (block defaults <
    ``params/<profile>/defaults.yaml``): what every notebook including the block sees, for
    commands that run outside a notebook (``seglab predict`` takes its mask settings here)."""
    root = root or paths.project_root()
    path = schema_dir(root) / f"{block}.yaml"
    if block not in include_names(root):
        raise ParamsError(f"{path}: no such block; blocks: {', '.join(include_names(root))}")
    specs = {k: _spec(k, s, path) for k, s in read_yaml(path).items()}
    defaults_file = root / "params" / profile / "defaults.yaml"
    if not defaults_file.parent.is_dir():
        raise ParamsError(f"profile '{profile}' not found: no folder {defaults_file.parent}; profiles: "
                          f"{', '.join(_profiles(root))}")
    given = read_yaml(defaults_file) if defaults_file.is_file() else {}
    return validate({k: v for k, v in given.items() if k in specs}, Schema(block, path, specs), defaults_file)


def params_hash(params: dict) -> str:
    """sha256 of the params as canonical JSON (sorted keys): equal params, equal hash."""
    return sha256_text(json.dumps(params, sort_keys=True, default=str))


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as YAML (``epochs=3``, ``markers=[gfap]``)."""
    if "=" not in text:
        raise ParamsError(f"override {text!r}: expected key=value, e.g. epochs=3")
    key, _, value = text.partition("=")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: value is not valid YAML{_yaml_place(exc)}; quote it, e.g. "
                          f"--set '{key.strip()}=[1, 2]'") from None
