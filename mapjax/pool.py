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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from mapjax.errors import InputError, PoolError

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
        rewards = np.asarray(self.rewards, dtype=np.float64)
        mask = np.asarray(self.mask, dtype=bool)
        names = tuple(str(name) for name in self.value_names)
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
        if self.prompts is not None and len(self.prompts) != rewards.shape[0]:
            raise PoolError(f"{len(self.prompts)} prompts for {rewards.shape[0]} prompt rows")
        if self.generations is not None:
            counts = mask.sum(axis=1)
            if len(self.generations) != rewards.shape[0] or any(
                len(texts) != count for texts, count in zip(self.generations, counts)
            ):
                raise PoolError("generations must hold one text per valid sample of each prompt")
        object.__setattr__(self, "rewards", np.where(mask[:, :, None], rewards, 0.0))
        object.__setattr__(self, "mask", mask)
        object.__setattr__(self, "value_names", names)

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_array(
        cls,
        rewards: np.ndarray | Sequence[Sequence[float]],
        value_names: Sequence[str] | None = None,
        mask: np.ndarray | None = None,
    ) -> "RewardPool":
        """A pool from an array: [n, values] (one sample per prompt) or [prompts, samples, values]."""
        try:
            array = np.asarray(rewards, dtype=np.float64)
        except OverflowError:
            raise PoolError("rewards hold a number too large for a float64; rescale them") from None
        except (TypeError, ValueError) as error:
            raise PoolError(
                f"rewards must be a numeric array [n, values] or [prompts, samples, values] ({error})"
            ) from None
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
        lacks a value, or holds something other than a finite number there, is an error naming its row.
        """
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
        stats = {"mean": flat.mean(axis=0), "std": flat.std(axis=0), "min": flat.min(axis=0), "max": flat.max(axis=0)}
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
            se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
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
        """One record per valid sample, in the authors' schema (``prompt``, ``generated``, values)."""
        out = []
        for prompt_row in range(self.num_prompts):
            for slot, sample in enumerate(np.flatnonzero(self.mask[prompt_row])):
                record: dict[str, Any] = {}
                if self.prompts is not None:
                    record["prompt"] = self.prompts[prompt_row]
                else:
                    record["prompt_id"] = prompt_row
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
            except (OSError, EOFError, UnicodeDecodeError) as error:
                raise PoolError(f"{path}: cannot be read ({error}); is the file truncated?") from None

        if suffix == ".json":
            try:
                data = json.loads(read_text())
            except json.JSONDecodeError as error:
                raise PoolError(f"{path}: not valid JSON ({error}); is the file truncated?") from None
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
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise PoolError(
                        f"{path}: line {line_number} is not valid JSON ({error}); is the file truncated?"
                    ) from None
        elif suffix == ".parquet":
            import pyarrow
            import pyarrow.parquet as pq

            try:
                rows = pq.read_table(path).to_pylist()
            except (pyarrow.ArrowInvalid, OSError) as error:
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
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reward(raw: Any, source: str, row: int, name: str) -> float:
    """One reward of a record as a finite float; the error names the row and value."""
    if not _is_number(raw):
        raise PoolError(f"{source}: row {row}, value {name!r} is {raw!r}, expected a number")
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
    if isinstance(names, str):
        raise error(f"{argument} must be a list of value names, got the string {names!r}")
    names = tuple(str(name) for name in names)
    repeated = repeated_names(names)
    if repeated:
        raise error(f"{argument} names {repeated} more than once: {list(names)}")
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
