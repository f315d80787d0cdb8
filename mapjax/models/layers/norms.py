"""Normalisation layers; their statistics run in float32 whatever the parameter dtype."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.models.layers.axes import NORM, param

Array = jax.Array
DType = Any


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32, result cast back to the input dtype."""

    def __init__(self, features: int, *, eps: float = 1e-5, use_scale: bool = True, use_bias: bool = True,
                 dtype: DType = jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init, accepted for a uniform constructor signature
        self.eps = eps
        self.weight = param(jnp.ones((features,), dtype), (NORM,)) if use_scale else None
        self.bias = param(jnp.zeros((features,), dtype), (NORM,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        variance = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(variance + self.eps)
        if self.weight is not None:
            y = y * self.weight.get_value().astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Llama's RMSNorm: normalise in float32, cast to the input dtype, then scale."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype: DType = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.weight = param(jnp.ones((features,), dtype), (NORM,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + self.eps)
        # The cast before the scale mirrors transformers, which matters in bfloat16.
        return self.weight.get_value() * y.astype(x.dtype)
