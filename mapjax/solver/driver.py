"""Running the Newton kernel on a batch: device copies, batch buckets, rounds, precision, and measuring p_λ.

Data flow: targets (raw) -> :func:`newton_batch` (standardize, run :func:`mapjax.solver.newton.projected_newton`
in rounds on the rows still going) -> :class:`Solved` (numpy, float64, raw λ); :func:`solve_exact` adds the
float64 retry of float32 rows, :func:`exact_sequential` the coordinate-ascent variant, and :func:`measured`
builds a :class:`Solved` for λ found elsewhere (the reference, given λ). Each takes a
:class:`~mapjax.solver.placement.Placement`: one device (the default) or a mesh that splits the samples and the
palettes.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.problem import DualProblem, precision
from mapjax.solver.newton import NewtonResult
from mapjax.solver.placement import ONE_DEVICE, Placement
from mapjax.solver.solution import NOT_CONVERGED

DEFAULT_TOLERANCE = {"float32": 1e-4, "float64": 1e-8}
# Pools up to this many rewards pad small batches to 8 rows, sharing one compiled program.
SMALL_POOL = 1 << 20
# Iterations of the first round; each later round runs twice as many on the rows still going.
FIRST_ROUND = 2


@dataclass(frozen=True)
class Solved:
    """A batch's λ and what p_λ does there, on the host in float64 (one row per palette).

    ``scaled_lam``, ``mean`` and ``covariance`` are in the standardized frame of ``problem``.
    """

    problem: DualProblem
    scaled_lam: np.ndarray  # [B, m] λ̃ = λσ
    mean: np.ndarray  # [B, m] E_{p_λ} r̃
    covariance: np.ndarray  # [B, m, m] Cov_{p_λ} r̃
    ess: np.ndarray  # [B]
    kl: np.ndarray  # [B]
    residual: np.ndarray  # [B] KKT residual, sd
    worst_margin: np.ndarray  # [B] the kernel's Farkas margin (0 where not computed)
    status: np.ndarray  # [B] int status codes
    iterations: np.ndarray  # [B] int

    @property
    def lam(self) -> np.ndarray:
        """[B, m] raw λ."""
        return self.problem.to_raw_lambda(self.scaled_lam)

    def replace_rows(self, rows: np.ndarray, other: "Solved") -> "Solved":
        """This batch with ``rows`` taken from ``other`` (a batch of len(rows) on the same problem)."""
        fields = {}
        for name in _ARRAY_FIELDS:
            array = getattr(self, name).copy()
            array[rows] = getattr(other, name)
            fields[name] = array
        return Solved(problem=self.problem, **fields)


_ARRAY_FIELDS = ("scaled_lam", "mean", "covariance", "ess", "kl", "residual", "worst_margin", "status", "iterations")


def device_arrays(
    problem: DualProblem, dtype, placement: Placement = ONE_DEVICE
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(scaled, log_base, group_weight) of the problem on device in ``dtype``, transferred once per problem
    (and mesh: see :meth:`Placement.problem_arrays`)."""
    return placement.problem_arrays(problem, dtype)


def bucket(batch: int, pool_size: int) -> int:
    """Batch size to pad to: a power of two, at least 8 on small pools so that few programs get compiled;
    on a big pool the padding rows would cost more than a compile."""
    smallest = 8 if pool_size <= SMALL_POOL else 1
    return max(smallest, 1 << (batch - 1).bit_length())


def _padded(rows: np.ndarray, pool_size: int, multiple: int = 1) -> np.ndarray:
    """``rows`` padded to its bucket (rounded up to a multiple of the devices a batch is split over) by
    repeating the first row."""
    size = bucket(rows.size, pool_size)
    padding = size + (-size % multiple) - rows.size
    return np.concatenate([rows, np.repeat(rows[:1], padding)])


def newton_batch(
    problem: DualProblem,
    targets: np.ndarray,
    dtype: str,
    tol: float,
    max_iter: int,
    movable: np.ndarray | None = None,
    start: np.ndarray | None = None,
    placement: Placement = ONE_DEVICE,
) -> Solved:
    """Run the kernel on a batch of raw targets [B, values] (NaN = unconstrained); raw ``start`` λ.

    Most palettes of a random batch are settled in one or two iterations (an infeasible one is usually proved so
    by its first step), so the batch runs in rounds of growing length, and after each round only the rows still
    going are gathered into a smaller batch (padded to a power of two, so batches of similar size share one
    compiled program). Restarting a row from its λ costs one extra evaluation.
    """
    if movable is None:
        movable = ~np.isnan(targets)
    scaled_targets = np.where(movable, problem.to_scaled_targets(np.nan_to_num(targets)), 0.0)
    scaled_lam = np.zeros(targets.shape) if start is None else problem.to_scaled_lambda(start)
    out: NewtonResult | None = None
    iterations = np.zeros(targets.shape[0], dtype=np.int64)
    remaining = np.arange(targets.shape[0])
    budget, round_length = int(max_iter), FIRST_ROUND
    projected_newton, _, _ = placement.kernels()
    with precision(dtype) as jdtype:
        inputs = device_arrays(problem, jdtype, placement)
        while remaining.size:
            steps = min(round_length, budget)
            rows = _padded(remaining, problem.scaled.size, placement.palette_devices)
            result = projected_newton(
                *inputs,
                placement.palettes(scaled_targets[rows], jdtype),
                placement.palettes(movable[rows]),
                placement.palettes(scaled_lam[rows], jdtype),
                placement.scalar(tol, jdtype),
                placement.scalar(steps, jnp.int32),
            )
            result = _first_rows(result, remaining.size)
            out = _scatter(out, result, remaining, targets.shape[0])
            iterations[remaining] += result.iterations
            scaled_lam[remaining] = result.lam
            budget -= steps
            round_length *= 2
            remaining = remaining[~result.done] if budget > 0 else remaining[:0]
    assert out is not None  # targets has at least one row
    return Solved(
        problem=problem,
        scaled_lam=scaled_lam.astype(np.float64),
        mean=out.mean.astype(np.float64),
        covariance=out.covariance.astype(np.float64),
        ess=out.ess.astype(np.float64),
        kl=out.kl.astype(np.float64),
        residual=out.residual.astype(np.float64),
        worst_margin=out.worst_margin.astype(np.float64),
        status=out.status.astype(np.int64),
        iterations=iterations,
    )


def _first_rows(result: NewtonResult, count: int) -> NewtonResult:
    """The result on the host, without the padding rows."""
    return jax.tree_util.tree_map(lambda leaf: np.asarray(leaf)[:count], result)


def _scatter(out: NewtonResult | None, result: NewtonResult, rows: np.ndarray, total: int) -> NewtonResult:
    """Write a round's result into the whole batch's arrays (allocated on the first round) at ``rows``."""
    if out is None:
        out = jax.tree_util.tree_map(lambda leaf: np.zeros((total,) + leaf.shape[1:], leaf.dtype), result)

    def write(whole: np.ndarray, part: np.ndarray) -> None:
        whole[rows] = part

    jax.tree_util.tree_map(write, out, result)
    return out


def solve_exact(
    problem: DualProblem,
    targets: np.ndarray,
    dtype: str,
    tol: float,
    max_iter: int,
    placement: Placement = ONE_DEVICE,
) -> Solved:
    """The exact batch solve; float32 rows that miss ``tol`` are solved again in float64 from scratch."""
    solved = newton_batch(problem, targets, dtype, tol, max_iter, placement=placement)
    if dtype == "float32":
        # float32 rounding can stall a hard row short of tol; finish those in float64.
        retry = np.flatnonzero(solved.status == NOT_CONVERGED)
        if retry.size:
            again = newton_batch(
                problem,
                targets[retry],
                "float64",
                min(tol, DEFAULT_TOLERANCE["float64"] * 1e4),
                max_iter * 2,
                placement=placement,
            )
            solved = solved.replace_rows(retry, again)
    return solved


def exact_sequential(
    problem: DualProblem,
    targets: np.ndarray,
    order: list[int],
    rounds: int,
    tol: float,
    placement: Placement = ONE_DEVICE,
) -> list[np.ndarray]:
    """Coordinate ascent on g for one palette: each step re-solves one λ_i exactly with the others held, in
    ``order``; a round visits each once. Returns raw λ [1, values] after each round."""
    lam = np.zeros((1, problem.num_values))
    history = []
    for _ in range(rounds):
        for column in order:
            movable = np.zeros((1, problem.num_values), dtype=bool)
            movable[0, column] = True
            lam = newton_batch(
                problem, targets, "float64", tol, 100, movable=movable, start=lam, placement=placement
            ).lam
        history.append(lam)
    return history


def measure(
    problem: DualProblem, lam: np.ndarray, placement: Placement = ONE_DEVICE
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(mean, covariance, ESS, KL) of p_λ for raw λ [B, values], float64, scaled frame."""
    rows = _padded(np.arange(lam.shape[0]), problem.scaled.size, placement.palette_devices)
    _, measure_at, _ = placement.kernels()
    with precision("float64") as jdtype:
        mean, covariance, ess, kl = measure_at(
            *device_arrays(problem, jdtype, placement),
            placement.palettes(problem.to_scaled_lambda(lam)[rows], jdtype),
        )
        count = lam.shape[0]
        return tuple(np.asarray(array)[:count] for array in (mean, covariance, ess, kl))


def levels_at(problem: DualProblem, scaled_lam: np.ndarray, placement: Placement = ONE_DEVICE) -> np.ndarray:
    """E_{p_λ} r̃ [B, values] for scaled λ̃ [B, values], float64: the levels a reweighting reaches."""
    rows = _padded(np.arange(scaled_lam.shape[0]), problem.scaled.size, placement.palette_devices)
    _, _, mean_at = placement.kernels()
    with precision("float64") as jdtype:
        mean = mean_at(
            *device_arrays(problem, jdtype, placement), placement.palettes(scaled_lam[rows], jdtype)
        )
        return np.asarray(mean)[: scaled_lam.shape[0]]


def measured(
    problem: DualProblem,
    targets: np.ndarray,
    lam: np.ndarray,
    status,
    iterations,
    placement: Placement = ONE_DEVICE,
) -> Solved:
    """A :class:`Solved` for raw λ found elsewhere (reference, sequential, given λ), measured in float64;
    rows with non-finite λ are measured at 0 (their status says what happened)."""
    finite = np.all(np.isfinite(lam), axis=1)
    mean, covariance, ess, kl = measure(problem, np.where(finite[:, None], lam, 0.0), placement)
    return Solved(
        problem=problem,
        scaled_lam=problem.to_scaled_lambda(lam),
        mean=mean,
        covariance=covariance,
        ess=ess,
        kl=kl,
        residual=kkt_residual(problem, targets, np.nan_to_num(lam), mean),
        worst_margin=np.zeros(len(lam)),
        status=np.asarray(status, dtype=np.int64),
        iterations=np.asarray(iterations, dtype=np.int64),
    )


def kkt_residual(problem: DualProblem, targets: np.ndarray, lam: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """KKT residual in standard deviations (host-side twin of the kernel's stopping test)."""
    constrained = ~np.isnan(targets)
    gradient = np.where(constrained, mean - problem.to_scaled_targets(np.nan_to_num(targets)), 0.0)
    per_value = np.where(lam > 0, np.abs(gradient), np.maximum(-gradient, 0.0))
    return np.max(np.where(constrained, per_value, 0.0), axis=-1)
