"""The paper's MAP-D decoding tables, driven by YAML configs: one pipeline, four tables.

    python -m experiments.decoding_tables table1 --out runs/table1            # OPT-1.3B, hh-rlhf, HHH palettes
    python -m experiments.decoding_tables table2 --out runs/table2            # OPT-1.3B, IMDB, positive +κ
    python -m experiments.decoding_tables table3 --out runs/table3            # navigation efficiency, MAP vs MORL
    python -m experiments.decoding_tables table4 --out runs/table4            # Llama-2-7B-chat, hh-rlhf
    python -m experiments.decoding_tables table1 --config configs/tiny_decoding.yaml --set policy=PATH --out runs/t

Each table runs the same pipeline (``run_table``):

1. load the policy (a local folder, a ``.gguf`` file, or a hub id found in the local Hugging Face cache: the
   script never downloads; a missing model stops it before any work, with the command that fetches it);
2. read the prompts and split them, after a seeded shuffle, into disjoint pilot and evaluation sets;
3. build the pilot pool (``samples_per_prompt`` samples per pilot prompt, scored by every value; resumable);
4. solve each palette on the pilot (feasibility, λ, ESS); an infeasible palette is reported and skipped;
5. build the evaluation candidates once (k samples per evaluation prompt, scored; resumable): every palette
   and baseline is realised on these same candidates, which is what makes MAP-D cheap to evaluate;
6. MAP-D each palette (keep one candidate per prompt with probability softmax(λᵀr)), and the paper's numeric
   estimate (the softmax-weighted level, no sampling);
7. evaluate against the base model, one plain sample per prompt (the first candidate): realised levels ± SE,
   palette verdicts, win rates; Table 3 instead realises N random MAP palettes and N random MORL λ and reports
   the navigation efficiency over helpfulness and harmlessness.

Outputs in ``--out`` (created; a non-empty folder is refused unless it holds a run of the same config, which is
then resumed, or ``--force`` is given): ``<table>.md`` (the paper-shaped table plus the solver's table),
``<table>.json`` (everything), ``config.json`` (the resolved config), the pilot pool and the candidates, and
for Tables 1, 2 and 4 the MAP-D result of each palette under ``decoded/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
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
    path_or_name,
    prepare_out,
    reports_errors,
)
from mapjax.errors import BuildError, ConfigError, ModelError
from mapjax.jsonio import dumps, jsonable

# table name -> (kind of pipeline, default config)
TABLES: dict[str, tuple[str, Path]] = {
    "table1": ("levels", CONFIGS / "table1_opt_hh.yaml"),
    "table2": ("levels", CONFIGS / "table2_imdb.yaml"),
    "table3": ("navigation", CONFIGS / "table3_navigation.yaml"),
    "table4": ("levels", CONFIGS / "table4_llama.yaml"),
}


# Registry rewards that load a hub model by default: reward name -> (option naming the model, default hub id).
# The script checks these are cached before it starts, so a missing reward model fails as early as the policy.
def _hub_reward_models() -> dict[str, tuple[str, str | None]]:
    from mapjax.rewards.classifier import HUMOR_MODEL, POSITIVE_MODEL
    from mapjax.rewards.coherence import SIMCSE_MODEL
    from mapjax.rewards.reward_models import HARMLESS_MODEL, HELPFUL_MODEL

    return {"humor": ("model", HUMOR_MODEL), "positive": ("model", POSITIVE_MODEL),
            "gpt2-helpful": ("model", HELPFUL_MODEL), "gpt2-harmless": ("model", HARMLESS_MODEL),
            "coherence-simcse": ("model", SIMCSE_MODEL), "classifier": ("model_id_or_path", None)}


class ModelNotCachedError(ModelError):
    """A hub model id that is not in the local Hugging Face cache (this script never downloads)."""


# ============================================================================ config


@dataclasses.dataclass
class PromptsConfig:
    source: str = "hh-rlhf"            # hh-rlhf, imdb, or a prompts file (relative to the repository)
    split: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None   # local copies of a hub dataset's files
    field: str | None = None
    shuffle_seed: int | None = 0       # seeded shuffle before the split (null: the source's order)
    pilot_count: int = 100
    eval_count: int = 100


@dataclasses.dataclass
class SamplingConfig:
    max_new_tokens: int = 50
    top_k: int | None = 50             # 0 or null: no top-k
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    chunk_size: int = 64


@dataclasses.dataclass
class PilotConfig:
    samples_per_prompt: int = 1
    normaliser: Literal["pooled", "per_prompt"] = "pooled"


@dataclasses.dataclass
class ValueEntry:
    """A value scored under a column name of its own: ``{name: coherence, reward: coherence-simcse}``."""

    name: str | None = None            # the pool column (default: the reward's name)
    reward: str | None = None          # the registry reward (default: the column name)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.name or self.reward):
            raise ConfigError("values: an entry {name, reward, options} needs a name or a reward")


@dataclasses.dataclass
class NavigationConfig:
    count: int = 100                   # N models of each kind
    values: list[str] = dataclasses.field(default_factory=lambda: ["gpt2-helpful", "gpt2-harmless"])
    random_values: list[str] | None = None   # the values random palettes and λ run over (default: values)
    max_l1: float = 6.0
    tolerances: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.06])


@dataclasses.dataclass
class TableConfig:
    """configs/table*.yaml: the policy, the prompts and their split, sampling, the values, the palettes."""

    policy: str                        # a local folder, a .gguf file (relative to the repository) or a hub id
    table: str | None = None           # table1 .. table4 (the command line's choice wins)
    title: str = ""
    # the policy's parameters and KV cache (mapjax.dtypes); reward models stay float32, as the paper scored them,
    # unless a value's options set their own dtype
    dtype: Literal["float32", "bfloat16"] = "float32"
    chat_template: bool = False        # the paper feeds prompts raw, even to Llama-2-chat
    seed: int = 0
    k: int = 16
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    pilot: PilotConfig = dataclasses.field(default_factory=PilotConfig)
    values: list[str | ValueEntry] = dataclasses.field(default_factory=list)
    reward_options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    palettes: dict[str, Any] = dataclasses.field(default_factory=dict)
    win_rates: str | list[str] = "all"  # "all" or the values to report win rates for
    confidence: float = 0.95
    navigation: NavigationConfig = dataclasses.field(default_factory=NavigationConfig)
    paper: dict[str, Any] = dataclasses.field(default_factory=dict)   # the paper's numbers, for comparison only


def resolve_config(config: TableConfig | Mapping[str, Any], table: str | None = None) -> TableConfig:
    """The config typed (from a mapping: ``experiments.common.load_yaml`` reads one), ``table`` set, and
    checked.

    Everything that can be checked without models is checked here, so a typo fails in a second, not after
    an hour of sampling: the table name, counts, value names, palettes naming only scored values.
    """
    resolved = build_config(TableConfig, config) if isinstance(config, Mapping) else dataclasses.replace(config)
    if table is not None:
        resolved.table = table
    if resolved.table not in TABLES:
        raise ConfigError(f"table is {resolved.table!r}; choose one of {sorted(TABLES)}")
    if not resolved.policy:
        raise ConfigError("policy: the config names no policy (a local folder, a .gguf file or a hub id)")
    for key, value in (("k", resolved.k), ("prompts.pilot_count", resolved.prompts.pilot_count),
                       ("prompts.eval_count", resolved.prompts.eval_count),
                       ("pilot.samples_per_prompt", resolved.pilot.samples_per_prompt)):
        _positive_int(key, value)
    names = value_names(resolved.values)
    if not names:
        raise ConfigError("values: the config scores no values; list them under values")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"values name {repeated} twice")
    kind = TABLES[resolved.table][0]
    if kind == "levels":
        if not resolved.palettes:
            raise ConfigError(f"palettes: {resolved.table} needs palettes; list them under palettes")
        for name, spec in resolved.palettes.items():
            unknown = [value for value in palette_spec(name, spec).names if value not in names]
            if unknown:
                raise ConfigError(f"palettes.{name} constrains {unknown}, which the config does not score "
                                  f"(values: {names})")
    wins = resolved.win_rates
    if wins == "all":
        resolved.win_rates = list(names)
    elif not isinstance(wins, list) or any(name not in names for name in wins):
        raise ConfigError(f"win_rates must be 'all' or a list of scored values {names}, got {wins!r}")
    if kind == "navigation":
        navigation = resolved.navigation = dataclasses.replace(resolved.navigation)
        _positive_int("navigation.count", navigation.count)
        navigation.random_values = list(navigation.random_values or navigation.values)
        for key in ("values", "random_values"):
            unknown = [value for value in getattr(navigation, key) if value not in names]
            if unknown:
                raise ConfigError(f"navigation.{key} names {unknown}, which the config does not score "
                                  f"(values: {names})")
    return resolved


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be a positive whole number, got {value!r}")


def value_names(values: Sequence[str | ValueEntry]) -> list[str]:
    """The pool column of each configured value: a registry name, or the ``name`` of a ``{name, reward,
    options}`` entry (e.g. the paper's SimCSE coherence scored as ``coherence``)."""
    return [entry if isinstance(entry, str) else (entry.name or entry.reward) for entry in values]


def palette_spec(name: str, spec: Any) -> Any:
    """A palette as ``mapjax.palette`` reads it, from a config entry: a spec string (``"humor>=q0.8"``), a
    dict of levels, or the quantile form ``{quantile: 0.7, raise: [...], maintain: [...]}`` (the paper's
    HHH-q palettes: raised values at max(mean, q-quantile), maintained ones at their means)."""
    from mapjax.palette import PaletteError, parse, quantile_palette

    try:
        if isinstance(spec, dict) and "quantile" in spec:
            unknown = sorted(set(spec) - {"quantile", "raise", "maintain", "floor_at_mean"})
            if unknown or not spec.get("raise"):
                raise ConfigError(f"palettes.{name}: the quantile form takes quantile, raise (a non-empty list), "
                                  f"maintain and floor_at_mean; got {sorted(spec)}")
            return quantile_palette(list(spec["raise"]), float(spec["quantile"]), list(spec.get("maintain") or []),
                                    floor_at_mean=bool(spec.get("floor_at_mean", True)))
        return parse(spec)
    except PaletteError as error:
        raise ConfigError(f"palettes.{name}: {error}") from None


# ============================================================================ models


def require_local_model(path_or_id: str, role: str, setting: str) -> Path:
    """A local folder (or ``.gguf`` file) for ``path_or_id``, from the disk or the local Hugging Face cache.

    Never downloads: the tables need gigabytes of weights, and a download mid-run (or a hang on a machine
    without network) is worse than stopping here with the command that fetches the model.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    looks_like_hub_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise ConfigError(f"{setting}: {role} {path_or_id!r} is neither an existing file or folder nor a hub id "
                          "(owner/name)")
    from huggingface_hub import constants, snapshot_download

    cache = constants.HF_HUB_CACHE
    try:
        directory = Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any cache miss means the same thing here
        directory = None
    has_weights = directory is not None and (any(directory.glob("*.safetensors"))
                                             or any(directory.glob("pytorch_model*.bin")))
    if directory is None or not (directory / "config.json").is_file() or not has_weights:
        found = "is not" if directory is None else "has no config.json and weights"
        gated = (" (a gated model: accept its licence on huggingface.co and log in with `huggingface-cli login` "
                 "first)") if "llama" in path_or_id.lower() else ""
        raise ModelNotCachedError(
            f"{role} {path_or_id!r} {found} in the local Hugging Face cache ({cache}); this script reads hub "
            f"models from the cache only and never downloads. Get it on a machine with network access with "
            f"`huggingface-cli download {path_or_id}`{gated}, then copy the cache here (or point HF_HOME at "
            f"it), or set {setting} to a local folder holding config.json, the weights and the tokenizer.")
    return directory


def check_models(config: TableConfig) -> dict[str, Path]:
    """Every model the table needs, found locally (policy first): {setting: folder}. Raises
    ModelNotCachedError before any work when one is missing."""
    found = {"policy": require_local_model(path_or_name(config.policy), "policy", "policy")}
    hub_rewards = _hub_reward_models()
    for entry in config.values:
        name, reward, options = _value_entry(entry, config)
        if reward not in hub_rewards:
            continue
        option, default = hub_rewards[reward]
        model = options.get(option, default)
        if model is None:
            raise ConfigError(f"values: value {name!r}: reward {reward!r} needs options.{option}")
        found[f"values.{name}"] = require_local_model(str(model), f"reward model of {name!r}",
                                                      f"the {option} option of value {name!r}")
    return found


def _value_entry(entry: str | ValueEntry, config: TableConfig) -> tuple[str, str, dict[str, Any]]:
    """(pool column, registry reward, options) of one configured value; ``reward_options`` by column name
    add to the entry's own options."""
    if isinstance(entry, str):
        name, reward, options = entry, entry, {}
    else:
        reward = entry.reward or entry.name
        name, options = entry.name or reward, dict(entry.options)
    options.update(config.reward_options.get(name, {}))
    return name, reward, options


class NamedReward:
    """A reward scored under another column name (e.g. ``coherence-simcse`` as the paper's ``coherence``)."""

    def __init__(self, name: str, reward: Callable[[Sequence[str], Sequence[str]], Any]):
        self.name = name
        self.reward = reward

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> Any:
        return self.reward(prompts, continuations)


def build_rewards(config: TableConfig, folders: Mapping[str, Path], policy: Any, tokenizer: Any) -> list[Any]:
    """One Reward per configured value, built once and shared by the pilot pool and the candidates (a
    GPT-2-large reward model loads in tens of seconds). Hub models come from the folders ``check_models``
    found; ``perplexity`` is scored under the policy, as the paper does."""
    from mapjax.rewards import get_reward

    hub_rewards = _hub_reward_models()
    rewards = []
    for entry in config.values:
        name, reward_name, options = _value_entry(entry, config)
        if reward_name == "perplexity" and "model" not in options and "model_path" not in options:
            options.update(model=policy, tokenizer=tokenizer)
        if reward_name in hub_rewards:
            options[hub_rewards[reward_name][0]] = str(folders[f"values.{name}"])
        reward = get_reward(reward_name, **options)
        rewards.append(reward if getattr(reward, "name", None) == name else NamedReward(name, reward))
    return rewards


def load_policy_checked(config: TableConfig, folder: Path) -> tuple[Any, Any]:
    """The policy and its tokenizer from the folder (or .gguf file) ``check_models`` found."""
    from mapjax.dtypes import resolve_dtype
    from mapjax.generate import load_policy

    return load_policy(folder, resolve_dtype(config.dtype, what="dtype", error=ConfigError))


# ============================================================================ prompts


def read_prompt_split(config: TableConfig) -> tuple[list[str], list[str], dict[str, Any]]:
    """Disjoint (pilot, evaluation) prompts: the source's prompts, duplicates dropped (the same text in both
    sets would not be disjoint), shuffled with ``prompts.shuffle_seed`` (null keeps the source's order), then
    the first ``pilot_count`` for the pilot and the next ``eval_count`` for evaluation."""
    from mapjax.prompts import load_prompts

    settings = config.prompts
    options: dict[str, Any] = {}
    if settings.data_files:
        options["data_files"] = settings.data_files
    source = path_or_name(settings.source)
    pilot_count, eval_count = settings.pilot_count, settings.eval_count
    # hh-rlhf and files: read them all (the paper's order), so the shuffle below decides the split. IMDB has
    # 25000 reviews and its loader shuffles with its own seed: take what is needed plus a margin for the
    # duplicate openings dropped below.
    count = None if source != "imdb" else pilot_count + eval_count + max(20, (pilot_count + eval_count) // 20)
    try:
        prompts = load_prompts(source, split=settings.split, field=settings.field, count=count, **options)
    except Exception as error:  # noqa: BLE001 - name the setting to change, keep the loader's reason
        hint = ("" if source not in ("hh-rlhf", "anthropic-harmless", "imdb") else
                "; offline, set prompts.data_files to local copies of the dataset's files")
        raise ConfigError(f"prompts.source: cannot read prompts from {source!r}: {error}{hint}") from error
    unique = list(dict.fromkeys(prompts))
    if settings.shuffle_seed is not None:
        order = np.random.default_rng(settings.shuffle_seed).permutation(len(unique))
        unique = [unique[i] for i in order]
    if pilot_count + eval_count > len(unique):
        raise ConfigError(f"prompts.pilot_count {pilot_count} + prompts.eval_count {eval_count} exceed the "
                          f"{len(unique)} distinct prompts of {source!r}")
    info = {"source": source, "read": len(prompts), "distinct": len(unique), "pilot": pilot_count,
            "eval": eval_count}
    return unique[:pilot_count], unique[pilot_count:pilot_count + eval_count], info


# ============================================================================ output folder


def _build(build: Callable[..., Any], force: bool, **arguments: Any) -> Any:
    """``build_pool`` resuming what the folder holds; under ``force`` a pool made with other settings is
    rebuilt instead of refused."""
    try:
        return build(overwrite=False, **arguments)
    except BuildError:
        if not force:
            raise
        return build(overwrite=True, **arguments)


# ============================================================================ the pipeline


def run_table(config: TableConfig | Mapping[str, Any], out: str | os.PathLike, *, table: str | None = None,
              force: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run one table end to end (see the module docstring) and return what ``<table>.json`` holds.

    ``config`` is a TableConfig or its mapping (``experiments.common.load_yaml`` reads one); ``table``
    overrides its ``table`` setting.
    """
    from mapjax.build import build_pool
    from mapjax.decode import first_samples
    from mapjax.prompts import chat_formatter

    started = time.perf_counter()
    config = resolve_config(config, table)
    name, kind = config.table, TABLES[config.table][0]
    out = Path(out)
    folders = check_models(config)                     # before anything slow, and before touching --out
    resumed = prepare_out(out, force=force, config=config, resumable=True)
    _say(name, f"{'resuming' if resumed else 'writing'} {out}")
    pilot_prompts, eval_prompts, prompt_info = read_prompt_split(config)
    _say(name, f"loading the policy {config.policy}")
    policy, tokenizer = load_policy_checked(config, folders["policy"])
    rewards = build_rewards(config, folders, policy, tokenizer)
    seed, sampling = config.seed, config.sampling
    generation = dict(max_new_tokens=sampling.max_new_tokens, top_k=sampling.top_k or None,
                      temperature=sampling.temperature, top_p=sampling.top_p,
                      batch_size=sampling.batch_size, chunk_size=sampling.chunk_size,
                      format_prompt=chat_formatter(tokenizer) if config.chat_template else None,
                      progress=progress)
    timings: dict[str, float] = {}

    clock = time.perf_counter()
    _say(name, f"pilot pool: {len(pilot_prompts)} prompts x {config.pilot.samples_per_prompt}")
    pilot = _build(build_pool, force, policy=policy, tokenizer=tokenizer, prompts=pilot_prompts, values=rewards,
                   samples_per_prompt=config.pilot.samples_per_prompt, out=out / "pilot_pool.jsonl",
                   seed=seed, **generation)
    timings["pilot_pool"] = time.perf_counter() - clock

    clock = time.perf_counter()
    _say(name, f"evaluation candidates: {len(eval_prompts)} prompts x k = {config.k}")
    # seed + 1: the evaluation draws are independent of the pilot's even where prompt indices coincide.
    candidates = _build(build_pool, force, policy=policy, tokenizer=tokenizer, prompts=eval_prompts,
                        values=rewards, samples_per_prompt=config.k, out=out / "eval_candidates.jsonl",
                        seed=seed + 1, **generation)
    timings["candidates"] = time.perf_counter() - clock
    base = first_samples(candidates)

    clock = time.perf_counter()
    if kind == "levels":
        result = _levels_table(config, pilot, candidates, base, out)
    else:
        result = _navigation_table(config, pilot, candidates, base)
    timings["solve_decode_evaluate"] = time.perf_counter() - clock
    timings["total"] = time.perf_counter() - started

    summary = {
        "table": name,
        "title": config.title,
        "config": config,
        "resumed": resumed,
        "prompts": prompt_info,
        "pilot": {"prompts": pilot.num_prompts, "samples": pilot.num_samples,
                  "levels": _levels_dict(pilot)},
        "candidates": {"prompts": candidates.num_prompts, "samples": candidates.num_samples, "k": config.k},
        **result["json"],
        "paper": config.paper,
        "seconds": timings,
    }
    markdown = _document(config, summary, result["tables"])
    (out / f"{name}.md").write_text(markdown, encoding="utf-8")
    (out / f"{name}.json").write_text(dumps(summary, indent=1), encoding="utf-8")
    print()
    print(result["tables"][0])
    print()
    print(f"{out / (name + '.md')} ({timings['total']:.0f} s)")
    return jsonable(summary)


def solve_palettes(pilot: Any, palettes: Mapping[str, Any], normaliser: str) -> dict[str, dict[str, Any]]:
    """Each palette solved on the pilot: {name: {palette, solution or None, status, reason}}. A palette whose
    level lies outside the pilot's range is reported like an infeasible one, not raised: one bad palette
    must not cost the whole table."""
    from mapjax import solve
    from mapjax.palette import PaletteError

    solved = {}
    for name, spec in palettes.items():
        palette = palette_spec(name, spec)
        try:
            solution = solve(pilot, palette, normaliser=normaliser)
        except PaletteError as error:
            solved[name] = {"palette": str(palette), "solution": None, "status": "invalid", "reason": str(error)}
            continue
        reason = solution.certificate.explain() if solution.certificate is not None else ""
        solved[name] = {"palette": str(palette), "solution": solution, "status": solution.status, "reason": reason}
    return solved


def _levels_table(config: TableConfig, pilot: Any, candidates: Any, base: Any, out: Path) -> dict[str, Any]:
    """Tables 1, 2 and 4: MAP-D of each palette on the shared candidates, against the base sample."""
    from mapjax.decode import decode_pool, expected_levels
    from mapjax.evaluate import realised_levels, win_rates

    names = list(candidates.value_names)
    confidence = float(config.confidence)
    solved = solve_palettes(pilot, config.palettes, config.pilot.normaliser)
    base_levels = realised_levels(base, confidence=confidence)
    rows: dict[str, Any] = {}
    (out / "decoded").mkdir(exist_ok=True)
    for name, entry in solved.items():
        solution = entry["solution"]
        row: dict[str, Any] = {"palette": entry["palette"], "status": entry["status"], "reason": entry["reason"]}
        if solution is not None:
            row["solve"] = solution.to_dict()
        if solution is None or not solution.feasible:
            _say(config.table, f"{name}: {entry['status']} on the pilot ({entry['reason']}); skipped")
            rows[name] = row
            continue
        targets = {value: float(level) for value, level in zip(solution.value_names, solution.targets)
                   if not math.isnan(level)}
        # One seed for every palette: the same Gumbel noise, so differences between palettes are λ's alone.
        decoded = decode_pool(candidates, solution, seed=int(config.seed))
        levels = realised_levels(decoded.result, targets, confidence=confidence)
        wins = win_rates(decoded.result, base, config.win_rates)
        expected = dict(zip(names, expected_levels(candidates, solution)))
        decoded.result.save(out / "decoded" / f"{_file_name(name)}.jsonl", overwrite=True)
        row.update(lam=solution.lam_by_name(), ess_pilot=solution.ess, targets=targets, realised=levels.to_dict(),
                   expected=expected, win_rates=wins.to_dict(), palette_met=levels.all_met,
                   verdicts={level.name: level.met for level in levels.levels if level.met is not None})
        rows[name] = row
        rows[name]["_levels"], rows[name]["_wins"] = levels, wins
    main = _main_table(names, config.win_rates, base_levels, rows)
    detail = _solve_table(names, rows)
    for row in rows.values():
        row.pop("_levels", None)
        row.pop("_wins", None)
    return {"json": {"original": base_levels.to_dict(), "palettes": rows}, "tables": [main, detail]}


def _navigation_table(config: TableConfig, pilot: Any, candidates: Any, base: Any) -> dict[str, Any]:
    """Table 3: N random MAP palettes and N random MORL λ, each realised by MAP-D on the same candidates;
    navigation efficiency over the navigation values against the base sample's levels."""
    from mapjax import adjust
    from mapjax.decode import decode_pool, expected_levels
    from mapjax.evaluate import navigation_efficiency, realised_levels
    from mapjax.palette import PaletteError

    navigation = config.navigation
    count, seed = navigation.count, config.seed
    values, random_values = list(navigation.values), list(navigation.random_values)
    normaliser = config.pilot.normaliser
    methods: dict[str, Any] = {}
    try:
        palettes, kept_share = adjust.random_palettes(pilot, random_values, count, seed=seed,
                                                      max_l1=float(navigation.max_l1), normaliser=normaliser)
        methods["MAP-D"] = {"solutions": palettes, "kept_share": kept_share, "note": ""}
    except (adjust.TooFewPalettes, PaletteError) as error:
        # Too few feasible palettes with ||λ||₁ < max_l1 among the draws, or a value constant on the pilot:
        # reported in the table, and MORL still runs.
        methods["MAP-D"] = {"solutions": None, "kept_share": 0.0, "note": str(error)}
    morl = adjust.random_morl_lambdas(pilot, random_values, count, seed=seed, max_scale=float(navigation.max_l1),
                                      normaliser=normaliser)
    methods["MORL-D"] = {"solutions": morl, "kept_share": 1.0, "note": ""}

    base_levels = realised_levels(base, values=values)
    # Like against like: the sampled MAP-D levels against the base's one plain sample per prompt, the numeric
    # estimates against the base's numeric estimate (λ = 0: the mean over each prompt's candidates).
    base_expected = expected_levels(candidates, np.zeros(candidates.num_values))
    references = {"realised": {name: base_levels[name].mean for name in values},
                  "expected": {name: float(base_expected[candidates.index_of(name)]) for name in values}}
    tolerances = [float(tolerance) for tolerance in navigation.tolerances]
    results: dict[str, Any] = {}
    for method, entry in methods.items():
        solutions = entry["solutions"]
        if solutions is None:
            results[method] = {"models": 0, "kept_share": entry["kept_share"], "note": entry["note"]}
            continue
        realised, expected, lambdas = {}, {}, {}
        for index, solution in enumerate(solutions):
            model = f"{method} {index}"
            decoded = decode_pool(candidates, solution, seed=seed)
            realised[model] = dict(zip(candidates.value_names, decoded.result.means()))
            expected[model] = dict(zip(candidates.value_names, expected_levels(candidates, solution)))
            lambdas[model] = solution.lam_by_name()
        efficiency = {}
        for label, levels in (("realised", realised), ("expected", expected)):
            for tolerance in tolerances:
                ne = navigation_efficiency(levels, references[label], values, tolerance)
                efficiency[f"{label}, tolerance {tolerance:g}"] = ne.to_dict()
        results[method] = {
            "models": len(solutions), "kept_share": entry["kept_share"], "note": entry["note"],
            "navigation_efficiency": efficiency,
            "mean_realised": {name: float(np.mean([levels[name] for levels in realised.values()]))
                              for name in values},
            "realised": realised, "expected": expected, "lambdas": lambdas,
            "targets": None if method != "MAP-D" else {
                f"{method} {i}": {v: float(c) for v, c in zip(solutions.value_names, solutions.targets[i])
                                  if not math.isnan(c)} for i in range(len(solutions))},
        }
    table = _navigation_markdown(values, tolerances, base_levels, results)
    return {"json": {"original": base_levels.to_dict(), "navigation": results, "reference": references},
            "tables": [table]}


# ============================================================================ tables


def _main_table(names: Sequence[str], win_values: Sequence[str], base_levels: Any, rows: Mapping[str, Any]) -> str:
    """The paper-shaped table: Original and each palette; per value the realised level ± SE (win rate)."""
    header = "| model | " + " | ".join(names) + " | palette met |"
    lines = [header, "|---|" + "---|" * (len(names) + 1)]
    lines.append("| Original | " + " | ".join(_level_cell(base_levels[name]) for name in names) + " | - |")
    for name, row in rows.items():
        if "_levels" not in row:
            lines.append(f"| {name} | " + " | ".join(["-"] * len(names)) + f" | {row['status']}: skipped |")
            continue
        levels, wins = row["_levels"], row["_wins"]
        cells = []
        for value in names:
            cell = _level_cell(levels[value])
            if value in win_values:
                cell += f" ({100 * wins[value].rate:.1f}%)"
            cells.append(cell)
        missed = [level.name for level in levels.levels if level.met is False]
        verdict = "yes" if not missed else "NO: " + ", ".join(missed)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


def _solve_table(names: Sequence[str], rows: Mapping[str, Any]) -> str:
    """Per palette: status on the pilot, λ, ESS, and the numeric estimate of MAP-D's levels."""
    lines = ["| palette | targets (on the pilot) | status | λ (" + ", ".join(names) + ") | ESS (pilot) | "
             "expected levels (numeric) |", "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        if "lam" not in row:
            lines.append(f"| {name} | {row['palette']} | {row['status']} | - | - | {row['reason'] or '-'} |")
            continue
        targets = ", ".join(f"{value} ≥ {level:.3f}" for value, level in row["targets"].items())
        lam = ", ".join(f"{row['lam'][value]:.3f}" for value in names)
        expected = ", ".join(f"{row['expected'][value]:.3f}" for value in names)
        lines.append(f"| {name} | {targets} | {row['status']} | {lam} | {row['ess_pilot']:.1f} | {expected} |")
    return "\n".join(lines)


def _navigation_markdown(values: Sequence[str], tolerances: Sequence[float], base_levels: Any,
                         results: Mapping[str, Any]) -> str:
    """Table 3's shape: a row per method, its navigation efficiency (realised by MAP-D, and the numeric
    estimate) at each tolerance, and the mean realised levels."""
    ne_columns = [f"NE realised (tol {t:g})" for t in tolerances] + [f"NE expected (tol {t:g})" for t in tolerances]
    lines = ["| model | models | " + " | ".join(values) + " | " + " | ".join(ne_columns) + " |",
             "|---|---|" + "---|" * (len(values) + len(ne_columns))]
    lines.append("| Original | 1 | " + " | ".join(_level_cell(base_levels[v]) for v in values) + " | "
                 + " | ".join(["-"] * len(ne_columns)) + " |")
    for method, result in results.items():
        if not result["models"]:
            lines.append(f"| {method} | 0 | " + " | ".join(["-"] * (len(values) + len(ne_columns))) + " |")
            continue
        efficiency = result["navigation_efficiency"]
        shares = [efficiency[f"{label}, tolerance {t:g}"]["navigation_efficiency"]
                  for label in ("realised", "expected") for t in tolerances]
        lines.append(f"| {method} | {result['models']} | "
                     + " | ".join(f"{result['mean_realised'][v]:.3f}" for v in values) + " | "
                     + " | ".join(f"{100 * share:.1f}%" for share in shares) + " |")
    return "\n".join(lines)


def _level_cell(level: Any) -> str:
    error = f"{level.standard_error:.3f}" if math.isfinite(level.standard_error) else "-"
    return f"{level.mean:.3f} ± {error}"


def _document(config: TableConfig, summary: Mapping[str, Any], tables: Sequence[str]) -> str:
    """The Markdown file: what was run, the paper-shaped table, the solver's table, notes."""
    kind = TABLES[config.table][0]
    lines = [f"# {config.table}: {config.title or 'MAP-D decoding'}", "",
             f"Policy `{config.policy}`; prompts `{config.prompts.source}`: {summary['pilot']['prompts']} "
             f"pilot prompts x {config.pilot.samples_per_prompt} samples (solved with the "
             f"{config.pilot.normaliser} normaliser), {summary['candidates']['prompts']} evaluation prompts "
             f"x k = {config.k} candidates; top-k {config.sampling.top_k}, temperature "
             f"{config.sampling.temperature}, {config.sampling.max_new_tokens} new tokens; seed "
             f"{config.seed}. {summary['seconds']['total']:.0f} s.", ""]
    if kind == "levels":
        lines += ["Realised level (mean ± SE over evaluation prompts) of MAP-D, one candidate kept per prompt with "
                  "probability softmax(λᵀr); in brackets the win rate against the base (strictly higher reward, per "
                  "prompt). Original: the base model, one plain sample per prompt (the first candidate). Palette "
                  f"met: every target within the realised level's {100 * config.confidence:g}% interval.", "",
                  tables[0], "", "## Solved on the pilot", "", tables[1], ""]
    else:
        navigation = config.navigation
        lines += [f"{navigation.count} random MAP palettes (c_i ~ U(c0_i, max r_i) over "
                  f"{', '.join(navigation.random_values)}, kept when feasible with ||λ||₁ < "
                  f"{navigation.max_l1}) "
                  f"and {navigation.count} random MORL λ (s·Dirichlet(1), s ~ U(0, {navigation.max_l1})), each "
                  "realised by MAP-D on the same candidates. Navigation efficiency: the share of models whose level "
                  f"is at least the base's minus the tolerance in each of {', '.join(navigation.values)}; "
                  "'realised' compares the sampled MAP-D levels with the base sample's, 'expected' the numeric "
                  "estimates with the base's (the mean over the candidates). Level columns: the mean over models of "
                  "the realised levels.", "", tables[0], ""]
        for method, result in summary["navigation"].items():
            if result.get("note"):
                lines += [f"{method}: no models ({result['note']}).", ""]
            elif result["models"]:
                lines += [f"{method}: {result['models']} models, {100 * result['kept_share']:.1f}% of the draws kept.",
                          ""]
    if config.paper:
        lines += ["Paper's numbers (for comparison): `" + dumps(config.paper, indent=None) + "`", ""]
    return "\n".join(lines)


def _levels_dict(pool: Any) -> dict[str, float]:
    return {name: float(mean) for name, mean in zip(pool.value_names, pool.means())}


def _file_name(name: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in name)


def _say(table: str, message: str) -> None:
    print(f"[{table}] {message}", flush=True)


# ============================================================================ command line


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=sorted(TABLES), help="which table's pipeline to run")
    add_config_arguments(parser, None)
    add_output_arguments(parser, resumable=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    config = load_yaml(args.config or TABLES[args.table][1], args.overrides)
    run_table(config, args.out, table=args.table, force=args.force, progress=not args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
