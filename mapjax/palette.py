"""Palettes: the minimum expected level asked of each value, resolved against a pool to a target vector c.

A palette is written as a string, ``"humor>=q0.8, gpt2-helpful>=max(mean,q0.8), diversity>=mean"``, or as a
dict ``{"humor": "q0.8", "diversity": "mean", "coherence": 0.45}``. A level is one of

- a number: the raw level, in the reward's own units;
- ``q0.8`` (or ``q80``): the 0.8-quantile of the value over the pool's samples;
- ``max(mean,q0.8)``: the larger of the mean and the quantile, as the paper's quantile palettes do;
- ``mean``, ``mean+0.1``, ``mean-0.1``: the pool mean, optionally shifted;
- ``mean+log(1+0.25)``: the classifier palettes' "make it 25% more likely" (for log-probability rewards).

Values the palette leaves out are unconstrained.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

import numpy as np

from mapjax.pool import RewardPool

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_QUANTILE = re.compile(rf"^q\s*({_NUMBER})\s*(%?)$")
_MAX_MEAN_QUANTILE = re.compile(rf"^max\(\s*mean\s*,\s*q\s*({_NUMBER})\s*(%?)\s*\)$")
_MEAN_LOG = re.compile(rf"^mean\s*\+\s*log\(\s*1\s*\+\s*({_NUMBER})\s*\)$")
_MEAN_SHIFT = re.compile(rf"^mean\s*(?:([-+])\s*({_NUMBER}))?$")
_RAW = re.compile(rf"^{_NUMBER}$")


class PaletteError(ValueError):
    """Raised for a palette that cannot be read or resolved; the message names the value and level."""


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
            return max(float(values.mean()), float(np.quantile(values, self.number)))
        if self.kind == "mean":
            return float(values.mean()) + self.number
        if self.kind == "mean_log1p":
            return float(values.mean()) + math.log1p(self.number)
        raise AssertionError(self.kind)


def parse_level(text: Union[str, float, int], value: str = "?") -> Level:
    """Read one level; the error names the value and shows the accepted forms."""
    if isinstance(text, bool):
        raise PaletteError(f"level of {value!r} is {text!r}, expected a number or a level such as 'q0.8'")
    if isinstance(text, (int, float)):
        if not math.isfinite(text):
            raise PaletteError(f"level of {value!r} is {text}, expected a finite number")
        return Level("raw", float(text), str(text))
    spec = str(text).strip().lower()
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


def _fraction(match: re.Match, value: str, spec: str) -> float:
    number = float(match.group(1))
    if match.group(2) == "%" or number > 1:
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

    def targets(self, pool: RewardPool, check_range: bool = True) -> np.ndarray:
        """c over all of the pool's values: the resolved level, NaN where unconstrained."""
        flat = pool.flat()
        c = np.full(pool.num_values, np.nan)
        for name, level in self.entries:
            column = pool.index_of(name)
            c[column] = level.resolve(flat[:, column])
        if check_range:
            check_levels(pool, c)
        return c


PaletteSpec = Union[str, Palette, Mapping[str, Union[str, float, int]]]


def parse(spec: PaletteSpec) -> Palette:
    """A Palette from a string ``"v>=level, ..."`` or a dict ``{value: level}``."""
    if isinstance(spec, Palette):
        return spec
    if isinstance(spec, Mapping):
        items = [(str(name), parse_level(level, str(name))) for name, level in spec.items()]
    elif isinstance(spec, str):
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
    names = [name for name, _ in items]
    repeated = sorted({name for name in names if names.count(name) > 1})
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


def resolve(pool: RewardPool, spec: PaletteSpec, check_range: bool = True) -> np.ndarray:
    """c over the pool's values (NaN where unconstrained), checked against the data's range."""
    return parse(spec).targets(pool, check_range=check_range)


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
    kind = "max_mean_quantile" if floor_at_mean else "quantile"
    text = f"max(mean,q{q:g})" if floor_at_mean else f"q{q:g}"
    entries = [(name, Level(kind, float(q), text)) for name in names]
    entries += [(name, Level("mean", 0.0, "mean")) for name in maintain]
    return parse(Palette(tuple(entries)))
