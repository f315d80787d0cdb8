"""Rotary position embeddings: the settings (``RopeSpec``, read from and written to transformers configs), the
frequencies of every rope type transformers defines, and the rotation itself (half-split, as HF Llama)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.errors import ModelError

Array = jax.Array
DType = Any


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


def longrope_cache_is_stale(spec: RopeSpec, cached_tokens: Array, call_tokens: Array) -> Array:
    """bool ``[batch]``: rows whose cached keys were computed with longrope's short factors while this call
    switches them to the long ones.

    ``cached_tokens`` (the cache's ``token_count``) and ``call_tokens`` (real tokens the call adds) are ``[batch]``.
    A call whose largest position reaches ``original_max_position_embeddings`` uses the long factors; the
    entries cached before it (every layer's keys and values, since each layer's input went through attention
    rotated with the short factors) then disagree with what one forward over the whole row computes. That is
    transformers' ``Phi3ForCausalLM.prepare_inputs_for_generation`` condition for dropping its cache and running
    the whole sequence again: a past of at most ``original_max_position_embeddings`` tokens and a total beyond
    it. Always False for other rope types.
    """
    cached_tokens = jnp.asarray(cached_tokens)
    if spec.rope_type != "longrope":
        return jnp.zeros(cached_tokens.shape, bool)
    threshold = spec.original_max_position_embeddings
    return (cached_tokens > 0) & (cached_tokens <= threshold) & (cached_tokens + jnp.asarray(call_tokens) > threshold)


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
