"""Layers shared by the decoder (and encoder) ports.

Weights keep Hugging Face's PyTorch layout (``nn.Linear.weight`` is
``[out_features, in_features]``) so that loading and exporting are plain copies
and the name maps stay readable.  Activations run in the parameter dtype;
normalisation statistics, attention logits and softmax always run in float32.

The KV cache (``KVCache``) has static shapes: every row of the batch shares the
same slot index (``write_index``); padding is tracked per slot in ``slot_mask``
and per row in ``token_count`` (the next position id), so a left-padded prefill
followed by one-token decode steps gives the same logits as one full forward.
Its arrays are kv-head major (``[batch, kv_heads, slots, head_dim]``) and a cached call
attends only over the slots written so far, chunk by chunk (``cached_attention``).

Every parameter names its dimensions (NNX metadata ``logical_axes``, MaxText's vocabulary: ``EMBED``,
``VOCAB``, ``HEADS``, ``KV_HEADS``, ``MLP``, ...); ``mapjax.sharding`` maps the names to device-mesh axes.
``Linear`` takes ``axes=(input name, output name)``, as a kernel ``[in, out]`` would be named, and stores the
names of its ``[out, in]`` weight accordingly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError

Array = jax.Array
DType = Any

# A large negative logit rather than -inf: a query row whose keys are all masked
# (a pad query under left padding) then gets a uniform softmax instead of NaN,
# and NaNs never leak into gradients of the real rows.
MASKED_LOGIT = float(np.finfo(np.float32).min)


# --------------------------------------------------------------------------- #
# Logical axis names (mapped to mesh axes by ``mapjax.sharding.DEFAULT_RULES``)
# --------------------------------------------------------------------------- #
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


def param(value: Array, axes: Axes | None) -> nnx.Param:
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


# --------------------------------------------------------------------------- #
# Parametrised layers
# --------------------------------------------------------------------------- #
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
        weight = self.weight.get_value()
        y = jnp.einsum("...i,oi->...o", x.astype(weight.dtype), weight,
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


# --------------------------------------------------------------------------- #
# Rotary position embeddings
# --------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """Everything needed to compute rotary frequencies (hashable, static under jit).

    ``rope_type`` is one of ``SUPPORTED``: ``default``, ``linear``, ``dynamic``, ``llama3``, ``yarn`` (Qwen2.5 and
    Mistral long-context configs) and ``longrope`` (Phi-3/3.5/4 long-context configs), as transformers defines
    them. ``attention_factor`` (yarn, longrope) scales cos and sin; ``None`` derives it from ``factor`` as
    transformers does. ``long_factor`` / ``short_factor`` (longrope) rescale each frequency; the long ones apply
    to a call whose largest position id reaches ``original_max_position_embeddings``.
    """

    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_position_embeddings: int = 2048
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    long_factor: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()

    SUPPORTED = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")

    def __post_init__(self) -> None:
        if self.rope_type not in self.SUPPORTED:
            raise ModelError(f"unsupported rope_type {self.rope_type!r}; supported: {list(self.SUPPORTED)}")
        if self.rope_type == "longrope":
            for name in ("long_factor", "short_factor"):
                if len(getattr(self, name)) != self.rotary_dim // 2:
                    raise ModelError(f"longrope {name} has {len(getattr(self, name))} entries; rotary_dim "
                                     f"{self.rotary_dim} needs {self.rotary_dim // 2}")


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def rope_spec_from_hf_config(hf_config: Any, head_dim: int, layer_type: str | None = None) -> RopeSpec:
    """Read rope settings from a transformers config (v5 ``rope_parameters`` or v4 ``rope_scaling``).

    Configs whose rope differs by layer type (Gemma 3: ``{"full_attention": {...}, "sliding_attention": {...}}``)
    are read for ``layer_type`` (default ``"full_attention"``).
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    nested = [key for key, value in params.items() if isinstance(value, dict)]
    if nested:
        chosen = layer_type or "full_attention"
        if chosen not in params:
            raise ModelError(f"the config's rope_parameters has no entry for layer type {chosen!r}; it has {nested}")
        params = dict(params[chosen] or {})
    legacy_scaling = getattr(hf_config, "rope_scaling", None)
    if isinstance(legacy_scaling, dict) and not nested:
        for key, value in legacy_scaling.items():
            params.setdefault(key, value)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type in ("su", "yarn") and getattr(hf_config, "model_type", None) == "phi3":
        rope_type = "longrope"   # Phi-3's early configs named longrope "su" or "yarn"; transformers renames them
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    max_positions = int(getattr(hf_config, "max_position_embeddings", 2048))
    # Phi-3 keeps the pretraining length beside the rope parameters; transformers gives that one priority.
    original = getattr(hf_config, "original_max_position_embeddings", None) if rope_type in ("yarn", "longrope") \
        else None
    original = int(original or params.get("original_max_position_embeddings") or max_positions)
    factor = params.get("factor")
    if factor is None and rope_type in ("yarn", "longrope"):
        factor = max_positions / original
    return RopeSpec(
        rotary_dim=int(head_dim * partial),
        theta=float(theta),
        rope_type=str(rope_type),
        factor=float(1.0 if factor is None else factor),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        max_position_embeddings=max_positions,
        attention_factor=_float_or_none(params.get("attention_factor")),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        mscale=_float_or_none(params.get("mscale")),
        mscale_all_dim=_float_or_none(params.get("mscale_all_dim")),
        truncate=bool(params.get("truncate", True)),
        long_factor=tuple(float(value) for value in params.get("long_factor") or ()),
        short_factor=tuple(float(value) for value in params.get("short_factor") or ()),
    )


def rope_spec_to_hf(spec: RopeSpec) -> dict[str, Any]:
    """The ``rope_parameters`` dict transformers v5 writes for ``spec``."""
    params: dict[str, Any] = {"rope_type": spec.rope_type, "rope_theta": spec.theta}
    if spec.rope_type in ("linear", "dynamic", "llama3", "yarn", "longrope"):
        params["factor"] = spec.factor
    if spec.rope_type == "llama3":
        params.update(low_freq_factor=spec.low_freq_factor, high_freq_factor=spec.high_freq_factor,
                      original_max_position_embeddings=spec.original_max_position_embeddings)
    if spec.rope_type == "yarn":
        params.update(beta_fast=spec.beta_fast, beta_slow=spec.beta_slow, truncate=spec.truncate,
                      original_max_position_embeddings=spec.original_max_position_embeddings)
        params.update({name: getattr(spec, name) for name in ("mscale", "mscale_all_dim")
                       if getattr(spec, name) is not None})
    if spec.rope_type == "longrope":
        params.update(long_factor=list(spec.long_factor), short_factor=list(spec.short_factor),
                      original_max_position_embeddings=spec.original_max_position_embeddings)
    if spec.attention_factor is not None:
        params["attention_factor"] = spec.attention_factor
    return params


def _base_inverse_frequencies(dim: int, theta: Any) -> Any:
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    return 1.0 / (theta ** exponents)


def rotary_attention_scaling(spec: RopeSpec) -> float:
    """The factor yarn and longrope put on cos and sin (1 for the other types), as transformers derives it."""
    if spec.attention_factor is not None:
        return spec.attention_factor
    if spec.rope_type == "yarn":
        def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        if spec.mscale and spec.mscale_all_dim:
            return float(yarn_mscale(spec.factor, spec.mscale) / yarn_mscale(spec.factor, spec.mscale_all_dim))
        return yarn_mscale(spec.factor)
    if spec.rope_type == "longrope" and spec.factor > 1.0:
        return math.sqrt(1 + math.log(spec.factor) / math.log(spec.original_max_position_embeddings))
    return 1.0


def _yarn_inverse_frequencies(spec: RopeSpec) -> np.ndarray:
    """YaRN: interpolate (divide by ``factor``) the low frequencies, keep the high ones, ramp in between."""
    dim, base = spec.rotary_dim, spec.theta

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(spec.original_max_position_embeddings / (rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001   # avoid a zero-width ramp, as transformers does
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (np.float32(spec.factor) * pos_freqs)
    return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def rotary_inverse_frequencies(spec: RopeSpec, max_position: Array | None = None) -> Array:
    """Inverse frequencies ``[rotary_dim // 2]`` in float32.

    ``max_position`` (the largest position id in the call, traced) only matters for ``dynamic`` (the base grows
    once a sequence outgrows ``max_position_embeddings``) and ``longrope`` (the long factors apply once it
    reaches ``original_max_position_embeddings``). Transformers keeps those frequencies as module state between
    calls; here they are a pure function of the current call's positions, which is what transformers computes
    for that call. For ``longrope`` ``max_position`` may hold one value per row (shape ``[batch]``); the result
    is then ``[batch, rotary_dim // 2]``.
    """
    dim = spec.rotary_dim
    if spec.rope_type == "dynamic":
        seq_len = jnp.float32(spec.max_position_embeddings)
        if max_position is not None:
            seq_len = jnp.maximum(max_position.astype(jnp.float32) + 1.0, seq_len)
        base = spec.theta * ((spec.factor * seq_len / spec.max_position_embeddings) - (spec.factor - 1)) ** (
            dim / (dim - 2))
        return _base_inverse_frequencies(dim, base).astype(jnp.float32)
    if spec.rope_type == "longrope":
        exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        powers = np.float32(spec.theta) ** exponents
        short = 1.0 / (np.asarray(spec.short_factor, np.float32) * powers)
        long = 1.0 / (np.asarray(spec.long_factor, np.float32) * powers)
        if max_position is None:
            return jnp.asarray(short, jnp.float32)
        use_long = (jnp.asarray(max_position) + 1 > spec.original_max_position_embeddings)[..., None]
        return jnp.where(use_long, jnp.asarray(long, jnp.float32), jnp.asarray(short, jnp.float32))
    if spec.rope_type == "yarn":
        return jnp.asarray(_yarn_inverse_frequencies(spec), jnp.float32)

    inv_freq = _base_inverse_frequencies(dim, np.float32(spec.theta)).astype(np.float32)
    if spec.rope_type == "linear":
        inv_freq = inv_freq / np.float32(spec.factor)
    elif spec.rope_type == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept,
        # and the band in between interpolated smoothly.
        old_context = spec.original_max_position_embeddings
        low_freq_wavelen = old_context / spec.low_freq_factor
        high_freq_wavelen = old_context / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
        smooth = (old_context / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return jnp.asarray(inv_freq, jnp.float32)


def rotary_cos_sin(spec: RopeSpec, positions: Array, dtype: DType) -> tuple[Array, Array]:
    """``cos, sin`` of shape ``[batch, seq, rotary_dim]`` for integer ``positions [batch, seq]``.

    ``longrope`` chooses its factors row by row (by each row's largest position), so a row's result does not
    depend on the other rows of the batch; for a single row that is transformers' choice.
    """
    max_position = None
    if spec.rope_type == "dynamic":
        max_position = jnp.max(positions)
    elif spec.rope_type == "longrope":
        max_position = jnp.max(positions, axis=1)
    inv_freq = rotary_inverse_frequencies(spec, max_position)
    if inv_freq.ndim == 2:
        inv_freq = inv_freq[:, None, :]   # per row
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    scaling = rotary_attention_scaling(spec)
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    return cos.astype(dtype), sin.astype(dtype)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x [batch, seq, heads, head_dim]`` (half-split convention, as HF Llama)."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x_rot * cos + rotated_half * sin
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


# --------------------------------------------------------------------------- #
# KV cache and masks
# --------------------------------------------------------------------------- #
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape key/value cache for a whole decoder.

    keys, values: one array per layer, ``[batch, kv_heads, max_len, head_dim]``. Kv-head major because the
                  attention products batch over (row, kv head) and contract over ``head_dim``: with the
                  slot axis in the middle, XLA:CPU transposes the whole cache on every call (7x slower
                  decode attention at batch 64, measured).
    slot_mask:    ``[batch, max_len]`` bool, True where a slot holds a real token.
    write_index:  int32 scalar, next slot to write (shared by all rows).
    token_count:  ``[batch]`` int32, real tokens seen per row = the next position id.
    """

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    slot_mask: Array
    write_index: Array
    token_count: Array

    @property
    def max_len(self) -> int:
        return self.slot_mask.shape[1]

    @classmethod
    def create(cls, *, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
               dtype: DType) -> "KVCache":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(
            keys=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            values=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
            slot_mask=jnp.zeros((batch, max_len), bool),
            write_index=jnp.zeros((), jnp.int32),
            token_count=jnp.zeros((batch,), jnp.int32),
        )


@dataclasses.dataclass(frozen=True)
class AttentionContext:
    """What every layer of one forward call shares: positions, mask, cache slot."""

    positions: Array          # [batch, seq] int32, -1 on padding
    allowed: Array            # [batch, 1, seq, keys] bool
    write_index: Array | None  # None without a cache


def _check_inputs(input_ids: Array, attention_mask: Array | None) -> Array:
    if input_ids.ndim != 2:
        raise ModelError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        return jnp.ones(input_ids.shape, jnp.int32)
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ModelError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape "
                         f"{tuple(input_ids.shape)}")
    return attention_mask.astype(jnp.int32)


def attention_context(input_ids: Array, attention_mask: Array | None, cache: KVCache | None,
                      positions: Array | None) -> tuple[AttentionContext, Array]:
    """Positions and the boolean attention mask for a call; returns ``(context, mask_int)``.

    Position ids count real tokens (``cumsum(mask) - 1``, continuing from the cache's
    ``token_count``), exactly what transformers derives from the attention mask, so
    left- and right-padded rows get the positions they would have unpadded.
    """
    mask = _check_inputs(input_ids, attention_mask)
    seq = input_ids.shape[1]
    start = jnp.zeros((input_ids.shape[0],), jnp.int32) if cache is None else cache.token_count
    if positions is None:
        positions = (start[:, None] + jnp.cumsum(mask, axis=1)) * mask - 1
    positions = positions.astype(jnp.int32)

    if cache is None:
        query_slots = jnp.arange(seq)
        key_slots = jnp.arange(seq)
        key_valid = mask.astype(bool)
        write_index = None
    else:
        if not isinstance(cache.write_index, jax.core.Tracer) and int(cache.write_index) + seq > cache.max_len:
            raise ModelError(f"KV cache overflow: writing {seq} tokens at slot {int(cache.write_index)} "
                             f"exceeds max_len={cache.max_len}; create the cache with a larger max_len")
        write_index = cache.write_index
        query_slots = write_index + jnp.arange(seq)
        key_slots = jnp.arange(cache.max_len)
        key_valid = jax.lax.dynamic_update_slice(cache.slot_mask, mask.astype(bool), (0, write_index))
    causal = key_slots[None, :] <= query_slots[:, None]
    allowed = (key_valid[:, None, :] & causal[None, :, :])[:, None, :, :]
    return AttentionContext(positions=positions, allowed=allowed, write_index=write_index), mask


def run_layers(stack: Any, x: Array, cache: KVCache | None, mask: Array,
               call: Callable[[Any, Array, tuple[Array, Array] | None], tuple[Array, tuple[Array, Array] | None]]
               ) -> tuple[Array, KVCache | None]:
    """Run a decoder's layers in order, each on its own slice of the cache.

    ``call(layer, x, layer_cache) -> (x, layer_cache)`` runs one layer. Returns the last hidden states and the
    advanced cache (None when there is no cache).
    """
    new_keys, new_values = [], []
    for index, layer in enumerate(stack):
        layer_cache = None if cache is None else (cache.keys[index], cache.values[index])
        x, layer_cache = call(layer, x, layer_cache)
        if layer_cache is not None:
            new_keys.append(layer_cache[0])
            new_values.append(layer_cache[1])
    return x, (None if cache is None else advance_cache(cache, mask, new_keys, new_values))


def advance_cache(cache: KVCache, mask: Array, keys: list[Array], values: list[Array]) -> KVCache:
    """The cache after a call wrote ``mask.shape[1]`` slots."""
    seq = mask.shape[1]
    return KVCache(
        keys=tuple(keys),
        values=tuple(values),
        slot_mask=jax.lax.dynamic_update_slice(cache.slot_mask, mask.astype(bool), (0, cache.write_index)),
        write_index=cache.write_index + seq,
        token_count=cache.token_count + mask.sum(axis=1).astype(jnp.int32),
    )


def _masked_logits(query: Array, key: Array, allowed: Array, scale: float, logit_softcap: float | None = None
                   ) -> Array:
    """float32 logits ``[b, kv_heads, groups, s, t]`` of grouped queries ``[b, kv_heads, groups, s, d]`` against
    keys ``[b, kv_heads, t, d]``; disallowed pairs get ``MASKED_LOGIT``. With ``logit_softcap`` the scaled
    logits pass through ``cap * tanh(logits / cap)`` first (Gemma 2)."""
    logits = jnp.einsum("bkgsd,bktd->bkgst", query, key, preferred_element_type=jnp.float32) * scale
    if logit_softcap is not None:
        logits = logit_softcap * jnp.tanh(logits / logit_softcap)
    return jnp.where(allowed[:, :, None, :, :], logits, MASKED_LOGIT)


def _within_window(query_slots: Array, key_slots: Array, sliding_window: int) -> Array:
    """``[s, t]`` bool: key slot within the ``sliding_window`` slots ending at each query's slot (itself
    included), transformers' ``kv_idx > q_idx - sliding_window``."""
    return key_slots[None, :] > query_slots[:, None] - sliding_window


def _group_queries(query: Array, kv_heads: int) -> Array:
    """``[b, s, heads, d]`` -> ``[b, kv_heads, groups, s, d]`` (the query heads that share one key/value head)."""
    batch, seq, heads, head_dim = query.shape
    return query.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)


def _ungroup(out: Array, dtype: DType) -> Array:
    """``[b, kv_heads, groups, s, d]`` -> ``[b, s, heads, d]``."""
    batch, kv_heads, groups, seq, head_dim = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, seq, kv_heads * groups, head_dim).astype(dtype)


def dot_product_attention(query: Array, key: Array, value: Array, allowed: Array, scale: float, *,
                          sliding_window: int | None = None, logit_softcap: float | None = None) -> Array:
    """Grouped-query attention with float32 logits and softmax.

    query ``[b, s, heads, d]``, key/value ``[b, t, kv_heads, d]``, allowed ``[b, 1, s, t]``.
    Returns ``[b, s, heads, d]`` in the query dtype.

    ``sliding_window`` (Mistral, Gemma's local layers): each query also sees only the keys within that many
    slots of its own, counting the queries as the last ``s`` of the ``t`` key slots. ``logit_softcap``: see
    ``_masked_logits``. Both default to off, which is plain attention.
    """
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
    if sliding_window is not None:
        seq, total = query.shape[1], key.shape[2]
        allowed = allowed & _within_window(total - seq + jnp.arange(seq), jnp.arange(total), sliding_window)
    logits = _masked_logits(_group_queries(query, key.shape[1]), key, allowed, scale, logit_softcap)
    probs = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return _ungroup(jnp.einsum("bkgst,bktd->bkgsd", probs, value), query.dtype)


# Cache slots attended per step of ``cached_attention``'s loop. 64 was the fastest of 32/64 on the 2-core CPU
# (SmolLM2, batch 64); it is also a multiple of every GPU's tile sizes.
ATTENTION_CHUNK = 64


def cached_attention(query: Array, keys: Array, values: Array, allowed: Array, used: Array, scale: float, *,
                     sliding_window: int | None = None, logit_softcap: float | None = None) -> Array:
    """Attention of ``query [b, s, heads, d]`` over the first ``used`` slots of a cache ``[b, kv_heads, T, d]``.

    The slots are visited ``ATTENTION_CHUNK`` at a time by a loop whose trip count is ``ceil(used / chunk)``
    (traced), merging the chunks' softmaxes by their running maximum and sum (the online softmax of
    flash-decoding), so a decode step costs what the filled part of the cache costs, not its full length.
    ``allowed [b, 1, s, T]`` masks padding and the future within the used part. Returns ``[b, s, heads, d]``
    in the query dtype; equal to ``dot_product_attention`` over the whole cache up to float rounding.

    ``sliding_window``: the queries sit at slots ``used - s ... used - 1`` and each sees only the keys within
    that many slots of its own; the loop then starts at the first chunk any query can see, so a windowed
    decode step costs the window, not the whole filled cache. ``logit_softcap``: see ``_masked_logits``.
    """
    batch, kv_heads, total, head_dim = keys.shape
    grouped = _group_queries(query, kv_heads)
    chunk = min(ATTENTION_CHUNK, total)
    # The last chunk may overrun the cache: it is read from ``total - chunk`` instead, and the slots an earlier
    # chunk already covered are masked out again so that no slot is counted twice.
    chunk_slots = jnp.arange(chunk)
    query_slots = used - query.shape[1] + jnp.arange(query.shape[1])

    def one_chunk(index, carry):
        running_max, running_sum, accumulated = carry
        nominal = index * chunk
        start = jnp.minimum(nominal, total - chunk)
        key = jax.lax.dynamic_slice_in_dim(keys, start, chunk, axis=2)
        value = jax.lax.dynamic_slice_in_dim(values, start, chunk, axis=2)
        slots = start + chunk_slots
        fresh = (slots >= nominal) & (slots < used)
        chunk_allowed = jax.lax.dynamic_slice_in_dim(allowed, start, chunk, axis=3) & fresh
        if sliding_window is not None:
            chunk_allowed = chunk_allowed & _within_window(query_slots, slots, sliding_window)
        logits = _masked_logits(grouped, key, chunk_allowed, scale, logit_softcap)
        new_max = jnp.maximum(running_max, logits.max(axis=-1))
        probs = jnp.exp(logits - new_max[..., None])
        rescale = jnp.exp(running_max - new_max)
        running_sum = running_sum * rescale + probs.sum(axis=-1)
        update = jnp.einsum("bkgst,bktd->bkgsd", probs.astype(value.dtype), value,
                            preferred_element_type=jnp.float32)
        return new_max, running_sum, accumulated * rescale[..., None] + update

    stats_shape = grouped.shape[:-1]
    initial = (jnp.full(stats_shape, MASKED_LOGIT, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
               jnp.zeros(grouped.shape, jnp.float32))
    chunks = (used + chunk - 1) // chunk
    first_chunk = 0
    if sliding_window is not None:
        # Every slot left of the first query's window is masked for all queries: skip its chunks.
        first_chunk = jnp.maximum(used - query.shape[1] - sliding_window + 1, 0) // chunk
    _, running_sum, accumulated = jax.lax.fori_loop(first_chunk, chunks, one_chunk, initial)
    # Every query row has at least one visited slot (masked slots keep a finite logit), so the sum is >= 1.
    return _ungroup(accumulated / running_sum[..., None], query.dtype)


def attend_with_cache(query: Array, key: Array, value: Array, context: AttentionContext,
                      layer_cache: tuple[Array, Array] | None, scale: float, *,
                      sliding_window: int | None = None, logit_softcap: float | None = None
                      ) -> tuple[Array, tuple[Array, Array] | None]:
    """Write this call's keys/values ``[b, s, kv_heads, d]`` into the layer cache (if any) and attend.

    ``sliding_window`` and ``logit_softcap`` as in ``dot_product_attention``; the window counts cache slots
    (transformers counts cache positions), which equals counting tokens since a row's real tokens fill
    consecutive slots.
    """
    options = dict(sliding_window=sliding_window, logit_softcap=logit_softcap)
    if layer_cache is None:
        return dot_product_attention(query, key, value, context.allowed, scale, **options), None
    cached_keys, cached_values = layer_cache
    slot = (0, 0, context.write_index, 0)
    cached_keys = jax.lax.dynamic_update_slice(cached_keys, key.transpose(0, 2, 1, 3).astype(cached_keys.dtype),
                                               slot)
    cached_values = jax.lax.dynamic_update_slice(cached_values,
                                                 value.transpose(0, 2, 1, 3).astype(cached_values.dtype), slot)
    used = context.write_index + query.shape[1]
    out = cached_attention(query, cached_keys.astype(query.dtype), cached_values.astype(query.dtype),
                           context.allowed, used, scale, **options)
    return out, (cached_keys, cached_values)


def last_token_index(mask: Array) -> Array:
    """Index of the rightmost real token per row (works for left and right padding)."""
    seq = mask.shape[1]
    return jnp.argmax(jnp.arange(seq)[None, :] * mask, axis=1)
