"""Requests checked against what this machine can hold, before any file is written or any model loaded.

A count such as ``--samples 100000000000000000000`` is a valid integer, and used to fail late: an
``OverflowError`` from numpy after the build's manifest was written, or an out-of-memory kill after minutes.
Each check here estimates the memory a request needs from its sizes alone (never from a model), compares it
with the machine's physical memory, and raises :class:`mapjax.errors.LimitError` with both numbers. The
estimates are lower bounds of what the work holds at once, so a request they pass may still be too big for a
small accelerator, but one they refuse cannot run.
"""

from __future__ import annotations

import operator
import os
from typing import Any

from mapjax.errors import LimitError

# The largest count any array dimension may take: JAX indexes with int32.
MAX_COUNT = 2**31 - 1
# What one sampled row costs in memory, besides its values: token ids and log-probabilities (int32 + float32
# per new token while sampling), its decoded text (about 4 bytes a token as a Python string), and the record
# and string objects around it.
BYTES_PER_NEW_TOKEN = 4 + 4 + 4
BYTES_PER_ROW = 400
# A grid point of `adjust --method grid` keeps a float64 weight per sample of the pool, and the solver a few
# working copies of it.
GRID_COPIES_PER_POINT = 4


def machine_memory() -> int:
    """This machine's physical memory in bytes (``MAPJAX_MEMORY_BYTES`` overrides it, e.g. to leave room for
    other jobs); 2**40 where the system does not say."""
    override = os.environ.get("MAPJAX_MEMORY_BYTES")
    if override:
        try:
            return max(1, int(override))
        except ValueError:
            raise LimitError(f"MAPJAX_MEMORY_BYTES={override!r} is not a whole number of bytes") from None
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 2**40


def human_bytes(count: float) -> str:
    """``count`` bytes as a person reads it: 1.5 GB, 320 MB, 1.2e+12 TB."""
    for unit in ("bytes", "KB", "MB", "GB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} TB" if count < 1e6 else f"{count:.3g} TB"


def check_count(name: str, value: Any, maximum: int = MAX_COUNT) -> Any:
    """``value`` unchanged when it is not a whole number or is at most ``maximum`` (by default what an array
    dimension can take); a larger one is refused."""
    if value is None or isinstance(value, bool):
        return value
    try:
        number = operator.index(value)
    except TypeError:
        return value
    if number > maximum:
        raise LimitError(f"{name} {number} is more than this machine can handle (at most {maximum:,})")
    return value


def check_fits(what: str, needed: float, *, hint: str = "") -> None:
    """Refuse a request whose estimated memory ``needed`` (bytes) exceeds the machine's memory."""
    available = machine_memory()
    if needed > available:
        raise LimitError(f"{what} needs about {human_bytes(needed)} of memory, more than this machine's "
                         f"{human_bytes(available)}" + (f"; {hint}" if hint else ""))


def check_sampled_rows(prompts: int, samples: int, *, max_new_tokens: int, values: int, flag: str = "--samples",
                       batch_size: int | None = None, chunk_size: int | None = None,
                       prompt_chars: float = 0.0) -> None:
    """A pool (or MAP-D's candidates) of ``prompts`` x ``samples`` rows of ``max_new_tokens`` tokens and
    ``values`` scores: every count fits an array, and the whole pool fits in memory (it is held at once when
    it is written and read back, each row with its own copy of its prompt, ``prompt_chars`` long on average)."""
    for name, value in ((flag, samples), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size),
                        ("--chunk-size", chunk_size)):
        if value is not None:
            check_count(name, value)
    rows = int(prompts) * int(samples)
    check_count(f"{prompts} prompts x {flag} {samples} =", rows)
    per_row = BYTES_PER_ROW + BYTES_PER_NEW_TOKEN * int(max_new_tokens) + 8 * int(values) + float(prompt_chars)
    check_fits(f"{prompts} prompts x {samples} samples ({rows:,} rows of up to {max_new_tokens} tokens)",
               float(rows) * per_row, hint=f"lower {flag} or --max-new-tokens, or use fewer prompts (--count)")


def check_grid_points(points: int, pool_rows: int, *, flag: str = "points") -> None:
    """``points`` palettes solved at once on a pool of ``pool_rows`` samples fit in memory."""
    check_count(flag, points)
    needed = float(points) * max(1, int(pool_rows)) * 8 * GRID_COPIES_PER_POINT
    check_fits(f"a grid of {points:,} points on a pool of {pool_rows:,} samples", needed,
               hint=f"lower {flag}")
