"""The paper's Table 3 with every column, decoding and finetuning, from one config.

    python -m experiments.table3_mapf --config configs/table3_mapf_demo.yaml --out runs/table3-demo
    python -m experiments.table3_mapf --config configs/table3_mapf_opt.yaml --out runs/table3-opt   # accelerator

Columns (each one function below, run in the config's order, each a set of models):

- **MAP-D**: MAP's λ for the config's palette, plus ``navigation.random_palettes`` palettes drawn as the paper
  draws them (c_i ~ U(c0_i, max r_i), kept when feasible with ||λ||₁ < max_l1), each realised by decoding: keep
  one of the k evaluation candidates per prompt with probability softmax(λᵀr).
- **MAP-F**: the same λ (the first ``online.models`` of them), realised by online finetuning (PPO by default,
  the paper's route; ``mapjax.finetune.finetune_online``) with reward λᵀr and KL coefficient 1 to the base.
- **MORL-D / MORL-F**: ``navigation.morl_draws`` λ drawn as the paper's MORL baseline draws them
  (λ = s·u, s ~ U(0, max_l1), u ~ Dirichlet(1); ``mapjax.adjust.random_morl_lambdas``), decoded / finetuned
  exactly as MAP's λ are.
- **DPO(β)**: for each β in ``dpo.betas`` and each mixing ratio ρ in ``dpo.ratios``, DPO from the base model on
  one preference pair per training prompt (its highest- against its lowest-scoring sample): ranked by the first
  of ``dpo.values`` on a seeded share ρ of the prompts and by the second on the rest. That is the paper's
  baseline on the pool's own samples: it trained DPO on hh-rlhf's helpful and harmless preference data mixed at
  ratios 0..1.
- **DPO-Soup(β)**: the paper's DPO-Soup / Rewarded Soups: the two per-value DPO models (ρ = 1: the first value
  alone; ρ = 0: the second) interpolated in weight space (``mapjax.finetune.soup``) with weight w on the first,
  for each w in ``soup.weights``.

Every model is evaluated on the same held-out prompts: decoded models on the k candidates of the base model
(the one sample kept per prompt), finetuned models on ``evaluation.samples`` fresh samples per prompt, sampled
with the prompt formatting the pool was sampled with (the chat template when ``chat_template``). Levels are
means with prompt-clustered standard errors (``mapjax.evaluate.realised_levels``) against the palette's targets
(resolved on the training pool). KL to the base: for decoded models, the selection's KL on the candidates
(mean over prompts of Σ_j w_j log(k w_j)); for finetuned models, the mean over their samples of
log p_θ(y|x) − log p0(y|x) (``mapjax.finetune.against_base.kl_to_base``). Navigation efficiency (the table's
headline): the share of a column's models whose level is at least the base model's (its mean over all k
candidates) minus the tolerance in each of ``navigation.values``.

Outputs in ``--out``: ``table3.md`` and ``table3.json``, ``config.json``, the training pool and the evaluation
candidates, ``models/`` (each finetuning run: checkpoints and its exported model) and ``members/`` (each
model's evaluation). A rerun of the same config resumes: pools from their manifests, finetuning from its
checkpoints, evaluations from ``members/``. ``--force`` starts another config afresh in a used folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from experiments.common import (
    CONFIGS,
    add_config_arguments,
    add_output_arguments,
    build_config,
    load_yaml,
    prepare_out,
    reports_errors,
)
from experiments.decoding_tables import (
    PromptsConfig,
    SamplingConfig,
    ValueEntry,
    build_rewards,
    check_models,
    load_policy_checked,
    read_prompt_split,
    value_names,
)
from mapjax.errors import BuildError, ConfigError, FinetuneError
from mapjax.jsonio import dumps, jsonable, write_json

COLUMNS = ("MAP-D", "MAP-F", "MORL-D", "MORL-F", "DPO", "DPO-Soup")
ONLINE_COLUMNS = ("MAP-F", "MORL-F")


# ============================================================================ config


@dataclasses.dataclass
class NavigationSettings:
    values: list[str] | None = None           # NE's values (paper: gpt2-helpful, gpt2-harmless); default: the first two
    tolerances: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.06])
    random_values: list[str] | None = None    # the values random palettes and MORL λ run over (default: values)
    random_palettes: int = 0                  # MAP palettes drawn at random, besides the config's palette
    morl_draws: int = 2                       # MORL λ
    max_l1: float = 6.0


@dataclasses.dataclass
class OnlineSettings:
    method: Literal["ppo", "grpo"] = "ppo"
    models: int | None = 1                    # finetuned models per online column: its first n λ (null: all)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)   # mapjax.finetune.OnlineConfig settings


@dataclasses.dataclass
class DpoSettings:
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.5])
    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.5, 1.0])
    values: list[str] | None = None           # the two values whose preferences are mixed (default: navigation's)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)   # FinetuneConfig settings (not beta)


@dataclasses.dataclass
class SoupSettings:
    weights: list[float] = dataclasses.field(default_factory=lambda: [0.25, 0.5, 0.75])   # on the first value's model


@dataclasses.dataclass
class EvaluationSettings:
    samples: int = 2                          # fresh samples per evaluation prompt of each finetuned model
    batch_size: int = 16


@dataclasses.dataclass
class Table3Config:
    """configs/table3_mapf_*.yaml."""

    policy: str                               # packaged-smollm2, a .gguf file, an HF folder or a cached hub id
    values: list[str | ValueEntry]
    palette: str                              # MAP's palette (MAP-D's and MAP-F's first model)
    title: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    chat_template: bool = False               # feed prompts through the tokenizer's chat template (pool and models)
    seed: int = 0
    pool_samples: int = 8                     # samples per training prompt: λ, DPO pairs and MAP-F's prompts
    k: int = 16                               # candidates per evaluation prompt (MAP-D, MORL-D, the base levels)
    normaliser: Literal["pooled", "per_prompt"] = "per_prompt"
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)   # pilot_count: training prompts
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    reward_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    columns: list[str] = dataclasses.field(default_factory=lambda: list(COLUMNS))
    navigation: NavigationSettings = dataclasses.field(default_factory=NavigationSettings)
    online: OnlineSettings = dataclasses.field(default_factory=OnlineSettings)
    dpo: DpoSettings = dataclasses.field(default_factory=DpoSettings)
    soup: SoupSettings = dataclasses.field(default_factory=SoupSettings)
    evaluation: EvaluationSettings = dataclasses.field(default_factory=EvaluationSettings)
    confidence: float = 0.95
    paper: dict[str, Any] = dataclasses.field(default_factory=dict)   # the paper's numbers, for comparison only


def _positive_int(key: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be a whole number >= {minimum}, got {value!r}")


def _unit_interval(key: str, values: Sequence[float]) -> None:
    for index, value in enumerate(values):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ConfigError(f"{key}[{index}] must lie in [0, 1], got {value!r}")


def _known(key: str, names: Sequence[str], scored: Sequence[str]) -> None:
    unknown = [name for name in names if name not in scored]
    if unknown:
        raise ConfigError(f"{key} names {unknown}, which the config does not score (values: {list(scored)})")


def dpo_config(settings: DpoSettings, beta: float) -> Any:
    """The FinetuneConfig of DPO(β): ``dpo.config``'s settings with ``beta``; a ConfigError naming a bad one."""
    from mapjax.finetune import FinetuneConfig

    known = {field.name for field in dataclasses.fields(FinetuneConfig)}
    for key in settings.config:
        if key == "beta":
            raise ConfigError("dpo.config.beta: β comes from dpo.betas (one DPO column per β)")
        if key not in known:
            raise ConfigError(f"dpo.config.{key}: unknown setting; FinetuneConfig takes {', '.join(sorted(known))}")
    try:
        config = FinetuneConfig(**{**settings.config, "beta": float(beta)})
        config.validate("dpo")
    except FinetuneError as error:
        raise ConfigError(f"dpo.config: {error}") from None
    return config


def online_config(settings: OnlineSettings) -> Any:
    """The OnlineConfig of the online columns; a ConfigError naming a bad setting."""
    from mapjax.finetune import OnlineConfig

    known = {field.name for field in dataclasses.fields(OnlineConfig)}
    for key in settings.config:
        if key not in known:
            raise ConfigError(f"online.config.{key}: unknown setting; OnlineConfig takes {', '.join(sorted(known))}")
    try:
        config = OnlineConfig(**settings.config)
        config.validate(settings.method)
    except FinetuneError as error:
        raise ConfigError(f"online.config: {error}") from None
    return config


def resolve_config(config: Table3Config | Mapping[str, Any]) -> Table3Config:
    """The config typed and checked: everything that can be wrong without a model fails here, in a second."""
    from mapjax.palette import PaletteError, parse

    resolved = build_config(Table3Config, config) if isinstance(config, Mapping) else dataclasses.replace(config)
    names = value_names(resolved.values)
    if not names:
        raise ConfigError("values: the config scores no values")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"values name {repeated} twice")
    try:
        palette = parse(resolved.palette)
    except PaletteError as error:
        raise ConfigError(f"palette: {error}") from None
    _known("palette", palette.names, names)
    columns = list(resolved.columns)
    if not columns:
        raise ConfigError(f"columns is empty; choose among {list(COLUMNS)}")
    for column in columns:
        if column not in COLUMNS:
            raise ConfigError(f"columns: unknown column {column!r}; choose among {list(COLUMNS)}")
    if len(set(columns)) != len(columns):
        raise ConfigError(f"columns lists a column twice: {columns}")
    for key, value in (("prompts.pilot_count", resolved.prompts.pilot_count),
                       ("prompts.eval_count", resolved.prompts.eval_count),
                       ("evaluation.samples", resolved.evaluation.samples),
                       ("evaluation.batch_size", resolved.evaluation.batch_size)):
        _positive_int(key, value)
    _positive_int("k", resolved.k, 2)
    _positive_int("pool_samples", resolved.pool_samples, 2 if "DPO" in columns or "DPO-Soup" in columns else 1)
    if not 0.0 < resolved.confidence < 1.0:
        raise ConfigError(f"confidence must lie strictly between 0 and 1, got {resolved.confidence!r}")

    navigation = resolved.navigation = dataclasses.replace(resolved.navigation)
    navigation.values = list(navigation.values or names[:2])
    navigation.random_values = list(navigation.random_values or navigation.values)
    _known("navigation.values", navigation.values, names)
    _known("navigation.random_values", navigation.random_values, names)
    _positive_int("navigation.random_palettes", navigation.random_palettes, 0)
    _positive_int("navigation.morl_draws", navigation.morl_draws,
                  1 if {"MORL-D", "MORL-F"} & set(columns) else 0)
    if not navigation.max_l1 > 0:
        raise ConfigError(f"navigation.max_l1 must be positive, got {navigation.max_l1!r}")
    for index, tolerance in enumerate(navigation.tolerances):
        if tolerance < 0:
            raise ConfigError(f"navigation.tolerances[{index}] must be >= 0, got {tolerance!r}")

    if {"DPO", "DPO-Soup"} & set(columns):
        dpo = resolved.dpo = dataclasses.replace(resolved.dpo)
        dpo.values = list(dpo.values or navigation.values)
        if len(dpo.values) != 2:
            raise ConfigError(f"dpo.values must name two values (the preferences mixed), got {dpo.values}")
        _known("dpo.values", dpo.values, names)
        if not dpo.betas:
            raise ConfigError("dpo.betas is empty: give at least one β")
        for beta in dpo.betas:
            dpo_config(dpo, beta)
        _unit_interval("dpo.ratios", dpo.ratios)
        if "DPO" in columns and not dpo.ratios:
            raise ConfigError("dpo.ratios is empty: give at least one mixing ratio")
    if "DPO-Soup" in columns:
        _unit_interval("soup.weights", resolved.soup.weights)
        if not resolved.soup.weights:
            raise ConfigError("soup.weights is empty: give at least one interpolation weight")
    if set(ONLINE_COLUMNS) & set(columns):
        if resolved.online.models is not None:
            _positive_int("online.models", resolved.online.models)
        online_config(resolved.online)
    return resolved


# ============================================================================ the run's shared state


@dataclasses.dataclass
class Member:
    """One model of a column: its name, what made it, and how it did on the evaluation prompts."""

    column: str
    name: str
    setting: dict[str, Any]
    levels: dict[str, dict[str, Any]]          # value -> {mean, se, target, met}
    kl: dict[str, Any] | None                  # {mean, se, kind}
    palette_met: bool | None
    seconds: float

    def level(self, value: str) -> float:
        return float(self.levels[value]["mean"])


@dataclasses.dataclass
class Context:
    """What every column reads: the config, the models, the pools, the λ sets, and where results go."""

    config: Table3Config
    out: Path
    force: bool
    progress: bool
    policy: Any
    tokenizer: Any
    rewards: list[Any]                         # Reward instances, the pool's columns in order
    scored: list[Any]                          # mapjax.scoring.ScoredValue s (for sampling evaluations)
    format_prompt: Callable[[str], str] | None
    pool: Any                                  # training pool: pool_samples per training prompt
    candidates: Any                            # evaluation candidates: k per evaluation prompt (from p0)
    eval_prompts: list[str]
    targets: dict[str, float]                  # the palette's levels, resolved on the training pool
    config_key: str                            # hash of the resolved config: members of another config are stale
    lambdas: dict[str, list[tuple[str, np.ndarray, dict[str, Any]]]] = dataclasses.field(default_factory=dict)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(self.pool.value_names)


def _say(message: str) -> None:
    print(f"[table3-mapf] {message}", flush=True)


def _slug(text: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in text).strip("_")


def _lambda_setting(ctx: Context, lam: np.ndarray) -> dict[str, float]:
    return {name: float(value) for name, value in zip(ctx.values, lam)}


# ============================================================================ evaluation


def _levels(ctx: Context, pool: Any) -> tuple[dict[str, dict[str, Any]], bool | None]:
    """Each value's realised level (mean, prompt-clustered SE) in ``pool`` with the palette's verdicts."""
    from mapjax.evaluate import realised_levels

    report = realised_levels(pool, ctx.targets or None, confidence=ctx.config.confidence)
    levels = {level.name: {"mean": level.mean, "se": level.standard_error, "target": level.target,
                           "met": level.met} for level in report.levels}
    return levels, (report.all_met if ctx.targets else None)


def _member_file(ctx: Context, column: str, name: str) -> Path:
    return ctx.out / "members" / f"{_slug(column)}--{_slug(name)}.json"


def _cached(ctx: Context, column: str, name: str) -> Member | None:
    """The member's evaluation from an earlier run of this very config, if there is one."""
    path = _member_file(ctx, column, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if record.pop("config_key", None) != ctx.config_key:
        return None
    return Member(**record)


def _record(ctx: Context, member: Member) -> Member:
    path = _member_file(ctx, member.column, member.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path,
               {**jsonable(dataclasses.asdict(member)), "config_key": ctx.config_key}, indent=1)
    level_text = ", ".join(f"{value} {member.level(value):.3f}" for value in ctx.config.navigation.values)
    kl = "" if member.kl is None else f", KL {member.kl['mean']:.3f}"
    _say(f"{member.column} {member.name}: {level_text}{kl} ({member.seconds:.0f} s)")
    return member


def decoded_member(ctx: Context, column: str, name: str, lam: np.ndarray, setting: dict[str, Any]) -> Member:
    """A λ realised by MAP-D on the evaluation candidates; KL: the selection's KL from the uniform choice."""
    from mapjax.decode import decode_pool, selection_probabilities

    cached = _cached(ctx, column, name)
    if cached is not None:
        return cached
    started = time.perf_counter()
    # One seed for every λ: the same Gumbel noise, so differences between models are λ's alone.
    decoded = decode_pool(ctx.candidates, lam, seed=int(ctx.config.seed))
    levels, met = _levels(ctx, decoded.result)
    weights = selection_probabilities(ctx.candidates, lam)
    counts = ctx.candidates.mask.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(weights > 0, weights * np.log(weights * counts[:, None]), 0.0)
    per_prompt = terms.sum(axis=1)
    kl = {"mean": float(per_prompt.mean()), "se": _se(per_prompt), "kind": "selection on the k candidates"}
    return _record(ctx, Member(column, name, setting, levels, kl, met, time.perf_counter() - started))


def _se(per_prompt: np.ndarray) -> float:
    return float(per_prompt.std(ddof=1) / math.sqrt(len(per_prompt))) if len(per_prompt) > 1 else float("nan")


def sampled_member(ctx: Context, column: str, name: str, model: Any, setting: dict[str, Any],
                   started: float) -> Member:
    """A finetuned model's levels on fresh samples of the evaluation prompts (sampled as the pool was), and its
    KL to the base estimated from those samples."""
    from mapjax.finetune.against_base import kl_to_base, sample_and_score
    from mapjax.pool import RewardPool

    config = ctx.config
    sampling, samples = config.sampling, config.evaluation.samples
    generation, scores = sample_and_score(
        model, ctx.tokenizer, ctx.eval_prompts, ctx.scored, samples=samples,
        max_new_tokens=sampling.max_new_tokens, seed=int(config.seed) + 2, batch_size=config.evaluation.batch_size,
        format_prompt=ctx.format_prompt, top_k=sampling.top_k or None, top_p=sampling.top_p,
        temperature=sampling.temperature)
    rewards = np.stack([scores[value] for value in ctx.values], axis=-1)
    pool = RewardPool(rewards, np.ones(rewards.shape[:2], bool), ctx.values)
    levels, met = _levels(ctx, pool)
    per_prompt = kl_to_base(model, ctx.policy, generation, batch_size=config.evaluation.batch_size).reshape(
        len(ctx.eval_prompts), samples).mean(axis=1)
    kl = {"mean": float(per_prompt.mean()), "se": _se(per_prompt), "kind": "log-ratio on the model's samples"}
    return _record(ctx, Member(column, name, setting, levels, kl, met, time.perf_counter() - started))


# ============================================================================ λ sets


def map_lambdas(ctx: Context) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """MAP's λ: the config's palette (moved to the nearest reachable one when it is out of reach, as the demo
    does), then ``navigation.random_palettes`` random palettes."""
    if "MAP" in ctx.lambdas:
        return ctx.lambdas["MAP"]
    from mapjax import adjust, solve
    from mapjax.palette import PaletteError
    from mapjax.solver import lambda_for

    config = ctx.config
    navigation = config.navigation
    requested = solve(ctx.pool, config.palette, normaliser=config.normaliser)
    solution, info = requested, {"palette": config.palette, "status": requested.status}
    if not requested.feasible:
        adjusted = adjust.interpolate(ctx.pool, config.palette, normaliser=config.normaliser)
        solution = adjusted.solution
        info.update(adjusted_rho=float(adjusted.rho), reason=requested.certificate.explain()
                    if requested.certificate is not None else "")
        ctx.notes["MAP"] = (f"the palette is out of reach on the training pool ({requested.status}); moved to the "
                            f"nearest reachable one, ρ = {adjusted.rho:.3f}")
    info.update(ess=float(solution.ess), kl=float(solution.kl))
    entries = [("palette", lambda_for(ctx.pool, solution), info)]
    if navigation.random_palettes:
        try:
            drawn, share = adjust.random_palettes(ctx.pool, navigation.random_values, navigation.random_palettes,
                                                  seed=int(config.seed), max_l1=float(navigation.max_l1),
                                                  normaliser=config.normaliser)
        except (adjust.TooFewPalettes, PaletteError) as error:
            ctx.notes["MAP random"] = f"no random palettes: {error}"
        else:
            for index in range(len(drawn)):
                palette = {name: float(level) for name, level in zip(drawn.value_names, drawn.targets[index])
                           if not math.isnan(level)}
                entries.append((f"random {index + 1}", lambda_for(ctx.pool, drawn[index]),
                                {"palette": palette, "kept_share": share}))
    ctx.lambdas["MAP"] = entries
    return entries


def morl_lambdas(ctx: Context) -> list[tuple[str, np.ndarray, dict[str, Any]]]:
    """The MORL baseline's λ: s·Dirichlet(1) over ``navigation.random_values``, s ~ U(0, max_l1)."""
    if "MORL" in ctx.lambdas:
        return ctx.lambdas["MORL"]
    from mapjax import adjust
    from mapjax.solver import lambda_for

    navigation = ctx.config.navigation
    draws = adjust.random_morl_lambdas(ctx.pool, navigation.random_values, navigation.morl_draws,
                                       seed=int(ctx.config.seed), max_scale=float(navigation.max_l1),
                                       normaliser=ctx.config.normaliser)
    entries = [(f"draw {index + 1}", lambda_for(ctx.pool, draws[index]), {}) for index in range(len(draws))]
    ctx.lambdas["MORL"] = entries
    return entries


# ============================================================================ training


def _run_folder(ctx: Context, name: str) -> Path:
    return ctx.out / "models" / _slug(name)


def _resuming(train: Callable[[bool], Any], force: bool) -> Any:
    """``train(overwrite)``: resume what the folder holds; under ``--force`` a run of other settings there is
    replaced instead of refused."""
    try:
        return train(False)
    except FinetuneError as error:
        if not force or "another run" not in str(error):
            raise
        return train(True)


def online_model(ctx: Context, name: str, lam: np.ndarray) -> Any:
    """The policy finetuned online (PPO or GRPO) toward p_λ on the training prompts (resumable)."""
    from mapjax.finetune import finetune_online

    config = ctx.config
    folder = _run_folder(ctx, name)

    def train(overwrite: bool) -> Any:
        return finetune_online(ctx.policy, ctx.tokenizer, list(ctx.pool.prompts), ctx.rewards,
                               _lambda_setting(ctx, lam), method=config.online.method,
                               config=online_config(config.online), out=folder, format_prompt=ctx.format_prompt,
                               progress=ctx.progress, overwrite=overwrite)

    return _resuming(train, ctx.force).model


def preference_pool(pool: Any, values: Sequence[str], ratio: float, seed: int) -> Any:
    """The pool with one column, ``preference``: per prompt the score of ``values[0]`` on a seeded share
    ``ratio`` of the prompts and of ``values[1]`` on the rest (nested: a larger ratio adds prompts), so DPO's
    pair per prompt (its best against its worst sample) follows that value's preference."""
    from mapjax.pool import RewardPool

    order = np.random.default_rng([seed, 3]).permutation(pool.num_prompts)
    first = np.zeros(pool.num_prompts, bool)
    first[order[:int(round(ratio * pool.num_prompts))]] = True
    a, b = pool.index_of(values[0]), pool.index_of(values[1])
    column = np.where(first[:, None], pool.rewards[:, :, a], pool.rewards[:, :, b])
    return RewardPool(column[:, :, None], pool.mask, ("preference",), prompts=pool.prompts,
                      generations=pool.generations)


def dpo_name(beta: float, ratio: float) -> str:
    return f"β {beta:g}, ρ {ratio:g}"


def dpo_folder(ctx: Context, beta: float, ratio: float) -> Path:
    """The exported DPO(β, ρ) model, trained first when it is not there yet (resumable)."""
    from mapjax.finetune import finetune

    config = ctx.config
    folder = _run_folder(ctx, f"dpo {dpo_name(beta, ratio)}")
    if (folder / "model" / "config.json").is_file() and (folder / "losses.json").is_file() and not ctx.force:
        return folder / "model"
    data = preference_pool(ctx.pool, config.dpo.values, ratio, int(config.seed))
    options = {}
    if "format_prompt" in inspect.signature(finetune).parameters:
        options["format_prompt"] = ctx.format_prompt
    elif ctx.format_prompt is not None:
        ctx.notes["DPO"] = ("finetune() takes no format_prompt yet: the DPO pairs were tokenized with raw prompts "
                            "although the pool was sampled with the chat template")

    def train(overwrite: bool) -> Any:
        return finetune(ctx.policy, ctx.tokenizer, data, np.ones(1), method="dpo",
                        config=dpo_config(config.dpo, beta), out=folder, progress=ctx.progress,
                        overwrite=overwrite, **options)

    _resuming(train, ctx.force)
    return folder / "model"


def _load(folder: Path, ctx: Context) -> Any:
    from mapjax.models import from_pretrained

    return from_pretrained(folder, ctx.config.dtype)


# ============================================================================ the columns


def column_map_d(ctx: Context) -> list[Member]:
    """MAP-D: MAP's λ, decoded on the evaluation candidates."""
    return [decoded_member(ctx, "MAP-D", name, lam, {"lambda": _lambda_setting(ctx, lam), **info})
            for name, lam, info in map_lambdas(ctx)]


def column_morl_d(ctx: Context) -> list[Member]:
    """MORL-D: the MORL baseline's random λ, decoded on the evaluation candidates."""
    return [decoded_member(ctx, "MORL-D", name, lam, {"lambda": _lambda_setting(ctx, lam)})
            for name, lam, _ in morl_lambdas(ctx)]


def _online_column(ctx: Context, column: str, entries: list[tuple[str, np.ndarray, dict[str, Any]]]
                   ) -> list[Member]:
    count = ctx.config.online.models
    members = []
    for name, lam, info in entries[:count] if count is not None else entries:
        cached = _cached(ctx, column, name)
        if cached is not None:
            members.append(cached)
            continue
        started = time.perf_counter()
        _say(f"{column} {name}: {ctx.config.online.method.upper()} with λ = "
             + ", ".join(f"{value} {weight:.3g}" for value, weight in _lambda_setting(ctx, lam).items()))
        model = online_model(ctx, f"{column} {name}", lam)
        setting = {"lambda": _lambda_setting(ctx, lam), "method": ctx.config.online.method, **info}
        members.append(sampled_member(ctx, column, name, model, setting, started))
    return members


def column_map_f(ctx: Context) -> list[Member]:
    """MAP-F: the policy finetuned online toward p_λ for MAP's λ (the paper's PPO route)."""
    return _online_column(ctx, "MAP-F", map_lambdas(ctx))


def column_morl_f(ctx: Context) -> list[Member]:
    """MORL-F: the same online finetuning with the MORL baseline's random λ."""
    return _online_column(ctx, "MORL-F", morl_lambdas(ctx))


def column_dpo(ctx: Context) -> list[Member]:
    """DPO(β) for each β and preference mixing ratio ρ."""
    members = []
    for beta in ctx.config.dpo.betas:
        for ratio in ctx.config.dpo.ratios:
            name = dpo_name(beta, ratio)
            cached = _cached(ctx, "DPO", name)
            if cached is not None:
                members.append(cached)
                continue
            started = time.perf_counter()
            _say(f"DPO {name}")
            model = _load(dpo_folder(ctx, beta, ratio), ctx)
            members.append(sampled_member(ctx, "DPO", name, model, {"beta": beta, "ratio": ratio,
                                                                    "values": ctx.config.dpo.values}, started))
    return members


def column_dpo_soup(ctx: Context) -> list[Member]:
    """DPO-Soup(β): the per-value DPO(β) models (ρ = 1 and ρ = 0) interpolated in weight space."""
    from mapjax.finetune.soup import soup_from_folders

    members = []
    first, second = ctx.config.dpo.values
    for beta in ctx.config.dpo.betas:
        for weight in ctx.config.soup.weights:
            name = f"β {beta:g}, w {weight:g}"
            cached = _cached(ctx, "DPO-Soup", name)
            if cached is not None:
                members.append(cached)
                continue
            started = time.perf_counter()
            _say(f"DPO-Soup {name}: {weight:g} x DPO({first}) + {1 - weight:g} x DPO({second})")
            folders = [dpo_folder(ctx, beta, 1.0), dpo_folder(ctx, beta, 0.0)]
            model = soup_from_folders(folders, [weight, 1.0 - weight], normalize=True, dtype=ctx.config.dtype)
            setting = {"beta": beta, "weights": {first: weight, second: 1.0 - weight}}
            members.append(sampled_member(ctx, "DPO-Soup", name, model, setting, started))
    return members


COLUMN_FUNCTIONS: dict[str, Callable[[Context], list[Member]]] = {
    "MAP-D": column_map_d, "MAP-F": column_map_f, "MORL-D": column_morl_d, "MORL-F": column_morl_f,
    "DPO": column_dpo, "DPO-Soup": column_dpo_soup,
}


# ============================================================================ the pipeline


def _policy_source(config: Table3Config) -> Table3Config:
    """``packaged-smollm2`` named as the packaged GGUF file; anything else as it is."""
    if config.policy != "packaged-smollm2":
        return config
    from mapjax.models.packaged import smollm2_gguf_path

    return dataclasses.replace(config, policy=str(smollm2_gguf_path()))


def _build(force: bool, **arguments: Any) -> Any:
    """``build_pool`` resuming what the folder holds; under ``force`` a pool of other settings is rebuilt."""
    from mapjax.build import build_pool

    try:
        return build_pool(overwrite=False, **arguments)
    except BuildError:
        if not force:
            raise
        return build_pool(overwrite=True, **arguments)


def run(config: Table3Config | Mapping[str, Any], out: str | Path, *, force: bool = False,
        progress: bool = False) -> dict[str, Any]:
    """Run every configured column and write ``table3.md`` / ``table3.json``; returns the JSON's content."""
    from mapjax.evaluate import resolve_targets
    from mapjax.prompts import chat_formatter
    from mapjax.scoring import resolve_values

    started = time.perf_counter()
    config = resolve_config(config)
    loading = _policy_source(config)
    folders = check_models(loading)                    # before anything slow, and before touching --out
    out = Path(out)
    resumed = prepare_out(out, force=force, config=config, resumable=True)
    _say(f"{'resuming' if resumed else 'writing'} {out}")
    train_prompts, eval_prompts, prompt_info = read_prompt_split(config)
    _say(f"loading the policy {config.policy}")
    policy, tokenizer = load_policy_checked(loading, folders["policy"])
    format_prompt = None
    if config.chat_template:
        format_prompt = chat_formatter(tokenizer)
        if format_prompt is None:
            raise ConfigError(f"chat_template: the tokenizer of {config.policy} has no chat template")
    rewards = build_rewards(config, folders, policy, tokenizer)
    sampling = config.sampling
    generation = dict(max_new_tokens=sampling.max_new_tokens, top_k=sampling.top_k or None,
                      temperature=sampling.temperature, top_p=sampling.top_p, batch_size=sampling.batch_size,
                      chunk_size=sampling.chunk_size, format_prompt=format_prompt, progress=progress,
                      dtype=config.dtype)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    _say(f"training pool: {len(train_prompts)} prompts x {config.pool_samples}")
    pool = _build(force, policy=policy, tokenizer=tokenizer, prompts=train_prompts, values=rewards,
                  samples_per_prompt=config.pool_samples, out=out / "pool.jsonl", seed=config.seed, **generation)
    timings["pool"] = time.perf_counter() - clock
    clock = time.perf_counter()
    _say(f"evaluation candidates: {len(eval_prompts)} prompts x k = {config.k}")
    # seed + 1: the evaluation draws are independent of the training pool's even where prompt indices coincide.
    candidates = _build(force, policy=policy, tokenizer=tokenizer, prompts=eval_prompts, values=rewards,
                        samples_per_prompt=config.k, out=out / "eval_candidates.jsonl", seed=config.seed + 1,
                        **generation)
    timings["candidates"] = time.perf_counter() - clock
    targets = resolve_targets(config.palette, pool)
    key = hashlib.sha256(dumps(config, indent=None).encode("utf-8")).hexdigest()[:16]
    ctx = Context(config, out, force, progress, policy, tokenizer, rewards,
                  resolve_values(rewards, policy, tokenizer, None), format_prompt, pool, candidates, eval_prompts,
                  targets, key)
    original, _ = _levels(ctx, candidates)
    reference = {value: original[value]["mean"] for value in config.navigation.values}

    columns: dict[str, Any] = {}
    for column in config.columns:
        clock = time.perf_counter()
        _say(f"column {column}")
        members = COLUMN_FUNCTIONS[column](ctx)
        timings[column] = time.perf_counter() - clock
        columns[column] = summarise(ctx, column, members, reference)
    timings["total"] = time.perf_counter() - started
    summary = {
        "title": config.title, "config": config, "resumed": resumed, "prompts": prompt_info,
        "pool": {"prompts": pool.num_prompts, "samples": pool.num_samples},
        "candidates": {"prompts": candidates.num_prompts, "k": config.k},
        "formatted_prompts": format_prompt is not None,
        "palette": {"spec": config.palette, "targets": targets},
        "map_lambda": ctx.lambdas.get("MAP", [(None, None, None)])[0][2],
        "original": original, "reference": reference, "columns": columns, "notes": ctx.notes,
        "paper": config.paper, "seconds": timings,
    }
    markdown = document(ctx, summary)
    (out / "table3.md").write_text(markdown, encoding="utf-8")
    (out / "table3.json").write_text(dumps(summary, indent=1), encoding="utf-8")
    print()
    print(navigation_table(ctx, summary))
    print()
    print(f"{out / 'table3.md'} ({timings['total']:.0f} s)")
    return jsonable(summary)


def summarise(ctx: Context, column: str, members: list[Member], reference: Mapping[str, float]) -> dict[str, Any]:
    """A column's models, navigation efficiency at each tolerance, and mean levels and KL over its models."""
    from mapjax.evaluate import navigation_efficiency

    navigation = ctx.config.navigation
    result: dict[str, Any] = {"models": len(members), "members": [dataclasses.asdict(m) for m in members]}
    if not members:
        return result
    levels = {member.name: {value: member.level(value) for value in ctx.values} for member in members}
    result["navigation_efficiency"] = {
        f"{tolerance:g}": navigation_efficiency(levels, reference, navigation.values, tolerance).to_dict()
        for tolerance in navigation.tolerances}
    result["mean_levels"] = {value: float(np.mean([m.level(value) for m in members])) for value in ctx.values}
    kls = [member.kl["mean"] for member in members if member.kl is not None]
    result["mean_kl"] = float(np.mean(kls)) if kls else None
    verdicts = [member.palette_met for member in members if member.palette_met is not None]
    result["palette_met_share"] = float(np.mean(verdicts)) if verdicts else None
    return result


# ============================================================================ tables


def _cell(mean: float, error: float) -> str:
    return f"{mean:.3f} ± {error:.3f}" if math.isfinite(error) else f"{mean:.3f}"


def navigation_table(ctx: Context, summary: Mapping[str, Any]) -> str:
    """Table 3's shape: a row per column, its navigation efficiency at each tolerance, its mean levels and KL."""
    navigation = ctx.config.navigation
    tolerances = [f"{t:g}" for t in navigation.tolerances]
    lines = ["| column | models | " + " | ".join(f"NE (tol {t})" for t in tolerances) + " | "
             + " | ".join(ctx.values) + " | KL to base | palette met |",
             "|---|---|" + "---|" * (len(tolerances) + len(ctx.values) + 2)]
    original = summary["original"]
    lines.append("| Original | 1 | " + " | ".join("-" for _ in tolerances) + " | "
                 + " | ".join(_cell(original[v]["mean"], original[v]["se"]) for v in ctx.values) + " | 0 | - |")
    for column, result in summary["columns"].items():
        if not result["models"]:
            lines.append(f"| {column} | 0 | " + " | ".join("-" for _ in range(len(tolerances) + len(ctx.values) + 2))
                         + " |")
            continue
        shares = [result["navigation_efficiency"][t]["navigation_efficiency"] for t in tolerances]
        kl = "-" if result["mean_kl"] is None else f"{result['mean_kl']:.3f}"
        met = "-" if result["palette_met_share"] is None else f"{100 * result['palette_met_share']:.0f}%"
        lines.append(f"| {column} | {result['models']} | " + " | ".join(f"{100 * s:.0f}%" for s in shares) + " | "
                     + " | ".join(f"{result['mean_levels'][v]:.3f}" for v in ctx.values) + f" | {kl} | {met} |")
    return "\n".join(lines)


def members_table(ctx: Context, summary: Mapping[str, Any]) -> str:
    """Every model: its realised levels against the palette, its KL to the base, whether it met the palette."""
    lines = ["| column | model | " + " | ".join(ctx.values) + " | KL to base | palette met |",
             "|---|---|" + "---|" * (len(ctx.values) + 2)]
    targets = summary["palette"]["targets"]
    lines.append("| Palette | targets | " + " | ".join(f"≥ {targets[v]:.3f}" if v in targets else "-"
                                                      for v in ctx.values) + " | - | - |")
    for column, result in summary["columns"].items():
        for member in result["members"]:
            cells = []
            for value in ctx.values:
                level = member["levels"][value]
                mark = "" if level["met"] is None else (" ✓" if level["met"] else " ✗")
                cells.append(_cell(level["mean"], level["se"]) + mark)
            kl = "-" if member["kl"] is None else _cell(member["kl"]["mean"], member["kl"]["se"])
            met = "-" if member["palette_met"] is None else ("yes" if member["palette_met"] else "no")
            lines.append(f"| {column} | {member['name']} | " + " | ".join(cells) + f" | {kl} | {met} |")
    return "\n".join(lines)


def document(ctx: Context, summary: Mapping[str, Any]) -> str:
    """The Markdown file: what was run, Table 3's shape, every model's levels, notes."""
    config = ctx.config
    navigation = config.navigation
    seconds = summary["seconds"]
    lines = [f"# Table 3 with every column: {config.title or 'MAP vs its finetuning baselines'}", "",
             f"Policy `{config.policy}` ({config.dtype}{', chat template' if summary['formatted_prompts'] else ''});"
             f" prompts `{config.prompts.source}`: {summary['pool']['prompts']} training prompts x "
             f"{config.pool_samples} samples (λ solved with the {config.normaliser} normaliser), "
             f"{summary['candidates']['prompts']} evaluation prompts x k = {config.k} candidates (decoded models and "
             f"the base) or {config.evaluation.samples} fresh samples (finetuned models); top-k "
             f"{config.sampling.top_k}, temperature {config.sampling.temperature}, {config.sampling.max_new_tokens} "
             f"new tokens; seed {config.seed}. {seconds['total']:.0f} s.", "",
             f"Palette: `{config.palette}`. Navigation efficiency (NE): the share of a column's models whose level is "
             f"at least the base's (its mean over all k candidates) minus the tolerance in each of "
             f"{', '.join(navigation.values)}. Online columns: {config.online.method.upper()}, KL coefficient "
             f"{online_config(config.online).kl_coef if set(ONLINE_COLUMNS) & set(config.columns) else '-'}.", "",
             navigation_table(ctx, summary), "", "## Every model", "",
             "Realised level (mean ± prompt-clustered SE; ✓/✗: the palette's target within / below its "
             f"{100 * config.confidence:g}% interval). KL to base: for decoded models the selection's KL on the "
             "candidates, for finetuned models the mean of log p_θ − log p0 over their samples (nats per "
             "continuation).", "", members_table(ctx, summary), ""]
    for column, note in summary["notes"].items():
        lines += [f"Note ({column}): {note}", ""]
    lines += ["Seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()), ""]
    if config.paper:
        lines += ["Paper's numbers (OPT-1.3B, NE over helpfulness and harmlessness, for comparison): `"
                  + dumps(config.paper, indent=None) + "`", ""]
    return "\n".join(lines)


# ============================================================================ command line


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, CONFIGS / "table3_mapf_demo.yaml")
    add_output_arguments(parser, resumable=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    run(load_yaml(args.config, args.overrides), args.out, force=args.force, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
