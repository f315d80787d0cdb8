"""What a solve returns: :class:`Solution` for one palette, :class:`Solutions` for a batch, and the statuses."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from mapjax.certificate import Certificate
from mapjax.errors import SolverError
from mapjax.jsonio import jsonable

STATUSES: tuple[str, ...] = ("optimal", "infeasible", "not_converged")
# Status codes, the indices of STATUSES: the kernel and the driver carry these.
OPTIMAL, INFEASIBLE, NOT_CONVERGED = 0, 1, 2
# An optimal λ whose p_λ has fewer effective samples than this (per prompt, for the per-prompt normaliser) puts
# about all of its weight on one sample per group: decoding or finetuning with it copies single samples.
DEGENERATE_ESS = 2.0


@dataclass(frozen=True)
class Solution:
    """λ for one palette and what it realises.

    Attributes:
        value_names: the pool's values; every array below is over them, in this order.
        targets: the palette c (NaN where a value is unconstrained).
        lam: λ >= 0, exactly 0 where a constraint is slack or a value is unconstrained.
        status: "optimal" (KKT residual <= tolerance, and the palette has room to spare: the LP margin is
            positive), "infeasible" (no finite λ reaches c, including a level reachable only in the limit
            λ → ∞, such as a value's largest reward; see ``certificate``) or "not_converged". For
            method="reference" it is the authors' verdict: "optimal" when λ stayed finite, "infeasible" on
            overflow.
        realised: E_{p_λ} r, the levels the aligned model reaches on the pool.
        kkt_residual: largest KKT violation, in standard deviations of the value.
        kl: KL(p_λ || p0) on the pool (per prompt, averaged, for the per-prompt normaliser).
        ess: effective sample size 1/Σw² of p_λ's weights (per prompt, averaged, for per-prompt).
        iterations: Newton iterations (Adam steps for the reference).
        normaliser, method, dtype: how it was solved.
        sensitivity: dλ/dc (raw units, [values, values]) when asked for; zero rows and columns for values
            with λ = 0.
        certificate: the LP (or the solver's own Farkas) verdict when computed.
    """

    value_names: tuple[str, ...]
    targets: np.ndarray
    lam: np.ndarray
    status: str
    realised: np.ndarray
    kkt_residual: float
    kl: float
    ess: float
    iterations: int
    normaliser: str
    method: str
    dtype: str
    sensitivity: np.ndarray | None = None
    certificate: Certificate | None = None

    @property
    def feasible(self) -> bool:
        return self.status == "optimal"

    @property
    def degenerate(self) -> bool:
        """An optimal λ whose p_λ sits on about one sample per group (ESS < :data:`DEGENERATE_ESS`): decoding
        or finetuning with it copies single samples; an infeasible λ (NaN) cannot be used at all."""
        return self.status == "optimal" and self.ess < DEGENERATE_ESS

    @property
    def constrained(self) -> np.ndarray:
        return ~np.isnan(self.targets)

    def violations(self) -> np.ndarray:
        """max(0, c − E_{p_λ} r) per value, raw units (0 where unconstrained)."""
        return _violations(self.targets, self.realised)

    def lam_by_name(self) -> dict[str, float]:
        return {name: float(value) for name, value in zip(self.value_names, self.lam)}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out: dict[str, Any] = {
            "status": self.status,
            "method": self.method,
            "normaliser": self.normaliser,
            "dtype": self.dtype,
            "values": [
                {
                    "name": name,
                    "target": None if math.isnan(target) else float(target),
                    "realised": float(realised),
                    "lambda": float(lam),
                }
                for name, target, realised, lam in zip(self.value_names, self.targets, self.realised, self.lam)
            ],
            "kkt_residual": jsonable(self.kkt_residual),
            "kl": jsonable(self.kl),
            "ess": jsonable(self.ess),
            "iterations": int(self.iterations),
            "degenerate": self.degenerate,
        }
        if self.sensitivity is not None:
            out["sensitivity"] = self.sensitivity.tolist()
        if self.certificate is not None:
            out["certificate"] = {
                "feasible": self.certificate.feasible,
                "margin": self.certificate.margin,
                "blocking_values": list(self.certificate.blocking_values),
                "explanation": self.certificate.explain(),
            }
        return out

    def table(self) -> str:
        """A table a person can read: value, target, realised, λ; then the verdict."""
        width = max(8, *(len(name) for name in self.value_names))
        lines = [f"{'value':<{width}}  {'target':>10}  {'realised':>10}  {'lambda':>10}"]
        for name, target, realised, lam in zip(self.value_names, self.targets, self.realised, self.lam):
            cells = ("-" if math.isnan(number) else f"{number:10.4f}" for number in (target, realised, lam))
            lines.append(f"{name:<{width}}  " + "  ".join(f"{cell:>10}" for cell in cells))
        lines.append("")
        lines.append(f"status        {self.status} ({self.method}, {self.normaliser} normaliser, {self.dtype})")
        if self.status != "infeasible":
            lines.append(f"KKT residual  {self.kkt_residual:.3g} sd")
            lines.append(f"KL(p_λ||p0)   {self.kl:.4f}")
            lines.append(f"ESS           {self.ess:.1f}")
        if self.degenerate:
            lines.append(f"warning       p_λ sits on about one sample per group (ESS "
                         f"{below_threshold_text(self.ess, DEGENERATE_ESS)} < {DEGENERATE_ESS:g}): "
                         "the palette is at the edge of what these samples reach")
        lines.append(f"iterations    {self.iterations}")
        if self.certificate is not None:
            lines.append(f"certificate   {self.certificate.explain()}")
        return "\n".join(lines)


def below_threshold_text(value: float, threshold: float) -> str:
    """``value`` with the fewest significant digits (at least 3) that still print it below ``threshold``: an ESS of
    1.9996 against 2 reads "1.9996", not a rounded "2" that contradicts "< 2"."""
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if float(text) < threshold:
            return text
    return repr(value)


def _violations(targets: np.ndarray, realised: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(targets), 0.0, np.maximum(targets - realised, 0.0))


@dataclass(frozen=True)
class Solutions:
    """Solutions for a batch of palettes, as arrays with a leading palette axis; index it for a Solution."""

    value_names: tuple[str, ...]
    targets: np.ndarray
    lam: np.ndarray
    status: np.ndarray  # of str
    realised: np.ndarray
    kkt_residual: np.ndarray
    kl: np.ndarray
    ess: np.ndarray
    iterations: np.ndarray
    normaliser: str
    method: str
    dtype: str
    sensitivity: np.ndarray | None = None
    certificates: dict[int, Certificate] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.lam.shape[0])

    def __getitem__(self, index: int) -> Solution:
        if not -len(self) <= index < len(self):
            raise IndexError(f"palette {index} of {len(self)}")
        index %= len(self)
        return Solution(
            value_names=self.value_names,
            targets=self.targets[index],
            lam=self.lam[index],
            status=str(self.status[index]),
            realised=self.realised[index],
            kkt_residual=float(self.kkt_residual[index]),
            kl=float(self.kl[index]),
            ess=float(self.ess[index]),
            iterations=int(self.iterations[index]),
            normaliser=self.normaliser,
            method=self.method,
            dtype=self.dtype,
            sensitivity=None if self.sensitivity is None else self.sensitivity[index],
            certificate=self.certificates.get(index),
        )

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def feasible(self) -> np.ndarray:
        return self.status == "optimal"

    @property
    def degenerate(self) -> np.ndarray:
        """[palettes] see :attr:`Solution.degenerate`."""
        with np.errstate(invalid="ignore"):
            return (self.status == "optimal") & (self.ess < DEGENERATE_ESS)

    def violations(self) -> np.ndarray:
        """[palettes, values] max(0, c − E_{p_λ} r), raw units."""
        return _violations(self.targets, self.realised)

    def take(self, rows: Sequence[int] | np.ndarray) -> "Solutions":
        """The solutions of the given rows (indices or a boolean mask), in that order."""
        rows = np.arange(len(self))[np.asarray(rows)]
        return concatenate([self], [rows])


def concatenate(batches: Sequence[Solutions], rows: Sequence[np.ndarray] | None = None) -> Solutions:
    """One Solutions from several solved alike (same pool values, normaliser, method, dtype)."""
    if not batches:
        raise SolverError("concatenate needs at least one batch of solutions")
    first = batches[0]
    rows = [np.arange(len(batch)) for batch in batches] if rows is None else [np.asarray(r) for r in rows]
    for batch in batches[1:]:
        if (batch.value_names, batch.normaliser, batch.method, batch.dtype) != (
            first.value_names, first.normaliser, first.method, first.dtype
        ):
            raise SolverError(
                "solutions of different pools or settings (values, normaliser, method, dtype) cannot be concatenated"
            )

    def stack(name):
        return np.concatenate([getattr(batch, name)[index] for batch, index in zip(batches, rows)])

    certificates, offset = {}, 0
    for batch, index in zip(batches, rows):
        for new_row, old_row in enumerate(index):
            if int(old_row) in batch.certificates:
                certificates[offset + new_row] = batch.certificates[int(old_row)]
        offset += len(index)
    with_sensitivity = all(batch.sensitivity is not None for batch in batches)
    return Solutions(
        value_names=first.value_names,
        targets=stack("targets"),
        lam=stack("lam"),
        status=stack("status"),
        realised=stack("realised"),
        kkt_residual=stack("kkt_residual"),
        kl=stack("kl"),
        ess=stack("ess"),
        iterations=stack("iterations"),
        normaliser=first.normaliser,
        method=first.method,
        dtype=first.dtype,
        sensitivity=stack("sensitivity") if with_sensitivity else None,
        certificates=certificates,
    )
