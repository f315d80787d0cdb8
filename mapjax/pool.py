"""RewardPool: rewards of base-model samples, grouped by prompt.

A pool holds ``rewards[prompt, sample, value]`` with a boolean ``mask[prompt, sample]`` for ragged sample
counts, the value names, and (when known) the prompt texts and the generated texts. It is the input of every
solver in this package: the pooled dual uses all valid samples under one normaliser, the per-prompt dual
normalises within each prompt's samples.

Files: the authors' pilot JSON (a list of ``{prompt, generated, <value>: number}`` records), JSON Lines with the
same records one per line, and Parquet with the same columns. Rows are grouped by ``prompt_id`` when that column
exists, else by the prompt text, in order of first appearance.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import numbers
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from mapjax.errors import InputError, PoolError
from mapjax.jsonio import OversizedInteger, loads

SUMMARY_QUANTILES: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 0.99)
# Columns of a record that are text or grouping keys, never rewards.
TEXT_COLUMNS: tuple[str, ...] = ("prompt", "generated", "prompt_id")


@dataclass(frozen=True)
class ValueSummary:
    """Per-value statistics of a pool, over its valid samples."""

    name: str
    mean: float
    standard_error: float
    minimum: float
    maximum: float
    quantiles: dict[float, float] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class RewardPool:
    """Rewards of samples from the base model.

    Attributes:
        rewards: float64 array [prompts, samples, values]; entries where ``mask`` is False are 0 and unused.
        mask: bool array [prompts, samples]; True where a sample exists.
        value_names: the name of each reward column.
        prompts: the prompt text of each prompt row, or None.
        generations: the generated text of each sample (a list per prompt, as long as its valid samples), or
            None.
    """

    rewards: np.ndarray
    mask: np.ndarray
    value_names: tuple[str, ...]
    prompts: tuple[str, ...] | None = None
    generations: tuple[tuple[str, ...], ...] | None = None

    def __post_init__(self) -> None:
        rewards = real_array(self.rewards, "rewards", PoolError)
        mask = _mask_array(self.mask)
        names = name_list(self.value_names, "value_names", PoolError)
        if rewards.ndim != 3:
            raise PoolError(f"rewards must have shape [prompts, samples, values], got shape {rewards.shape}")
        if mask.shape != rewards.shape[:2]:
            raise PoolError(
                f"mask shape {mask.shape} does not match rewards' [prompts, samples] = {rewards.shape[:2]}"
            )
        if len(names) != rewards.shape[2]:
            raise PoolError(f"{len(names)} value names {list(names)} for {rewards.shape[2]} reward columns")
        repeated = repeated_names(names)
        if repeated:
            raise PoolError(f"value names {repeated} repeat in {list(names)}; each reward column needs its own name")
        if rewards.shape[2] == 0:
            raise PoolError("the pool has no reward columns")
        if not mask.any():
            raise PoolError("the pool is empty: it has no samples")
        if (~mask.any(axis=1)).any():
            empty = int(np.flatnonzero(~mask.any(axis=1))[0])
            raise PoolError(f"prompt row {empty} has no samples")
        bad = ~np.isfinite(rewards) & mask[:, :, None]
        if bad.any():
            prompt, sample, value = (int(i) for i in np.argwhere(bad)[0])
            raise PoolError(
                f"reward {names[value]!r} of prompt row {prompt}, sample {sample} is {rewards[prompt, sample, value]}: "
                "rewards must be finite numbers"
            )
        prompts = None if self.prompts is None else _texts(self.prompts, "prompts")
        if prompts is not None and len(prompts) != rewards.shape[0]:
            raise PoolError(f"{len(prompts)} prompts for {rewards.shape[0]} prompt rows")
        generations = None
        if self.generations is not None:
            if isinstance(self.generations, (str, bytes)) or not isinstance(self.generations, Iterable):
                raise PoolError(f"generations must be a list of lists of texts, got a {type(self.generations).__name__}")
            generations = tuple(_texts(texts, f"generations[{row}]") for row, texts in enumerate(self.generations))
            counts = mask.sum(axis=1)
            if len(generations) != rewards.shape[0] or any(
                len(texts) != count for texts, count in zip(generations, counts)
            ):
                raise PoolError("generations must hold one text per valid sample of each prompt")
        object.__setattr__(self, "rewards", np.where(mask[:, :, None], rewards, 0.0))
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "value_names", names)
        object.__setattr__(self, "prompts", prompts)
        object.__setattr__(self, "generations", generations)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_array(
        cls,
        rewards: np.ndarray | Sequence[Sequence[float]],
        value_names: Sequence[str] | None = None,
        mask: np.ndarray | None = None,
    ) -> "RewardPool":
        """A pool from an array: [n, values] (one sample per prompt) or [prompts, samples, values]."""
        array = real_array(rewards, "rewards", PoolError)
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim == 2:
            array = array[:, None, :]
            if mask is not None:
                raise PoolError("a mask needs rewards of shape [prompts, samples, values]")
        if array.ndim != 3:
            raise PoolError(f"rewards must have 2 or 3 dimensions, got shape {np.shape(rewards)}")
        if value_names is None:
            value_names = tuple(f"r{i}" for i in range(array.shape[2]))
        if mask is None:
            mask = np.ones(array.shape[:2], dtype=bool)
        return cls(array, mask, tuple(value_names))

    @classmethod
    def from_records(
        cls,
        records: Iterable[Mapping[str, Any]],
        value_names: Sequence[str] | None = None,
        source: str = "records",
    ) -> "RewardPool":
        """A pool from records ``{prompt, generated, prompt_id?, <value>: number}``, grouped by prompt.

        ``value_names`` picks and orders the reward columns; by default every field that holds a number in any
        record (other than ``prompt_id``), in order of first appearance. Every record is read alike: one that
        lacks a value, or holds something other than a finite number there, is an error naming its row, and so
        is a ``prompt``, ``generated`` or ``prompt_id`` that is not text or a finite number (a list, an object).
        """
        if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
            raise PoolError(f"{source}: records must be a list of objects of fields, got a {type(records).__name__}")
        rows = list(records)
        if not rows:
            raise PoolError(f"{source}: the pool is empty: no records")
        for index, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise PoolError(f"{source}: row {index} is a {type(row).__name__}, expected an object of fields")
        if value_names is None:
            value_names = _numeric_fields(rows)
            if not value_names:
                raise PoolError(f"{source}: no record has a numeric reward field (fields: {list(rows[0])})")
        value_names = unique_names(value_names, "value_names", PoolError)

        present = {key for row in rows for key in row}
        group_key = "prompt_id" if "prompt_id" in present else ("prompt" if "prompt" in present else None)
        # Texts are kept when any record has them, so every record must then have them.
        text_keys = [key for key in ("prompt", "generated") if key in present]
        groups: dict[Any, list[int]] = {}
        values = np.empty((len(rows), len(value_names)), dtype=np.float64)
        for index, row in enumerate(rows):
            for column, name in enumerate(value_names):
                if name not in row:
                    raise PoolError(f"{source}: row {index} has no value {name!r} (fields: {list(row)})")
                values[index, column] = _reward(row[name], source, index, name)
            for key in text_keys:
                if row.get(key) is None:
                    raise PoolError(f"{source}: row {index} has no {key!r}, which other rows have")
            for key in TEXT_COLUMNS:
                if row.get(key) is not None:
                    _check_scalar(row[key], source, index, key)
            key = row.get(group_key) if group_key else index
            if group_key and key is None:
                raise PoolError(f"{source}: row {index} has no {group_key!r}")
            groups.setdefault(key, []).append(index)

        width = max(len(members) for members in groups.values())
        rewards = np.zeros((len(groups), width, len(value_names)))
        mask = np.zeros((len(groups), width), dtype=bool)
        for prompt_row, members in enumerate(groups.values()):
            rewards[prompt_row, : len(members)] = values[members]
            mask[prompt_row, : len(members)] = True
        prompts = None
        if "prompt" in text_keys:
            prompts = tuple(str(rows[members[0]]["prompt"]) for members in groups.values())
        generations = None
        if "generated" in text_keys:
            generations = tuple(tuple(str(rows[i]["generated"]) for i in members) for members in groups.values())
        return cls(rewards, mask, value_names, prompts, generations)

    # ----------------------------------------------------------------- views

    @property
    def num_prompts(self) -> int:
        return int(self.rewards.shape[0])

    @property
    def num_samples(self) -> int:
        """Number of valid samples over all prompts."""
        return int(self.mask.sum())

    @property
    def num_values(self) -> int:
        return len(self.value_names)

    @functools.cached_property
    def _flat(self) -> np.ndarray:
        flat = self.rewards.reshape(-1, self.num_values) if self.mask.all() else self.rewards[self.mask]
        flat = np.array(flat)  # own copy, so that freezing it leaves ``rewards`` writable
        flat.flags.writeable = False
        return flat

    @functools.cached_property
    def _column_stats(self) -> dict[str, np.ndarray]:
        flat = self._flat
        mean, spread = scaled_moments(flat)
        stats = {"mean": mean, "std": spread, "min": flat.min(axis=0), "max": flat.max(axis=0)}
        for array in stats.values():
            array.flags.writeable = False
        return stats

    def flat(self) -> np.ndarray:
        """Rewards of the valid samples as [n, values], prompt by prompt (read-only; computed once)."""
        return self._flat

    def spread(self) -> np.ndarray:
        """Standard deviation of each value over the valid samples."""
        return self._column_stats["std"]

    def value_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) of each value over the valid samples."""
        return self._column_stats["min"], self._column_stats["max"]

    def prompt_index(self) -> np.ndarray:
        """For each row of :meth:`flat`, the index of its prompt."""
        return np.nonzero(self.mask)[0]

    def index_of(self, name: str) -> int:
        """Column of a value; the error lists the known values."""
        try:
            return self.value_names.index(name)
        except ValueError:
            raise PoolError(f"unknown value {name!r}; this pool has {list(self.value_names)}") from None

    def select(self, names: Sequence[str]) -> "RewardPool":
        """A pool with only the named value columns, in the given order."""
        columns = [self.index_of(name) for name in names]
        return RewardPool(self.rewards[:, :, columns], self.mask, tuple(names), self.prompts, self.generations)

    def means(self) -> np.ndarray:
        """c0 = E_{p0} r over the valid samples, pooled."""
        return self._column_stats["mean"]

    def summary(self, quantiles: Sequence[float] = SUMMARY_QUANTILES) -> list[ValueSummary]:
        """Mean, standard error, range and quantiles of each value (the authors' realised c-levels table)."""
        flat = self.flat()
        n = flat.shape[0]
        stats = []
        for column, name in enumerate(self.value_names):
            values = flat[:, column]
            se = float(scaled_moments(values, ddof=1)[1] / math.sqrt(n)) if n > 1 else float("nan")
            stats.append(
                ValueSummary(
                    name=name,
                    mean=float(values.mean()),
                    standard_error=se,
                    minimum=float(values.min()),
                    maximum=float(values.max()),
                    quantiles={q: float(np.quantile(values, q)) for q in quantiles},
                )
            )
        return stats

    # ----------------------------------------------------------------- files

    def records(self) -> list[dict[str, Any]]:
        """One record per valid sample: the authors' schema (``prompt``, ``generated``, values) with the
        ``prompt_id`` of its prompt row, so that reading it back gives the same rows even when texts repeat."""
        out = []
        for prompt_row in range(self.num_prompts):
            for slot, sample in enumerate(np.flatnonzero(self.mask[prompt_row])):
                # The prompt row is the grouping key in every format: prompt texts may repeat (two rows asked
                # the same prompt), and grouping by text on reading would merge them.
                record: dict[str, Any] = {"prompt_id": prompt_row}
                if self.prompts is not None:
                    record["prompt"] = self.prompts[prompt_row]
                if self.generations is not None:
                    record["generated"] = self.generations[prompt_row][slot]
                for column, name in enumerate(self.value_names):
                    record[name] = float(self.rewards[prompt_row, sample, column])
                out.append(record)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, value_names: Sequence[str] | None = None) -> "RewardPool":
        """Read a pool from ``.json`` (the authors' pilot schema), ``.jsonl`` or ``.parquet``.

        A ``.json.gz`` or ``.jsonl.gz`` file is decompressed on the fly (the shipped pilot set is one).
        """
        if not isinstance(path, (str, os.PathLike)):
            raise PoolError(f"path must be a file path (a str or a Path), got a {type(path).__name__}")
        path = Path(path)
        if not path.is_file():
            raise PoolError(f"{path}: no such file")
        suffix, compressed = _pool_format(path)
        if compressed and suffix == ".parquet":
            raise PoolError(f"{path}: Parquet is compressed inside the file; do not gzip it")

        def read_text() -> str:
            try:
                if compressed:
                    with gzip.open(path, "rt", encoding="utf-8") as handle:
                        return handle.read()
                return path.read_text(encoding="utf-8")
            except (OSError, EOFError, UnicodeDecodeError, zlib.error) as error:
                raise PoolError(f"{path}: cannot be read ({error}); is the file truncated?") from None

        if suffix == ".json":
            data = loads(read_text(), str(path), PoolError, keep_oversized_integers=True)
            if isinstance(data, Mapping) and "records" in data:
                data = data["records"]
            if not isinstance(data, list):
                raise PoolError(f"{path}: expected a JSON list of records, found a {type(data).__name__}")
            rows = data
        elif suffix == ".jsonl":
            rows = []
            for line_number, line in enumerate(read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                rows.append(loads(line, f"{path}: line {line_number}", PoolError, keep_oversized_integers=True))
        elif suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except (pyarrow.ArrowException, OSError) as error:
                raise PoolError(f"{path}: not a readable Parquet file ({error})") from None
        else:
            raise PoolError(f"{path}: unknown pool format {suffix!r}; use .json, .jsonl or .parquet (or .json.gz, .jsonl.gz)")
        return cls.from_records(rows, value_names=value_names, source=str(path))

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the pool as ``.json``, ``.jsonl`` or ``.parquet`` (by suffix); never replaces a file unasked."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".json", ".jsonl", ".parquet"):
            raise PoolError(f"{path}: unknown pool format {suffix!r}; use .json, .jsonl or .parquet")
        if path.exists() and not overwrite:
            raise PoolError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        records = self.records()
        # Write beside the target and rename, so an interrupted save never leaves a truncated pool.
        partial = path.with_name(path.name + ".partial")
        if suffix == ".json":
            partial.write_text(json.dumps(records, indent=1), encoding="utf-8")
        elif suffix == ".jsonl":
            with partial.open("w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")
        else:
            import pyarrow
            import pyarrow.parquet as pq

            pq.write_table(pyarrow.Table.from_pylist(records), partial)
        os.replace(partial, path)
        return path


def _pool_format(path: Path) -> tuple[str, bool]:
    """(format suffix, gzip-compressed) of a pool file: ``a.json.gz`` is (".json", True)."""
    suffixes = [suffix.lower() for suffix in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        return (suffixes[-2] if len(suffixes) > 1 else ""), True
    return (suffixes[-1] if suffixes else ""), False


def _numeric_fields(rows: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """Fields holding a number in any row (never the text and grouping columns), in order of first appearance."""
    names: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if key not in TEXT_COLUMNS and key not in names and _is_number(value):
                names[key] = None
    return tuple(names)


def _is_number(value: Any) -> bool:
    """A real number (Python's or numpy's), or an integer too long for the JSON reader (refused by row later)."""
    if type(value) in (float, int):   # the common case, before the slower abstract checks (bool is not int here)
        return True
    if isinstance(value, OversizedInteger):
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _reward(raw: Any, source: str, row: int, name: str) -> float:
    """One reward of a record as a finite float; the error names the row and value."""
    if isinstance(raw, OversizedInteger):
        raise PoolError(
            f"{source}: row {row}, value {name!r} is an integer of {raw.digits} digits, too large for a float64; "
            "rescale the rewards"
        )
    if not _is_number(raw):
        raise PoolError(f"{source}: row {row}, value {name!r} is {_shown(raw)}, expected a number")
    try:
        number = float(raw)
    except OverflowError:
        raise PoolError(
            f"{source}: row {row}, value {name!r} is an integer of {len(str(abs(raw)))} digits, too large for a "
            "float64; rescale the rewards"
        ) from None
    if not math.isfinite(number):
        raise PoolError(f"{source}: row {row}, value {name!r} is {raw}: rewards must be finite")
    return number


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that an error about a huge field stays one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_scalar(value: Any, source: str, row: int, key: str) -> None:
    """A prompt, generated text or prompt_id is text or a finite number: a list or an object cannot group rows
    (it is not hashable) and is not text."""
    if isinstance(value, str):
        return
    if _is_number(value) and not isinstance(value, OversizedInteger) and math.isfinite(value):
        return
    what = "an integer too long to read" if isinstance(value, OversizedInteger) else f"a {type(value).__name__}"
    raise PoolError(f"{source}: row {row}, {key!r} is {what} ({_shown(value)}), expected text or a number")


def _texts(texts: Any, argument: str) -> tuple[str, ...]:
    """A list of texts (prompts, or one prompt's generations) as a tuple; anything else names ``argument``."""
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Iterable):
        raise PoolError(f"{argument} must be a list of texts, got a {type(texts).__name__}")
    texts = tuple(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise PoolError(f"{argument}[{index}] is a {type(text).__name__} ({_shown(text)}), expected text")
    return texts


def _mask_array(mask: Any) -> np.ndarray:
    """The pool's mask as bool: booleans, or numbers that are all 0 or 1."""
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        return mask
    array = real_array(mask, "mask", PoolError)
    if not np.isin(array, (0.0, 1.0)).all():
        raise PoolError("mask must hold True/False (or 1/0) for each [prompt, sample] slot")
    return array.astype(bool)


# The kinds of numpy array a numeric argument may arrive as: booleans, integers, floats, and Python objects
# (checked one by one on conversion). Complex, text, dates and bytes are refused, never truncated or parsed.
_REAL_KINDS = "biufO"


def real_array(value: Any, argument: str, error: type[Exception] = InputError) -> np.ndarray:
    """``value`` as a float64 array; anything that is not an array of real numbers is ``error`` naming
    ``argument``. Complex numbers are refused (numpy would silently drop the imaginary part), as are texts
    (numpy would parse "1.5") and ragged nested lists."""
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError, OverflowError) as reason:
        raise error(f"{argument} must be a numeric array ({reason})") from None
    if raw.dtype.kind == "c":
        raise error(f"{argument} holds complex numbers; pass real numbers (the imaginary part would be lost)")
    if raw.dtype.kind not in _REAL_KINDS:
        raise error(f"{argument} must be a numeric array, got an array of {raw.dtype} ({_shown(value)})")
    if raw.dtype.kind == "O" and any(isinstance(item, (complex, np.complexfloating)) for item in raw.flat):
        raise error(f"{argument} holds complex numbers; pass real numbers (the imaginary part would be lost)")
    try:
        return np.asarray(raw, dtype=np.float64)
    except OverflowError:
        raise error(f"{argument} holds a number too large for a float64; rescale it") from None
    except (TypeError, ValueError) as reason:
        raise error(f"{argument} must be a numeric array ({reason})") from None


def scaled_moments(array: np.ndarray, axis: int = 0, ddof: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard deviation) along ``axis``, free of overflow and underflow at any finite scale.

    ``np.std`` squares the deviations: rewards of size 1e-200 square to 0 and of size 1e200 to inf, and the
    spread (the unit of every solver tolerance) is lost. Each column is first divided by the power of two
    nearest above its largest magnitude, which is exact, so on ordinary rewards the results are the same bits
    as numpy's own.
    """
    array = np.asarray(array, dtype=np.float64)
    exponent = np.frexp(np.max(np.abs(array), axis=axis, keepdims=True))[1]
    unit = np.ldexp(array, -exponent)
    mean = np.ldexp(unit.mean(axis=axis, keepdims=True), exponent)
    spread = np.ldexp(unit.std(axis=axis, ddof=ddof, keepdims=True), exponent)
    return np.squeeze(mean, axis=axis), np.squeeze(spread, axis=axis)


def repeated_names(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, in order of first appearance."""
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name for name, count in seen.items() if count > 1]


def unique_names(
    names: Iterable[str], argument: str = "values", error: type[Exception] = InputError
) -> tuple[str, ...]:
    """``names`` as a tuple of strings; naming a value twice is an error that lists the repeats."""
    names = name_list(names, argument, error)
    repeated = repeated_names(names)
    if repeated:
        raise error(f"{argument} names {repeated} more than once: {list(names)}")
    return names


def name_list(names: Iterable[str], argument: str = "values", error: type[Exception] = InputError) -> tuple[str, ...]:
    """``names`` (a list of value names, each a text) as a tuple; anything else is ``error`` naming ``argument``."""
    if isinstance(names, str):
        raise error(f"{argument} must be a list of value names, got the string {names!r}")
    if not isinstance(names, Iterable):
        raise error(f"{argument} must be a list of value names, got a {type(names).__name__}")
    names = tuple(names)
    for name in names:
        if not isinstance(name, str):
            raise error(f"{argument} must be a list of value names (texts), but holds a {type(name).__name__} "
                        f"({_shown(name)})")
    return names


PoolLike = Union[RewardPool, np.ndarray, Sequence[Sequence[float]]]


def as_pool(data: PoolLike, values: Sequence[str] | None = None) -> RewardPool:
    """The one coercion of reward data at every public entry point.

    ``data`` is a RewardPool (returned as it is; ``values`` then concerns the caller's other arguments, not the
    pool), or a plain array: [n, values] with one sample each, [prompts, samples, values], or nested lists of
    either. An array's columns are named by ``values`` (default ``r0, r1, ...``), which must then name every
    column once.
    """
    if values is not None:
        values = unique_names(values)
    if isinstance(data, RewardPool):
        return data
    if values is not None:
        try:
            columns = np.shape(data)[-1] if np.ndim(data) > 1 else 1
        except ValueError:
            columns = None  # ragged nested lists: from_array names the problem
        if columns is not None and columns != len(values):
            raise PoolError(
                f"values names {len(values)} columns {list(values)} but the reward array has {columns} "
                f"(shape {np.shape(data)}); name every column once"
            )
    return RewardPool.from_array(data, value_names=values)
