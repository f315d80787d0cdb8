"""λ solver benchmark: mapjax's exact batched solver against the authors' PyTorch solver, same run.

On the OPT-1.3B pilot set, 1000 random palettes (c_i ~ U(c0_i, max r_i), the paper's random-palette draw) for
m = 3 and m = 6 values. Prints palettes per second for both and the ratio, verdict agreement, how far the
reference's λ miss their own palettes, and whether every exact λ is certified. Then one solve on a synthetic
pool of 10^6 samples x 8 values. Then the LP certificate of a per-prompt palette on a synthetic pool of
12,500 prompts x 16 samples x 6 values (as every ``finetune`` run certifies per prompt), with the LP over every
sample's weight ("primal", the definition) timed on 1,000 and 3,000 prompts for comparison.

    python benchmarks/solver.py                       # the full run recorded in RESULTS.md
    python benchmarks/solver.py --reference-palettes 50   # quicker: time the reference on a subset
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
from mapjax import RewardPool, solve_many
from mapjax.certificate import certify
from mapjax.problem import DualProblem
from mapjax.solver import reference_lambdas

VALUES = ("humor", "gpt2-helpful", "gpt2-harmless", "diversity", "coherence", "perplexity")
DEFAULT_PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
SECTIONS = ("palettes", "large", "certificate")


def machine() -> str:
    cpu = cpu_name()
    devices = ", ".join(str(d) for d in jax.devices())
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} on {devices}; torch {torch.__version__} "
            f"on {'cuda' if torch.cuda.is_available() else 'cpu'}")


def timed(function, repeats: int = 1):
    """(result, best seconds over repeats)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return result, best


def random_palettes(pool: RewardPool, values, count: int, seed: int) -> np.ndarray:
    columns = [pool.index_of(name) for name in values]
    rng = np.random.default_rng(seed)
    return rng.uniform(pool.means()[columns], pool.flat().max(axis=0)[columns], size=(count, len(columns)))


def palette_benchmark(pool: RewardPool, m: int, count: int, reference_count: int, seed: int) -> dict:
    values = VALUES[:m]
    sub = pool.select(values)
    palettes = random_palettes(sub, values, count, seed)
    results: dict = {"m": m, "palettes": count}

    for dtype in ("float64", "float32"):
        start = time.perf_counter()
        solve_many(sub, palettes[:8], dtype=dtype)  # compile the small bucket...
        solve_many(sub, palettes, dtype=dtype)  # ... and the full one
        results[f"compile_{dtype}_s"] = time.perf_counter() - start
        solutions, seconds = timed(partial(solve_many, sub, palettes, dtype=dtype), repeats=3)
        results[f"exact_{dtype}_s"] = seconds
        results[f"exact_{dtype}_per_s"] = count / seconds
        if dtype == "float64":
            exact = solutions
    results["exact_not_converged"] = int((exact.status == "not_converged").sum())
    results["exact_feasible"] = int(exact.feasible.sum())
    results["exact_max_kkt"] = float(np.nanmax(exact.kkt_residual)) if exact.feasible.any() else 0.0
    results["exact_max_iterations"] = int(exact.iterations.max())

    # The authors' solver in PyTorch, one palette at a time as they run it.
    subset = palettes[:reference_count]
    (torch_lam, torch_ok), torch_seconds = timed(lambda: torch_reference.reference_lambdas(sub.flat(), subset))
    results["reference_torch_palettes"] = reference_count
    results["reference_torch_s"] = torch_seconds
    results["reference_torch_per_s"] = reference_count / torch_seconds
    results["speedup_exact_float64"] = results["exact_float64_per_s"] / results["reference_torch_per_s"]
    results["speedup_exact_float32"] = results["exact_float32_per_s"] / results["reference_torch_per_s"]

    # The same reference replicated in JAX and vmapped (mapjax's method="reference"), all palettes.
    reference_lambdas(sub, palettes[:8])
    (jax_lam, jax_failed), jax_seconds = timed(lambda: reference_lambdas(sub, palettes))
    results["reference_jax_per_s"] = count / jax_seconds
    results["reference_jax_vs_torch_max_abs_lambda"] = float(
        np.nanmax(np.abs(jax_lam[:reference_count][torch_ok] - torch_lam[torch_ok])) if torch_ok.any() else 0.0
    )

    # Agreement and the quality of the reference's λ, over all palettes (JAX replica, equal to torch's).
    reference = solve_many(sub, palettes, method="reference")
    results["verdict_agreement"] = float(np.mean(reference.feasible == exact.feasible))
    results["reference_false_infeasible"] = int((~reference.feasible & exact.feasible).sum())
    results["reference_false_feasible"] = int((reference.feasible & ~exact.feasible).sum())
    scale = sub.flat().std(axis=0)
    misses = np.nanmax(reference.violations()[reference.feasible] / scale, axis=1)
    results["reference_share_violating_1e-3sd"] = float(np.mean(misses > 1e-3)) if misses.size else 0.0
    results["reference_median_violation_sd"] = float(np.median(misses)) if misses.size else 0.0
    results["reference_max_violation_sd"] = float(misses.max()) if misses.size else 0.0

    # Every exact verdict, checked against the LP on a sample of palettes.
    problem = DualProblem.from_pool(sub)
    sample = np.random.default_rng(seed + 1).choice(count, size=min(100, count), replace=False)
    agree = [exact.feasible[i] == certify(problem, exact.targets[i]).feasible for i in sample]
    results["exact_vs_lp_agreement_on_100"] = float(np.mean(agree))
    return results


def large_pool_benchmark(samples: int, values: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    rewards = rng.normal(size=(samples, values)) @ mixing
    pool = RewardPool.from_array(rewards)
    target = np.quantile(rewards, 0.6, axis=0)[None]
    start = time.perf_counter()
    solve_many(pool, target)
    compile_and_run = time.perf_counter() - start
    solution, seconds = timed(lambda: solve_many(pool, target)[0], repeats=3)
    (torch_lam, torch_ok), torch_seconds = timed(
        lambda: torch_reference.reference_lambdas(rewards.astype(np.float32), target)
    )
    return {
        "samples": samples,
        "values": values,
        "exact_s": seconds,
        "exact_first_call_s": compile_and_run,
        "exact_status": solution.status,
        "exact_kkt": solution.kkt_residual,
        "exact_iterations": solution.iterations,
        "reference_torch_s": torch_seconds,
        "reference_torch_success": bool(torch_ok[0]),
        "speedup": torch_seconds / seconds,
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
    print("| P | q | verdict | margin (sd) | decomposed LP (s) | primal LP (s) | |Δ margin| | solve_many (s) |")
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
                        help="palettes the PyTorch reference is timed on (it takes ~0.2-0.3 s each on 2 cores)")
    parser.add_argument("--large-samples", type=int, default=1_000_000)
    parser.add_argument("--certificate-prompts", type=int, default=12_500)
    parser.add_argument("--primal-prompts", type=int, nargs="*", default=[1000, 3000],
                        help="pool sizes (prompts) on which the primal LP is timed too (it grows fast with size)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    output: dict = {"machine": machine()}
    if "palettes" in args.sections:
        pool = RewardPool.load(args.pilot)
        rows = [palette_benchmark(pool, m, args.palettes, min(args.reference_palettes, args.palettes), args.seed)
                for m in (3, 6)]
        print_palettes(rows)
        output["palettes"] = rows
    if "large" in args.sections:
        large = large_pool_benchmark(args.large_samples, 8, args.seed)
        print_large(large)
        output["large"] = large
    if "certificate" in args.sections:
        certificate = certificate_benchmark(args.certificate_prompts, 16, 6, args.primal_prompts, args.seed)
        print_certificate(certificate)
        output["certificate"] = certificate
    if args.json:
        args.json.write_text(json.dumps(output, indent=2))


def print_palettes(rows: list[dict]) -> None:
    print("\n| m | exact f64 palettes/s | exact f32 palettes/s | PyTorch reference palettes/s | ratio f64 | ratio f32 "
          "| JAX reference palettes/s | verdict agreement | ref. false 'infeasible' | ref. λ violating (>1e-3 sd) "
          "| ref. max violation (sd) | exact not converged | exact max KKT (sd) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['m']} | {r['exact_float64_per_s']:.0f} | {r['exact_float32_per_s']:.0f} "
              f"| {r['reference_torch_per_s']:.2f} | {r['speedup_exact_float64']:.0f}x | {r['speedup_exact_float32']:.0f}x "
              f"| {r['reference_jax_per_s']:.0f} | {r['verdict_agreement']:.1%} | {r['reference_false_infeasible']} "
              f"| {r['reference_share_violating_1e-3sd']:.1%} | {r['reference_max_violation_sd']:.3f} "
              f"| {r['exact_not_converged']} | {r['exact_max_kkt']:.1e} |")
    for r in rows:
        print(f"m={r['m']}: compile f64 {r['compile_float64_s']:.2f} s, f32 {r['compile_float32_s']:.2f} s; "
              f"{r['exact_feasible']}/{r['palettes']} feasible; max Newton iterations {r['exact_max_iterations']}; "
              f"exact vs LP agreement on 100 palettes {r['exact_vs_lp_agreement_on_100']:.0%}; "
              f"JAX vs PyTorch reference max |Δλ| {r['reference_jax_vs_torch_max_abs_lambda']:.1e}; "
              f"PyTorch reference timed on {r['reference_torch_palettes']} palettes")


def print_large(large: dict) -> None:
    print(f"\nsynthetic pool {large['samples']:,} x {large['values']}: exact {large['exact_s']:.3f} s "
          f"({large['exact_status']}, KKT {large['exact_kkt']:.1e}, {large['exact_iterations']} iterations; "
          f"first call with compile {large['exact_first_call_s']:.2f} s), PyTorch reference "
          f"{large['reference_torch_s']:.2f} s -> {large['speedup']:.0f}x")


if __name__ == "__main__":
    main()
