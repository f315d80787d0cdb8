"""λ solver benchmark: mapjax's exact batched solver against the authors' PyTorch solver, same run.

On the OPT-1.3B pilot set, 1000 random palettes (c_i ~ U(c0_i, max r_i), the paper's random-palette draw) for
m = 3 and m = 6 values. Three solvers: mapjax's exact ``solve_many`` (float64 and float32), the authors' Adam
solver in PyTorch (``benchmarks/torch_reference.py``, one palette at a time as their code runs) and mapjax's JAX
replica of it (``method="reference"``, all palettes in one vmapped call). Every side is timed the same way:
untimed calls first (JAX compiles; PyTorch warms up and picks the faster of 1 thread and all cores on the first
20 palettes, or on the large pool's one palette; ``--torch-threads`` pins a count), then the best of
``--repeats`` calls. The speed table gives palettes per second and the ratios.

The verdict table compares each reference's own output on the palettes PyTorch solved
(``--reference-palettes``): PyTorch's verdicts and λ against the exact solver's and against the JAX replica's,
and the replica's against the exact solver's: verdict agreement, palettes the reference calls infeasible that
the exact solver solves (and the reverse), how far the λ a reference returns misses its own palette (in standard
deviations of each value), and how far its λ is from the exact λ. Every exact verdict is also checked against
the LP certificate on 100 palettes.

Then one palette on a synthetic pool of 10^6 samples x 8 values (all three solvers, same timing). Then the LP
certificate of a per-prompt palette on a synthetic pool of 12,500 prompts x 16 samples x 6 values (as every
``finetune`` run certifies per prompt), with the LP over every sample's weight ("primal", the definition) timed
on 1,000 and 3,000 prompts for comparison: this section has no PyTorch side (the authors' code has no
certificate); it compares mapjax's two formulations of the LP.

    python benchmarks/solver.py                       # the full run: PyTorch on all 1000 palettes, best of 3
    python benchmarks/solver.py --reference-palettes 200 --repeats 2   # PyTorch on a subset (RESULTS.md's run)
    python benchmarks/solver.py --sections certificate    # only the per-prompt certificate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import jax
import torch

from benchmarks import torch_reference
from benchmarks.machine import cpu_name
from benchmarks.models import pick_torch_threads, threads_label, torch_thread_counts, torch_threads
from mapjax import RewardPool, evaluate_lambdas, solve_many
from mapjax.certificate import certify
from mapjax.problem import DualProblem
from mapjax.solver import reference_lambdas

VALUES = ("humor", "gpt2-helpful", "gpt2-harmless", "diversity", "coherence", "perplexity")
DEFAULT_PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
SECTIONS = ("palettes", "large", "certificate")
PROBE_PALETTES = 20  # palettes on which PyTorch's faster thread count is picked


def machine() -> str:
    cpu = cpu_name()
    devices = ", ".join(str(d) for d in jax.devices())
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {devices}; torch {torch.__version__} "
            f"on {'cuda' if torch.cuda.is_available() else 'cpu'}")


def timed(function, repeats: int = 1):
    """(result of the last call, best seconds over ``repeats`` calls)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def torch_timed(function, probe, repeats: int, thread_counts: list[int | None]) -> dict:
    """The PyTorch side: its thread count picked on ``probe`` (a short piece of the work, run once to warm up
    and once timed at each count: that is its untimed first call), then the best of ``repeats`` calls of
    ``function`` at that count. Returns {"result", "seconds", "threads", "probe_seconds"}."""
    threads, probe_seconds = pick_torch_threads(probe, thread_counts)
    with torch_threads(threads):
        result, seconds = timed(function, repeats)
    return {"result": result, "seconds": seconds, "threads": threads, "probe_seconds": probe_seconds}


def jax_timed(function, repeats: int):
    """(result, best seconds of ``repeats`` calls) after one untimed call (tracing and compilation)."""
    function()
    return timed(function, repeats)


def random_palettes(pool: RewardPool, values, count: int, seed: int) -> np.ndarray:
    columns = [pool.index_of(name) for name in values]
    rng = np.random.default_rng(seed)
    return rng.uniform(pool.means()[columns], pool.flat().max(axis=0)[columns], size=(count, len(columns)))


def realised_levels(pool: RewardPool, lam: np.ndarray) -> np.ndarray:
    """E_{p_λ} r for each row of raw λ [palettes, values] (NaN rows stay NaN): what each λ actually reaches."""
    realised = np.full(lam.shape, np.nan)
    finite = np.all(np.isfinite(lam), axis=1)
    if finite.any():
        realised[finite] = evaluate_lambdas(pool, lam[finite]).realised
    return realised


def misses_in_sd(targets: np.ndarray, realised: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """[palettes] the largest shortfall max(0, c_i − E_{p_λ} r_i) / sd_i over the values of each palette."""
    return np.max(np.maximum(targets - realised, 0.0) / scale, axis=1)


def compare_solvers(feasible: np.ndarray, lam: np.ndarray, other_feasible: np.ndarray, other_lam: np.ndarray,
                    ) -> dict:
    """One solver's verdicts and λ against another's on the same palettes: verdict agreement, palettes it calls
    infeasible that the other solves ("false infeasible" when the other is exact) and the reverse, and over the
    palettes both solve: the largest |Δλ| and the median ‖Δλ‖ / ‖λ_other‖."""
    both = feasible & other_feasible
    gaps = np.abs(lam[both] - other_lam[both])
    norms = np.linalg.norm(other_lam[both], axis=1)
    return {
        "verdict_agreement": float(np.mean(feasible == other_feasible)),
        "infeasible_where_other_feasible": int(np.sum(~feasible & other_feasible)),
        "feasible_where_other_infeasible": int(np.sum(feasible & ~other_feasible)),
        "both_feasible": int(both.sum()),
        "max_abs_lambda_difference": float(gaps.max()) if both.any() else 0.0,
        "median_relative_lambda_difference": (float(np.median(np.linalg.norm(lam[both] - other_lam[both], axis=1)
                                                              / np.maximum(norms, 1e-300))) if both.any() else 0.0),
    }


def quality(feasible: np.ndarray, misses: np.ndarray) -> dict:
    """How far the λ a solver returns for the palettes it calls feasible miss those palettes (sd)."""
    misses = misses[feasible]
    return {
        "feasible": int(feasible.sum()),
        "share_violating_1e-3sd": float(np.mean(misses > 1e-3)) if misses.size else 0.0,
        "median_violation_sd": float(np.median(misses)) if misses.size else 0.0,
        "max_violation_sd": float(misses.max()) if misses.size else 0.0,
    }


def palette_benchmark(pool: RewardPool, m: int, count: int, reference_count: int, seed: int, repeats: int,
                      thread_counts: list[int | None]) -> dict:
    values = VALUES[:m]
    sub = pool.select(values)
    palettes = random_palettes(sub, values, count, seed)
    results: dict = {"m": m, "palettes": count, "repeats": repeats}

    for dtype in ("float64", "float32"):
        start = time.perf_counter()
        solve_many(sub, palettes[:8], dtype=dtype)  # compile the small bucket...
        solve_many(sub, palettes, dtype=dtype)  # ... and the full one
        results[f"compile_{dtype}_s"] = time.perf_counter() - start
        solutions, seconds = timed(partial(solve_many, sub, palettes, dtype=dtype), repeats)
        results[f"exact_{dtype}_s"] = seconds
        results[f"exact_{dtype}_per_s"] = count / seconds
        if dtype == "float64":
            exact = solutions
    results["exact_not_converged"] = int((exact.status == "not_converged").sum())
    results["exact_feasible"] = int(exact.feasible.sum())
    results["exact_max_kkt"] = float(np.nanmax(exact.kkt_residual)) if exact.feasible.any() else 0.0
    results["exact_max_iterations"] = int(exact.iterations.max())

    # The authors' solver in PyTorch, one palette at a time as they run it, on the first reference_count palettes.
    subset = palettes[:reference_count]
    probe = palettes[:min(PROBE_PALETTES, reference_count)]
    torch_run = torch_timed(lambda: torch_reference.reference_lambdas(sub.flat(), subset),
                            lambda: torch_reference.reference_lambdas(sub.flat(), probe), repeats, thread_counts)
    torch_lam, torch_ok = torch_run["result"]
    torch_lam = np.where(torch_ok[:, None], torch_lam, np.nan)
    results["reference_torch_palettes"] = reference_count
    results["reference_torch_threads"] = torch_run["threads"]
    results["reference_torch_probe_s"] = {str(k): v for k, v in torch_run["probe_seconds"].items()}
    results["reference_torch_per_s"] = reference_count / torch_run["seconds"]

    # The same reference replicated in JAX and vmapped (mapjax's method="reference"), all palettes at once.
    (jax_lam, jax_failed), jax_seconds = jax_timed(lambda: reference_lambdas(sub, palettes), repeats)
    results["reference_jax_per_s"] = count / jax_seconds
    for dtype in ("float64", "float32"):
        results[f"speedup_exact_{dtype}"] = results[f"exact_{dtype}_per_s"] / results["reference_torch_per_s"]
    results["speedup_reference_jax"] = results["reference_jax_per_s"] / results["reference_torch_per_s"]

    # Each reference's own verdicts and λ, on the palettes PyTorch solved: against the exact solver and each other.
    jax_ok = ~jax_failed[:reference_count]
    jax_lam = jax_lam[:reference_count]
    exact_ok, exact_lam = exact.feasible[:reference_count], exact.lam[:reference_count]
    scale = sub.flat().std(axis=0)
    misses = {name: misses_in_sd(subset, realised_levels(sub, lam), scale)
              for name, lam in (("torch", torch_lam), ("jax", jax_lam))}
    results["comparison_palettes"] = reference_count
    results["exact_feasible_compared"] = int(exact_ok.sum())
    results["torch_vs_exact"] = compare_solvers(torch_ok, torch_lam, exact_ok, exact_lam)
    results["torch_vs_jax"] = compare_solvers(torch_ok, torch_lam, jax_ok, jax_lam)
    results["jax_vs_exact"] = compare_solvers(jax_ok, jax_lam, exact_ok, exact_lam)
    results["torch_quality"] = quality(torch_ok, misses["torch"])
    results["jax_quality"] = quality(jax_ok, misses["jax"])

    # Every exact verdict, checked against the LP on a sample of palettes.
    problem = DualProblem.from_pool(sub)
    sample = np.random.default_rng(seed + 1).choice(count, size=min(100, count), replace=False)
    agree = [exact.feasible[i] == certify(problem, exact.targets[i]).feasible for i in sample]
    results["exact_vs_lp_agreement_on_100"] = float(np.mean(agree))
    return results


def large_pool_benchmark(samples: int, values: int, seed: int, repeats: int, thread_counts: list[int | None]) -> dict:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    rewards = rng.normal(size=(samples, values)) @ mixing
    pool = RewardPool.from_array(rewards)
    target = np.quantile(rewards, 0.6, axis=0)[None]
    start = time.perf_counter()
    solve_many(pool, target)
    compile_and_run = time.perf_counter() - start
    solution, seconds = timed(lambda: solve_many(pool, target)[0], repeats)
    rewards32 = rewards.astype(np.float32)
    reference = partial(torch_reference.reference_lambdas, rewards32, target)
    torch_run = torch_timed(reference, reference, repeats, thread_counts)
    torch_lam, torch_ok = torch_run["result"]
    (jax_lam, jax_failed), jax_seconds = jax_timed(lambda: reference_lambdas(pool, target), repeats)
    scale = rewards.std(axis=0)
    torch_miss = misses_in_sd(target, realised_levels(pool, torch_lam), scale)[0] if torch_ok[0] else float("nan")
    return {
        "samples": samples,
        "values": values,
        "repeats": repeats,
        "exact_s": seconds,
        "exact_first_call_s": compile_and_run,
        "exact_status": solution.status,
        "exact_kkt": solution.kkt_residual,
        "exact_iterations": solution.iterations,
        "reference_torch_s": torch_run["seconds"],
        "reference_torch_threads": torch_run["threads"],
        "reference_torch_success": bool(torch_ok[0]),
        "reference_torch_violation_sd": float(torch_miss),
        "reference_torch_relative_lambda_difference": (
            float(np.linalg.norm(torch_lam[0] - solution.lam) / np.linalg.norm(solution.lam))
            if torch_ok[0] and solution.status == "optimal" else float("nan")),
        "reference_jax_s": jax_seconds,
        "reference_jax_success": not bool(jax_failed[0]),
        "reference_jax_vs_torch_max_abs_lambda": (float(np.max(np.abs(jax_lam[0] - torch_lam[0])))
                                                  if torch_ok[0] and not jax_failed[0] else float("nan")),
        "speedup": torch_run["seconds"] / seconds,
        "speedup_reference_jax": torch_run["seconds"] / jax_seconds,
    }


def synthetic_prompt_pool(prompts: int, samples: int, values: int, seed: int) -> RewardPool:
    """Correlated rewards with per-prompt offsets, ``samples`` per prompt (seeded)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    offsets = rng.normal(scale=0.7, size=(prompts, 1, values))
    rewards = rng.normal(size=(prompts, samples, values)) @ mixing + offsets
    return RewardPool(rewards, np.ones((prompts, samples), bool), tuple(f"v{i}" for i in range(values)))


def certificate_benchmark(prompts: int, samples: int, values: int, primal_prompts: list[int], seed: int) -> dict:
    """The per-prompt LP certificate of a quantile palette (levels at the pooled 0.5 and 0.6 quantiles: one
    feasible, one not), decomposed at full size, the primal LP on smaller pools; and solve_many there."""
    results: dict = {"prompts": prompts, "samples": samples, "values": values, "rows": []}
    for size in sorted(set(primal_prompts) | {prompts}):
        pool = synthetic_prompt_pool(size, samples, values, seed)
        problem = DualProblem.from_pool(pool, "per_prompt")
        for quantile in (0.5, 0.6):
            targets = np.quantile(pool.flat(), quantile, axis=0)
            row = {"prompts": size, "quantile": quantile}
            fast, row["decomposed_s"] = timed(partial(certify, problem, targets))
            row["margin"], row["feasible"] = fast.margin, fast.feasible
            if size in primal_prompts:
                primal, row["primal_s"] = timed(partial(certify, problem, targets, formulation="primal"))
                row["margin_difference"] = abs(primal.margin - fast.margin)
                row["same_verdict"] = primal.feasible == fast.feasible
            if size == prompts:
                solve_many(pool, targets[None], normaliser="per_prompt")  # compile
                solution, row["solve_many_s"] = timed(partial(solve_many, pool, targets[None], normaliser="per_prompt"))
                row["solve_many_status"] = str(solution.status[0])
            results["rows"].append(row)
    return results


def print_certificate(result: dict) -> None:
    print(f"\nper-prompt LP certificate, synthetic pool of P prompts x {result['samples']} samples x "
          f"{result['values']} values (levels at the pooled quantile q):")
    print("| P | q | verdict | margin (sd) | decomposed LP (s) | primal LP (s) | \\|Δ margin\\| | solve_many (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        primal = f"{row['primal_s']:.2f}" if "primal_s" in row else "-"
        difference = f"{row['margin_difference']:.1e}" if "margin_difference" in row else "-"
        solved = f"{row['solve_many_s']:.2f} ({row['solve_many_status']})" if "solve_many_s" in row else "-"
        print(f"| {row['prompts']:,} | {row['quantile']} | {'feasible' if row['feasible'] else 'infeasible'} "
              f"| {row['margin']:.6f} | {row['decomposed_s']:.2f} | {primal} | {difference} | {solved} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pilot", type=Path, default=DEFAULT_PILOT)
    parser.add_argument("--palettes", type=int, default=1000)
    parser.add_argument("--reference-palettes", type=int, default=1000,
                        help="palettes the PyTorch reference solves and is compared on (it takes ~0.015-0.03 s "
                             "each on 2 cores, per call)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side, best kept (after one untimed)")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's CPU threads (default: the faster of 1 and all cores, each timed)")
    parser.add_argument("--large-samples", type=int, default=1_000_000)
    parser.add_argument("--certificate-prompts", type=int, default=12_500)
    parser.add_argument("--primal-prompts", type=int, nargs="*", default=[1000, 3000],
                        help="pool sizes (prompts) on which the primal LP is timed too (it grows fast with size)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    for name in ("palettes", "reference_palettes", "repeats", "large_samples", "certificate_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    thread_counts = torch_thread_counts("cuda" if torch.cuda.is_available() else "cpu", args.torch_threads)

    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M')}")
    output: dict = {"machine": machine(), "repeats": args.repeats}
    if "palettes" in args.sections:
        pool = RewardPool.load(args.pilot)
        rows = []
        for m in (3, 6):
            rows.append(palette_benchmark(pool, m, args.palettes, min(args.reference_palettes, args.palettes),
                                          args.seed, args.repeats, thread_counts))
            print(f"m={m} done ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
        print_palettes(rows)
        output["palettes"] = rows
    if "large" in args.sections:
        large = large_pool_benchmark(args.large_samples, 8, args.seed, args.repeats, thread_counts)
        print_large(large)
        output["large"] = large
    if "certificate" in args.sections:
        certificate = certificate_benchmark(args.certificate_prompts, 16, 6, args.primal_prompts, args.seed)
        print_certificate(certificate)
        output["certificate"] = certificate
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    if args.json:
        args.json.write_text(json.dumps(output, indent=2, default=str))


def print_palettes(rows: list[dict]) -> None:
    r0 = rows[0]
    print(f"\nspeed: {r0['palettes']} random palettes, best of {r0['repeats']} calls per side (PyTorch on the first "
          f"{r0['reference_torch_palettes']}, at its faster thread count)")
    print("| m | exact f64 palettes/s | exact f32 palettes/s | PyTorch reference palettes/s | JAX replica palettes/s "
          "| exact f64 / PyTorch | exact f32 / PyTorch | JAX replica / PyTorch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {r['exact_float64_per_s']:.0f} | {r['exact_float32_per_s']:.0f} "
              f"| {r['reference_torch_per_s']:.2f} ({threads_label(r['reference_torch_threads'])}) "
              f"| {r['reference_jax_per_s']:.0f} | {r['speedup_exact_float64']:.0f}x "
              f"| {r['speedup_exact_float32']:.0f}x | {r['speedup_reference_jax']:.1f}x |")

    print(f"\nverdicts and λ, on the {r0['comparison_palettes']} palettes PyTorch solved; each reference's own output "
          "against the exact solver and against the other reference (Δλ over the palettes both call feasible; "
          "violation: how far a λ misses its own palette, largest over the values, in sd)")
    print("| m | solver | feasible (exact) | agreement with exact | false 'infeasible' | false 'feasible' "
          "| λ violating (>1e-3 sd) | max violation (sd) | median ‖Δλ‖/‖λ*‖ vs exact "
          "| agreement with the other reference | max \\|Δλ\\| vs the other reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for label, key, versus_exact, versus_other in (
                ("PyTorch reference", "torch", r["torch_vs_exact"], r["torch_vs_jax"]),
                ("JAX replica", "jax", r["jax_vs_exact"], r["torch_vs_jax"])):
            q = r[f"{key}_quality"]
            print(f"| {r['m']} | {label} | {q['feasible']} ({r['exact_feasible_compared']}) "
                  f"| {versus_exact['verdict_agreement']:.1%} | {versus_exact['infeasible_where_other_feasible']} "
                  f"| {versus_exact['feasible_where_other_infeasible']} | {q['share_violating_1e-3sd']:.1%} "
                  f"| {q['max_violation_sd']:.3f} | {versus_exact['median_relative_lambda_difference']:.1e} "
                  f"| {versus_other['verdict_agreement']:.1%} | {versus_other['max_abs_lambda_difference']:.1e} |")
    print()
    for r in rows:
        threads = ", ".join(f"{threads_label(None if count == 'None' else int(count))} {seconds:.2f} s"
                            for count, seconds in r["reference_torch_probe_s"].items())
        line = (f"m={r['m']}: exact compile f64 {r['compile_float64_s']:.2f} s, f32 {r['compile_float32_s']:.2f} s; "
                f"{r['exact_feasible']}/{r['palettes']} feasible; {r['exact_not_converged']} not converged, max KKT "
                f"{r['exact_max_kkt']:.1e} sd, max Newton iterations {r['exact_max_iterations']}; exact vs LP "
                f"agreement on 100 palettes {r['exact_vs_lp_agreement_on_100']:.0%}; PyTorch's thread probe "
                f"({min(PROBE_PALETTES, r['reference_torch_palettes'])} palettes): {threads}")
        print(line)


def print_large(large: dict) -> None:
    print(f"\nsynthetic pool {large['samples']:,} x {large['values']}, one palette, best of {large['repeats']}: exact "
          f"{large['exact_s']:.3f} s ({large['exact_status']}, KKT {large['exact_kkt']:.1e}, "
          f"{large['exact_iterations']} iterations; first call with compile {large['exact_first_call_s']:.2f} s); "
          f"PyTorch reference {large['reference_torch_s']:.2f} s ({threads_label(large['reference_torch_threads'])}; "
          f"{'feasible' if large['reference_torch_success'] else 'failed'}, misses its palette by "
          f"{large['reference_torch_violation_sd']:.1e} sd, ‖Δλ‖/‖λ*‖ vs exact "
          f"{large['reference_torch_relative_lambda_difference']:.1e}) -> exact {large['speedup']:.1f}x; "
          f"JAX replica {large['reference_jax_s']:.2f} s ({'feasible' if large['reference_jax_success'] else 'failed'}, "
          f"max |Δλ| vs PyTorch {large['reference_jax_vs_torch_max_abs_lambda']:.1e}) -> "
          f"{large['speedup_reference_jax']:.1f}x PyTorch")


if __name__ == "__main__":
    main()
