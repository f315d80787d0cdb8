"""Llama (``LlamaForCausalLM``) in Flax NNX: RMSNorm, rotary positions, grouped-query attention.

Covers SmolLM2, TinyLlama, Llama 2/3(.1/.2) and other checkpoints with the same tensor names; rope scaling types
``default``, ``linear``, ``dynamic``, ``llama3``.

This is the decoder every Llama-shaped family builds on, so a fix to decoder attention here reaches them all:

- Mistral and Qwen2 are configurations of it (:mod:`mapjax.models.mistral`, :mod:`mapjax.models.qwen2`): a
  config may give layers a sliding window (``sliding_window`` and ``layer_types``, read through
  :func:`layer_sliding_window`; a plain ``LlamaConfig`` has none) and say whether ``o_proj`` has a bias;
- Phi-3 and Gemma 2/3 override steps of :class:`LlamaDecoderLayer` (``build_projections``, ``project_qkv``,
  ``feed_forward``, ``__call__``) and of :class:`LlamaForCausalLM` (``layer_class``, ``make_norm``, ``embed``,
  ``logits_from_hidden``);
- the decoder sequence classifiers reuse ``hidden_states``.

Each layer attends through its window and logit soft-cap (``layers.attend_with_cache``), so both hold in the full
forward and in cached sampling alike; each gets the rotary table of its own ``RopeSpec`` (Gemma 3's local layers
use another base than its global ones). The window counts cache slots as transformers counts cache positions: a
query at slot ``i`` sees slots ``i - sliding_window + 1 ... i``; the sampler fills a row's real tokens into
consecutive slots, so this is also the last ``sliding_window`` tokens. A sliding layer's cache is a ring of its
window's slots (``init_cache``), so a long generation's cache grows only with its full-attention layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import layers
from mapjax.models.base import CausalLMBase, CausalLMOutput, HFParameter, register_model
from mapjax.models.layers import KVCache, RopeSpec

__all__ = ["FULL_ATTENTION", "LAYER_TYPES", "SLIDING_ATTENTION", "LlamaConfig", "LlamaDecoderLayer",
           "LlamaForCausalLM", "layer_sliding_window"]

# transformers' names for a layer's attention span.
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a Llama model (names follow ``transformers.LlamaConfig``)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeSpec = RopeSpec(rotary_dim=128)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2

    model_type: ClassVar[str] = "llama"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.rope.rotary_dim != self.head_dim:
            raise ModelError(f"rope.rotary_dim={self.rope.rotary_dim} must equal head_dim={self.head_dim} (Llama "
                             f"rotates whole heads); pass rope=RopeSpec(rotary_dim={self.head_dim}, ...)")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def output_projection_bias(self) -> bool:
        """Whether ``o_proj`` has a bias: in Llama ``attention_bias`` covers q, k, v and o alike."""
        return self.attention_bias

    @property
    def max_positions(self) -> int:
        """The trained context. Rotary positions have no table to run out of, but past this length the model
        reads positions it never saw in training; raise ``max_position_embeddings`` to go further."""
        return self.max_position_embeddings

    @classmethod
    def from_hf(cls, hf_config: Any) -> "LlamaConfig":
        """Read the fields this port uses from a ``transformers.LlamaConfig``."""
        skip = {"rope", "head_dim", "num_key_value_heads"}
        values = {field.name: getattr(hf_config, field.name) for field in dataclasses.fields(cls)
                  if field.name not in skip and getattr(hf_config, field.name, None) is not None}
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        values["head_dim"] = int(head_dim)
        values["num_key_value_heads"] = int(getattr(hf_config, "num_key_value_heads", None)
                                            or hf_config.num_attention_heads)
        values["rope"] = layers.rope_spec_from_hf_config(hf_config, head_dim)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(values.get(name), list):
                values[name] = values[name][0]
        return cls(**values)

    def to_hf_dict(self, architecture: str) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values.pop("rope")
        values["rope_parameters"] = layers.rope_spec_to_hf(self.rope)
        # transformers v4 reads these two; v5 reads rope_parameters.
        values["rope_theta"] = self.rope.theta
        values["rope_scaling"] = (None if self.rope.rope_type == "default"
                                  else dict(layers.rope_spec_to_hf(self.rope), type=self.rope.rope_type))
        values.update(model_type=self.model_type, architectures=[architecture])
        return values


def layer_sliding_window(config: Any, index: int) -> int | None:
    """The window of layer ``index`` under ``config`` (any ``LlamaConfig``; a plain one has none)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", ())
    if window is None or (layer_types and layer_types[index] != SLIDING_ATTENTION):
        return None
    return int(window)


class LlamaDecoderLayer(nnx.Module):
    """Llama's decoder layer in overridable steps, attending through its ``sliding_window`` when it has one.

    ``attention_scale`` (``head_dim ** -0.5``) and ``logit_softcap`` (None) are attributes so that Gemma's
    layer can change them; ``rope`` is the ``RopeSpec`` whose rotary table the model hands this layer.
    """

    def __init__(self, config: LlamaConfig, layer_index: int, *, dtype: Any, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope = config.rope
        self.activation_name = config.hidden_act
        self.sliding_window = layer_sliding_window(config, layer_index)
        self.attention_scale = config.head_dim ** -0.5
        self.logit_softcap: float | None = None
        self.build_projections(config, dtype=dtype, rngs=rngs)
        self.input_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def build_projections(self, config: LlamaConfig, *, dtype: Any, rngs: nnx.Rngs) -> None:
        """The attention's ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` and the MLP's ``gate_proj``, ``up_proj``,
        ``down_proj``."""
        hidden, head_dim, width = config.hidden_size, self.head_dim, config.intermediate_size
        attn_bias, mlp_bias = config.attention_bias, config.mlp_bias
        embed, heads, kv_heads, mlp = layers.EMBED, layers.HEADS, layers.KV_HEADS, layers.MLP
        self.q_proj = layers.Linear(hidden, self.num_heads * head_dim, use_bias=attn_bias, dtype=dtype, rngs=rngs,
                                    axes=(embed, heads))
        self.k_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs, axes=(embed, kv_heads))
        self.v_proj = layers.Linear(hidden, self.num_kv_heads * head_dim, use_bias=attn_bias, dtype=dtype,
                                    rngs=rngs, axes=(embed, kv_heads))
        self.o_proj = layers.Linear(self.num_heads * head_dim, hidden, use_bias=config.output_projection_bias,
                                    dtype=dtype, rngs=rngs, axes=(heads, embed))
        self.gate_proj = layers.Linear(hidden, width, use_bias=mlp_bias, dtype=dtype, rngs=rngs, axes=(embed, mlp))
        self.up_proj = layers.Linear(hidden, width, use_bias=mlp_bias, dtype=dtype, rngs=rngs, axes=(embed, mlp))
        self.down_proj = layers.Linear(width, hidden, use_bias=mlp_bias, dtype=dtype, rngs=rngs, axes=(mlp, embed))

    def project_qkv(self, normed: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries ``[b, s, heads, d]`` and keys, values ``[b, s, kv_heads, d]`` before rotation."""
        batch, seq, _ = normed.shape
        query = self.q_proj(normed).reshape(batch, seq, self.num_heads, self.head_dim)
        key = self.k_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        value = self.v_proj(normed).reshape(batch, seq, self.num_kv_heads, self.head_dim)
        return query, key, value

    def self_attention(self, normed: jax.Array, context: layers.AttentionContext,
                       cos_sin: tuple[jax.Array, jax.Array], layer_cache: tuple[jax.Array, jax.Array] | None
                       ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """The attention block's output (after ``o_proj``) and the updated layer cache."""
        batch, seq, _ = normed.shape
        query, key, value = self.project_qkv(normed)
        cos, sin = cos_sin
        query, key = layers.apply_rotary(query, cos, sin), layers.apply_rotary(key, cos, sin)
        attended, layer_cache = layers.attend_with_cache(query, key, value, context, layer_cache,
                                                         self.attention_scale, sliding_window=self.sliding_window,
                                                         logit_softcap=self.logit_softcap)
        return self.o_proj(attended.reshape(batch, seq, -1)), layer_cache

    def feed_forward(self, normed: jax.Array) -> jax.Array:
        """The gated MLP: ``down(act(gate(x)) * up(x))``."""
        return self.down_proj(layers.activation(self.activation_name)(self.gate_proj(normed)) * self.up_proj(normed))

    def __call__(self, x: jax.Array, context: layers.AttentionContext, cos_sin: tuple[jax.Array, jax.Array],
                 layer_cache: tuple[jax.Array, jax.Array] | None):
        attended, layer_cache = self.self_attention(self.input_layernorm(x), context, cos_sin, layer_cache)
        x = x + attended
        return x + self.feed_forward(self.post_attention_layernorm(x)), layer_cache

    def hf_parameters(self, prefix: str) -> Iterator[HFParameter]:
        for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj"))):
            for name in names:
                linear = getattr(self, name)
                yield f"{prefix}{group}.{name}.weight", linear.weight, "linear"
                if linear.bias is not None:
                    yield f"{prefix}{group}.{name}.bias", linear.bias, "linear"
        yield f"{prefix}input_layernorm.weight", self.input_layernorm.weight, "linear"
        yield f"{prefix}post_attention_layernorm.weight", self.post_attention_layernorm.weight, "linear"


@register_model
class LlamaForCausalLM(CausalLMBase, nnx.Module):
    """Llama language model: ``model(input_ids, attention_mask) -> CausalLMOutput(logits [b, s, vocab], cache)``.

    Subclasses name their config (``config_class``) and may choose their layer (``layer_class``) and override
    ``embed``, ``logits_from_hidden`` and the final norm (``make_norm``); the forward, the name map and the cache
    come from here. See ``layers.KVCache`` for the cache.
    """

    architecture = "LlamaForCausalLM"
    config_class: ClassVar[type[LlamaConfig]] = LlamaConfig
    layer_class: ClassVar[type[LlamaDecoderLayer]] = LlamaDecoderLayer

    def __init__(self, config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed_tokens = layers.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([self.layer_class(config, index, dtype=dtype, rngs=rngs)
                                for index in range(config.num_hidden_layers)])
        self.norm = self.make_norm(config, dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        layers.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      rngs=rngs, axes=(layers.EMBED, layers.VOCAB)))

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens, in which each sliding-window layer
        keeps a ring of its window's slots rather than ``max_len`` (see ``layers.KVCache``)."""
        config = self.config
        return KVCache.create(num_layers=config.num_layers, batch=batch, max_len=max_len,
                              kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype or self.dtype,
                              windows=self.cache_windows())

    def cache_windows(self) -> list[int | None]:
        """The window each layer's cache ring keeps (``None``: every slot), for ``init_cache``: the layer's
        sliding window.

        A longrope model keeps every slot: Phi-3 rebuilds its whole cache in one call when a row crosses the
        original context (``Phi3ForCausalLM.call_recomputing_cache`` writes all ``max_len`` slots and then sets
        the write slot back), which a ring would not survive; it can return to rings by laying that rebuilt cache
        out with ``layers.cache.fit_to_rings``."""
        if self.config.rope.rope_type == "longrope":
            return [None] * len(self.layers)
        return [layer.sliding_window for layer in self.layers]

    @staticmethod
    def make_norm(config: LlamaConfig, dtype: Any) -> nnx.Module:
        """The final norm."""
        return layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Input embeddings ``[b, s, hidden]``."""
        return self.embed_tokens(input_ids)

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      cache: KVCache | None = None, positions: jax.Array | None = None
                      ) -> tuple[jax.Array, KVCache | None]:
        """The final norm's output ``[b, s, hidden]`` and the advanced cache (arguments as ``__call__``)."""
        context, mask = layers.attention_context(input_ids, attention_mask, cache, positions)
        x = self.embed(input_ids)
        # One rotary table per distinct RopeSpec (Gemma 3: one for the local layers, one for the global ones).
        tables: dict[RopeSpec, tuple[jax.Array, jax.Array]] = {}
        for layer in self.layers:
            if layer.rope not in tables:
                tables[layer.rope] = layers.rotary_cos_sin(layer.rope, context.positions, x.dtype)
        x, new_cache = layers.run_layers(self.layers, x, cache, mask,
                                         lambda layer, h, c: layer(h, context, tables[layer.rope], c))
        return self.norm(x), new_cache

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """float32 vocabulary logits from the final hidden states (the tied embedding or ``lm_head``, accumulated
        in float32 whatever the parameter dtype, as every mapjax output head)."""
        return self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden,
                                                                                          float32_output=True)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None) -> CausalLMOutput:
        """Logits ``[batch, seq, vocab]``, and the advanced cache when ``cache`` is given.

        Args:
          input_ids: int ``[batch, seq]``.
          attention_mask: 1 for real tokens, 0 for padding (left or right); ``None`` = all real.
          cache: a ``KVCache`` from ``init_cache``; this call's tokens are written at
            ``cache.write_index`` and attend to everything cached before them (within each layer's window).
          positions: explicit position ids ``[batch, seq]``; by default they count real
            tokens (``cumsum(mask) - 1``, continuing from ``cache.token_count``).
        """
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, cache=cache, positions=positions)
        return CausalLMOutput(self.logits_from_hidden(hidden), new_cache)

    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        yield f"{prefix}model.embed_tokens.weight", self.embed_tokens.weight, "linear"
        for index, layer in enumerate(self.layers):
            yield from layer.hf_parameters(f"{prefix}model.layers.{index}.")
        yield f"{prefix}model.norm.weight", self.norm.weight, "linear"
        if self.lm_head is not None:
            yield f"{prefix}lm_head.weight", self.lm_head.weight, "linear"

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> LlamaConfig:
        return cls.config_class.from_hf(hf_config)

    @classmethod
    def prepare_checkpoint(cls, config: LlamaConfig, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        if config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)   # a tied copy some checkpoints still carry
        return {}
