"""How a finetuned policy does against its base: sample both on a pool's prompts, score with the pool's values,
and compare the realised levels with the palette's targets (what ``mapjax finetune`` prints at the end).

Prompt formatting. A pool records how its policy saw the prompts: ``build_pool(format_prompt=...)`` (e.g. the
demo wraps each request in SmolLM2's chat template) writes the hash of the formatted prompts into the pool's
build manifest (``formatted_prompts_sha256``). A finetuned model must be sampled the same way, or its levels are
those of another task: :func:`pool_prompt_format` reads the manifest back and returns the formatter to use
(``chat_formatter(tokenizer)`` or None for raw prompts), and :func:`evaluate_finetuned` / :func:`score_samples`
take it as ``format_prompt``. As in ``build_pool``, the model sees the formatted prompt while the rewards see the
raw one, so the scores are comparable with the pool's.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mapjax.errors import PoolError

FormatPrompt = Callable[[str], str]

__all__ = ["evaluate_finetuned", "evaluation_table", "kl_to_base", "pool_prompt_format", "sample_and_score",
           "score_samples"]


# ============================================================================ the pool's prompt formatting


def pool_prompt_format(pool_path: str | os.PathLike, tokenizer: Any, *,
                       prompts: Sequence[str] | None = None) -> FormatPrompt | None:
    """The ``format_prompt`` the pool at ``pool_path`` was sampled with, for sampling its policy again.

    Read from the pool's build manifest (``<pool>.manifest.json``, written by ``build_pool`` / ``mapjax pool``):

    - no manifest (a pool from elsewhere, e.g. the authors' files) or one from before the setting was recorded:
      None (prompts fed raw, as the paper does), with a warning that says so, since the formatting is unknown;
    - a manifest that records ``formatted_prompts_sha256: null``: None (the pool was sampled from raw prompts);
    - a recorded hash equal to that of ``chat_formatter(tokenizer)`` applied to the pool's prompts: that
      formatter (the tokenizer's chat template);
    - a hash equal to the raw prompts' (a formatter that changed nothing): None;
    - anything else: a PoolError, since sampling with another formatting would evaluate another task.

    ``prompts`` are the prompts the pool was built on, in order (default: read from the pool file); their hash
    must match the manifest's ``prompts_sha256``, else the manifest is not this pool's (a PoolError).
    """
    from mapjax.prompts import chat_formatter
    from mapjax.scoring import manifest_path, prompts_hash, read_manifest

    path = Path(pool_path).expanduser()
    manifest_file = manifest_path(path)
    if not manifest_file.is_file():
        _warn_prompts_raw(path, f"has no build manifest ({manifest_file.name})")
        return None
    settings = read_manifest(manifest_file).get("settings", {})
    if "formatted_prompts_sha256" not in settings:
        _warn_prompts_raw(path, f"has a build manifest ({manifest_file.name}) from before prompt formatting was "
                                "recorded")
        return None
    recorded = settings["formatted_prompts_sha256"]
    if recorded is None:
        return None
    if prompts is None:
        from mapjax.pool import RewardPool

        prompts = RewardPool.load(path).prompts
        if prompts is None:
            raise PoolError(f"{path} has no prompt texts, so its manifest's prompt formatting cannot be checked")
    prompts = list(prompts)
    if settings.get("prompts_sha256") not in (None, prompts_hash(prompts)):
        raise PoolError(f"{manifest_file} records other prompts than the {len(prompts)} of {path} (their hashes "
                        "differ): the manifest is not this pool's, so how its prompts were formatted is unknown")
    if recorded == prompts_hash(prompts):
        return None
    chat = chat_formatter(tokenizer)
    if chat is not None and recorded == prompts_hash([chat(prompt) for prompt in prompts]):
        return chat
    template = "has no chat template" if chat is None else "'s chat template gives other text"
    raise PoolError(f"{path} was sampled with prompts formatted in a way this tokenizer cannot reproduce: its "
                    f"manifest's formatted_prompts_sha256 matches neither the raw prompts nor their chat-template "
                    f"form (the tokenizer {template}); pass the format_prompt the pool was built with")


def _warn_prompts_raw(path: Path, why: str) -> None:
    warnings.warn(f"{path} {why}, so how its policy saw the prompts is unknown: the prompts are shown to the models "
                  "raw (no chat template), as the paper did; if the pool was sampled through a chat template, pass "
                  "format_prompt=chat_formatter(tokenizer) (mapjax finetune: --chat-template yes)",
                  UserWarning, stacklevel=3)


# ============================================================================ sampling and scoring


def _scorer(value: Any) -> Callable[[list[str], list[str]], Any]:
    """The scoring callable of a value: a ``mapjax.scoring.ScoredValue``'s reward, or a Reward itself."""
    from mapjax.scoring import ScoredValue

    return value.reward if isinstance(value, ScoredValue) else value


def sample_and_score(model: Any, tokenizer: Any, prompts: Sequence[str], rewards: Sequence[Any], *, samples: int,
                     max_new_tokens: int, seed: int, batch_size: int = 16,
                     format_prompt: FormatPrompt | None = None, top_k: int | None = 50, top_p: float = 1.0,
                     temperature: float = 1.0) -> tuple[Any, dict[str, np.ndarray]]:
    """``samples`` continuations per prompt from ``model`` and their scores: ``(generation, {value: [prompts,
    samples]})``. The model sees ``format_prompt(prompt)`` (None: the prompt as given); the rewards
    (:class:`mapjax.scoring.ScoredValue` s from ``resolve_values``, or Rewards with a ``.name``) see the raw
    prompt. Sampling settings default to the paper's (top-k 50, temperature 1), as ``build_pool``'s do."""
    from mapjax.generate import generate

    prompts = list(prompts)
    shown = prompts if format_prompt is None else [format_prompt(prompt) for prompt in prompts]
    generation = generate(model, tokenizer, shown, num_samples=samples, max_new_tokens=max_new_tokens,
                          seed=seed, batch_size=batch_size, top_k=top_k, top_p=top_p, temperature=temperature)
    row_prompts = [prompts[i] for i in generation.prompt_index]
    scores = {value.name: np.asarray(_scorer(value)(row_prompts, generation.texts), np.float64).reshape(
        len(prompts), samples) for value in rewards}
    return generation, scores


def score_samples(model: Any, tokenizer: Any, prompts: Sequence[str], rewards: Sequence[Any], *, samples: int,
                  max_new_tokens: int, seed: int, batch_size: int = 16,
                  format_prompt: FormatPrompt | None = None) -> dict[str, np.ndarray]:
    """Sample ``samples`` continuations per prompt and score them: ``{value: [prompts, samples]}`` (see
    :func:`sample_and_score`; ``format_prompt`` as the pool was sampled, the rewards see raw prompts)."""
    return sample_and_score(model, tokenizer, prompts, rewards, samples=samples, max_new_tokens=max_new_tokens,
                            seed=seed, batch_size=batch_size, format_prompt=format_prompt)[1]


def kl_to_base(model: Any, base_model: Any, generation: Any, *, batch_size: int = 16) -> np.ndarray:
    """Per row of ``generation`` (sampled from ``model``): log p_θ(y|x) − log p0(y|x), the sequence
    log-probability ratio of the finetuned and the base model on the sampled tokens (EOS included).

    Its mean over the model's samples estimates KL(p_θ || p0) in nats per continuation (the estimate TRL's PPO
    reports; with top-k or top-p sampling the samples come from the filtered distribution, so it is that
    distribution's expectation of the log-ratio). Both log-probabilities are recomputed by the same full
    forward pass (``token_logprobs``), so a model against itself gives exactly 0.
    """
    from mapjax.generate import token_logprobs

    sequences = [list(generation.prompt_tokens[int(generation.prompt_index[row])])
                 + [int(t) for t in generation.row_tokens(row)] for row in range(len(generation.texts))]
    mine = token_logprobs(model, sequences, batch_size=batch_size)
    base = token_logprobs(base_model, sequences, batch_size=batch_size)
    out = np.zeros(len(sequences), np.float64)
    for row in range(len(sequences)):
        length = int(generation.lengths[row])
        if length:
            out[row] = float(np.sum(mine[row][-length:], dtype=np.float64)
                             - np.sum(base[row][-length:], dtype=np.float64))
    return out


def _mean_and_se(per_prompt: np.ndarray) -> tuple[float, float]:
    """Mean over prompts and its standard error; with equal samples per prompt this is the prompt-clustered
    standard error of the mean over all samples (``mapjax.evaluate``)."""
    error = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
    return float(per_prompt.mean()), float(error)


# ============================================================================ the report


def evaluate_finetuned(base_model: Any, model: Any, tokenizer: Any, pool: Any, palette: Any, *,
                       num_prompts: int = 16, samples: int = 2, max_new_tokens: int = 32, seed: int = 0,
                       reward_options: dict | None = None, dtype: Any = None,
                       format_prompt: FormatPrompt | None = None, kl: bool = True) -> dict[str, Any]:
    """Realised levels (mean ± standard error over prompts) of ``model`` and ``base_model`` on the pool's first
    ``num_prompts`` prompts, with the palette's targets resolved on the pool. ``dtype`` (``"float32"`` or
    ``"bfloat16"``; None: float32) is the parameter dtype of the reward models built to score them.

    ``format_prompt``: how the pool's policy saw its prompts (``pool_prompt_format(pool_file, tokenizer)``
    reads it from the pool's manifest); both models are sampled with it, the rewards score the raw prompts.
    ``kl``: also estimate KL(finetuned || base) from the finetuned model's samples (:func:`kl_to_base`).
    """
    from mapjax.evaluate import resolve_targets
    from mapjax.scoring import resolve_values

    prompts = list(pool.prompts[:num_prompts])
    rewards = resolve_values(list(pool.value_names), base_model, tokenizer, reward_options, dtype=dtype)
    targets = resolve_targets(palette, pool) if palette is not None else {}
    scores, generations = {}, {}
    for label, m in (("finetuned", model), ("base", base_model)):
        generations[label], scores[label] = sample_and_score(
            m, tokenizer, prompts, rewards, samples=samples, max_new_tokens=max_new_tokens, seed=seed,
            format_prompt=format_prompt)
    rows = []
    for name in pool.value_names:
        row = {"value": name, "target": targets.get(name)}
        for label in ("finetuned", "base"):
            row[label], row[f"{label}_se"] = _mean_and_se(scores[label][name].mean(axis=1))
        if row["target"] is not None:
            row["met"] = bool(row["target"] <= row["finetuned"] + 1.96 * np.nan_to_num(row["finetuned_se"]))
        rows.append(row)
    report = {"prompts": len(prompts), "samples": samples, "max_new_tokens": max_new_tokens,
              "formatted_prompts": format_prompt is not None, "levels": rows}
    if kl:
        per_row = kl_to_base(model, base_model, generations["finetuned"])
        mean, error = _mean_and_se(per_row.reshape(len(prompts), samples).mean(axis=1))
        report["kl_to_base"] = {"mean": mean, "se": error}
    return report


def evaluation_table(report: dict[str, Any]) -> str:
    """The report of :func:`evaluate_finetuned` as a Markdown table (and its KL estimate under it)."""
    lines = ["| value | target | finetuned | base | met |", "|---|---|---|---|---|"]
    for row in report["levels"]:
        target = "-" if row["target"] is None else f"{row['target']:.3f}"
        met = "-" if "met" not in row else ("yes" if row["met"] else "no")
        lines.append(f"| {row['value']} | {target} | {row['finetuned']:.3f} ± {row['finetuned_se']:.3f} | "
                     f"{row['base']:.3f} ± {row['base_se']:.3f} | {met} |")
    if report.get("kl_to_base") is not None:
        kl = report["kl_to_base"]
        lines += ["", f"KL(finetuned || base) ≈ {kl['mean']:.3f} ± {kl['se']:.3f} nats per continuation (mean of "
                      "log p_θ − log p0 over the finetuned model's samples)"]
    return "\n".join(lines)
