"""mapjax: MAP (Multi-Human-Value Alignment Palette) in JAX.

The top level holds the solver's public surface: a pool of rewards, palettes, the λ solver and its results.
Everything downstream (models, sampling, rewards, MAP-D, MAP-F, evaluation, plots) lives in its own module.
Importing mapjax adds its measured XLA:CPU defaults to ``XLA_FLAGS`` (``mapjax.xla_cpu``; never over a flag the
user set, never after JAX's backend started; ``MAPJAX_XLA_DEFAULTS=0`` turns it off).
"""

from mapjax import xla_cpu

# First, before any mapjax module can start JAX's backend: XLA reads XLA_FLAGS only when it starts.
xla_cpu.apply_defaults()

from mapjax.certificate import Certificate  # noqa: E402
from mapjax.errors import MapjaxError  # noqa: E402
from mapjax.palette import Palette, palette_targets, quantile_palette  # noqa: E402
from mapjax.palette import parse as parse_palette  # noqa: E402
from mapjax.pool import RewardPool, as_pool  # noqa: E402
from mapjax.solver import Solution, Solutions, evaluate_lambdas, solve, solve_many, solve_sequential  # noqa: E402

__all__ = [
    "Certificate",
    "MapjaxError",
    "Palette",
    "RewardPool",
    "Solution",
    "Solutions",
    "as_pool",
    "evaluate_lambdas",
    "palette_targets",
    "parse_palette",
    "quantile_palette",
    "solve",
    "solve_many",
    "solve_sequential",
]
__version__ = "0.1.0"
