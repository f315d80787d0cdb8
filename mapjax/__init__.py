"""mapjax: MAP (Multi-Human-Value Alignment Palette) in JAX."""

from mapjax.certificate import Certificate
from mapjax.dual import Solution, Solutions, evaluate_lambdas, solve, solve_many, solve_sequential
from mapjax.palette import Palette, parse as parse_palette, quantile_palette
from mapjax.pool import RewardPool

__all__ = [
    "Certificate",
    "Palette",
    "RewardPool",
    "Solution",
    "Solutions",
    "evaluate_lambdas",
    "parse_palette",
    "quantile_palette",
    "solve",
    "solve_many",
    "solve_sequential",
]
__version__ = "0.1.0"
