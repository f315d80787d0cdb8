"""Scoring texts with values, shared by pool building (:mod:`mapjax.build`) and finetuning (:mod:`mapjax.finetune`).

- :func:`resolve_values` turns value names (or Rewards) into :class:`ScoredValue` s, a multi-objective reward into
  one :class:`RewardColumn` per output, so every caller scores a value the same way;
- :func:`score_chunk` scores one chunk of (prompt, continuation) pairs with every value (a multi-objective reward
  runs once for all its columns), :func:`score_texts` stacks those scores into a ``[rows, values]`` array;
- :func:`model_fingerprint`, :func:`tokenizer_fingerprint` and :func:`prompts_hash` are the cheap hashes a build
  manifest or a finetuning checkpoint records to recognise the same model, tokenizer and prompts on resume;
- :func:`manifest_path` and :func:`read_manifest` find and read the manifest a pool build writes beside its pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mapjax.dtypes import dtype_name
from mapjax.errors import BuildError


@dataclasses.dataclass(frozen=True)
class ScoredValue:
    """A value to score samples with: its name, the reward that scores it, and how a manifest recognises it."""

    name: str
    reward: Any
    identity: str   # what the manifest records to recognise the same reward on resume


class RewardColumn:
    """Column ``index`` of a multi-objective reward (one with ``.scores(prompts, continuations) -> [n, k]`` and
    ``.names``) as a one-score reward. Calling it scores all k outputs and keeps one; :func:`score_chunk` instead
    scores each chunk once per ``source`` and fills every column from that pass."""

    def __init__(self, source: Any, index: int):
        self.source, self.index = source, index
        self.name = str(source.names[index])

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        return np.asarray(self.source.scores(prompts, continuations))[:, self.index]


def _columns(reward: Any, identity: str) -> list[ScoredValue]:
    """One value per output of ``reward``: itself when it has one, a :class:`RewardColumn` per name when its
    ``.names`` lists several (the manifest records each column under the reward's identity and its name)."""
    names = getattr(reward, "names", None)
    if not isinstance(names, (list, tuple)) or len(names) <= 1:
        return [ScoredValue(reward.name, reward, identity)]
    if not callable(getattr(reward, "scores", None)):
        from mapjax.rewards.base import RewardError

        raise RewardError(f"reward {reward.name!r} names {len(names)} outputs but has no .scores(prompts, "
                          "continuations) method returning them")
    return [ScoredValue(str(column), RewardColumn(reward, index), f"{identity}#{column}")
            for index, column in enumerate(names)]


def resolve_values(values: Sequence[Any] | str, policy: Any, tokenizer: Any,
                   reward_options: Mapping[str, Mapping[str, Any]] | None, *, dtype: Any = None, mesh: Any = None
                   ) -> list[ScoredValue]:
    """The rewards for ``values`` (names, rewards, or a comma-separated string), ``perplexity`` under ``policy``;
    shared by pool building and finetuning's evaluation, so both score a value the same way.

    ``dtype`` (``"float32"`` or ``"bfloat16"``; None: each reward's default, float32) is the parameter dtype of
    the reward models built by name; a ``dtype`` in a reward's ``reward_options`` wins over it. ``mesh`` (a
    ``jax.sharding.Mesh`` or spec) goes to every reward built by name that takes a ``mesh`` option, unless its
    ``reward_options`` give one; scores do not depend on it, so no identity records it.
    """
    from mapjax.rewards.base import RewardError, get_reward, reward_takes_option

    default_dtype = None if dtype is None else dtype_name(dtype, error=BuildError)

    if isinstance(values, str):
        values = [name.strip() for name in values.split(",") if name.strip()]
    values = list(values)
    if not values:
        raise BuildError("values is empty: name at least one reward")
    options = dict(reward_options or {})
    resolved = []
    for index, value in enumerate(values):
        if isinstance(value, str):
            kwargs = dict(options.get(value, {}))
            if "dtype" in kwargs:   # recorded by name, so jnp.bfloat16 and "bfloat16" are the same setting
                kwargs["dtype"] = dtype_name(kwargs["dtype"], what=f"reward_options[{value!r}]['dtype']",
                                             error=BuildError)
            if value == "perplexity" and "model" not in kwargs and "model_path" not in kwargs:
                # The paper scores perplexity under the model that generated the samples.
                kwargs.update(model=policy, tokenizer=tokenizer)
            # The run's dtype is recorded once in the manifest's settings, not in every reward's identity.
            identity = f"registry:{value}:" + json.dumps(
                {k: v for k, v in sorted(kwargs.items())
                 if k != "mesh" and isinstance(v, (str, int, float, bool, type(None)))})
            if default_dtype is not None and "dtype" not in kwargs and reward_takes_option(value, "dtype"):
                kwargs["dtype"] = default_dtype
            if mesh is not None and "mesh" not in kwargs and reward_takes_option(value, "mesh"):
                kwargs["mesh"] = mesh
            reward = get_reward(value, **kwargs)
            if len(getattr(reward, "names", None) or ()) > 1:
                resolved.extend(_columns(reward, identity))
            else:
                resolved.append(ScoredValue(value, reward, identity))
        elif callable(value) and isinstance(getattr(value, "name", None), str):
            resolved.extend(_columns(value, f"instance:{type(value).__qualname__}:{value.name}"))
        else:
            raise RewardError(f"values[{index}] is {value!r}: expected a reward name or a Reward (a callable "
                              "with a .name)")
    names = [value.name for value in resolved]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BuildError(f"values name the same reward twice: {repeated}")
    reserved = {"prompt", "prompt_id", "generated"} & set(names)
    if reserved:
        raise BuildError(f"reward names {sorted(reserved)} clash with the pool's text columns")
    return resolved


# ------------------------------------------------------------------------------------------------------ scoring
def _score(value: ScoredValue, prompts: list[str], continuations: list[str]) -> np.ndarray:
    from mapjax.rewards.base import check_scores

    return check_scores(value.name, np.asarray(value.reward(prompts, continuations)), len(prompts))


def score_chunk(resolved: Sequence[ScoredValue], prompts: list[str], continuations: list[str]
                ) -> dict[str, np.ndarray]:
    """Every value's scores on one chunk of (prompt, continuation) pairs, ``{name: [pairs]}`` in ``resolved``'s
    order; a multi-objective reward runs once for all its columns. Each value's scores are checked (one finite
    number per pair, :func:`mapjax.rewards.base.check_scores`)."""
    from mapjax.rewards.base import RewardError, check_scores

    passes: dict[int, np.ndarray] = {}   # id(source) -> its [n, k] scores on this chunk
    scores = {}
    for value in resolved:
        if not isinstance(value.reward, RewardColumn):
            scores[value.name] = _score(value, prompts, continuations)
            continue
        source = value.reward.source
        if id(source) not in passes:
            table = np.asarray(source.scores(prompts, continuations), dtype=np.float32)
            if table.ndim != 2 or table.shape != (len(prompts), len(source.names)):
                raise RewardError(f"reward {source.name!r}.scores returned shape {table.shape} for {len(prompts)} "
                                  f"pairs and {len(source.names)} outputs")
            passes[id(source)] = table
        scores[value.name] = check_scores(value.name, passes[id(source)][:, value.reward.index], len(prompts))
    return scores


def score_texts(values: Sequence[ScoredValue], prompts: list[str], texts: list[str]) -> np.ndarray:
    """``[rows, values]`` float64 scores of ``texts`` (continuations of ``prompts``, one per row), the columns in
    ``values``' order; :func:`score_chunk`'s scores stacked (a multi-output reward scored once for all its
    columns)."""
    scores = score_chunk(values, prompts, texts)
    return np.stack([np.asarray(scores[value.name], np.float64) for value in values], axis=1)


# ------------------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: Any, samples_per_tensor: int = 256) -> str:
    """A cheap hash of a model: every parameter's path, shape and dtype, and a strided sample of its values."""
    from flax import nnx

    digest = hashlib.sha256()
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda item: str(item[0])):
        array = np.asarray(leaf.get_value() if hasattr(leaf, "get_value") else leaf)
        digest.update(f"{'.'.join(map(str, path))}:{array.shape}:{array.dtype};".encode())
        flat = array.reshape(-1)
        stride = max(1, flat.size // samples_per_tensor)
        digest.update(np.ascontiguousarray(flat[::stride].astype(np.float32)).tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A cheap hash of a tokenizer: its class, its vocabulary size and how it encodes a fixed probe text (letters,
    digits, accents and whitespace), so a tokenizer that splits text differently gets another fingerprint."""
    probe = "MAP palette: humor, helpfulness, harmlessness. 0123456789 ÀÉ \n\t"
    ids = tokenizer(probe, add_special_tokens=True)["input_ids"]
    text = json.dumps([type(tokenizer).__name__, len(tokenizer), list(map(int, ids))])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prompts_hash(prompts: Sequence[str]) -> str:
    """The SHA-256 (hex) of the prompt texts in order: equal exactly when the prompts and their order are."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- pool manifests
def manifest_path(pool_file: str | os.PathLike) -> Path:
    """The build manifest of ``pool_file`` (``<pool_file>.manifest.json``, beside it), whether or not it exists."""
    pool_file = Path(pool_file)
    return pool_file.with_name(pool_file.name + ".manifest.json")


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The build manifest at ``path`` (see :func:`manifest_path`) as a dict.

    Raises:
        BuildError: the file is not UTF-8 JSON.
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BuildError(f"{path}: unreadable build manifest ({error}); delete it and the .partial file beside "
                         "it to start over") from None
