"""The λ solver: MAP's dual, solved exactly and for many palettes at once, and a replica of the authors' solver.

Data flow, one module per step:

- :mod:`~mapjax.solver.api`: the public entry points; coerce the data and palettes, check the settings;
- :mod:`~mapjax.solver.driver`: device copies, batch buckets, the rounds of the kernel, precision;
- :mod:`~mapjax.solver.newton`: the pure-JAX projected-Newton kernel (typed loop state);
- :mod:`~mapjax.solver.reference`: the authors' Adam solver, replicated in PyTorch's float32 arithmetic;
- :mod:`~mapjax.solver.assemble`: verdicts settled against the LP, certificates, sensitivity;
- :mod:`~mapjax.solver.solution`: what comes back, :class:`Solution` and :class:`Solutions`;
- :mod:`~mapjax.solver.lambdas`: λ as a vector over a pool's values, from a Solution, a mapping or a vector.

The problem itself (standardized groups, p_λ's weights) is :mod:`mapjax.problem`; the LP certificate is
:mod:`mapjax.certificate`.
"""

from mapjax.solver.api import METHODS, Method, check_settings, evaluate_lambdas, solve, solve_many, solve_sequential
from mapjax.solver.driver import DEFAULT_TOLERANCE
from mapjax.solver.lambdas import LambdaLike, lambda_for
from mapjax.solver.reference import reference_lambdas
from mapjax.solver.solution import DEGENERATE_ESS, STATUSES, Solution, Solutions, concatenate

__all__ = [
    "DEFAULT_TOLERANCE",
    "DEGENERATE_ESS",
    "LambdaLike",
    "METHODS",
    "Method",
    "STATUSES",
    "Solution",
    "Solutions",
    "check_settings",
    "concatenate",
    "evaluate_lambdas",
    "lambda_for",
    "reference_lambdas",
    "solve",
    "solve_many",
    "solve_sequential",
]
