"""How a finetuned policy does against its base: sample both on a pool's prompts, score with the pool's values,
and compare the realised levels with the palette's targets (what ``mapjax finetune`` prints at the end).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def score_samples(model: Any, tokenizer: Any, prompts: Sequence[str], rewards: Sequence[Any], *, samples: int,
                  max_new_tokens: int, seed: int, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Sample ``samples`` continuations per prompt and score them: ``{value: [prompts, samples]}``."""
    from mapjax.generate import generate

    generation = generate(model, tokenizer, list(prompts), num_samples=samples, max_new_tokens=max_new_tokens,
                          seed=seed, batch_size=batch_size)
    row_prompts = [prompts[i] for i in generation.prompt_index]
    return {value.name: np.asarray(value.reward(row_prompts, generation.texts), np.float64).reshape(
        len(prompts), samples) for value in rewards}


def evaluate_finetuned(base_model: Any, model: Any, tokenizer: Any, pool: Any, palette: Any, *,
                       num_prompts: int = 16, samples: int = 2, max_new_tokens: int = 32, seed: int = 0,
                       reward_options: dict | None = None, dtype: Any = None) -> dict[str, Any]:
    """Realised levels (mean ± standard error over prompts) of ``model`` and ``base_model`` on the pool's first
    ``num_prompts`` prompts, with the palette's targets resolved on the pool. ``dtype`` (``"float32"`` or
    ``"bfloat16"``; None: float32) is the parameter dtype of the reward models built to score them."""
    from mapjax.build import resolve_values
    from mapjax.evaluate import resolve_targets

    prompts = list(pool.prompts[:num_prompts])
    rewards = resolve_values(list(pool.value_names), base_model, tokenizer, reward_options, dtype=dtype)
    targets = resolve_targets(palette, pool) if palette is not None else {}
    scores = {label: score_samples(m, tokenizer, prompts, rewards, samples=samples, max_new_tokens=max_new_tokens,
                                   seed=seed) for label, m in (("finetuned", model), ("base", base_model))}
    rows = []
    for name in pool.value_names:
        row = {"value": name, "target": targets.get(name)}
        for label in ("finetuned", "base"):
            per_prompt = scores[label][name].mean(axis=1)
            error = per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)) if len(per_prompt) > 1 else float("nan")
            row[label] = float(per_prompt.mean())
            row[f"{label}_se"] = float(error)
        if row["target"] is not None:
            row["met"] = bool(row["target"] <= row["finetuned"] + 1.96 * np.nan_to_num(row["finetuned_se"]))
        rows.append(row)
    return {"prompts": len(prompts), "samples": samples, "max_new_tokens": max_new_tokens, "levels": rows}


def evaluation_table(report: dict[str, Any]) -> str:
    """The report of :func:`evaluate_finetuned` as a Markdown table."""
    lines = ["| value | target | finetuned | base | met |", "|---|---|---|---|---|"]
    for row in report["levels"]:
        target = "-" if row["target"] is None else f"{row['target']:.3f}"
        met = "-" if "met" not in row else ("yes" if row["met"] else "no")
        lines.append(f"| {row['value']} | {target} | {row['finetuned']:.3f} ± {row['finetuned_se']:.3f} | "
                     f"{row['base']:.3f} ± {row['base_se']:.3f} | {met} |")
    return "\n".join(lines)
