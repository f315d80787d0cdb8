"""Model soups: linear interpolation of the parameters of several finetuned copies of one base model.

The paper's DPO-Soup baseline (Table 3) and Rewarded Soups (Ramé et al., 2023) finetune one model per value (or
per setting) from the same base model and then mix them in weight space: θ = Σ_i w_i θ_i with w on the simplex.
Mixing is only meaningful between models of one architecture finetuned from one initialisation, so
:func:`soup` refuses anything else with an error naming the first difference: the model class, a config field,
a parameter path that one model lacks, a parameter of another shape or dtype, or any other structural difference.

>>> from mapjax.finetune.soup import soup, soup_from_folders, save_soup
>>> mixed = soup([helpful_model, harmless_model], [0.3, 0.7])
>>> mixed = soup_from_folders(["runs/dpo-helpful/model", "runs/dpo-harmless/model"], [0.3, 0.7])
>>> save_soup(mixed, "runs/soup-0.3", tokenizer=tokenizer)

The mixture is accumulated in float32 (whatever the parameter dtype) and cast back to each parameter's dtype, so
the weights' rounding does not depend on the order of the models. :func:`soup_from_folders` loads one folder at a
time, so mixing n models holds three models' worth of parameters (the first, the running sum, the one being
added), not n.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import FinetuneError
from mapjax.jsonio import write_json

__all__ = ["check_soup_weights", "save_soup", "soup", "soup_from_folders"]

# How far from 1 the weights' sum may be before it is an error (without normalize=True): float rounding of
# weights written in a config (0.1 + 0.2 + 0.7) must pass, a mistake (0.5, 0.6) must not.
SUM_TOLERANCE = 1e-6


def check_soup_weights(weights: Sequence[float] | np.ndarray, count: int, *, normalize: bool = False
                       ) -> np.ndarray:
    """The soup weights as float64, checked: one per model, finite, non-negative, summing to 1 (or, with
    ``normalize``, to anything positive, then divided by their sum). Raises FinetuneError naming the bad one."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, (Sequence, np.ndarray)):
        raise FinetuneError(f"soup weights must be a sequence of numbers, got {weights!r}")
    values = []
    for index, weight in enumerate(weights):
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
            raise FinetuneError(f"soup weight {index} is {weight!r}, not a number")
        if not math.isfinite(float(weight)):
            raise FinetuneError(f"soup weight {index} is {weight!r}; weights must be finite")
        if weight < 0:
            raise FinetuneError(f"soup weight {index} is {weight!r}; weights must be >= 0")
        values.append(float(weight))
    if len(values) != count:
        raise FinetuneError(f"{len(values)} soup weights for {count} models; give one weight per model")
    array = np.asarray(values, np.float64)
    total = float(array.sum())
    if normalize:
        if total <= 0:
            raise FinetuneError(f"soup weights {values} sum to {total}; normalize needs a positive sum")
        return array / total
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise FinetuneError(f"soup weights {values} sum to {total:.8g}, not 1; pass normalize=True to divide "
                            "them by their sum")
    return array


def _path_text(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def _config_difference(first: Any, other: Any) -> str | None:
    """The first config field in which ``other`` differs from ``first`` (a sentence), or None when equal."""
    if first == other:
        return None
    if dataclasses.is_dataclass(first) and dataclasses.is_dataclass(other) and type(first) is type(other):
        for field in dataclasses.fields(first):
            mine, theirs = getattr(first, field.name), getattr(other, field.name)
            if mine != theirs:
                return f"config field {field.name!r} is {theirs!r}, not {mine!r}"
    return f"config {other!r} differs from {first!r}"


@dataclasses.dataclass
class _Ingredient:
    """A model split for mixing: its class, config, graph, parameters by path, and the rest of its state."""

    kind: type
    config: Any
    graphdef: Any
    params: dict[tuple[Any, ...], Any]   # path -> nnx.Param (in graph order)
    rest: Any                            # non-parameter state (empty for mapjax's models)

    @classmethod
    def of(cls, model: Any, label: str) -> "_Ingredient":
        if not isinstance(model, nnx.Module):
            raise FinetuneError(f"{label} is a {type(model).__name__}, not a Flax NNX model")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(type(model), getattr(model, "config", None), graphdef, dict(nnx.to_flat_state(params)), rest)


def _check_same(first: _Ingredient, other: _Ingredient, label: str) -> None:
    """Raise FinetuneError naming the first way ``other`` (called ``label``) differs from ``first``."""
    if other.kind is not first.kind:
        raise FinetuneError(f"{label} is a {other.kind.__name__}, not a {first.kind.__name__} like model 0: a "
                            "soup mixes models of one architecture")
    difference = _config_difference(first.config, other.config)
    if difference is not None:
        raise FinetuneError(f"{label}: {difference} (model 0's); a soup mixes models of one architecture")
    for path in first.params:
        if path not in other.params:
            raise FinetuneError(f"{label} has no parameter {_path_text(path)} (model 0 has)")
    for path in other.params:
        if path not in first.params:
            raise FinetuneError(f"{label} has a parameter {_path_text(path)} that model 0 lacks")
    for path, parameter in first.params.items():
        mine, theirs = parameter.get_value(), other.params[path].get_value()
        if tuple(theirs.shape) != tuple(mine.shape):
            raise FinetuneError(f"{label}: parameter {_path_text(path)} has shape {tuple(theirs.shape)}, not "
                                f"{tuple(mine.shape)} like model 0's")
        if theirs.dtype != mine.dtype:
            raise FinetuneError(f"{label}: parameter {_path_text(path)} is {theirs.dtype}, not {mine.dtype} like "
                                "model 0's (load every model with the same dtype)")
    if other.graphdef != first.graphdef:
        raise FinetuneError(f"{label} has the parameters of model 0 but another module structure (its graph "
                            "differs: another setting that the config does not show)")
    first_rest, other_rest = dict(nnx.to_flat_state(first.rest)), dict(nnx.to_flat_state(other.rest))
    for path in sorted(set(first_rest) | set(other_rest), key=str):
        if path not in first_rest or path not in other_rest:
            raise FinetuneError(f"{label}: state {_path_text(path)} is in only one of it and model 0")
        mine, theirs = np.asarray(first_rest[path].get_value()), np.asarray(other_rest[path].get_value())
        if mine.shape != theirs.shape or mine.dtype != theirs.dtype or not np.array_equal(mine, theirs):
            raise FinetuneError(f"{label}: non-parameter state {_path_text(path)} differs from model 0's; a "
                                "soup mixes parameters only, so the rest must be equal")


@jax.jit
def _add_scaled(totals: list[jax.Array], leaves: list[jax.Array], weight: jax.Array) -> list[jax.Array]:
    """``totals + weight · leaves`` in float32, leaf by leaf: one compiled program per model structure."""
    return [total + weight * leaf.astype(jnp.float32) for total, leaf in zip(totals, leaves)]


@functools.partial(jax.jit, static_argnums=1)
def _cast(totals: list[jax.Array], dtypes: tuple[str, ...]) -> list[jax.Array]:
    return [total.astype(dtype) for total, dtype in zip(totals, dtypes)]


def _mix(ingredients: Iterable[tuple[_Ingredient, float]], count: int, *, checked: bool = False) -> Any:
    """Σ_i w_i θ_i over ``ingredients`` (an iterator, consumed once: each model is released after its turn);
    returns a new model with model 0's graph and non-parameter state. Each model is checked against model 0
    before it is added, unless the caller ``checked`` them all already."""
    first: _Ingredient | None = None
    floating: list[tuple[Any, ...]] = []     # paths of the floating-point parameters, in graph order
    totals: list[jax.Array] = []
    seen = 0
    for index, (ingredient, weight) in enumerate(ingredients):
        if first is None:
            first = ingredient
            floating = [path for path, parameter in first.params.items()
                        if jnp.issubdtype(parameter.get_value().dtype, jnp.floating)]
            totals = [jnp.zeros(first.params[path].get_value().shape, jnp.float32) for path in floating]
        elif not checked:
            _check_same(first, ingredient, f"model {index}")
        for path, parameter in ingredient.params.items():
            value = parameter.get_value()
            if index and not jnp.issubdtype(value.dtype, jnp.floating) and not np.array_equal(
                    np.asarray(value), np.asarray(first.params[path].get_value())):
                raise FinetuneError(f"model {index}: integer parameter {_path_text(path)} differs from model 0's; "
                                    "a soup interpolates floating-point parameters only")
        leaves = [ingredient.params[path].get_value() for path in floating]
        totals = _add_scaled(totals, leaves, jnp.float32(weight))
        seen += 1
    if first is None or seen != count:
        raise FinetuneError(f"a soup of {count} models received {seen}")
    cast = dict(zip(floating, _cast(totals, tuple(str(first.params[path].get_value().dtype) for path in floating))))
    mixed = []
    for path, parameter in first.params.items():
        new = cast[path] if path in cast else jnp.array(parameter.get_value(), copy=True)
        mixed.append((path, parameter.replace(new)))
    state = nnx.from_flat_state(mixed)
    rest = nnx.from_flat_state([(path, variable.replace(jnp.array(variable.get_value(), copy=True)))
                                for path, variable in nnx.to_flat_state(first.rest)])
    return nnx.merge(first.graphdef, state, rest)


def soup(models: Sequence[Any], weights: Sequence[float] | np.ndarray | None = None, *,
         normalize: bool = False) -> Any:
    """A new model whose parameters are Σ_i weights[i] · (parameters of models[i]).

    Args:
        models: one or more mapjax models of one class, config, parameter shapes and dtypes (e.g. finetuned from
            one base model); they are not modified.
        weights: one per model, finite, >= 0, summing to 1; None: equal weights.
        normalize: divide the weights by their sum instead of requiring it to be 1.

    Raises:
        FinetuneError: the weights are bad, or a model differs from the first (the message names the class,
            config field or parameter path that differs), checked before any arithmetic.
    """
    if isinstance(models, nnx.Module) or not isinstance(models, Sequence):
        raise FinetuneError("soup takes a list of models")
    models = list(models)
    if not models:
        raise FinetuneError("a soup needs at least one model")
    weights = np.full(len(models), 1.0 / len(models)) if weights is None else weights
    weights = check_soup_weights(weights, len(models), normalize=normalize)
    ingredients = [_Ingredient.of(model, f"model {index}") for index, model in enumerate(models)]
    for index, ingredient in enumerate(ingredients[1:], start=1):
        _check_same(ingredients[0], ingredient, f"model {index}")
    return _mix(zip(ingredients, weights.tolist()), len(models), checked=True)


def soup_from_folders(paths: Sequence[str | os.PathLike], weights: Sequence[float] | np.ndarray | None = None, *,
                      normalize: bool = False, dtype: Any = "float32") -> Any:
    """:func:`soup` of models exported in Hugging Face format (``mapjax.models.from_pretrained`` folders, e.g.
    a finetuning run's ``model/``), loaded one at a time with parameter dtype ``dtype``. The weights and the
    folders' existence are checked before any model is read."""
    from mapjax.models import from_pretrained

    if isinstance(paths, (str, os.PathLike)) or not isinstance(paths, Sequence):
        raise FinetuneError("soup_from_folders takes a list of folders")
    folders = [Path(path).expanduser() for path in paths]
    if not folders:
        raise FinetuneError("a soup needs at least one model folder")
    weights = np.full(len(folders), 1.0 / len(folders)) if weights is None else weights
    weights = check_soup_weights(weights, len(folders), normalize=normalize)
    for folder in folders:
        if not (folder / "config.json").is_file():
            raise FinetuneError(f"{folder} is not a model folder (no config.json); give the folders "
                                "export_pretrained wrote (a finetuning run's model/)")

    def ingredients() -> Iterator[tuple[_Ingredient, float]]:
        for index, (folder, weight) in enumerate(zip(folders, weights.tolist())):
            yield _Ingredient.of(from_pretrained(folder, dtype), f"model {index}"), weight

    try:
        return _mix(ingredients(), len(folders))
    except FinetuneError as error:
        # _mix names models by index: add the folders so the message says which files differ.
        names = "; ".join(f"model {index} = {folder}" for index, folder in enumerate(folders))
        raise FinetuneError(f"{error} ({names})") from None


def save_soup(model: Any, directory: str | os.PathLike, *, tokenizer: Any = None,
              sources: Sequence[str | os.PathLike] | None = None, weights: Sequence[float] | None = None,
              dtype: str = "float32") -> Path:
    """Write a soup as a Hugging Face folder (``mapjax.models.export_pretrained``: config.json and
    model.safetensors), the tokenizer when given, and ``soup.json`` recording the sources and weights when given
    (so the folder says what it is a mixture of). Returns the folder."""
    from mapjax.models import export_pretrained

    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise FinetuneError(f"{directory} is a file; give a folder for the soup")
    export_pretrained(model, directory, dtype=dtype)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(directory))
    if sources is not None or weights is not None:
        write_json(directory / "soup.json", {"sources": None if sources is None else [str(s) for s in sources],
                                             "weights": None if weights is None else [float(w) for w in weights]})
    return directory
