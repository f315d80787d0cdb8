"""MAP-F routes at equal wall time: reward-weighted likelihood, DPO, GRPO and PPO toward one palette's p_λ.

No PyTorch side: every route is mapjax's; the table compares the routes with each other (the PyTorch
comparison of the training step itself is ``benchmarks/finetune.py``).

The demo setting (``mapjax demo``'s): the packaged SmolLM2-135M-Instruct policy fed through its chat template, the
shipped everyday requests split as the demo splits them (32 for the pool, 16 held out), k = 8 samples of 40 new
tokens per pool request scored by sentiment, coherence, diversity and perplexity, and the demo palette solved on
that pool with the per-prompt normaliser. Each method then trains from the base policy for the same wall time,
``--budget`` seconds:

1. a short probe run (``--probe-steps`` steps) measures the method's time per step (the first step, which
   compiles, is left out of the median);
2. the timed run takes ``max(1, budget // step time)`` steps (one run, so its schedule and checkpoints are those
   of a normal run); its wall time is reported in full and without its first step's compilation.

Every trained model, and the base, is evaluated on fresh samples of the held-out requests (``--eval-samples``
per request, sampled through the chat template as the pool was): realised levels with prompt-clustered standard
errors against the palette's targets (``mapjax.evaluate.realised_levels``), and the KL to the base model
estimated from the model's own samples (mean of log p_θ − log p0; ``mapjax.finetune.against_base.kl_to_base``).

    python benchmarks/online_mapf.py --budget 600 --out runs/online-mapf [--methods weighted,dpo,grpo,ppo]
                                     [--set grpo.learning_rate=2e-5] [--json results.json]
    python benchmarks/online_mapf.py --tiny          # tiny random model, seconds: the plumbing, for the tests

``--set METHOD.KEY=VALUE`` changes one method's setting (``FinetuneConfig`` for weighted and dpo,
``OnlineConfig`` for grpo and ppo; the value is read as YAML). ``--out`` keeps the pool (a rerun reuses it),
``results.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

METHODS = ("weighted", "dpo", "grpo", "ppo")
OFFLINE = ("weighted", "dpo")

# Each method's settings on the demo setting (steps come from the budget). The offline methods take
# FinetuneConfig fields, the online ones OnlineConfig fields. The same rollout size for both online methods.
DEFAULTS: dict[str, dict[str, Any]] = {
    "weighted": {"batch_size": 8, "learning_rate": 5e-5},
    "dpo": {"batch_size": 8, "learning_rate": 5e-6, "beta": 0.1},
    "grpo": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 40, "ppo_epochs": 2, "learning_rate": 1e-5},
    "ppo": {"prompts_per_step": 8, "group_size": 4, "max_new_tokens": 40, "ppo_epochs": 2, "learning_rate": 1e-5},
}
TINY_DEFAULTS: dict[str, dict[str, Any]] = {
    "weighted": {"batch_size": 4, "learning_rate": 1e-3},
    "dpo": {"batch_size": 2, "learning_rate": 1e-3, "beta": 0.1},
    "grpo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "ppo_epochs": 1, "learning_rate": 1e-3},
    "ppo": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "ppo_epochs": 1, "learning_rate": 1e-3},
}


@dataclasses.dataclass
class Setting:
    """The policy, its prompts and values, the palette, and how the pool is sampled."""

    label: str
    policy: Any
    tokenizer: Any
    pool_prompts: list[str]
    heldout: list[str]
    values: list[Any]                          # Reward instances (perplexity under the base policy)
    palette: str
    format_prompt: Callable[[str], str] | None
    k: int
    max_new_tokens: int
    batch_size: int
    chunk_size: int
    defaults: dict[str, dict[str, Any]]


class WordLevel:
    """``--tiny``'s toy value: the mean word id of a word-token continuation, in hundreds (it differs between
    almost any two samples, unlike diversity on a handful of random words)."""

    name = "word-level"

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        import numpy as np

        return [float(np.mean([int(w[1:]) for w in text.split() if w[1:].isdigit()] or [0.0])) / 100.0
                for text in continuations]


def _rewards(names_or_rewards: Sequence[Any], policy: Any, tokenizer: Any) -> list[Any]:
    """Reward instances for the values, built once (a model reward loads once for pool, training and
    evaluation); ``perplexity`` under the base policy, as the pool scores it."""
    from mapjax.scoring import resolve_values

    return [value.reward for value in resolve_values(list(names_or_rewards), policy, tokenizer, None)]


def demo_setting(args: argparse.Namespace) -> Setting:
    from mapjax.demo import DEFAULT_PALETTE, DEFAULT_VALUES, DemoSettings, demo_prompts, split_prompts
    from mapjax.models import from_gguf
    from mapjax.models.packaged import smollm2_gguf_path
    from mapjax.prompts import chat_formatter

    demo = DemoSettings(out=Path("."))
    pool_prompts, heldout = split_prompts(demo_prompts(), demo.pool_prompts, demo.heldout_prompts, args.seed)
    policy, tokenizer = from_gguf(smollm2_gguf_path())
    return Setting("the demo setting (SmolLM2-135M-Instruct, chat template)", policy, tokenizer, pool_prompts,
                   heldout, _rewards(DEFAULT_VALUES, policy, tokenizer), args.palette or DEFAULT_PALETTE,
                   chat_formatter(tokenizer), demo.k, demo.max_new_tokens, demo.batch_size, 8, DEFAULTS)


def tiny_setting(args: argparse.Namespace) -> Setting:
    """A tiny random Llama (SmolLM2's architecture at toy size) and a word tokenizer with a chat template."""
    from benchmarks.suite_models import build_mapjax_model, model_spec, word_prompts, word_tokenizer

    spec = model_spec("smollm2", tiny=True)
    policy = build_mapjax_model(spec, "float32", seed=args.seed)
    tokenizer = word_tokenizer(spec.vocab_size)
    tokenizer.chat_template = ("{% for message in messages %}w500 {{ message['content'] }} w501 {% endfor %}"
                               "{% if add_generation_prompt %}w502{% endif %}")
    from mapjax.prompts import chat_formatter

    prompts = word_prompts(8, 4, spec.vocab_size, args.seed)
    return Setting("--tiny (a random toy Llama, word tokenizer)", policy, tokenizer, prompts[:4], prompts[4:6],
                   _rewards([WordLevel(), "perplexity"], policy, tokenizer),
                   args.palette or "word-level>=q0.6, perplexity>=mean", chat_formatter(tokenizer), 4, 4, 16, 4,
                   TINY_DEFAULTS)


# ============================================================================ training


def method_settings(setting: Setting, overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each method's settings: the defaults with ``METHOD.KEY=VALUE`` overrides (values read as YAML); an
    unknown method or key is an error before anything runs."""
    import yaml

    from mapjax.finetune import FinetuneConfig, OnlineConfig

    settings = {method: dict(values) for method, values in setting.defaults.items()}
    for override in overrides:
        key, equals, text = override.partition("=")
        method, dot, name = key.partition(".")
        if not (equals and dot and name) or method not in METHODS:
            raise SystemExit(f"--set {override!r}: write it as METHOD.KEY=VALUE with METHOD one of {METHODS}")
        settings[method][name] = yaml.safe_load(text)
    for method, values in settings.items():
        cls = FinetuneConfig if method in OFFLINE else OnlineConfig
        known = {field.name for field in dataclasses.fields(cls)} - {"steps", "epochs"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"--set {method}.{unknown[0]}: {cls.__name__} has no such setting (it takes "
                             f"{', '.join(sorted(known))})")
        config = cls(**values, steps=1)
        config.validate(method)
    return settings


def trainer(method: str, setting: Setting, pool: Any, solution: Any, settings: dict[str, Any]
            ) -> Callable[[int, Callable[[int, dict[str, Any]], None]], Any]:
    """``train(steps, callback) -> model``: the method from the base policy toward the solution's p_λ."""
    from mapjax.finetune import FinetuneConfig, OnlineConfig, finetune, finetune_online

    if method in OFFLINE:
        options = {}
        if "format_prompt" in inspect.signature(finetune).parameters:
            options["format_prompt"] = setting.format_prompt   # tokenize the prompts as the pool was sampled

        def train(steps: int, callback: Callable[[int, dict[str, Any]], None]) -> Any:
            config = FinetuneConfig(**settings, steps=steps)
            return finetune(setting.policy, setting.tokenizer, pool, solution, method=method, config=config,
                            callback=callback, progress=False, **options).model
        return train

    def train_online(steps: int, callback: Callable[[int, dict[str, Any]], None]) -> Any:
        config = OnlineConfig(**settings, steps=steps)
        return finetune_online(setting.policy, setting.tokenizer, list(pool.prompts), setting.values, solution,
                               method=method, config=config, format_prompt=setting.format_prompt,
                               callback=callback, progress=False).model
    return train_online


@dataclasses.dataclass
class Timed:
    """One run: its model, wall time, and the time of each step (the first includes compilation)."""

    model: Any
    wall: float
    steps: list[float]

    @property
    def step_time(self) -> float:
        """The median step after the first (the first alone when there is one)."""
        return statistics.median(self.steps[1:]) if len(self.steps) > 1 else self.steps[0]

    @property
    def compile_time(self) -> float:
        """The first step's excess over the median step: compilation (0 with a single step: unknown)."""
        return max(0.0, self.steps[0] - self.step_time) if len(self.steps) > 1 else 0.0


def timed(train: Callable[[int, Callable[[int, dict[str, Any]], None]], Any], steps: int) -> Timed:
    marks: list[float] = []
    started = time.perf_counter()
    model = train(steps, lambda step, metrics: marks.append(time.perf_counter()))
    wall = time.perf_counter() - started
    edges = [started] + marks
    return Timed(model, wall, [b - a for a, b in zip(edges, edges[1:])])


def run_method(method: str, train: Callable[..., Any], budget: float, probe_steps: int) -> tuple[Timed, dict]:
    """Probe the step time, then train for ``budget`` seconds' worth of steps."""
    probe = timed(train, probe_steps)
    steps = max(1, int(budget // probe.step_time))
    print(f"[online-mapf] {method}: {probe.step_time:.2f} s per step (probe of {probe_steps}); {steps} steps for "
          f"{budget:g} s", flush=True)
    run = timed(train, steps)
    info = {"steps": steps, "wall_s": run.wall, "train_s": run.wall - run.compile_time,
            "compile_s": run.compile_time, "step_s": run.step_time, "probe_step_s": probe.step_time}
    return run, info


# ============================================================================ evaluation


def evaluate(setting: Setting, model: Any, targets: dict[str, float], args: argparse.Namespace) -> dict[str, Any]:
    """Realised levels on fresh samples of the held-out prompts, and the KL to the base from those samples."""
    import numpy as np

    from mapjax.evaluate import realised_levels
    from mapjax.finetune.against_base import kl_to_base, sample_and_score
    from mapjax.pool import RewardPool
    from mapjax.scoring import resolve_values

    scored = resolve_values(setting.values, setting.policy, setting.tokenizer, None)
    generation, scores = sample_and_score(model, setting.tokenizer, setting.heldout, scored,
                                          samples=args.eval_samples, max_new_tokens=setting.max_new_tokens,
                                          seed=args.seed + 2, batch_size=setting.batch_size,
                                          format_prompt=setting.format_prompt)
    names = tuple(value.name for value in scored)
    rewards = np.stack([scores[name] for name in names], axis=-1)
    report = realised_levels(RewardPool(rewards, np.ones(rewards.shape[:2], bool), names), targets)
    per_prompt = kl_to_base(model, setting.policy, generation, batch_size=setting.batch_size).reshape(
        len(setting.heldout), args.eval_samples).mean(axis=1)
    error = float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")
    return {"levels": {level.name: {"mean": level.mean, "se": level.standard_error, "target": level.target,
                                    "met": level.met} for level in report.levels},
            "palette_met": report.all_met, "kl": {"mean": float(per_prompt.mean()), "se": error}}


def table(names: Sequence[str], rows: dict[str, dict[str, Any]], targets: dict[str, float]) -> str:
    def cell(mean: float, error: float) -> str:
        return f"{mean:.3f} ± {error:.3f}" if math.isfinite(error) else f"{mean:.3f}"

    lines = ["| method | steps | wall s | train s | compile s | " + " | ".join(names) + " | KL to base | met |",
             "|---|---:|---:|---:|---:|" + "---|" * (len(names) + 2)]
    lines.append("| target | | | | | " + " | ".join(f"≥ {targets[n]:.3f}" if n in targets else "-" for n in names)
                 + " | | |")
    for method, row in rows.items():
        timing = row.get("timing") or {}
        cells = []
        for name in names:
            level = row["levels"][name]
            mark = "" if level["met"] is None else (" ✓" if level["met"] else " ✗")
            cells.append(cell(level["mean"], level["se"]) + mark)
        numbers = [f"{timing[key]:.1f}" if key in timing else "-" for key in ("wall_s", "train_s", "compile_s")]
        lines.append(f"| {method} | {timing.get('steps', '-')} | " + " | ".join(numbers) + " | "
                     + " | ".join(cells) + f" | {cell(row['kl']['mean'], row['kl']['se'])} | "
                     + ("yes" if row["palette_met"] else "no") + " |")
    return "\n".join(lines)


# ============================================================================ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per method (default 300)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    parser.add_argument("--probe-steps", type=int, default=3, help="steps of the probe run that times a step")
    parser.add_argument("--eval-samples", type=int, default=4, help="fresh samples per held-out prompt")
    parser.add_argument("--palette", default=None, help="default: the demo palette")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for the pool and the results "
                        "(default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: the plumbing in seconds")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: {bad or 'none'}; choose among {', '.join(METHODS)}")
    if not args.budget > 0 or args.probe_steps < 1 or args.eval_samples < 1:
        raise SystemExit("--budget must be > 0, --probe-steps and --eval-samples >= 1")
    with tempfile.TemporaryDirectory() as scratch:
        return run(args, methods, args.out or Path(scratch))


def run(args: argparse.Namespace, methods: list[str], out: Path) -> dict[str, Any]:
    from mapjax import adjust, solve
    from mapjax.build import build_pool
    from mapjax.evaluate import resolve_targets
    from mapjax.jsonio import dumps

    started = time.perf_counter()
    setting = tiny_setting(args) if args.tiny else demo_setting(args)
    settings = method_settings(setting, args.overrides)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[online-mapf] pool: {len(setting.pool_prompts)} prompts x {setting.k} ({setting.label})", flush=True)
    pool = build_pool(setting.policy, setting.tokenizer, setting.pool_prompts, setting.values,
                      samples_per_prompt=setting.k, out=out / "pool.jsonl", seed=args.seed,
                      max_new_tokens=setting.max_new_tokens, batch_size=setting.batch_size,
                      chunk_size=setting.chunk_size, format_prompt=setting.format_prompt, progress=not args.tiny)
    solution = solve(pool, setting.palette, normaliser="per_prompt")
    note = ""
    if not solution.feasible:
        adjusted = adjust.interpolate(pool, setting.palette, normaliser="per_prompt")
        solution, note = adjusted.solution, f"palette out of reach; moved to the nearest reachable, ρ = {adjusted.rho:.3f}"
    targets = resolve_targets(setting.palette, pool)
    print("[online-mapf] λ = " + ", ".join(f"{n} {v:.3g}" for n, v in solution.lam_by_name().items()), flush=True)
    rows: dict[str, dict[str, Any]] = {"base": {**evaluate(setting, setting.policy, targets, args), "timing": None}}
    for method in methods:
        model_run, timing = run_method(method, trainer(method, setting, pool, solution, settings[method]),
                                       args.budget, args.probe_steps)
        rows[method] = {**evaluate(setting, model_run.model, targets, args), "timing": timing,
                        "settings": settings[method]}
        del model_run
    names = list(pool.value_names)
    markdown = table(names, rows, targets)
    results = {"setting": setting.label, "palette": setting.palette, "note": note, "targets": targets,
               "lambda": solution.lam_by_name(), "budget_s": args.budget, "probe_steps": args.probe_steps,
               "eval": {"prompts": len(setting.heldout), "samples": args.eval_samples}, "rows": rows,
               "seconds": time.perf_counter() - started}
    header = (f"MAP-F at equal wall time ({args.budget:g} s of training per method), {setting.label}; palette "
              f"`{setting.palette}`{'; ' + note if note else ''}; evaluated on {len(setting.heldout)} held-out "
              f"prompts x {args.eval_samples} fresh samples (mean ± prompt-clustered SE; ✓/✗: target within / "
              "below the 95% interval); KL to base: mean of log p_θ − log p0 over the model's samples (nats).")
    (out / "results.md").write_text(header + "\n\n" + markdown + "\n", encoding="utf-8")
    (out / "results.json").write_text(dumps(results, indent=1), encoding="utf-8")
    if args.json is not None:
        args.json.write_text(dumps(results, indent=1), encoding="utf-8")
    print()
    print(header)
    print()
    print(markdown)
    return json.loads(dumps(results, indent=None))


if __name__ == "__main__":
    main()
