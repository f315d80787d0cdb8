"""The one ``dtype`` setting every entry point takes: model parameters (and the KV cache) in float32 or bfloat16.

``"float32"`` is exact and the default; ``"bfloat16"`` halves the memory of weights and cache and is the fast
path on accelerators. Whatever the parameter dtype, the models compute norms, attention softmax and the
log-softmax of the logits in float32, and rewards return float32 scores. Every public function and CLI command
spells the setting the same way: the string ``"float32"`` or ``"bfloat16"`` (``--dtype float32|bfloat16``);
Python functions that took a JAX dtype (``jnp.float32``, ``jnp.bfloat16``) still take one.

>>> import jax.numpy as jnp
>>> from mapjax.dtypes import dtype_name, resolve_dtype
>>> resolve_dtype("bfloat16") is jnp.bfloat16
True
>>> dtype_name(jnp.float32)
'float32'
>>> resolve_dtype("bf16")
Traceback (most recent call last):
mapjax.errors.InputError: dtype must be 'float32' or 'bfloat16' (or jnp.float32 / jnp.bfloat16), got 'bf16'
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from mapjax.errors import InputError, MapjaxError

# name -> the JAX scalar type the models are built with (the names are the only spelling accepted as strings)
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_NAMES: tuple[str, ...] = tuple(DTYPES)
DEFAULT_DTYPE = "float32"

__all__ = ["DEFAULT_DTYPE", "DTYPES", "DTYPE_NAMES", "dtype_name", "known_dtype_name", "model_dtype_name",
           "resolve_dtype"]


def known_dtype_name(dtype: Any) -> str | None:
    """The canonical name of ``dtype`` if it is one of :data:`DTYPES` (a name or a dtype object), else None."""
    if isinstance(dtype, str):
        return dtype if dtype in DTYPES else None
    if dtype is None or isinstance(dtype, (bool, int, float)):
        return None
    try:
        name = np.dtype(dtype).name
    except (TypeError, ValueError):
        return None
    return name if name in DTYPES else None


def dtype_name(dtype: Any, *, what: str = "dtype", error: type[MapjaxError] = InputError) -> str:
    """``"float32"`` or ``"bfloat16"`` for ``dtype`` (a name or a JAX/numpy dtype); anything else raises
    ``error`` naming ``what``, the value given and the values allowed."""
    name = known_dtype_name(dtype)
    if name is None:
        allowed = " or ".join(repr(name) for name in DTYPE_NAMES)
        raise error(f"{what} must be {allowed} (or jnp.float32 / jnp.bfloat16), got {dtype!r}")
    return name


def resolve_dtype(dtype: Any, *, what: str = "dtype", error: type[MapjaxError] = InputError) -> Any:
    """The JAX dtype (``jnp.float32`` or ``jnp.bfloat16``) that ``dtype`` names; see :func:`dtype_name`."""
    return DTYPES[dtype_name(dtype, what=what, error=error)]


def model_dtype_name(model: Any) -> str:
    """The parameter dtype of a mapjax model as a name (``"float32"``, ``"bfloat16"``, or another numpy name
    for a model built otherwise): its ``dtype`` attribute, else the dtype of its first floating parameter."""
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        from flax import nnx

        for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
            if jnp.issubdtype(value.dtype, jnp.floating):
                dtype = value.dtype
                break
    try:
        return np.dtype(dtype).name
    except TypeError:
        return DEFAULT_DTYPE
