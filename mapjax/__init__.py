"""mapjax: MAP (Multi-Human-Value Alignment Palette) in JAX.

The top level holds the solver's public surface: a pool of rewards, palettes, the λ solver and its results.
Everything downstream (models, sampling, rewards, MAP-D, MAP-F, evaluation, plots) lives in its own module.
"""

from mapjax.certificate import Certificate
from mapjax.errors import MapjaxError
from mapjax.palette import Palette, palette_targets, quantile_palette
from mapjax.palette import parse as parse_palette
from mapjax.pool import RewardPool, as_pool
from mapjax.solver import Solution, Solutions, evaluate_lambdas, solve, solve_many, solve_sequential

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
