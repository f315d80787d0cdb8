"""The λ solver's public entry points: :func:`solve`, :func:`solve_many`, :func:`solve_sequential`,
:func:`evaluate_lambdas`.

Each takes reward data as a RewardPool or a plain [n, values] array (:func:`mapjax.pool.as_pool`) and palettes
in any form (:func:`mapjax.palette.palette_targets`), checks every setting before any work, then runs
coercion -> :class:`~mapjax.problem.DualProblem` -> driver (exact kernel or reference replica) -> assembly.

Each also takes ``mesh`` (a ``jax.sharding.Mesh``, a spec such as ``"data=8"`` or ``{"data": 2, "model": 4}``,
or None for one device; see :mod:`mapjax.sharding`): the pool's samples are split over its ``data``/``fsdp``
axes and a batch of palettes over its ``model`` axis (:mod:`mapjax.solver.placement`); λ is the one-device λ.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Literal, Sequence

import numpy as np

from mapjax.errors import PaletteError, SolverError
from mapjax.palette import Palettes, is_spec, palette_count, palette_targets, parse
from mapjax.pool import PoolLike, RewardPool, as_pool, real_array, unique_names
from mapjax.problem import DTYPES, NORMALISERS, DType, DualProblem, Normaliser
from mapjax.solver.assemble import assemble
from mapjax.solver.driver import DEFAULT_TOLERANCE, exact_sequential, measured, solve_exact
from mapjax.solver.placement import Placement
from mapjax.solver.reference import REFERENCE_STEPS, reference_lambdas, reference_sequential
from mapjax.solver.solution import INFEASIBLE, NOT_CONVERGED, OPTIMAL, Solution, Solutions

if TYPE_CHECKING:
    from mapjax.sharding import MeshLike

Method = Literal["exact", "reference"]
METHODS: tuple[str, ...] = ("exact", "reference")


def solve_many(
    data: PoolLike,
    palettes: Palettes,
    *,
    values: Sequence[str] | None = None,
    normaliser: Normaliser = "pooled",
    method: Method = "exact",
    dtype: DType = "float64",
    tol: float | None = None,
    max_iter: int = 100,
    sensitivity: bool = False,
    certify: bool = False,
    mesh: "MeshLike" = None,
) -> Solutions:
    """Solve MAP's dual for a batch of palettes, all as rows of one compiled program.

    Args:
        data: the base model's rewards: a RewardPool, or a plain array [n, values] (one sample each).
        palettes: palette specs (strings, dicts), or levels: a vector or a [palettes, values] array (see
            :func:`mapjax.palette.palette_targets`).
        values: for a pool, the values the columns of a palette array run over (default: all of the pool's,
            NaN where unconstrained); for a plain array, the names of its columns.
        normaliser: "pooled" (the paper's g_n) or "per_prompt" (matches per-prompt decoding).
        method: "exact" (projected Newton, certified) or "reference" (the authors' Adam replica).
        dtype: working precision of the exact solve; float32 is about twice as fast, and its rows that miss
            ``tol`` are re-solved in float64.
        tol: KKT tolerance in standard deviations, positive (default 1e-4 in float32, 1e-8 in float64).
        max_iter: Newton iterations at most.
        sensitivity: also return dλ/dc.
        certify: run the LP certificate on every palette (otherwise only where the solver could not decide).
        mesh: a device mesh (or its spec, e.g. ``"data=8"``; None: one device): the samples are split over its
            ``data``/``fsdp`` axes, the palettes over its ``model`` axis, and the sums over samples are reduced
            across devices. The λ is the one-device λ (to rounding). The reference method's Adam loop itself
            runs on one device; only its measurements use the mesh.
    """
    tol = check_settings(method=method, dtype=dtype, normaliser=normaliser, tol=tol, max_iter=max_iter)
    sensitivity, certify = _flag(sensitivity, "sensitivity"), _flag(certify, "certify")
    placement = Placement.of(mesh)
    pool, palette_values = _coerce(data, values)
    targets = palette_targets(pool, palettes, palette_values)
    problem = DualProblem.from_pool(pool, normaliser)
    if method == "reference":
        return _reference_solutions(pool, problem, targets, sensitivity, certify, placement)
    solved = solve_exact(problem, targets, dtype, tol, max_iter, placement)
    return assemble(problem, targets, solved, "exact", dtype, sensitivity, certify, placement)


def solve(
    data: PoolLike,
    palette: Palettes,
    *,
    values: Sequence[str] | None = None,
    normaliser: Normaliser = "pooled",
    method: Method = "exact",
    dtype: DType = "float64",
    tol: float | None = None,
    max_iter: int = 100,
    sensitivity: bool = False,
    certify: bool = True,
    mesh: "MeshLike" = None,
) -> Solution:
    """Solve MAP's dual for one palette.

    ``data`` is a RewardPool or a plain array [n, values]; ``palette`` a spec (string, dict) or a vector of
    levels over ``values`` (or over all values, NaN where unconstrained). The LP certificate is attached by
    default. See :func:`solve_many` for the other arguments (``mesh`` included).
    """
    count = palette_count(palette)
    if count != 1:
        raise PaletteError(f"solve takes one palette, got {count}; use solve_many for a batch")
    return solve_many(
        data,
        palette,
        values=values,
        normaliser=normaliser,
        method=method,
        dtype=dtype,
        tol=tol,
        max_iter=max_iter,
        sensitivity=sensitivity,
        certify=certify,
        mesh=mesh,
    )[0]


def solve_sequential(
    data: PoolLike,
    palette: Palettes,
    *,
    values: Sequence[str] | None = None,
    rounds: int = 5,
    method: Method = "exact",
    normaliser: Normaliser = "pooled",
    tol: float | None = None,
    mesh: "MeshLike" = None,
) -> list[Solution]:
    """Align one value at a time, each against the model the previous steps produced (Theorem 5).

    Each step re-solves one λ_i with the others fixed (coordinate ascent on g, exactly, for method="exact";
    the authors' 150 Adam steps restarted at λ_i = 1 for method="reference"), in the palette's written order (a
    vector of levels: the order of ``values``, else the pool's); a round visits every constrained value once.
    Returns the solution after each round: with enough rounds the exact variant converges to the joint λ.
    ``data``, ``palette``, ``values`` and ``mesh`` are as for :func:`solve`.
    """
    tol = check_settings(method=method, normaliser=normaliser, tol=tol)
    rounds = _positive_integer(rounds, "rounds")
    placement = Placement.of(mesh)
    pool, palette_values = _coerce(data, values)
    count = palette_count(palette)
    if count != 1:
        raise PaletteError(f"solve_sequential takes one palette, got {count}")
    targets = palette_targets(pool, palette, palette_values)
    order = _value_order(pool, palette, palette_values, targets[0])
    problem = DualProblem.from_pool(pool, normaliser)
    history: list[Solution] = []
    if method == "reference":
        for round_number, (lam, failed) in enumerate(reference_sequential(pool, targets, order, rounds), start=1):
            solved = measured(
                problem, targets, lam, [INFEASIBLE if failed else OPTIMAL], [round_number], placement
            )
            history.append(assemble(problem, targets, solved, "reference", "float32", False, False, placement)[0])
        return history
    for round_number, lam in enumerate(exact_sequential(problem, targets, order, rounds, tol, placement), start=1):
        solved = measured(problem, targets, lam, [OPTIMAL], [round_number], placement)
        # Coordinate ascent that has not reached the joint optimum yet says so rather than "optimal".
        if solved.residual[0] > tol:
            solved = dataclasses.replace(solved, status=np.array([NOT_CONVERGED]))
        history.append(assemble(problem, targets, solved, "exact", "float64", False, False, placement)[0])
    return history


def evaluate_lambdas(
    data: PoolLike,
    lambdas: np.ndarray,
    *,
    values: Sequence[str] | None = None,
    normaliser: Normaliser = "pooled",
    mesh: "MeshLike" = None,
) -> Solutions:
    """The palettes that given λ solve: c = E_{p_λ} r for each row of ``lambdas`` (e.g. MORL's random λ).

    ``data`` is a RewardPool or a plain [n, values] array; ``lambdas`` is [batch, len(values)] (or one vector)
    over the named values (default: all of the pool's values, or for a plain array all of its columns);
    ``mesh`` is as for :func:`solve_many`.
    """
    check_settings(normaliser=normaliser)
    placement = Placement.of(mesh)
    pool, lambda_values = _coerce(data, values)
    names = pool.value_names if lambda_values is None else unique_names(lambda_values, "values", SolverError)
    lambdas = np.atleast_2d(real_array(lambdas, "lambdas", SolverError))
    if lambdas.ndim != 2 or lambdas.shape[1] != len(names) or lambdas.shape[0] == 0:
        raise SolverError(f"lambdas of shape {lambdas.shape} need one column for each of the values {list(names)}")
    if not np.all(np.isfinite(lambdas)) or np.any(lambdas < 0):
        raise SolverError(f"lambdas must be finite and non-negative, got {lambdas.tolist()}")
    columns = [pool.index_of(name) for name in names]
    full = np.zeros((lambdas.shape[0], pool.num_values))
    full[:, columns] = lambdas
    problem = DualProblem.from_pool(pool, normaliser)
    unconstrained = np.full(full.shape, np.nan)  # the palettes are what λ reaches: no residual to measure
    solved = measured(
        problem, unconstrained, full, np.full(len(full), OPTIMAL), np.zeros(len(full), int), placement
    )
    targets = np.full(full.shape, np.nan)
    targets[:, columns] = problem.to_raw_levels(solved.mean)[:, columns]
    return assemble(problem, targets, solved, "given", "float64", False, False)


def check_settings(
    *,
    method: str = "exact",
    dtype: str = "float64",
    normaliser: str = "pooled",
    tol: float | None = None,
    max_iter: int = 1,
) -> float:
    """Check the solver settings, naming the one that is wrong; returns the tolerance to use."""
    if method not in METHODS:
        raise SolverError(f"method must be one of {METHODS}, got {method!r}")
    if dtype not in DTYPES:
        raise SolverError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    if normaliser not in NORMALISERS:
        raise SolverError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
    if method == "reference" and normaliser != "pooled":
        raise SolverError("method='reference' replicates the authors' pooled solver; use normaliser='pooled'")
    _positive_integer(max_iter, "max_iter")
    if tol is None:
        return DEFAULT_TOLERANCE[dtype]
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol <= 0:
        raise SolverError(f"tol must be a positive number (a KKT tolerance in standard deviations), got {tol!r}")
    return float(tol)


def _flag(value, name: str) -> bool:
    """A True/False setting; anything else (a string such as "no" would read as true) names the setting."""
    if not isinstance(value, (bool, np.bool_)):
        raise SolverError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _positive_integer(number, name: str) -> int:
    if isinstance(number, bool) or not isinstance(number, numbers.Integral) or number < 1:
        raise SolverError(f"{name} must be a whole number of at least 1, got {number!r}")
    return int(number)


def _coerce(data: PoolLike, values: Sequence[str] | None) -> tuple[RewardPool, Sequence[str] | None]:
    """(pool, the values a palette array or λ runs over): for a plain array ``values`` names its columns and a
    palette runs over all of them; for a pool ``values`` names the palette's columns."""
    if isinstance(data, RewardPool):
        return data, values
    return as_pool(data, values), None


def _value_order(pool: RewardPool, palette: Palettes, values: Sequence[str] | None, targets: np.ndarray) -> list[int]:
    """Columns of the constrained values in the order the palette names them."""
    if is_spec(palette):
        names: Sequence[str] = parse(palette).names
    elif not isinstance(palette, np.ndarray) and len(palette) == 1 and is_spec(palette[0]):
        names = parse(palette[0]).names
    else:
        names = values if values is not None else pool.value_names
    return [pool.index_of(name) for name in names if not np.isnan(targets[pool.index_of(name)])]


def _reference_solutions(
    pool: RewardPool, problem: DualProblem, targets, want_sensitivity, certify, placement: Placement
) -> Solutions:
    lam, failed = reference_lambdas(pool, targets)
    codes = np.where(failed, INFEASIBLE, OPTIMAL)
    solved = measured(problem, targets, lam, codes, np.full(len(targets), REFERENCE_STEPS), placement)
    return assemble(problem, targets, solved, "reference", "float32", want_sensitivity, certify, placement)


__all__ = ["METHODS", "Method", "check_settings", "evaluate_lambdas", "solve", "solve_many", "solve_sequential"]
