"""Palettes: the minimum expected level asked of each value, resolved against a pool to a target vector c.

A palette is written as a string, ``"humor>=q0.8, gpt2-helpful>=max(mean,q0.8), diversity>=mean"``, or as a
dict ``{"humor": "q0.8", "diversity": "mean", "coherence": 0.45}``. A level is one of

- a number: the raw level, in the reward's own units;
- ``q0.8`` (or ``q80%``, ``q80``): the 0.8-quantile of the value over the pool's samples. ``q0`` to ``q1`` are
  fractions; a percent is written with ``%``, or without it as a whole number from 10 to 100. Other numbers
  above 1 (``q1.5``, ``q2``) are ambiguous and refused;
- ``max(mean,q0.8)``: the larger of the mean and the quantile, as the paper's quantile palettes do;
- ``mean``, ``mean+0.1``, ``mean-0.1``: the pool mean, optionally shifted;
- ``mean+log(1+0.25)``: the classifier palettes' "make it 25% more likely" (for log-probability rewards).

Values the palette leaves out are unconstrained.

:func:`palette_targets` is the one road from a palette in any form (a spec, a dict, a Palette, a vector or
array of levels) to target vectors over a pool's values; every public entry point resolves palettes with it.
"""

from __future__ import annotations

import math
import numbers
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import numpy as np

from mapjax.errors import PaletteError
from mapjax.pool import RewardPool, real_array, scaled_moments, unique_names

# Every pattern below is linear-time: no quantified group holds another quantifier over the same characters
# (``\d+\.?\d*`` would be quadratic on a long run of digits that does not match: "1"*64000 + "x").
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_QUANTILE = re.compile(rf"^q\s*({_NUMBER})\s*(%?)$")
_MAX_MEAN_QUANTILE = re.compile(rf"^max\(\s*mean\s*,\s*q\s*({_NUMBER})\s*(%?)\s*\)$")
_MEAN_LOG = re.compile(rf"^mean\s*\+\s*log\(\s*1\s*\+\s*({_NUMBER})\s*\)$")
_MEAN_SHIFT = re.compile(rf"^mean\s*(?:([-+])\s*({_NUMBER}))?$")
_RAW = re.compile(rf"^{_NUMBER}$")
_PATTERNS = (_QUANTILE, _MAX_MEAN_QUANTILE, _MEAN_LOG, _MEAN_SHIFT, _RAW)
# Longest palette string and longest level read: a palette names a few dozen values at most, and a level is a
# number or a short formula. Anything longer is refused before it is parsed.
MAX_PALETTE_CHARS = 100_000
MAX_LEVEL_CHARS = 200


__all__ = [
    "Level",
    "Palette",
    "PaletteError",
    "PaletteSpec",
    "Palettes",
    "check_levels",
    "is_spec",
    "palette_count",
    "palette_targets",
    "parse",
    "parse_level",
    "quantile_palette",
]


@dataclass(frozen=True)
class Level:
    """One value's level as written: ``kind`` is raw, quantile, max_mean_quantile, mean or mean_log1p."""

    kind: str
    number: float = 0.0
    text: str = ""

    def resolve(self, values: np.ndarray) -> float:
        """The level on these reward samples."""
        if self.kind == "raw":
            return self.number
        if self.kind == "quantile":
            return float(np.quantile(values, self.number))
        if self.kind == "max_mean_quantile":
            return max(_mean(values), float(np.quantile(values, self.number)))
        if self.kind == "mean":
            return _mean(values) + self.number
        if self.kind == "mean_log1p":
            return _mean(values) + math.log1p(self.number)
        raise AssertionError(self.kind)


def _mean(values: np.ndarray) -> float:
    """The mean of a value's samples, as the pool computes it (no overflow near float64's largest numbers)."""
    return float(scaled_moments(values)[0])


def parse_level(text: Union[str, float, int], value: str = "?") -> Level:
    """Read one level; the error names the value and shows the accepted forms."""
    if isinstance(text, (bool, np.bool_)):
        raise PaletteError(f"level of {value!r} is {text!r}, expected a number or a level such as 'q0.8'")
    if isinstance(text, numbers.Real):
        try:
            number = float(text)
        except OverflowError:
            raise PaletteError(f"level of {value!r} is too large for a float64, expected a finite number") from None
        if not math.isfinite(number):
            raise PaletteError(f"level of {value!r} is {text}, expected a finite number")
        return Level("raw", number, str(text))
    if not isinstance(text, str):
        raise PaletteError(
            f"level of {value!r} is a {type(text).__name__} ({str(text)[:60]!r}), expected a number or a level "
            "such as 'q0.8'"
        )
    if len(text) > MAX_LEVEL_CHARS:
        raise PaletteError(
            f"level of {value!r} is {len(text)} characters long, more than {MAX_LEVEL_CHARS}: a level is a number "
            "or a short formula such as 'max(mean,q0.8)'"
        )
    spec = text.strip().lower()
    if match := _QUANTILE.match(spec):
        return Level("quantile", _fraction(match, value, spec), spec)
    if match := _MAX_MEAN_QUANTILE.match(spec):
        return Level("max_mean_quantile", _fraction(match, value, spec), spec)
    if match := _MEAN_LOG.match(spec):
        kappa = float(match.group(1))
        if kappa <= -1:
            raise PaletteError(f"level of {value!r}: {spec!r} needs 1+kappa > 0")
        return Level("mean_log1p", kappa, spec)
    if match := _MEAN_SHIFT.match(spec):
        shift = float(match.group(2) or 0.0) * (-1.0 if match.group(1) == "-" else 1.0)
        return Level("mean", shift, spec)
    if _RAW.match(spec):
        return parse_level(float(spec), value)
    raise PaletteError(
        f"cannot read level {text!r} of {value!r}; use a number, 'q0.8', 'max(mean,q0.8)', 'mean', "
        "'mean+0.1' or 'mean+log(1+0.25)'"
    )


# Without a percent sign, a quantile above 1 is read as a percent only from here up: q2 could be 2% or a slip
# for q0.2, while q80 can only mean 80%.
SMALLEST_BARE_PERCENT = 10


def _fraction(match: re.Match, value: str, spec: str) -> float:
    """The quantile of ``q<N>`` as a fraction: N in [0, 1] is one, N% a percent, and a bare N > 1 a percent
    only when it is a whole number from 10 to 100."""
    written = match.group(1)
    number = float(written)
    if match.group(2) == "%":
        number /= 100.0
    elif 1 < number <= 100:
        if not (number.is_integer() and number >= SMALLEST_BARE_PERCENT):
            raise PaletteError(
                f"quantile {spec!r} of {value!r} is ambiguous: q0 to q1 are fractions and a percent needs '%'; "
                f"write 'q{number / 100:g}' or 'q{written}%'"
            )
        number /= 100.0
    if not 0.0 <= number <= 1.0:
        raise PaletteError(f"quantile in {spec!r} of {value!r} must lie in [0, 1] (or 0-100%)")
    return number


@dataclass(frozen=True)
class Palette:
    """The constrained values and their levels, in the order written."""

    entries: tuple[tuple[str, Level], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.entries)

    def __str__(self) -> str:
        return ", ".join(f"{name}>={level.text}" for name, level in self.entries)


PaletteSpec = Union[str, Palette, Mapping[str, Union[str, float, int]]]


def parse(spec: PaletteSpec) -> Palette:
    """A Palette from a string ``"v>=level, ..."`` or a dict ``{value: level}``."""
    if isinstance(spec, Palette):
        return spec
    if isinstance(spec, Mapping):
        items = []
        for name, level in spec.items():
            if not isinstance(name, str):
                raise PaletteError(f"a palette's value names are texts, got the {type(name).__name__} {name!r}")
            if not name.strip():
                raise PaletteError(f"palette entry {name!r}: {level!r} names no value")
            items.append((name, parse_level(level, name)))
    elif isinstance(spec, str):
        if len(spec) > MAX_PALETTE_CHARS:
            raise PaletteError(
                f"the palette is {len(spec)} characters long, more than {MAX_PALETTE_CHARS}: a palette names each "
                "value once, as 'value>=level'"
            )
        items = []
        for part in _split_top_level(spec):
            if not part.strip():
                continue
            if ">=" not in part:
                raise PaletteError(f"palette entry {part.strip()!r} has no '>=': write it as 'value>=level'")
            name, level = part.split(">=", 1)
            name = name.strip()
            if not name:
                raise PaletteError(f"palette entry {part.strip()!r} names no value")
            items.append((name, parse_level(level, name)))
    else:
        raise PaletteError(f"a palette is a string or a dict of levels, got a {type(spec).__name__}")
    if not items:
        raise PaletteError("the palette constrains no value")
    counts = Counter(name for name, _ in items)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        raise PaletteError(f"the palette names {repeated} more than once")
    return Palette(tuple(items))


def _split_top_level(spec: str) -> list[str]:
    """Split at commas outside parentheses, so 'max(mean,q0.8)' stays whole."""
    parts, depth, current = [], 0, []
    for char in spec:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char in ",;" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


# A palette in any form: one spec, a list of specs, a vector of levels, or an array of them (one per row).
Palettes = Union[PaletteSpec, Sequence[PaletteSpec], np.ndarray, Sequence[float], Sequence[Sequence[float]]]


def is_spec(palette: Any) -> bool:
    """Whether ``palette`` is one palette written by name (a string, a dict of levels or a Palette)."""
    return isinstance(palette, (str, Mapping, Palette))


def _is_collection(palettes: Any) -> bool:
    """A list, tuple or array (numpy's, or any with ``__array__``), that is, something that can hold palettes."""
    return isinstance(palettes, (np.ndarray, Sequence)) or hasattr(palettes, "__array__")


def palette_count(palettes: Palettes) -> int:
    """How many palettes ``palettes`` holds (a spec or a vector of levels is one), without resolving any.

    Anything that is no palette (None, a bare number, a ragged or mixed list, complex levels) is a
    :class:`PaletteError` saying what a palette is.
    """
    if is_spec(palettes):
        return 1
    if not _is_collection(palettes) or isinstance(palettes, (bytes, bytearray)):
        raise PaletteError(
            "a palette is a string, a dict of levels, a vector of levels, or a list or array of them; got a "
            f"{type(palettes).__name__}"
        )
    if isinstance(palettes, Sequence):
        if len(palettes) == 0:
            raise PaletteError("no palettes given")
        specs = [is_spec(spec) for spec in palettes]
        if all(specs):
            return len(palettes)
        if any(specs):
            raise PaletteError("a list of palettes holds either specs (strings, dicts) or vectors of levels, not both")
    levels = real_array(palettes, "palette levels", PaletteError)
    if levels.ndim not in (1, 2):
        raise PaletteError(f"palette levels must be a vector or a [palettes, values] array, got shape {levels.shape}")
    return 1 if levels.ndim == 1 else int(levels.shape[0])


def palette_targets(
    pool: RewardPool,
    palettes: Palettes,
    values: Sequence[str] | None = None,
    *,
    check_range: bool = True,
) -> np.ndarray:
    """Target vectors c, [palettes, pool values], NaN where a value is unconstrained.

    ``palettes`` is one spec (a string, a dict of levels, a Palette), a list of specs, a vector of levels, or a
    [palettes, levels] array. A vector or array runs over ``values`` when they are given (each named once),
    else over all of the pool's values with NaN for an unconstrained one. Levels such as ``q0.8`` and ``mean``
    are resolved on ``pool``; with ``check_range`` every level must lie within the range of its value's
    samples (see :func:`check_levels`).
    """
    if values is not None:
        values = unique_names(values, "values", PaletteError)
    if is_spec(palettes):
        palettes = [palettes]
    palette_count(palettes)   # refuses what is no palette, before any level is resolved
    if isinstance(palettes, Sequence) and all(is_spec(spec) for spec in palettes):
        targets = np.stack([_resolve(pool, parse(spec)) for spec in palettes])
    else:
        targets = _levels_array(pool, palettes, values)
    unconstrained = np.isnan(targets).all(axis=1)
    if unconstrained.any():
        raise PaletteError(f"palette {int(np.flatnonzero(unconstrained)[0])} constrains no value")
    if check_range:
        check_levels(pool, targets)
    return targets


def one_palette_targets(
    pool: RewardPool,
    palette: Palettes,
    values: Sequence[str] | None = None,
    *,
    check_range: bool = True,
    refusal: str = "this takes",
    error: type[Exception] = PaletteError,
) -> np.ndarray:
    """The target vector c [pool values] of exactly one palette (see :func:`palette_targets`); a batch is
    ``error("<refusal> one palette, got N")``, so each caller says what takes only one."""
    targets = palette_targets(pool, palette, values, check_range=check_range)
    if targets.shape[0] != 1:
        raise error(f"{refusal} one palette, got {targets.shape[0]}")
    return targets[0]


def _resolve(pool: RewardPool, palette: Palette) -> np.ndarray:
    """One parsed palette over the pool's values: each level resolved on its value's samples."""
    flat = pool.flat()
    targets = np.full(pool.num_values, np.nan)
    for name, level in palette.entries:
        column = pool.index_of(name)
        targets[column] = level.resolve(flat[:, column])
    return targets


def _levels_array(pool: RewardPool, levels: Any, values: tuple[str, ...] | None) -> np.ndarray:
    """A vector or [palettes, levels] array of raw levels, over ``values`` or over all of the pool's values."""
    array = real_array(levels, "palette levels", PaletteError)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2:
        raise PaletteError(f"palette levels must be a vector or a [palettes, values] array, got shape {array.shape}")
    if array.shape[0] == 0:
        raise PaletteError("no palettes given: the array of levels has no rows")
    names = pool.value_names if values is None else values
    if array.shape[1] != len(names):
        over = "the named values" if values is not None else "the pool's values"
        hint = "" if values is not None else "; pass values=[...] to name the columns"
        raise PaletteError(f"palette levels have {array.shape[1]} columns for {over} {list(names)}{hint}")
    if values is None:
        return array.copy()
    targets = np.full((array.shape[0], pool.num_values), np.nan)
    for column, name in enumerate(values):
        targets[:, pool.index_of(name)] = array[:, column]
    return targets


def check_levels(pool: RewardPool, targets: np.ndarray) -> None:
    """Reject levels outside [min, max] of a value's samples, and constraints on a constant value.

    ``targets`` is one palette [values] or a batch [palettes, values], NaN where unconstrained. A level above
    the maximum can never be reached by reweighting the samples; one below the minimum holds for every model
    and is almost always a mistake (a sign or a unit).
    """
    batch = np.atleast_2d(np.asarray(targets, dtype=np.float64))
    if batch.ndim != 2 or batch.shape[1] != pool.num_values:
        raise PaletteError(
            f"targets of shape {np.shape(targets)} do not match the pool's {pool.num_values} values "
            f"{list(pool.value_names)}"
        )
    lows, highs = pool.value_range()
    where = (lambda row: f" (palette {row})") if batch.shape[0] > 1 else (lambda row: "")
    for column, name in enumerate(pool.value_names):
        levels = batch[:, column]
        constrained = ~np.isnan(levels)
        if not constrained.any():
            continue
        if np.isinf(levels).any():
            row = int(np.flatnonzero(np.isinf(levels))[0])
            raise PaletteError(f"level of {name!r} is {levels[row]}{where(row)}, expected a finite number")
        if lows[column] == highs[column]:
            raise PaletteError(
                f"{name!r} is constant ({lows[column]:g}) over the pool: constraining it means nothing; "
                "leave it out of the palette"
            )
        above = constrained & (levels > highs[column])
        if above.any():
            row = int(np.flatnonzero(above)[0])
            raise PaletteError(
                f"level {levels[row]:g} of {name!r}{where(row)} is above its largest reward in the pool "
                f"({highs[column]:g}): no model supported on these samples reaches it"
            )
        below = constrained & (levels < lows[column])
        if below.any():
            row = int(np.flatnonzero(below)[0])
            raise PaletteError(
                f"level {levels[row]:g} of {name!r}{where(row)} is below its smallest reward in the pool "
                f"({lows[column]:g}): the constraint holds for every model; check its sign and units"
            )


def quantile_palette(names: Sequence[str], q: float, maintain: Sequence[str] = (), floor_at_mean: bool = True) -> Palette:
    """The paper's quantile palettes: ``names`` at the q-quantile (at least the mean), ``maintain`` at the mean.

    ``quantile_palette(["humor", "gpt2-helpful", "gpt2-harmless"], 0.7, ["diversity", "coherence",
    "perplexity"])`` is the paper's HHH-70.
    """
    if isinstance(q, bool) or not 0.0 <= float(q) <= 1.0:
        raise PaletteError(f"quantile_palette takes the quantile as a fraction in [0, 1], got {q!r}")
    kind = "max_mean_quantile" if floor_at_mean else "quantile"
    text = f"max(mean,q{q:g})" if floor_at_mean else f"q{q:g}"
    entries = [(name, Level(kind, float(q), text)) for name in names]
    entries += [(name, Level("mean", 0.0, "mean")) for name in maintain]
    return parse(Palette(tuple(entries)))
