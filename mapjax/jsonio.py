"""Strict JSON output: every file and every ``--json`` print mapjax writes goes through :func:`dumps`.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which no strict JSON reader accepts. Here numpy
scalars and arrays become Python numbers and lists, paths become text, and a non-finite number becomes
``null``; ``allow_nan=False`` then guarantees the text is valid JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


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
