"""The explorer's state and answers, with no web framework: one pool, solved warm, one request at a time.

Every public method of :class:`ExploreSession` takes a request as a JSON-ready mapping (what the page posts),
checks it before any work (a :class:`RequestError` names the field that is wrong and carries the HTTP status to
answer with) and returns a JSON-ready dict. Requests are served one at a time, in the order they asked
(:class:`FifoLock`), so that answers to several tabs never mix and every solve reuses the same compiled
programs; the first solve, which compiles them, runs when the session is made (:meth:`ExploreSession.warm`).

A slider move is answered in two steps so that it can follow the slider: ``solve`` without ``certificate``
gives the verdict (already exact: the solver's own proof, or the LP where it cannot decide), λ, the realised
levels, KL, ESS and the aligned histograms; the same palette with ``certificate`` then adds the LP's margin in
standard deviations (the costly part). Both come from the same cached solution.
"""

from __future__ import annotations

import math
import shlex
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from mapjax.certificate import Certificate, certify
from mapjax.errors import InputError, MapjaxError
from mapjax.palette import Palette, palette_targets, parse
from mapjax.pool import RewardPool
from mapjax.problem import NORMALISERS, DualProblem, Normaliser, tilt_weights
from mapjax.solver import Solution, evaluate_lambdas, solve_many
from mapjax.solver.solution import DEGENERATE_ESS, below_threshold_text

# Request limits: what a page ever sends is far below these, so anything above is refused, not truncated.
MAX_PALETTE_CHARS = 2000
MAX_QUERY_CHARS = 200
MAX_PROMPTS_LISTED = 200
MAX_HISTOGRAM_BINS = 200
HISTOGRAM_BINS = 40
# Ticks under each slider, and the resolution of a slider: its range in this many steps.
QUANTILE_TICKS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)
SLIDER_STEPS = 1000
# With the pooled normaliser, fewer effective samples than this leave the realised levels a standard error
# above 0.1 sd (1/sqrt(ESS)): the page warns.
SMALL_ESS = 100.0
# Texts are cut here in answers, so that one long generation cannot make an answer large.
MAX_TEXT_CHARS = 4000
PROMPT_PREVIEW_CHARS = 160
# Solutions and certificates kept per palette (a slider sweep revisits the same levels).
CACHE_SIZE = 256
ADJUST_METHODS: tuple[str, ...] = ("greedy", "interpolate")
ALGORITHM = {"greedy": "Algorithm 3 (raise values in priority order)",
             "interpolate": "Algorithm 2 (largest step towards the palette)"}


class RequestError(InputError):
    """A request the explorer cannot answer: ``status`` is the HTTP status to answer with (400 malformed,
    404 unknown, 413 too large, 422 well formed but not usable), ``field`` the request field at fault."""

    def __init__(self, message: str, status: int = 422, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.field = field


class MissingDependencyError(MapjaxError, ImportError):
    """The explorer's server libraries are not installed (they come with ``pip install 'mapjax[explore]'``)."""


class FifoLock:
    """A lock granted in the order it was asked for (``threading.Lock`` promises no order)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._now_serving = 0

    @property
    def waiting(self) -> int:
        """How many holders and waiters there are now."""
        with self._condition:
            return self._next_ticket - self._now_serving

    def __enter__(self) -> "FifoLock":
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            self._condition.wait_for(lambda: self._now_serving == ticket)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        with self._condition:
            self._now_serving += 1
            self._condition.notify_all()


# ------------------------------------------------------------------------------------------- request fields
Check = Callable[[str, Any], Any]


def _string(limit: int) -> Check:
    def check(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise RequestError(f"field {name!r} must be a string, got {_kind(value)}", 400, name)
        if len(value) > limit:
            raise RequestError(f"field {name!r} has {len(value)} characters; at most {limit} are accepted", 413, name)
        return value
    return check


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"field {name!r} must be true or false, got {_kind(value)}", 400, name)
    return value


def _integer(low: int, high: int | None = None) -> Check:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f"field {name!r} must be a whole number, got {_kind(value)}", 400, name)
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise RequestError(f"field {name!r} is {value}; it must be {bounds}", 422, name)
        return value
    return check


def _names(limit: int) -> Check:
    def check(name: str, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise RequestError(f"field {name!r} must be a list of value names, got {_kind(value)}", 400, name)
        if len(value) > limit:
            raise RequestError(f"field {name!r} lists {len(value)} names; the pool has {limit} values", 422, name)
        return value
    return check


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def read_fields(request: Any, required: Mapping[str, Check], optional: Mapping[str, tuple[Check, Any]]) -> dict:
    """The request's fields, checked: a JSON object with every required field, no unknown one."""
    if not isinstance(request, Mapping):
        raise RequestError(f"the request must be a JSON object, got {_kind(request)}", 400)
    unknown = sorted(set(request) - set(required) - set(optional))
    if unknown:
        known = ", ".join(sorted([*required, *optional]))
        raise RequestError(f"unknown field {unknown[0]!r}; this request takes {known}", 400, unknown[0])
    fields = {}
    for name, check in required.items():
        if name not in request:
            raise RequestError(f"field {name!r} is missing", 400, name)
        fields[name] = check(name, request[name])
    for name, (check, default) in optional.items():
        fields[name] = check(name, request[name]) if name in request else default
    return fields


# ------------------------------------------------------------------------------------------------- session
class ExploreSession:
    """One pool, its solver warm, answering the explorer's requests (see the module docstring).

    Args:
        pool: the reward pool to explore.
        normaliser: "pooled" (the paper's p_λ on the pool) or "per_prompt" (the objective MAP-D realises).
        source: how the pool was named (a path): shown on the page and written into the equivalent commands.
        warm: solve once now, so that the first request does not pay for compiling the solver.
    """

    def __init__(self, pool: RewardPool, *, normaliser: Normaliser = "pooled", source: str | None = None,
                 warm: bool = True):
        if not isinstance(pool, RewardPool):
            raise InputError(f"ExploreSession takes a RewardPool, got {type(pool).__name__}")
        if normaliser not in NORMALISERS:
            raise InputError(f"normaliser must be one of {NORMALISERS}, got {normaliser!r}")
        self.pool = pool
        self.normaliser = normaliser
        self.source = source
        self.problem = DualProblem.from_pool(pool, normaliser)
        self.lock = FifoLock()
        self.served = 0
        self._flat = pool.flat()
        self._base_weights = self._flat_weights(np.zeros(pool.num_values))
        self._edges, self._bin_of_sample = _histogram_bins(self._flat, HISTOGRAM_BINS)
        self._base_histograms = self._histograms(self._base_weights, self._bin_of_sample)
        self._base = evaluate_lambdas(pool, np.zeros(pool.num_values), normaliser=normaliser)[0]
        self._solutions: OrderedDict[bytes, Solution] = OrderedDict()
        self._certificates: OrderedDict[bytes, Certificate] = OrderedDict()
        self.warm_seconds: float | None = None
        self._description: dict[str, Any] | None = None
        if warm:
            self.warm()

    # ------------------------------------------------------------------------------------- public answers
    def warm(self) -> float:
        """Solve, certify and reweight one palette so that the compiled programs exist; returns the seconds."""
        start = time.perf_counter()
        first = self.pool.value_names[0]
        palette = ", ".join(f"{name}>={'q0.6' if name == first else 'mean'}" for name in self.pool.value_names
                            if self._constrainable(name))
        if palette:
            with self.lock:
                self._answer(palette, certificate=True, histograms=True, record=False)
        self.warm_seconds = time.perf_counter() - start
        return self.warm_seconds

    def describe(self) -> dict[str, Any]:
        """The pool as the page draws it: values with their range, slider step, quantile ticks, base mean,
        base histograms; counts; whether it has texts; the prompt to show first. Computed once."""
        if self._description is None or self._description["warm_seconds"] != self.warm_seconds:
            self._description = self._describe()
        return self._description

    def _describe(self) -> dict[str, Any]:
        summaries = self.pool.summary(QUANTILE_TICKS)
        spread = self.pool.spread()
        values = []
        for column, summary in enumerate(summaries):
            span = summary.maximum - summary.minimum
            step = span / SLIDER_STEPS if span > 0 else 1.0
            values.append({
                "name": summary.name,
                "min": summary.minimum,
                "max": summary.maximum,
                "mean": summary.mean,
                "sd": float(spread[column]),
                "base": float(self._base.realised[column]),
                "step": step,
                "decimals": int(min(12, max(0, math.ceil(-math.log10(step))))) if step > 0 else 6,
                "constrainable": self._constrainable(summary.name),
                "quantiles": [{"q": q, "level": level} for q, level in summary.quantiles.items()],
                "histogram": {"edges": self._edges[column].tolist(), "base": self._base_histograms[column]},
            })
        counts = self.pool.mask.sum(axis=1)
        return _json_ready({
            "source": self.source,
            "normaliser": self.normaliser,
            "prompts": self.pool.num_prompts,
            "samples": self.pool.num_samples,
            "samples_per_prompt": {"min": int(counts.min()), "max": int(counts.max())},
            "values": values,
            "slider_steps": SLIDER_STEPS,
            "has_texts": self._has_texts,
            "default_prompt": self.default_prompt(),
            "small_ess": SMALL_ESS if self.normaliser == "pooled" else DEGENERATE_ESS,
            "adjust_methods": [{"name": name, "label": ALGORITHM[name]} for name in ADJUST_METHODS],
            "limits": {"palette_chars": MAX_PALETTE_CHARS, "histogram_bins": MAX_HISTOGRAM_BINS},
            "warm_seconds": self.warm_seconds,
        })

    def solve(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"palette": spec, "certificate": false, "histograms": true}`` -> the verdict, λ, realised and base
        levels, KL, ESS (with a warning when small), the aligned histograms, the equivalent commands; with
        ``certificate`` also the LP's margin in standard deviations and the values that block."""
        fields = read_fields(request, {"palette": _string(MAX_PALETTE_CHARS)},
                             {"certificate": (_boolean, False), "histograms": (_boolean, True)})
        with self.lock:
            return self._answer(fields["palette"], certificate=fields["certificate"],
                                histograms=fields["histograms"])

    def adjust(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"palette": spec, "method": "greedy" | "interpolate", "priority": [names]}`` -> the nearest
        reachable palette (the paper's Algorithm 3 in priority order, or Algorithm 2), answered as ``solve``
        answers it, with an ``adjustment`` entry saying what moved."""
        fields = read_fields(request, {"palette": _string(MAX_PALETTE_CHARS)}, {
            "method": (_string(32), "greedy"),
            "priority": (_names(self.pool.num_values), None),
        })
        method, priority = fields["method"], fields["priority"]
        if method not in ADJUST_METHODS:
            raise RequestError(f"method {method!r} is unknown; use one of {', '.join(ADJUST_METHODS)}", 422, "method")
        if priority is not None and method != "greedy":
            raise RequestError("priority orders method 'greedy' only; interpolate takes none", 422, "priority")
        with self.lock:
            palette, requested = self._parse(fields["palette"])
            if palette is None:
                raise RequestError("nothing to adjust: the palette constrains no value", 422, "palette")
            from mapjax import adjust

            start = time.perf_counter()
            try:
                if method == "greedy":
                    result = adjust.greedy(self.pool, palette, priority, normaliser=self.normaliser)
                else:
                    result = adjust.interpolate(self.pool, palette, normaliser=self.normaliser)
            except MapjaxError as error:
                raise RequestError(str(error), 422, "priority" if priority else "palette") from None
            adjusted_spec = _adjusted_spec(palette, requested, result.palette, self.pool.value_names)
            seconds = time.perf_counter() - start
            answer = self._answer(adjusted_spec, certificate=True, histograms=True)
            answer["adjustment"] = _json_ready({
                "method": method,
                "algorithm": ALGORITHM[method],
                "priority": priority if method == "greedy" else None,
                "rho": result.rho,
                "changed": result.changed,
                "requested_palette": str(palette),
                "moved": [name for name, before, after in zip(self.pool.value_names, requested, result.palette)
                          if not np.isnan(before) and before != after],
                "seconds": seconds,
            })
            return answer

    def samples(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"palette": spec, "prompt": index}`` -> the prompt's samples ranked by their MAP-D probability
        softmax(λᵀr) among the prompt's samples (λ of the palette; λ = 0, the base, when it is unreachable)."""
        fields = read_fields(request, {"palette": _string(MAX_PALETTE_CHARS)},
                             {"prompt": (_integer(0, self.pool.num_prompts - 1), None)})
        self._require_texts()
        with self.lock:
            self._count()
            prompt = self.default_prompt() if fields["prompt"] is None else fields["prompt"]
            palette, targets = self._parse(fields["palette"])
            note = None
            lam = np.zeros(self.pool.num_values)
            if palette is not None:
                solution = self._solution(targets)
                if solution.feasible:
                    lam = solution.lam
                else:
                    note = "the palette is not reached, so no λ exists: the samples are shown under the base model"
            slots = np.flatnonzero(self.pool.mask[prompt])
            rewards = self.pool.rewards[prompt, slots]
            scores = rewards @ lam
            probabilities = np.exp(scores - scores.max())
            probabilities /= probabilities.sum()
            order = np.argsort(-probabilities, kind="stable")
            texts = self.pool.generations[prompt]
            ranked = [{
                "rank": rank + 1,
                "sample": int(order_index),
                "text": _cut(texts[order_index]),
                "probability": float(probabilities[order_index]),
                "base_probability": 1.0 / len(slots),
                "score": float(scores[order_index]),
                "rewards": {name: float(value) for name, value in zip(self.pool.value_names, rewards[order_index])},
            } for rank, order_index in enumerate(order)]
            return _json_ready({
                "prompt": prompt,
                "prompt_text": _cut(self.pool.prompts[prompt]) if self.pool.prompts is not None else None,
                "palette": "" if palette is None else str(palette),
                "lambda": dict(zip(self.pool.value_names, lam.tolist())),
                "note": note,
                "samples": ranked,
                "served": self.served,
            })

    def histogram(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"palette": spec, "bins": 40}`` -> each value's histogram under the base and the aligned model
        (probability per bin; the aligned one is null when the palette is not reached)."""
        fields = read_fields(request, {"palette": _string(MAX_PALETTE_CHARS)},
                             {"bins": (_integer(2, MAX_HISTOGRAM_BINS), HISTOGRAM_BINS)})
        with self.lock:
            self._count()
            palette, targets = self._parse(fields["palette"])
            edges, bins = _histogram_bins(self._flat, fields["bins"])
            aligned = None
            if palette is None:
                aligned = self._histograms(self._base_weights, bins, fields["bins"])
            else:
                solution = self._solution(targets)
                if solution.feasible:
                    aligned = self._histograms(self._flat_weights(solution.lam), bins, fields["bins"])
            base = self._histograms(self._base_weights, bins, fields["bins"])
            return _json_ready({
                "palette": "" if palette is None else str(palette),
                "values": [{"name": name, "edges": edges[column].tolist(), "base": base[column],
                            "aligned": None if aligned is None else aligned[column]}
                           for column, name in enumerate(self.pool.value_names)],
                "served": self.served,
            })

    def prompts(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``{"query": text, "offset": 0, "limit": 50}`` -> the prompts whose text holds ``query`` (any case),
        as previews with their sample counts."""
        fields = read_fields(request, {}, {
            "query": (_string(MAX_QUERY_CHARS), ""),
            "offset": (_integer(0), 0),
            "limit": (_integer(1, MAX_PROMPTS_LISTED), 50),
        })
        self._require_texts()
        query = fields["query"].strip().lower()
        texts = self.pool.prompts or tuple(f"prompt {index}" for index in range(self.pool.num_prompts))
        matching = [index for index, text in enumerate(texts) if query in text.lower()] if query else \
            range(len(texts))
        counts = self.pool.mask.sum(axis=1)
        page = matching[fields["offset"]: fields["offset"] + fields["limit"]]
        return {
            "total": len(matching),
            "offset": fields["offset"],
            "prompts": [{"index": int(index), "text": _cut(texts[index], PROMPT_PREVIEW_CHARS),
                         "samples": int(counts[index])} for index in page],
        }

    def default_prompt(self) -> int:
        """The prompt shown first: the first one with the most samples."""
        return int(np.argmax(self.pool.mask.sum(axis=1)))

    # ------------------------------------------------------------------------------------------- internals
    @property
    def _has_texts(self) -> bool:
        return self.pool.generations is not None

    def _require_texts(self) -> None:
        if not self._has_texts:
            raise RequestError("this pool holds no generated texts, so it has no samples to show", 404)

    def _constrainable(self, name: str) -> bool:
        low, high = self.pool.value_range()
        column = self.pool.index_of(name)
        return bool(low[column] < high[column])

    def _count(self) -> None:
        self.served += 1

    def _parse(self, spec: str) -> tuple[Palette | None, np.ndarray | None]:
        """(palette, targets over the pool's values), or (None, None) for a palette that constrains nothing."""
        if not spec.replace(",", " ").replace(";", " ").strip():
            return None, None
        try:
            palette = parse(spec)
            targets = palette_targets(self.pool, palette)[0]
        except MapjaxError as error:
            raise RequestError(str(error), 422, "palette") from None
        return palette, targets

    def _solution(self, targets: np.ndarray) -> Solution:
        key = targets.tobytes()
        if key not in self._solutions:
            # certify=False still gives an exact verdict: the solver's own proof, or the LP where it has none.
            self._solutions[key] = solve_many(self.pool, targets[None], normaliser=self.normaliser)[0]
            _trim(self._solutions)
        self._solutions.move_to_end(key)
        return self._solutions[key]

    def _certificate(self, targets: np.ndarray) -> Certificate:
        key = targets.tobytes()
        if key not in self._certificates:
            self._certificates[key] = certify(self.problem, targets)
            _trim(self._certificates)
        self._certificates.move_to_end(key)
        return self._certificates[key]

    def _flat_weights(self, lam: np.ndarray) -> np.ndarray:
        """p_λ's weight of each sample in :meth:`RewardPool.flat` order (summing to 1 over the pool)."""
        weights = tilt_weights(self.problem, lam)
        if self.normaliser == "pooled":
            return weights
        return weights[self.pool.mask] / self.pool.num_prompts

    @staticmethod
    def _histograms(weights: np.ndarray, bins: np.ndarray, count: int = HISTOGRAM_BINS) -> list[list[float]]:
        """Probability of each of ``count`` bins per value, under sample weights summing to 1."""
        return [np.bincount(bins[:, column], weights=weights, minlength=count).tolist()
                for column in range(bins.shape[1])]

    def _answer(self, spec: str, *, certificate: bool, histograms: bool, record: bool = True) -> dict[str, Any]:
        """The answer to one palette (the lock is held)."""
        start = time.perf_counter()
        if record:
            self._count()
        palette, targets = self._parse(spec)
        names = self.pool.value_names
        timing: dict[str, float] = {}
        if palette is None:
            return self._unconstrained_answer(histograms, start)
        solution = self._solution(targets)
        timing["solve"] = _milliseconds(start)
        found: Certificate | None = solution.certificate
        source = "solver" if found is not None else None
        if certificate:
            lp_start = time.perf_counter()
            found, source = self._certificate(targets), "lp"
            timing["certificate"] = _milliseconds(lp_start)
        levels = dict(palette.entries)
        blocking = set(found.blocking_values) if found is not None and not found.feasible else set()
        feasible = solution.feasible
        aligned = None
        if histograms and feasible:
            histogram_start = time.perf_counter()
            aligned = self._histograms(self._flat_weights(solution.lam), self._bin_of_sample)
            timing["histograms"] = _milliseconds(histogram_start)
        values = [{
            "name": name,
            "target": None if np.isnan(target) else float(target),
            "level": levels[name].text if name in levels else None,
            "lambda": float(lam) if feasible else None,
            "realised": float(realised) if feasible else None,
            "base": float(base),
            "blocking": name in blocking,
        } for name, target, lam, realised, base in zip(names, targets, solution.lam, solution.realised,
                                                       self._base.realised)]
        canonical = str(palette)
        timing["total"] = _milliseconds(start)
        return _json_ready({
            "palette": canonical,
            "entries": [{"name": name, "level": level.text} for name, level in palette.entries],
            "status": solution.status,
            "feasible": feasible,
            "verdict": {"optimal": "reachable", "infeasible": "unreachable"}.get(solution.status, "not converged"),
            "values": values,
            "certificate": None if found is None else {
                "source": source,
                "feasible": found.feasible,
                "margin_sd": found.margin,
                "blocking_values": list(found.blocking_values) if not found.feasible else [],
                "explanation": found.explain() if source == "lp" else _solver_explanation(found),
            },
            "kl": solution.kl if feasible else None,
            "ess": solution.ess if feasible else None,
            "ess_scale": self._ess_scale(),
            "degenerate": solution.degenerate,
            "ess_warning": self._ess_warning(solution),
            "kkt_residual": solution.kkt_residual if feasible else None,
            "iterations": solution.iterations,
            "histograms": aligned,
            "commands": self._commands(canonical),
            "timing_ms": timing,
            "served": self.served,
        })

    def _unconstrained_answer(self, histograms: bool, start: float) -> dict[str, Any]:
        base = self._base
        return _json_ready({
            "palette": "",
            "entries": [],
            "status": "unconstrained",
            "feasible": True,
            "verdict": "base model",
            "values": [{"name": name, "target": None, "level": None, "lambda": 0.0, "realised": float(level),
                        "base": float(level), "blocking": False} for name, level in zip(base.value_names,
                                                                                         base.realised)],
            "certificate": None,
            "kl": 0.0,
            "ess": base.ess,
            "ess_scale": self._ess_scale(),
            "degenerate": False,
            "ess_warning": None,
            "kkt_residual": None,
            "iterations": 0,
            "histograms": self._base_histograms if histograms else None,
            "commands": None,
            "timing_ms": {"total": _milliseconds(start)},
            "served": self.served,
        })

    def _ess_scale(self) -> dict[str, Any]:
        """What ESS counts: samples of the pool, or samples per prompt (averaged)."""
        if self.normaliser == "pooled":
            return {"unit": "samples", "of": self.pool.num_samples}
        return {"unit": "samples per prompt", "of": float(self.pool.mask.sum(axis=1).mean())}

    def _ess_warning(self, solution: Solution) -> str | None:
        if not solution.feasible:
            return None
        if solution.degenerate:
            per = "prompt" if self.normaliser == "per_prompt" else "pool"
            return (f"ESS {below_threshold_text(solution.ess, DEGENERATE_ESS)} < {DEGENERATE_ESS:g}: p_λ sits on about one sample per {per}; "
                    "the palette is at the edge of what these samples reach, and MAP-D or MAP-F cannot realise it")
        if self.normaliser == "pooled" and solution.ess < SMALL_ESS:
            return (f"p_λ rests on about {solution.ess:.0f} effective samples of {self.pool.num_samples}: the "
                    f"realised levels carry a standard error of about {1 / math.sqrt(solution.ess):.2f} sd, and "
                    "k candidates per prompt rarely realise such a λ")
        return None

    def _commands(self, palette: str) -> dict[str, str]:
        source = self.source if self.source is not None else "POOL"
        per_prompt = self.normaliser == "per_prompt"
        cli = f"mapjax solve {shlex.quote(source)} --palette {shlex.quote(palette)}"
        normaliser = ', normaliser="per_prompt"' if per_prompt else ""
        python = (f"import mapjax\n\npool = mapjax.RewardPool.load({source!r})\n"
                  f"solution = mapjax.solve(pool, {palette!r}{normaliser})\nprint(solution.table())")
        return {"cli": cli + (" --per-prompt" if per_prompt else ""), "python": python}


# ----------------------------------------------------------------------------------------------- helpers
def _histogram_bins(flat: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges [values, bins + 1], bin of each sample [n, values]) on ``bins`` equal bins over each value's range."""
    low, high = flat.min(axis=0), flat.max(axis=0)
    span = np.where(high > low, high - low, 1.0)
    edges = low[:, None] + span[:, None] * np.linspace(0.0, 1.0, bins + 1)[None]
    position = np.floor((flat - low) / span * bins).astype(np.int64)
    return edges, np.clip(position, 0, bins - 1)


def _adjusted_spec(palette: Palette, requested: np.ndarray, adjusted: np.ndarray, names: Sequence[str]) -> str:
    """The adjusted palette as a spec: the levels that did not move keep their text (``mean``, ``q0.8``)."""
    entries = []
    for name, level in palette.entries:
        column = list(names).index(name)
        same = adjusted[column] == requested[column]
        entries.append(f"{name}>={level.text if same else _number(adjusted[column])}")
    return ", ".join(entries)


def _number(value: float) -> str:
    """A level as text, to 12 significant digits: an adjusted level sits 1e-3 sd inside the boundary, far
    beyond the rounding."""
    return f"{value:.12g}"


def _solver_explanation(found: Certificate) -> str:
    if found.feasible:
        return found.explain()
    together = " and ".join(found.blocking_values)
    verb = "cannot reach its level" if len(found.blocking_values) == 1 else "cannot be reached together"
    return f"infeasible: {together} {verb} on these samples"


def _cut(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _milliseconds(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _trim(cache: OrderedDict) -> None:
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _json_ready(value: Any) -> Any:
    from mapjax.jsonio import jsonable

    return jsonable(value)
