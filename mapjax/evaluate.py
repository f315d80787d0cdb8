"""Evaluation of aligned models against the base model, from reward pools.

What the paper reports about an aligned model, computed from two pools of scored samples (the aligned model's
and the base model's, over the same prompts):

- **realised levels**: per value, the expected reward with its standard error and a normal-approximation
  confidence interval, and whether each palette entry was met;
- **win rate** against the base model: per prompt, the share of (aligned, base) sample pairs in which the
  aligned sample's reward is strictly higher, averaged over prompts;
- **navigation efficiency** over a set of aligned models: the share whose levels improve on the base in every
  chosen value (the paper's Table 3 uses helpfulness and harmlessness);
- **quantile table**: each model's realised level expressed as a quantile of the base model's rewards (the
  authors' "realised c-levels in quantile").

A realised level is the mean over all samples (as the solver's levels and the paper's tables are); its standard
error is clustered by prompt, because a prompt's samples share the prompt and are not independent draws. With
one sample per prompt (the usual evaluation file) it is the plain standard error std(ddof=1)/√n. Win rates are
per prompt first, then averaged over prompts, with the standard error over prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Mapping, Sequence, Union

import numpy as np

from mapjax.errors import EvaluationError
from mapjax.jsonio import jsonable
from mapjax.palette import Palettes, is_spec, one_palette_targets, parse
from mapjax.pool import PoolLike, RewardPool, as_pool, unique_names

# The authors' navigation-efficiency slack (their plotting code): a model counts when each chosen level is at
# least the base's minus this much. Expected reward, raw units:
AUTHORS_LEVEL_TOLERANCE = 0.06
# Win rates, against the even 0.5:
AUTHORS_WIN_RATE_TOLERANCE = 0.03
# The paper's Table 3 values.
NAVIGATION_VALUES = ("gpt2-helpful", "gpt2-harmless")


__all__ = [
    "EvaluationError",
    "Evaluation",
    "LevelReport",
    "NavigationEfficiency",
    "QuantileTable",
    "ValueLevel",
    "WinRate",
    "WinRateReport",
    "base_quantile",
    "evaluate",
    "match_prompts",
    "navigation_efficiency",
    "quantile_table",
    "realised_levels",
    "resolve_targets",
    "shared_values",
    "win_rates",
]


# ============================================================================ per-prompt statistics


def _mean_and_error(per_prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over prompts and its standard error (sample standard deviation, ddof=1, over √prompts)."""
    count = per_prompt.shape[0]
    mean = per_prompt.mean(axis=0)
    if count < 2:
        return mean, np.full(mean.shape, np.nan)
    return mean, per_prompt.std(axis=0, ddof=1) / math.sqrt(count)


def _pooled_mean_and_clustered_error(pool: RewardPool, columns: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Mean over all valid samples, and its standard error clustered by prompt.

    SE² = G/(G−1) · Σ_g (Σ_{i∈g} (r_i − mean))² / n² over G prompts and n samples; with one sample per prompt
    this is exactly the sample variance (ddof=1) over n.
    """
    rewards = pool.rewards[:, :, list(columns)]
    mask = pool.mask[:, :, None]
    count = int(pool.mask.sum())
    groups = pool.num_prompts
    mean = (rewards * mask).sum(axis=(0, 1)) / count
    if groups < 2:
        return mean, np.full(mean.shape, np.nan)
    residual_sums = ((rewards - mean) * mask).sum(axis=1)  # [prompts, values]
    variance = groups / (groups - 1) * (residual_sums**2).sum(axis=0) / count**2
    return mean, np.sqrt(variance)


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def _names(values: Sequence[str] | None) -> tuple[str, ...] | None:
    return None if values is None else unique_names(values, "values", EvaluationError)


def _columns(pool: RewardPool, names: Sequence[str], label: str) -> list[int]:
    missing = [name for name in names if name not in pool.value_names]
    if missing:
        raise EvaluationError(f"{label} has no value {missing[0]!r}; its values are {list(pool.value_names)}")
    return [pool.value_names.index(name) for name in names]


def shared_values(result: PoolLike, base: PoolLike, values: Sequence[str] | None = None) -> tuple[str, ...]:
    """The values to compare: ``values`` if given (each must be in both pools), else the values of both,
    which must then be the same set (in the result's order)."""
    values = _names(values)
    result, base = as_pool(result, values), as_pool(base, values)
    if values is not None:
        names = values
        if not names:
            raise EvaluationError("no values to evaluate")
        _columns(result, names, "the result")
        _columns(base, names, "the base")
        return names
    only_result = [name for name in result.value_names if name not in base.value_names]
    only_base = [name for name in base.value_names if name not in result.value_names]
    if only_result or only_base:
        parts = []
        if only_result:
            parts.append(f"the result has {only_result} that the base lacks")
        if only_base:
            parts.append(f"the base has {only_base} that the result lacks")
        raise EvaluationError("the pools' values differ: " + "; ".join(parts) + "; choose the values to compare")
    return tuple(result.value_names)


# ============================================================================ realised levels


@dataclass(frozen=True)
class ValueLevel:
    """One value's realised level.

    Attributes:
        name: the value.
        mean: expected reward, the mean over all samples.
        standard_error: of ``mean``, clustered by prompt (NaN with one prompt).
        lower, upper: the normal-approximation interval mean ± z·SE at ``confidence``.
        confidence: the interval's level.
        target: the palette's level for this value, or None when unconstrained.
        met: None when unconstrained; else True when the target is not above ``upper`` (the data cannot
            reject that the level was reached), False when the whole interval lies below the target.
    """

    name: str
    mean: float
    standard_error: float
    lower: float
    upper: float
    confidence: float
    target: float | None = None
    met: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mean": self.mean,
            "standard_error": jsonable(self.standard_error),
            "interval": [jsonable(self.lower), jsonable(self.upper)],
            "confidence": self.confidence,
            "target": self.target,
            "met": self.met,
        }


@dataclass(frozen=True)
class LevelReport:
    """Realised levels of a pool's values (and the palette's verdicts, when a palette was given)."""

    levels: tuple[ValueLevel, ...]
    confidence: float
    num_prompts: int
    num_samples: int
    palette: str | None = None

    def __getitem__(self, name: str) -> ValueLevel:
        for level in self.levels:
            if level.name == name:
                return level
        raise KeyError(f"no value {name!r}; the report has {[level.name for level in self.levels]}")

    @property
    def value_names(self) -> tuple[str, ...]:
        return tuple(level.name for level in self.levels)

    def means(self) -> dict[str, float]:
        return {level.name: level.mean for level in self.levels}

    @property
    def all_met(self) -> bool | None:
        """Whether every palette entry was met; None without a palette."""
        verdicts = [level.met for level in self.levels if level.met is not None]
        return all(verdicts) if verdicts else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "confidence": self.confidence,
            "prompts": self.num_prompts,
            "samples": self.num_samples,
            "palette": self.palette,
            "all_met": self.all_met,
            "values": [level.to_dict() for level in self.levels],
        }

    def table(self) -> str:
        """value, mean, SE, interval, target, met."""
        width = max(8, *(len(name) for name in self.value_names))
        percent = f"{self.confidence * 100:g}% interval"
        lines = [f"{'value':<{width}}  {'mean':>9}  {'se':>8}  {percent:>21}  {'target':>9}  met"]
        for level in self.levels:
            target = "-" if level.target is None else f"{level.target:9.4f}"
            met = "-" if level.met is None else ("yes" if level.met else "NO")
            interval = f"[{level.lower:9.4f}, {level.upper:9.4f}]" if math.isfinite(level.upper) else "-"
            lines.append(
                f"{level.name:<{width}}  {level.mean:9.4f}  {_cell(level.standard_error, 8, 4)}  {interval:>21}  "
                f"{target:>9}  {met}"
            )
        lines.append(f"({self.num_prompts} prompts, {self.num_samples} samples; a palette entry is met when its "
                     f"target is not above the interval's upper bound)")
        return "\n".join(lines)


def resolve_targets(palette: Palettes, base: PoolLike, values: Sequence[str] | None = None) -> dict[str, float]:
    """One palette's levels by value name, resolved on the base model's rewards (quantiles and means are the
    base's), in the order written (the base's value order for a vector of levels over ``values`` or all of its
    values). Levels outside the base's range are kept: an aligned model's level is checked against them."""
    base = as_pool(base, values)
    targets = one_palette_targets(base, palette, values, check_range=False, refusal="an evaluation checks",
                                  error=EvaluationError)
    names = parse(palette).names if is_spec(palette) else [
        base.value_names[column] for column in np.flatnonzero(~np.isnan(targets))
    ]
    return {name: float(targets[base.index_of(name)]) for name in names}


def _palette_text(palette: Palettes, targets: Mapping[str, float]) -> str:
    if isinstance(palette, str):
        return palette
    if is_spec(palette):
        return str(parse(palette))
    return ", ".join(f"{name}>={level:g}" for name, level in targets.items())


def realised_levels(
    pool: PoolLike,
    palette: Palettes | None = None,
    *,
    base: PoolLike | None = None,
    confidence: float = 0.95,
    values: Sequence[str] | None = None,
) -> LevelReport:
    """Mean, standard error and confidence interval of each value of ``pool``; palette verdicts.

    Args:
        pool: the aligned model's rewards (a RewardPool or a plain reward array, see
            :func:`mapjax.pool.as_pool`).
        palette: levels to check: a spec (levels such as ``q0.8`` or ``mean`` are resolved on ``base``, or on
            ``pool`` itself when no base is given), a dict, or a vector of levels over the reported values.
        base: the base model's pool, for resolving the palette.
        confidence: the interval's level (normal approximation: mean ± z·SE).
        values: the values to report (default: all of the pool's); for a plain array, its columns.
    """
    z = _z(confidence)
    values = _names(values)
    pool = as_pool(pool, values)
    names = values if values is not None else pool.value_names
    columns = _columns(pool, names, "the pool")
    targets: dict[str, float] = {}
    if palette is not None:
        targets = resolve_targets(palette, as_pool(base, values) if base is not None else pool, names)
        _columns(pool, list(targets), "the pool")
        names = names + tuple(name for name in targets if name not in names)
        columns = _columns(pool, names, "the pool")
    mean, error = _pooled_mean_and_clustered_error(pool, columns)
    levels = []
    for index, name in enumerate(names):
        lower, upper = mean[index] - z * error[index], mean[index] + z * error[index]
        target = targets.get(name)
        met = None
        if target is not None:
            # With one prompt there is no interval: fall back to the point estimate.
            bound = upper if math.isfinite(upper) else mean[index]
            met = bool(target <= bound)
        levels.append(ValueLevel(name, float(mean[index]), float(error[index]), float(lower), float(upper),
                                 confidence, target, met))
    text = None if palette is None else _palette_text(palette, targets)
    return LevelReport(tuple(levels), confidence, pool.num_prompts, pool.num_samples, text)


# ============================================================================ win rates


@dataclass(frozen=True)
class WinRate:
    """Win rate of one value: the mean over prompts of the share of strictly winning (result, base) pairs."""

    name: str
    rate: float
    standard_error: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "win_rate": self.rate, "standard_error": jsonable(self.standard_error)}


@dataclass(frozen=True)
class WinRateReport:
    """Win rates of a result against the base, per value, over the prompts both pools hold."""

    rates: tuple[WinRate, ...]
    num_prompts: int
    matched_by: str  # "text" or "row"

    def __getitem__(self, name: str) -> WinRate:
        for rate in self.rates:
            if rate.name == name:
                return rate
        raise KeyError(f"no value {name!r}; the report has {[rate.name for rate in self.rates]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": self.num_prompts,
            "matched_by": self.matched_by,
            "values": [rate.to_dict() for rate in self.rates],
        }

    def table(self) -> str:
        width = max(8, *(len(rate.name) for rate in self.rates))
        lines = [f"{'value':<{width}}  {'win rate':>8}  {'se':>7}"]
        for rate in self.rates:
            lines.append(f"{rate.name:<{width}}  {rate.rate:8.4f}  {_cell(rate.standard_error, 7, 4)}")
        lines.append(f"({self.num_prompts} prompts matched by {'prompt text' if self.matched_by == 'text' else 'prompt row'})")
        return "\n".join(lines)


def match_prompts(result: PoolLike, base: PoolLike) -> tuple[np.ndarray, np.ndarray, str]:
    """Rows of ``result`` and ``base`` holding the same prompts: by prompt text when both pools have texts,
    else by prompt row (then both must have the same number of prompts). Returns (result rows, base rows, how)."""
    result, base = as_pool(result), as_pool(base)
    if result.prompts is not None and base.prompts is not None:
        base_rows = {text: row for row, text in enumerate(base.prompts)}
        pairs = [(row, base_rows[text]) for row, text in enumerate(result.prompts) if text in base_rows]
        if not pairs:
            raise EvaluationError(
                f"no common prompts: none of the result's {result.num_prompts} prompt texts is among the base's "
                f"{base.num_prompts} (e.g. result {result.prompts[0][:60]!r}, base {base.prompts[0][:60]!r})"
            )
        rows = np.asarray(pairs, dtype=int)
        return rows[:, 0], rows[:, 1], "text"
    if result.num_prompts != base.num_prompts:
        raise EvaluationError(
            f"cannot match prompts: the pools lack prompt texts and hold different numbers of prompt rows "
            f"(result {result.num_prompts}, base {base.num_prompts})"
        )
    rows = np.arange(result.num_prompts)
    return rows, rows, "row"


def win_rates(result: PoolLike, base: PoolLike, values: Sequence[str] | None = None) -> WinRateReport:
    """Win rate of ``result`` against ``base``, per value.

    Per prompt: the share of pairs (a result sample, a base sample) of that prompt in which the result's reward
    is strictly higher (ties lose, as in the paper); then the mean over the common prompts, with its standard
    error over prompts (ddof=1).
    """
    values = _names(values)
    result, base = as_pool(result, values), as_pool(base, values)
    names = shared_values(result, base, values)
    result_rows, base_rows, how = match_prompts(result, base)
    result_columns, base_columns = _columns(result, names, "the result"), _columns(base, names, "the base")
    ours = result.rewards[result_rows][:, :, result_columns]  # [P, K, V]
    theirs = base.rewards[base_rows][:, :, base_columns]  # [P, L, V]
    pair_mask = result.mask[result_rows][:, :, None] & base.mask[base_rows][:, None, :]  # [P, K, L]
    wins = (ours[:, :, None, :] > theirs[:, None, :, :]) & pair_mask[..., None]
    per_prompt = wins.sum(axis=(1, 2)) / pair_mask.sum(axis=(1, 2))[:, None]
    rate, error = _mean_and_error(per_prompt)
    rates = tuple(WinRate(name, float(rate[i]), float(error[i])) for i, name in enumerate(names))
    return WinRateReport(rates, int(len(result_rows)), how)


# ============================================================================ navigation efficiency


@dataclass(frozen=True)
class NavigationEfficiency:
    """The share of aligned models whose levels improve on the reference in every chosen value.

    Attributes:
        share: count / total.
        count, total: models that improve, models in all.
        values: the values checked.
        tolerance: per value, the slack: a model counts when level >= reference − tolerance in every value.
        improved: per model (in the order given), whether it counts.
        models: the models' names.
    """

    share: float
    count: int
    total: int
    values: tuple[str, ...]
    tolerance: dict[str, float]
    improved: tuple[bool, ...]
    models: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "navigation_efficiency": self.share,
            "count": self.count,
            "total": self.total,
            "values": list(self.values),
            "tolerance": self.tolerance,
            "improved": dict(zip(self.models, self.improved)),
        }


def navigation_efficiency(
    models: Mapping[str, Mapping[str, float]] | Sequence[Mapping[str, float]],
    reference: Mapping[str, float],
    values: Sequence[str] = NAVIGATION_VALUES,
    tolerance: float | Mapping[str, float] = 0.0,
) -> NavigationEfficiency:
    """The paper's Navigation Efficiency: the share of models improving on ``reference`` in every value.

    ``models`` maps a name to a model's levels (or is a list of levels); ``reference`` holds the base model's
    levels (its expected rewards, or 0.5 for every value when the levels are win rates). A model counts when
    level_v >= reference_v − tolerance_v for every v in ``values``. The paper's Table 3 uses helpfulness and
    harmlessness; the authors' code counts with a slack (``AUTHORS_LEVEL_TOLERANCE`` = 0.06 for expected
    rewards, ``AUTHORS_WIN_RATE_TOLERANCE`` = 0.03 for win rates); the default 0 asks for no loss at all.
    """
    if isinstance(models, Mapping):
        names, levels = tuple(str(name) for name in models), list(models.values())
    else:
        levels = list(models)
        names = tuple(f"model {i}" for i in range(len(levels)))
    if not levels:
        raise EvaluationError("navigation efficiency needs at least one model")
    values = _names(values)
    if not values:
        raise EvaluationError("navigation efficiency needs at least one value")
    slack = {name: float(tolerance[name] if isinstance(tolerance, Mapping) else tolerance) for name in values}
    for name in values:
        if name not in reference:
            raise EvaluationError(f"the reference has no level for {name!r} (it has {sorted(reference)})")
    improved = []
    for model_name, model in zip(names, levels):
        missing = [name for name in values if name not in model]
        if missing:
            raise EvaluationError(f"{model_name} has no level for {missing[0]!r} (it has {sorted(model)})")
        improved.append(all(float(model[v]) >= float(reference[v]) - slack[v] for v in values))
    count = int(sum(improved))
    return NavigationEfficiency(count / len(levels), count, len(levels), values, slack, tuple(improved), names)


# ============================================================================ quantile table


def base_quantile(base: PoolLike, name: str, level: float, *, values: Sequence[str] | None = None) -> float:
    """``level`` as a quantile of the base model's rewards of ``name``: the share of base samples below it,
    ties counted half (so the base's own median sits at 0.5 whatever the ties). ``values`` names the columns
    of a plain reward array."""
    base = as_pool(base, values)
    samples = base.flat()[:, base.index_of(name)]
    below = np.count_nonzero(samples < level)
    equal = np.count_nonzero(samples == level)
    return float((below + 0.5 * equal) / samples.size)


@dataclass(frozen=True)
class QuantileTable:
    """Each model's realised level of each value, as a quantile of the base model's rewards."""

    models: tuple[str, ...]
    values: tuple[str, ...]
    levels: np.ndarray  # [models, values], raw units
    quantiles: np.ndarray  # [models, values], in [0, 1]

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": list(self.values),
            "models": {
                model: {
                    value: {"level": float(self.levels[i, j]), "quantile": float(self.quantiles[i, j])}
                    for j, value in enumerate(self.values)
                }
                for i, model in enumerate(self.models)
            },
        }

    def table(self, markdown: bool = True) -> str:
        """Quantiles in percent, one row per model (Markdown by default)."""
        if markdown:
            lines = ["| model | " + " | ".join(self.values) + " |", "|---|" + "---|" * len(self.values)]
            for i, model in enumerate(self.models):
                cells = [f"{100 * q:.1f}% ({level:.3f})" for q, level in zip(self.quantiles[i], self.levels[i])]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
            return "\n".join(lines)
        width = max(8, *(len(model) for model in self.models))
        lines = [f"{'model':<{width}}" + "".join(f"  {value[:14]:>14}" for value in self.values)]
        for i, model in enumerate(self.models):
            lines.append(f"{model:<{width}}" + "".join(f"  {100 * q:13.1f}%" for q in self.quantiles[i]))
        return "\n".join(lines)


ModelLevels = Union[Mapping[str, float], RewardPool, np.ndarray, LevelReport]


def quantile_table(models: Mapping[str, ModelLevels], base: PoolLike, values: Sequence[str] | None = None) -> QuantileTable:
    """The authors' realised c-levels table: each model's level of each value as a base-reward quantile.

    ``models`` maps a name to the model's levels: a dict value -> level, a LevelReport, or a RewardPool or
    plain reward array (its realised levels are computed; an array's columns are ``values``, else the base's).
    """
    if not models:
        raise EvaluationError("the quantile table needs at least one model")
    values = _names(values)
    base = as_pool(base, values)
    resolved: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        if isinstance(model, (RewardPool, np.ndarray)):
            resolved[name] = realised_levels(as_pool(model, values or base.value_names)).means()
        elif isinstance(model, LevelReport):
            resolved[name] = model.means()
        else:
            resolved[name] = {key: float(level) for key, level in model.items()}
    if values is None:
        first = next(iter(resolved.values()))
        values = [name for name in first if name in base.value_names]
    values = tuple(values)
    _columns(base, values, "the base")
    levels = np.empty((len(resolved), len(values)))
    quantiles = np.empty_like(levels)
    for i, (model, model_levels) in enumerate(resolved.items()):
        for j, value in enumerate(values):
            if value not in model_levels:
                raise EvaluationError(f"{model} has no level for {value!r} (it has {sorted(model_levels)})")
            levels[i, j] = model_levels[value]
            quantiles[i, j] = base_quantile(base, value, levels[i, j])
    return QuantileTable(tuple(resolved), values, levels, quantiles)


# ============================================================================ one result against the base


@dataclass(frozen=True)
class Evaluation:
    """An aligned model's pool against the base's: levels of both, quantiles, win rates."""

    levels: LevelReport
    base_levels: LevelReport
    quantiles: dict[str, float]
    win_rates: WinRateReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels": self.levels.to_dict(),
            "base_levels": self.base_levels.to_dict(),
            "base_quantiles": self.quantiles,
            "win_rates": self.win_rates.to_dict(),
        }

    def table(self) -> str:
        """One row per value: base mean, realised mean ± SE, interval, base quantile, target, met, win rate."""
        names = self.levels.value_names
        width = max(8, *(len(name) for name in names))
        percent = f"{self.levels.confidence * 100:g}% interval"
        lines = [
            f"{'value':<{width}}  {'base':>9}  {'realised':>9}  {'se':>7}  {percent:>21}  {'quantile':>8}  "
            f"{'target':>9}  {'met':>3}  {'win rate':>8}  {'se':>6}"
        ]
        for level in self.levels.levels:
            base = self.base_levels[level.name].mean
            win = self.win_rates[level.name]
            interval = f"[{level.lower:9.4f}, {level.upper:9.4f}]" if math.isfinite(level.upper) else "-"
            target = "-" if level.target is None else f"{level.target:9.4f}"
            met = "-" if level.met is None else ("yes" if level.met else "NO")
            lines.append(
                f"{level.name:<{width}}  {base:9.4f}  {level.mean:9.4f}  {_cell(level.standard_error, 7, 4)}  "
                f"{interval:>21}  {100 * self.quantiles[level.name]:7.1f}%  {target:>9}  {met:>3}  "
                f"{win.rate:8.4f}  {_cell(win.standard_error, 6, 4)}"
            )
        lines.append("")
        lines.append(
            f"result: {self.levels.num_prompts} prompts, {self.levels.num_samples} samples; base: "
            f"{self.base_levels.num_prompts} prompts, {self.base_levels.num_samples} samples; win rates over "
            f"{self.win_rates.num_prompts} common prompts (matched by "
            f"{'prompt text' if self.win_rates.matched_by == 'text' else 'prompt row'})"
        )
        lines.append("quantile: the realised level as a quantile of the base's rewards; met: the target is not "
                     "above the interval's upper bound")
        if self.levels.all_met is not None:
            lines.append("palette: " + ("every entry met" if self.levels.all_met else "NOT every entry met"))
        return "\n".join(lines)


def evaluate(
    result: PoolLike,
    base: PoolLike,
    palette: Palettes | None = None,
    *,
    confidence: float = 0.95,
    values: Sequence[str] | None = None,
) -> Evaluation:
    """Evaluate an aligned model's pool against the base model's pool (see the module docstring).

    ``values`` picks the values to compare (default: all, and then both pools must have the same values; for
    plain reward arrays, their columns); palette levels are resolved on the base, and a vector of levels runs
    over the compared values.
    """
    values = _names(values)
    result, base = as_pool(result, values), as_pool(base, values)
    names = shared_values(result, base, values)
    if palette is not None and is_spec(palette):
        # (A vector of levels runs over the compared values, so only a spec can name another value.)
        for name in parse(palette).names:
            if name not in names:
                raise EvaluationError(f"the palette constrains {name!r}, which is not among the compared values {list(names)}")
    levels = realised_levels(result, palette, base=base, confidence=confidence, values=names)
    base_levels = realised_levels(base, confidence=confidence, values=names)
    quantiles = {name: base_quantile(base, name, levels[name].mean) for name in names}
    return Evaluation(levels, base_levels, quantiles, win_rates(result, base, names))


# ============================================================================ helpers


def _cell(value: float, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if math.isfinite(value) else f"{'-':>{width}}"
