"""The reward interface and the registry of rewards by name.

A reward scores (prompt, continuation) pairs: ``reward(prompts, continuations) -> np.ndarray`` of float32,
one score per pair, higher is better. Rewards that need set-up (loading a model) are registered as factories
and built by :func:`get_reward` with keyword options; a plain Python function is registered as is.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from mapjax.errors import RewardError

__all__ = ["FunctionReward", "Reward", "RewardError", "available_rewards", "check_pairs", "check_scores",
           "get_reward", "register_reward", "register_reward_factory", "reward_takes_option", "unregister_reward"]


@runtime_checkable
class Reward(Protocol):
    """Scores pairs; ``name`` is the value it measures."""

    name: str

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray: ...


class FunctionReward:
    """A plain function ``f(prompts, continuations) -> scores`` as a Reward, with its output checked."""

    def __init__(self, name: str, function: Callable[[Sequence[str], Sequence[str]], Any]):
        self.name = name
        self.function = function

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        check_pairs(self.name, prompts, continuations)
        scores = np.asarray(self.function(list(prompts), list(continuations)), dtype=np.float32)
        return check_scores(self.name, scores, len(prompts))


def check_pairs(name: str, prompts: Sequence[str], continuations: Sequence[str]) -> None:
    """Same number of prompts and continuations, all strings."""
    if len(prompts) != len(continuations):
        raise RewardError(f"reward {name!r}: {len(prompts)} prompts but {len(continuations)} continuations")
    for index, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        if not isinstance(prompt, str) or not isinstance(continuation, str):
            raise RewardError(f"reward {name!r}: pair {index} is not two strings")


def check_scores(name: str, scores: np.ndarray, expected: int) -> np.ndarray:
    """One finite float32 score per pair, or an error naming the reward and the first bad pair."""
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape[0] != expected:
        raise RewardError(f"reward {name!r} returned {scores.shape[0]} scores for {expected} pairs")
    bad = ~np.isfinite(scores)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise RewardError(f"reward {name!r} gave {scores[index]} for pair {index}; scores must be finite")
    return scores


_FACTORIES: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str, function: Callable[[Sequence[str], Sequence[str]], Any], *, overwrite: bool = False) -> None:
    """Register a plain scoring function under ``name``."""
    register_reward_factory(name, lambda: FunctionReward(name, function), overwrite=overwrite)


def register_reward_factory(name: str, factory: Callable[..., Reward], *, overwrite: bool = False) -> Callable[..., Reward]:
    """Register ``factory(**options) -> Reward`` under ``name``; usable as a decorator via functools.partial."""
    if name in _FACTORIES and not overwrite:
        raise RewardError(f"a reward named {name!r} is already registered; pass overwrite=True to replace it")
    _FACTORIES[name] = factory
    return factory


def get_reward(name: str, /, **options: Any) -> Reward:
    """Build the reward registered under ``name`` with its options (which may include a ``name`` of their own:
    the reward's name in pools and errors)."""
    _load_builtin_rewards()
    if name not in _FACTORIES:
        raise RewardError(f"unknown reward {name!r}; registered: {sorted(_FACTORIES)}")
    factory = _FACTORIES[name]
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as error:
        raise RewardError(f"reward {name!r}: bad options {sorted(options)}: {error}") from None
    except ValueError:  # a callable without a signature (some builtins): let the call speak for itself
        pass
    return factory(**options)


def reward_takes_option(name: str, option: str) -> bool:
    """Whether the factory registered under ``name`` has a keyword parameter ``option`` (e.g. ``dtype``: the
    model-based rewards take it, the text rewards do not). False for an unknown name."""
    _load_builtin_rewards()
    factory = _FACTORIES.get(name)
    if factory is None:
        return False
    try:
        parameter = inspect.signature(factory).parameters.get(option)
    except (TypeError, ValueError):  # a callable without a signature
        return False
    return parameter is not None and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)


def unregister_reward(name: str) -> None:
    """Remove ``name`` from the registry (tests, notebooks redefining a reward)."""
    if _FACTORIES.pop(name, None) is None:
        raise RewardError(f"unknown reward {name!r}; registered: {sorted(_FACTORIES)}")


def available_rewards() -> list[str]:
    """Names of every registered reward, sorted."""
    _load_builtin_rewards()
    return sorted(_FACTORIES)


# Modules whose import registers rewards: the package (its __init__ imports the built-in modules). They are
# imported on first lookup, not with this module, to avoid import cycles; add a module outside mapjax.rewards
# here if it registers rewards on import. One that does not exist (yet) is skipped.
_REGISTERING_MODULES = ("mapjax.rewards",)


def _load_builtin_rewards() -> None:
    """Import the modules whose import registers the built-in rewards."""
    for module_name in _REGISTERING_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:  # a missing dependency inside the module must surface
                raise
