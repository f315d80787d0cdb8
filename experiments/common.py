"""What every experiment shares: typed configs read from YAML with ``--set key=value`` overrides, paths relative
to the repository, the output-folder rule, the paper's named palettes, and how a script reports bad input.

Configs. Each experiment declares its settings as a dataclass; :func:`load_config` reads a YAML file, applies
the overrides (``--set k=8``, ``--set prompts.eval_count=100``, ``--set values=[humor,diversity]``: the value
is read as YAML, dots reach nested settings) and builds the dataclass, checking every key and type on the way:
an unknown key or a value of the wrong kind is a :class:`mapjax.errors.ConfigError` naming the key.

Paths. A ``Path`` setting that is relative is relative to the repository root, so a config works from any
working directory; settings that are a path *or* a name (a policy that may be a hub id, a prompt source that
may be ``hh-rlhf``) go through :func:`path_or_name`.

Output folders. :func:`prepare_out` is the one rule: a folder holding files is refused unless ``--force``;
an experiment that can resume (``resumable=True``) instead continues in a folder whose ``config.json`` records
the same config. ``--force`` writes only into a folder a mapjax run made (its ``.mapjax-run.json`` marker), and
no output folder is the working folder, one of its parents, or holds or sits inside a file the config reads
(:mod:`mapjax.outputs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from mapjax.errors import ConfigError, MapjaxError, OutputExistsError, OutputNotOursError
from mapjax.jsonio import jsonable, write_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The authors' OPT-1.3B pilot set, shipped with the repository: the default pool of every pool experiment.
PILOT = ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
PILOT_PALETTES = CONFIGS / "opt_pilot_palettes.yaml"

Config = TypeVar("Config")


# ============================================================================ paths


def repository_path(value: str | Path) -> Path:
    """``value`` as a path; a relative one is taken from the repository root."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else ROOT / path


def path_or_name(text: str) -> str:
    """A setting that is a file path or a name (a hub id, ``hh-rlhf``): a relative path that exists under the
    repository root becomes that path; anything else is returned as it is."""
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    return str(ROOT / path) if (ROOT / path).exists() else text


# ============================================================================ configs


def load_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The YAML mapping at ``path`` with ``key.sub=value`` overrides applied (not yet checked)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config {path} is not valid YAML: {error}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} is not a mapping of settings")
    for override in overrides:
        apply_override(data, override)
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in ``data`` (nested mappings created as needed); the value is read as YAML, so
    ``k=8``, ``values=[diversity,perplexity]`` and ``prompts.data_files=null`` do what they say."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: write it as key=value (dots for nested keys)")
    key, text = override.split("=", 1)
    parts = [part for part in key.strip().split(".") if part]
    if not parts:
        raise ConfigError(f"--set {override!r} names no key")
    node = data
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {override!r}: the value is not valid YAML ({error})") from None


def build_config(cls: type[Config], data: Mapping[str, Any], key: str = "") -> Config:
    """The dataclass ``cls`` from a mapping: every key known, every value of its field's type (nested
    dataclasses, lists, dicts, optionals, unions and literals included), missing keys at their defaults."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{key or 'the config'}: expected a mapping of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    for name in data:
        if name not in fields:
            raise ConfigError(f"{_join(key, str(name))}: unknown setting; {key or 'the config'} takes "
                              f"{', '.join(fields)}")
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], _join(key, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(key, name)} is missing: the config must set it")
    return cls(**values)


def load_config(cls: type[Config], path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """The typed config ``cls`` from the YAML file at ``path`` with ``--set`` overrides."""
    return build_config(cls, load_yaml(path, overrides))


def config_record(config: Any) -> dict[str, Any]:
    """A config as plain JSON data (what ``config.json`` in an output folder holds)."""
    return jsonable(config)


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _convert(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against (and, for numbers and paths, converted to) ``annotation``."""
    if annotation is Any:
        return value
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        for option in arguments:
            if option is not type(None):
                try:
                    return _convert(value, option, key)
                except ConfigError:
                    continue
        raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
    if origin is Literal:
        if value in arguments:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, arguments))}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
        item = arguments[0] if arguments else Any
        return [_convert(entry, item, f"{key}[{index}]") for index, entry in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")
        item = arguments[1] if arguments else Any
        return {str(name): _convert(entry, item, f"{key}.{name}") for name, entry in value.items()}
    if dataclasses.is_dataclass(annotation):
        return build_config(annotation, value, key)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        number = _finite_number(value)
        if number is not None:
            return number
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is Path:
        if isinstance(value, (str, Path)) and str(value):
            return repository_path(value)
    else:
        raise TypeError(f"{key}: the config class uses a type the loader does not know: {annotation!r}")
    raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")


def _finite_number(value: Any) -> float | None:
    """A finite float from a number, or from text YAML leaves as text (PyYAML reads ``1e-5`` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _describe(annotation: Any) -> str:
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if option is type(None) else _describe(option) for option in arguments)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, arguments))
    if origin in (list, tuple):
        return f"a list of {_describe(arguments[0]) if arguments else 'values'}"
    if origin in (dict, Mapping):
        return f"a mapping to {_describe(arguments[1]) if arguments else 'values'}"
    if dataclasses.is_dataclass(annotation):
        return f"a mapping of {annotation.__name__} settings"
    names = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text", Path: "a path"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


# ============================================================================ command lines


def add_config_arguments(parser: argparse.ArgumentParser, default: Path | None) -> None:
    """``--config PATH`` (default: ``default``; None: the experiment picks one) and repeatable ``--set KEY=VALUE``."""
    parser.add_argument("--config", type=Path, default=default,
                        help="YAML config (default: " + (f"configs/{default.name})" if default else "the table's own)"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config setting, e.g. --set seed=1 --set region.points=20 (repeatable; the "
                        "value is read as YAML, dots reach nested settings)")


def add_output_arguments(parser: argparse.ArgumentParser, *, resumable: bool = False) -> None:
    """``--out FOLDER`` and ``--force``, worded for the experiment's kind of folder."""
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder (created; " + ("a rerun of the same config resumes in it, another "
                                                           "config is refused" if resumable else
                                                           "refused if not empty") + " unless --force)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing its files")


def reports_errors(main: Callable[..., int]) -> Callable[..., int]:
    """An experiment's ``main``: bad input (a :class:`mapjax.errors.MapjaxError`) prints one line on stderr
    and returns 2, as the ``mapjax`` command does; anything else is a bug and keeps its traceback."""

    @functools.wraps(main)
    def guarded(argv: Sequence[str] | None = None) -> int:
        try:
            return main(argv)
        except MapjaxError as error:
            print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2

    return guarded


# ============================================================================ output folders


def prepare_out(out: Path, *, force: bool, config: Any = None, resumable: bool = False) -> bool:
    """Create the output folder ``out`` and record ``config`` in its ``config.json``; returns whether the run
    resumes one already there.

    A folder holding files is refused (:class:`mapjax.errors.OutputExistsError`) unless ``force``; when
    ``resumable`` and its ``config.json`` records this very config, the run resumes there instead.
    """
    from mapjax.outputs import check_not_input, check_not_working_folder, is_mapjax_folder, write_run_marker

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} is a file; give a folder")
    check_not_working_folder(out)
    check_not_input(out, config_paths(config) if config is not None else {})
    record = out / "config.json"
    resumed = False
    if out.exists() and any(out.iterdir()):
        if resumable and config is not None and record.is_file() and _recorded(record) == config_record(config):
            resumed = True
        elif not force:
            raise OutputExistsError(
                f"--out {out} is not empty" + (" and holds no run of this config" if resumable else "")
                + "; pass --force to write into it (replacing its files), or choose another --out")
        elif not is_mapjax_folder(out):
            raise OutputNotOursError(f"--out {out} holds files mapjax did not write; --force writes only into a "
                                     "folder a mapjax run made (marked by .mapjax-run.json): choose a new or "
                                     "empty --out")
    write_run_marker(out, "experiment")
    if config is not None:
        write_json(record, config_record(config), indent=1)
    return resumed


def config_paths(config: Any, key: str = "") -> dict[str, Path]:
    """Every ``Path`` a config (a dataclass, possibly nested) holds, by its dotted key: the files and folders an
    experiment reads, which its output may not be, hold, or sit inside."""
    found: dict[str, Path] = {}
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        for field in dataclasses.fields(config):
            found.update(config_paths(getattr(config, field.name), _join(key, field.name)))
    elif isinstance(config, Path):
        found[key] = config
    elif isinstance(config, (list, tuple)):
        for index, item in enumerate(config):
            found.update(config_paths(item, f"{key}[{index}]"))
    elif isinstance(config, Mapping):
        for name, item in config.items():
            found.update(config_paths(item, _join(key, str(name))))
    return found


def _recorded(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


# ============================================================================ the paper's palettes


@dataclasses.dataclass
class PaletteSet:
    """The paper's named palettes (``configs/opt_pilot_palettes.yaml``): multi-value palettes, each with the
    maintained values added, and single-value palettes as they are."""

    values: list[str]
    palettes: dict[str, dict[str, float]]
    pool: Path = PILOT
    maintained: dict[str, float] = dataclasses.field(default_factory=dict)
    single: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    def named(self) -> dict[str, dict[str, float]]:
        """Every palette by name: levels plus the maintained values, then the single-value ones."""
        every = {name: {**levels, **self.maintained} for name, levels in self.palettes.items()}
        every.update(self.single)
        return every

    def pick(self, names: Sequence[str]) -> dict[str, dict[str, float]]:
        """The named palettes, or a ConfigError naming the missing one and those there are."""
        every = self.named()
        missing = [name for name in names if name not in every]
        if missing:
            raise ConfigError(f"palette {missing[0]!r} is not among the named palettes ({', '.join(every)})")
        return {name: every[name] for name in names}


def palette_set(path: str | Path = PILOT_PALETTES) -> PaletteSet:
    return load_config(PaletteSet, path)
