"""Logical names of parameter dimensions (MaxText's vocabulary), which ``mapjax.sharding.DEFAULT_RULES`` maps to
device-mesh axes, and the helpers that attach them to parameters (NNX metadata ``logical_axes``)."""

from __future__ import annotations

import jax
from flax import nnx

from mapjax.errors import ModelError

EMBED = "embed"          # the model width (hidden size)
VOCAB = "vocab"          # token ids of embedding tables and output heads
HEADS = "heads"          # query heads x head_dim (and fused q/k/v projections)
KV_HEADS = "kv_heads"    # key/value heads x head_dim
MLP = "mlp"              # the feed-forward width
NORM = "norm"            # norm scales and shifts (replicated)
POSITION = "position"    # position and relative-position tables
LABELS = "labels"        # classifier outputs
LOGICAL_AXES = "logical_axes"   # the metadata key (``mapjax.sharding.LOGICAL_AXES``)

Axes = tuple[str | None, ...]


def param(value: jax.Array, axes: Axes | None) -> nnx.Param:
    """``nnx.Param(value)`` whose dimensions are named ``axes`` (one name, or ``None``, per dimension)."""
    if axes is None:
        return nnx.Param(value)
    if len(axes) != len(value.shape):
        raise ModelError(f"{len(axes)} axis names {axes} for a parameter of shape {tuple(value.shape)}")
    return nnx.Param(value, **{LOGICAL_AXES: tuple(axes)})


def name_axes(parameter: nnx.Variable | None, axes: Axes) -> None:
    """Name (or rename) the dimensions of an existing parameter; ``None`` is skipped (an optional layer)."""
    if parameter is None:
        return
    if len(axes) != len(parameter.get_value().shape):
        raise ModelError(f"{len(axes)} axis names {axes} for a parameter of shape "
                         f"{tuple(parameter.get_value().shape)}")
    parameter.set_metadata(**{LOGICAL_AXES: tuple(axes)})
