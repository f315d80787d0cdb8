"""How often each jitted function of the sampler was traced: each trace is one compilation.

Tests read it through ``trace_counts()`` to check that length buckets and the engine's refills reuse programs.
"""

from __future__ import annotations

import collections

TRACE_COUNTS: collections.Counter[str] = collections.Counter()


def count_trace(name: str) -> None:
    """Called at the top of a jitted function's Python body: runs once per trace."""
    TRACE_COUNTS[name] += 1


def trace_counts() -> dict[str, int]:
    """How many times each of the sampler's jitted functions (``prefill``, ``sample_loop``, ``sample_chunk``,
    ``score``, ...) was traced."""
    return dict(TRACE_COUNTS)
