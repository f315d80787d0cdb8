"""``mapjax demo``: the whole MAP procedure offline, on the packaged SmolLM2-135M policy and MiniLM.

1. Sample k continuations for each of a few dozen everyday requests (shipped in ``mapjax/assets``) and score
   them: sentiment (VADER), coherence (MiniLM), diversity and perplexity under the policy. That is the pool.
2. Solve a palette on it (default: raise sentiment and coherence to their 70% quantiles, hold diversity and
   perplexity at their means) with the per-prompt normaliser, which is the objective MAP-D with k candidates
   realises. An unreachable palette is reported and moved to the nearest reachable one (Algorithm 2).
3. Run MAP-D on held-out requests: k candidates each, keep one with probability softmax(λᵀr).
4. Print target vs realised vs base levels, say whether the palette was met, and write a Markdown report with
   plots into the output folder.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mapjax.errors import InputError
from mapjax.jsonio import write_json
from mapjax.outputs import check_output_folder, write_run_marker

DEFAULT_VALUES = ("sentiment", "coherence", "diversity", "perplexity")
DEFAULT_PALETTE = "sentiment>=q0.7, coherence>=q0.7, diversity>=mean, perplexity>=mean"


@dataclass(frozen=True)
class DemoSettings:
    out: Path
    palette: str = DEFAULT_PALETTE
    values: tuple[str, ...] = DEFAULT_VALUES
    pool_prompts: int = 32
    heldout_prompts: int = 16
    k: int = 8
    max_new_tokens: int = 40
    seed: int = 0
    batch_size: int = 32
    force: bool = False
    dtype: str = "float32"   # parameters of the policy and MiniLM (and the KV cache): "float32" or "bfloat16"


def demo_prompts() -> list[str]:
    """The shipped prompt set: a few dozen everyday requests, one a line."""
    text = resources.files("mapjax").joinpath("assets/demo_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split_prompts(prompts: Sequence[str], pool_count: int, heldout_count: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle, cut into the pool's prompts and the held-out prompts MAP-D is evaluated on."""
    if pool_count < 2 or heldout_count < 2:
        raise InputError("--pool-prompts and --heldout-prompts must each be at least 2")
    if pool_count + heldout_count > len(prompts):
        raise InputError(f"--pool-prompts {pool_count} + --heldout-prompts {heldout_count} exceed the "
                         f"{len(prompts)} prompts available")
    order = np.random.default_rng(seed).permutation(len(prompts))
    shuffled = [prompts[i] for i in order]
    return shuffled[:pool_count], shuffled[pool_count:pool_count + heldout_count]


def run_demo(settings: DemoSettings, *, policy: Any = None, tokenizer: Any = None, rewards: Sequence[Any] | None = None,
             prompts: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the demo; ``policy``/``tokenizer``/``rewards``/``prompts`` replace the packaged defaults (tests use
    tiny ones). Returns the summary also written to ``summary.json``."""
    from mapjax import adjust, solve
    from mapjax.build import build_pool
    from mapjax.decode import decode_pool, expected_levels, first_samples
    from mapjax.dtypes import resolve_dtype
    from mapjax.evaluate import realised_levels
    from mapjax.prompts import chat_formatter

    started = time.perf_counter()
    out = settings.out
    check_settings(settings)
    pool_prompts, heldout = split_prompts(list(prompts or demo_prompts()), settings.pool_prompts,
                                          settings.heldout_prompts, settings.seed)
    write_run_marker(out, "demo")   # a later --force may rebuild only a folder the demo made
    if policy is None:
        from mapjax.models import from_gguf
        from mapjax.models.packaged import smollm2_gguf_path

        _say(f"loading SmolLM2-135M-Instruct (packaged GGUF, {settings.dtype})")
        policy, tokenizer = from_gguf(smollm2_gguf_path(), resolve_dtype(settings.dtype))
    values = list(rewards) if rewards is not None else list(settings.values)
    # Chunks of 8 requests: the progress bar moves, and an interrupted demo resumes from the last chunk.
    sampling = dict(samples_per_prompt=settings.k, max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                    chunk_size=8, dtype=settings.dtype,
                    format_prompt=chat_formatter(tokenizer), overwrite=settings.force, progress=True)

    _say(f"1/4 pool: {len(pool_prompts)} requests x {settings.k} samples, scoring {', '.join(map(_name, values))}")
    pool = build_pool(policy, tokenizer, pool_prompts, values, out=out / "pool.jsonl", seed=settings.seed, **sampling)

    _say(f"2/4 solving the palette: {settings.palette}")
    requested = solve(pool, settings.palette, normaliser="per_prompt")
    solution, adjusted = requested, None
    if not requested.feasible:
        adjusted = adjust.interpolate(pool, settings.palette, normaliser="per_prompt")
        solution = adjusted.solution
        _say(f"    unreachable ({requested.certificate.explain()}); moved to the nearest reachable palette, "
             f"rho = {adjusted.rho:.3f}")

    _say(f"3/4 MAP-D on {len(heldout)} held-out requests, k = {settings.k}")
    candidates = build_pool(policy, tokenizer, heldout, values, out=out / "heldout_candidates.jsonl",
                            seed=settings.seed + 1, **sampling)
    decoded = decode_pool(candidates, solution, seed=settings.seed)
    base = first_samples(candidates)

    _say("4/4 evaluating and writing the report")
    targets = dict(zip(pool.value_names, solution.targets))
    constrained = {name: float(level) for name, level in targets.items() if not math.isnan(level)}
    report = realised_levels(decoded.result, constrained)
    base_levels = realised_levels(base)
    expected = dict(zip(candidates.value_names, expected_levels(candidates, solution)))
    decoded.result.save(out / "mapd_result.jsonl", overwrite=True)
    base.save(out / "base_result.jsonl", overwrite=True)
    plots = _plots(out, pool, decoded.result, base, constrained)
    summary = {
        "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in settings.__dict__.items()},
        "pool": {"prompts": pool.num_prompts, "samples": pool.num_samples},
        "requested": requested.to_dict(),
        "adjusted": None if adjusted is None else adjusted.to_dict(),
        "lambda": solution.lam_by_name(),
        "ess_per_prompt": solution.ess,
        "realised": report.to_dict(),
        "base": base_levels.to_dict(),
        "expected": expected,
        "palette_met": report.all_met,
        "seconds": time.perf_counter() - started,
        "plots": [str(path.name) for path in plots],
    }
    write_json(out / "summary.json", summary)
    table = _level_table(pool.value_names, constrained, expected, report, base_levels)
    (out / "report.md").write_text(_markdown(settings, pool, requested, adjusted, solution, table, report, decoded,
                                             base, plots, summary["seconds"]))
    print()
    print(table)
    print()
    verdict = "MET" if report.all_met else "NOT MET"
    print(f"palette {verdict}: {_verdict_sentence(report)}")
    print(f"report: {out / 'report.md'} ({summary['seconds']:.0f} s)")
    return summary


def check_settings(settings: DemoSettings) -> None:
    """Everything about the settings that can be wrong, checked before any model is loaded."""
    from mapjax.dtypes import dtype_name
    from mapjax.palette import parse

    # Not the working folder, not a file, not a folder of the user's (--force or not).
    check_output_folder(settings.out, overwrite=settings.force, flag="--out", overwrite_flag="--force")
    dtype_name(settings.dtype, what="--dtype")
    for name in ("k", "max_new_tokens", "batch_size"):
        value = getattr(settings, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    unknown = [name for name in parse(settings.palette).names if name not in settings.values]
    if unknown:
        raise InputError(f"the palette names {unknown}, which the demo does not score; it scores "
                         f"{list(settings.values)} (change --values)")


def _name(value: Any) -> str:
    return value if isinstance(value, str) else value.name


def _say(message: str) -> None:
    print(f"[mapjax demo] {message}", flush=True)


def _plots(out: Path, pool, result, base, targets) -> list[Path]:
    from mapjax import plots

    written = []
    if pool.num_values >= 3:
        models = {"MAP-D": dict(zip(result.value_names, result.means())),
                  "base sample": dict(zip(base.value_names, base.means()))}
        written.append(plots.radar(models, pool, out / "radar.png", targets=targets, overwrite=True))
    written.append(plots.reward_histograms(base, out / "histograms.png", aligned={"MAP-D": result}, overwrite=True))
    return written


def _level_table(names, targets, expected, report, base_levels) -> str:
    width = max(10, *(len(name) for name in names))
    lines = [f"| {'value':<{width}} | {'target':>8} | {'MAP-D realised':>20} | {'expected':>8} | {'base':>20} | met |",
             f"|{'-' * (width + 2)}|{'-' * 10}|{'-' * 22}|{'-' * 10}|{'-' * 22}|-----|"]
    for name in names:
        level, base = report[name], base_levels[name]
        target = f"{targets[name]:8.3f}" if name in targets else f"{'-':>8}"
        met = "-" if level.met is None else ("yes" if level.met else "NO")
        lines.append(f"| {name:<{width}} | {target} | {level.mean:8.3f} ± {level.standard_error:9.3f} | "
                     f"{expected[name]:8.3f} | {base.mean:8.3f} ± {base.standard_error:9.3f} | {met:>3} |")
    return "\n".join(lines)


def _verdict_sentence(report) -> str:
    missed = [level.name for level in report.levels if level.met is False]
    if not missed:
        return "every constrained value reached its target (within its 95% interval)"
    return f"{', '.join(missed)} fell short of the target (the whole 95% interval lies below it)"


def _markdown(settings, pool, requested, adjusted, solution, table, report, decoded, base, plots, seconds) -> str:
    lam = ", ".join(f"{name} {value:.3f}" for name, value in solution.lam_by_name().items())
    lines = [
        "# mapjax demo report",
        "",
        f"Policy: SmolLM2-135M-Instruct (packaged GGUF, {settings.dtype}). "
        f"Pool: {pool.num_prompts} requests x {settings.k} samples, "
        f"{settings.max_new_tokens} new tokens, top-k 50, seed {settings.seed}. Held-out: {settings.heldout_prompts} "
        f"requests. Ran in {seconds:.0f} s.",
        "",
        f"Palette asked: `{settings.palette}`",
        "",
        f"Feasibility: **{requested.status}** — {requested.certificate.explain() if requested.certificate else ''}",
    ]
    if adjusted is not None:
        lines += ["", f"Adjusted (Algorithm 2, rho = {adjusted.rho:.3f}) to a reachable palette."]
    lines += [
        "",
        f"λ (per-prompt normaliser): {lam}; KKT residual {solution.kkt_residual:.1e} sd; "
        f"KL {solution.kl:.3f}; ESS per prompt {solution.ess:.2f} of {settings.k}.",
        "",
        "## Levels on the held-out requests",
        "",
        "`expected` is MAP-D's level computed from the candidates' softmax weights (no sampling); `base` is one "
        "plain sample per request. Met: the target is not above the realised level's 95% interval.",
        "",
        table,
        "",
        f"**Palette {'met' if report.all_met else 'not met'}**: {_verdict_sentence(report)}.",
        "",
    ]
    lines += [f"![{path.stem}]({path.name})" for path in plots]
    lines += ["", "## A few held-out requests", ""]
    for prompt_row in range(min(4, decoded.result.num_prompts)):
        lines += [
            f"**{decoded.result.prompts[prompt_row]}**",
            "",
            f"- base: {base.generations[prompt_row][0].strip()}",
            f"- MAP-D: {decoded.result.generations[prompt_row][0].strip()}",
            "",
        ]
    return "\n".join(lines)
