"""XLA:CPU flags that mapjax sets when it is imported, measured before being kept.

XLA reads ``XLA_FLAGS`` once, when JAX starts its backend (the first array or compilation), so
``apply_defaults()`` runs from ``mapjax/__init__.py`` before anything in mapjax touches JAX.  It
adds a flag only

* if the backend has not started yet (otherwise it could not take effect; a debug log says so),
* if the user's own ``XLA_FLAGS`` does not already name that flag (a user's value always wins),
* unless ``MAPJAX_XLA_DEFAULTS=0`` (or ``false``/``no``/``off``) is set in the environment.

``DEFAULT_FLAGS`` holds the flags kept, with the measurement behind them (``python benchmarks/xla_flags.py``
reruns it, with a ``mapjax`` flag set for exactly these defaults when there are any).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

OPT_OUT_VARIABLE = "MAPJAX_XLA_DEFAULTS"
"""Environment variable: set it to 0/false/no/off to keep mapjax from adding any XLA flag."""

DEFAULT_FLAGS: dict[str, str] = {}
"""Flag name (without ``--``) -> value, added to ``XLA_FLAGS`` when mapjax is imported.

Empty, because no flag earned its place.  ``benchmarks/xla_flags.py`` (jaxlib 0.10.2, 2-core AMD EPYC, float32,
2026-11-29; each flag set in its own process, interleaved, 3 rounds, CPU time per call) measured SmolLM2-135M
and GPT-2 small forwards at 16 x 128 tokens, MiniLM-L6 at 64 x 128 and a SmolLM2 decode step at batch 64,
against an A/A control whose spread was about +-5%:

* ``--xla_cpu_experimental_ynn_fusion_type=+eltwise`` (elementwise ops into YNNPACK): 0.86x / 0.88x / 0.58x /
  1.00x: it splits GELU and the norms into many small YNNPACK kernels;
* YNNPACK off (``--xla_cpu_experimental_ynn_fusion_type=``), or only for fused dots (``=-individual_dot``):
  forwards 0.98-1.01x, decode step 0.66x;
* ``--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY``: no effect with YNNPACK on,
  and with it off the very same program as YNNPACK off;
* ``--xla_cpu_use_onednn=true``, ``--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME``,
  ``--xla_llvm_disable_expensive_passes=true``: the same HLO and LLVM IR as the default (no-ops);
* ``--xla_cpu_prefer_vector_width=512``, ``--xla_cpu_enable_fast_math=true``,
  ``--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE``, ``--xla_backend_optimization_level=1``: different
  code, outputs within 2e-6 of the default, speed 0.92-1.05x and compile time unchanged: noise.

The mechanism stays (and is tested) so that a flag that does win on a later jaxlib goes in here with its numbers.
"""

_FLAG_NAME = re.compile(r"--([A-Za-z0-9_]+)")


def opted_out(environ: MutableMapping[str, str] | None = None) -> bool:
    """Whether the user turned the defaults off with ``MAPJAX_XLA_DEFAULTS``."""
    environ = os.environ if environ is None else environ
    return environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off")


def backend_started() -> bool:
    """Whether JAX has already started a backend (after which ``XLA_FLAGS`` is no longer read)."""
    if "jax" not in sys.modules:  # not even imported: nothing can have started
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:  # a JAX without this module: assume the worst, never change flags late
        return True
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return True if started is None else bool(started())


def flags_named(xla_flags: str) -> set[str]:
    """The flag names an ``XLA_FLAGS`` string sets (``--name=value`` or ``--name``)."""
    return set(_FLAG_NAME.findall(xla_flags))


def merged_flags(user_flags: str, defaults: dict[str, str]) -> tuple[str, list[str]]:
    """``user_flags`` plus every default it does not name; returns the new string and the flags added."""
    present = flags_named(user_flags)
    added = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([user_flags.strip(), *added]).strip(), added


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   defaults: dict[str, str] | None = None) -> list[str]:
    """Add mapjax's default XLA:CPU flags to ``XLA_FLAGS``; returns the flags added (possibly none)."""
    environ = os.environ if environ is None else environ
    defaults = DEFAULT_FLAGS if defaults is None else defaults
    if not defaults or opted_out(environ):
        return []
    if backend_started():
        logger.debug("JAX's backend already started; mapjax's XLA flags %s not applied", defaults)
        return []
    new_flags, added = merged_flags(environ.get("XLA_FLAGS", ""), defaults)
    if added:
        environ["XLA_FLAGS"] = new_flags
        logger.debug("added XLA flags %s", added)
    return added
