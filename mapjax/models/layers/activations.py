"""Activation functions by the names Hugging Face configs use."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from mapjax.errors import ModelError

Array = jax.Array


def _gelu_exact(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def _gelu_clipped_10(x: Array) -> Array:
    return jnp.clip(_gelu_exact(x), -10.0, 10.0)


# Activations by the names Hugging Face configs use (``hidden_act``, ``activation_function``, ``activation``).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # The erf form: what BERT, RoBERTa and DistilBERT checkpoints were trained with.
    "gelu": _gelu_exact,
    "gelu_python": _gelu_exact,
    # Tanh approximations: transformers has several names for the same formula (GPT-2's "gelu_new").
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "gelu_10": _gelu_clipped_10,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def activation(name: str) -> Callable[[Array], Array]:
    """The activation a Hugging Face config names; ``ModelError`` listing the supported names otherwise."""
    if name not in ACTIVATIONS:
        raise ModelError(f"unsupported activation {name!r} in the model config; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
