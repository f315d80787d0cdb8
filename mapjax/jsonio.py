"""Strict JSON: every file and every ``--json`` print mapjax writes goes through :func:`dumps`, and JSON that
comes from a user (pool files, the explorer's request bodies) is read with :func:`loads`.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader accepts. Here numpy
scalars and arrays become Python numbers and lists, paths become text, and a non-finite number becomes
``null``; ``allow_nan=False`` then guarantees the text is valid JSON.

Reading, Python's ``json`` fails in three ways besides a syntax error, none of them a ``JSONDecodeError``: an
integer longer than Python's int-string limit (4300 digits) is a bare ``ValueError``, deep nesting a
``RecursionError``, and bytes that are not UTF-8 a ``UnicodeDecodeError``. :func:`loads` turns every one into
the caller's :class:`~mapjax.errors.MapjaxError`, naming where the text came from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from mapjax.errors import InputError, MapjaxError


def jsonable(value: Any) -> Any:
    """``value`` with numpy types, paths, tuples and dataclasses turned into JSON types, NaN and ±inf into None."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def dumps(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON text of ``value`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(value), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | os.PathLike, value: Any, *, indent: int | None = 2) -> Path:
    """Write ``value`` as strict JSON to ``path``; returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent) + "\n", encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True)
class OversizedInteger:
    """An integer in JSON text too long for Python to convert (over its int-string limit, 4300 digits by
    default), kept as its digit count so that a reader can name the row and field it sits in. Any such integer
    is also far beyond float64's range (309 digits)."""

    digits: int


class _IntegerTooLong(Exception):
    def __init__(self, digits: int):
        self.digits = digits


def loads(
    text: str | bytes,
    where: str,
    error: type[MapjaxError] = InputError,
    *,
    keep_oversized_integers: bool = False,
) -> Any:
    """Parse JSON from a user; every way it can fail is ``error`` with a message that starts with ``where``.

    ``keep_oversized_integers``: an integer too long to convert becomes an :class:`OversizedInteger` (so the
    caller can name its row) instead of an error.
    """

    def integer(digits: str) -> Any:
        try:
            return int(digits)
        except ValueError:   # over the int-string limit: the only way int() fails on JSON's digits
            count = len(digits.lstrip("-"))
            if keep_oversized_integers:
                return OversizedInteger(count)
            raise _IntegerTooLong(count) from None

    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text).decode("utf-8")
        return json.loads(text, parse_int=integer)
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text") from None
    except _IntegerTooLong as long_integer:
        raise error(
            f"{where} holds an integer of {long_integer.digits} digits; numbers that long are refused (float64 "
            "reaches about 1.8e308)"
        ) from None
    except json.JSONDecodeError as decode_error:
        raise error(f"{where} is not valid JSON ({decode_error})") from None
    except RecursionError:
        raise error(f"{where} nests too deeply to be read (lists or objects hundreds of levels inside each other)") from None
    except ValueError as value_error:   # any other refusal of the decoder
        raise error(f"{where} cannot be read as JSON ({value_error})") from None
