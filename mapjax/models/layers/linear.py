"""Dense layers in Hugging Face's PyTorch layout: ``Linear`` (weight ``[out, in]``, as ``torch.nn.Linear``) and
``Embedding`` (whose ``attend`` is the tied output head), so that loading and exporting are plain copies."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.models.layers.axes import EMBED, VOCAB, param

Array = jax.Array
DType = Any


def _normal_init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: DType, stddev: float = 0.02) -> Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * stddev).astype(dtype)


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``W`` stored ``[out, in]`` like ``torch.nn.Linear``.

    ``axes=(in_name, out_name)`` names the input and output dimensions (e.g. ``(EMBED, MLP)`` for an MLP's
    first projection): the weight is named ``(out_name, in_name)`` and the bias ``(out_name,)``. Without
    ``axes`` the parameters carry no names (``mapjax.sharding`` then shards the weight over ``fsdp`` on its
    largest dimension).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 dtype: DType = jnp.float32, rngs: nnx.Rngs, axes: tuple[str | None, str | None] | None = None):
        self.in_features = in_features
        self.out_features = out_features
        self.weight = param(_normal_init(rngs, (out_features, in_features), dtype),
                            None if axes is None else (axes[1], axes[0]))
        self.bias = param(jnp.zeros((out_features,), dtype), None if axes is None else (axes[1],)) \
            if use_bias else None

    def __call__(self, x: Array, *, float32_output: bool = False) -> Array:
        """``float32_output``: accumulate and return float32 whatever the weights' dtype (output heads: the
        logits feed float32 log-softmax and sampling, and bfloat16 would round a logit near 10 to 0.06)."""
        # ``[...]``, not ``get_value()``: under QLoRA (qwix) the frozen weight is a quantized array in a
        # ``WithAux`` box, which reads like a Variable and whose einsum qwix intercepts.
        weight = self.weight[...]
        y = jnp.einsum("...i,oi->...o", x.astype(self.weight.dtype), weight,
                       preferred_element_type=jnp.float32 if float32_output else None)
        if self.bias is not None:
            y = y + self.bias.get_value()
        return y


class Embedding(nnx.Module):
    """Token/position table ``[num_embeddings, features]``; ``attend`` is the tied output head."""

    def __init__(self, num_embeddings: int, features: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs,
                 axes: tuple[str | None, str | None] = (VOCAB, EMBED)):
        """``axes``: names of the table's ``[num_embeddings, features]`` (a position table: ``(POSITION, EMBED)``)."""
        self.num_embeddings = num_embeddings
        self.features = features
        self.weight = param(_normal_init(rngs, (num_embeddings, features), dtype), axes)

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.weight.get_value(), ids, axis=0)

    def attend(self, x: Array) -> Array:
        """float32 logits against the table, for tied input/output embeddings (see ``Linear``'s
        ``float32_output``)."""
        weight = self.weight.get_value()
        return jnp.einsum("...d,vd->...v", x.astype(weight.dtype), weight, preferred_element_type=jnp.float32)
