"""λ as a vector over a pool's values, from whatever form a caller holds it in: a :class:`Solution`, a
``{value: λ}`` mapping or a plain vector. MAP-D, finetuning, the plots and the experiments all take λ this way."""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence, Union

import numpy as np

from mapjax.errors import DecodeError
from mapjax.pool import PoolLike, as_pool
from mapjax.solver.solution import DEGENERATE_ESS, Solution, below_threshold_text

LambdaLike = Union[Solution, Mapping[str, float], np.ndarray, Sequence[float]]


def lambda_for(pool: PoolLike, lam: LambdaLike, *, values: Sequence[str] | None = None) -> np.ndarray:
    """λ over the pool's values, from a Solution (matched by value name: it may come from another pool),
    a {value: λ} mapping (missing values get 0), or a vector in the pool's value order."""
    pool = as_pool(pool, values)
    if isinstance(lam, Solution):
        lam = solution_lambda(lam)
    if isinstance(lam, Mapping):
        vector = np.zeros(pool.num_values)
        for name, value in lam.items():
            if name in pool.value_names:
                vector[pool.index_of(name)] = value
            elif value != 0:
                raise DecodeError(f"λ for {name!r} is {value} but the candidates were not scored for it; "
                                  f"they have {list(pool.value_names)}")
        lam = vector
    try:
        vector = np.asarray(lam, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as error:
        raise DecodeError(f"λ must be a Solution, a {{value: λ}} mapping or a vector of numbers ({error})") from None
    if vector.shape[0] != pool.num_values:
        raise DecodeError(f"λ has {vector.shape[0]} entries for the pool's {pool.num_values} values "
                          f"{list(pool.value_names)}")
    if not np.all(np.isfinite(vector)):
        raise DecodeError(f"λ must be finite, got {vector.tolist()} (an infeasible palette has no λ to decode with)")
    if np.any(vector < 0):
        raise DecodeError(f"λ must be non-negative, got {vector.tolist()}")
    return vector


def solution_lambda(solution: Solution) -> dict[str, float]:
    """A Solution's λ by value name: refused when its palette is infeasible, and used with a warning when p_λ is
    degenerate (the choice then all but copies the best candidate of each prompt)."""
    if solution.status == "infeasible":
        explanation = f": {solution.certificate.explain()}" if solution.certificate is not None else ""
        raise DecodeError(f"the palette is infeasible{explanation}; an infeasible palette has no λ to decode with "
                          "(try mapjax.adjust for the nearest reachable one)")
    if solution.degenerate:
        warnings.warn(
            "decoding with a degenerate λ: p_λ's effective sample size (ESS) is "
            f"{below_threshold_text(solution.ess, DEGENERATE_ESS)} < {DEGENERATE_ESS:g}, so it sits on about one "
            "sample per group and MAP-D will keep the best candidate almost always; the palette is at the edge of "
            "what the samples reach (mapjax.adjust backs it off)",
            UserWarning,
            stacklevel=2,  # one location for every entry point, so the same λ is warned about once
        )
    return dict(zip(solution.value_names, solution.lam))
