"""Layers shared by the decoder (and encoder) ports, one module per concern:

- :mod:`~mapjax.models.layers.axes`: logical names of parameter dimensions (``EMBED``, ``VOCAB``, ``HEADS``,
  ``KV_HEADS``, ``MLP``, ...; MaxText's vocabulary), which ``mapjax.sharding`` maps to device-mesh axes;
- :mod:`~mapjax.models.layers.linear`: ``Linear`` and ``Embedding``;
- :mod:`~mapjax.models.layers.norms`: ``LayerNorm`` and ``RMSNorm``;
- :mod:`~mapjax.models.layers.activations`: activations by their Hugging Face names;
- :mod:`~mapjax.models.layers.rope`: rotary position embeddings (``RopeSpec``, every rope type of transformers);
- :mod:`~mapjax.models.layers.cache`: the static-shape ``KVCache``, and the positions and mask of a call;
- :mod:`~mapjax.models.layers.attention`: grouped-query attention, whole and cached, with windows and soft-caps.

Weights keep Hugging Face's PyTorch layout (``nn.Linear.weight`` is ``[out_features, in_features]``) so that
loading and exporting are plain copies and the name maps stay readable. Activations run in the parameter dtype;
normalisation statistics, attention logits and softmax always run in float32.

The KV cache's arrays are kv-head major (``[batch, kv_heads, slots, head_dim]``) and a cached call attends only
over the slots written so far, chunk by chunk (``cached_attention``).

``Linear`` takes ``axes=(input name, output name)``, as a kernel ``[in, out]`` would be named, and stores the
names of its ``[out, in]`` weight accordingly.

The ports use the names below as ``layers.X``; they are re-exported here for that. ``ATTENTION_CHUNK`` (the
cached loop's chunk) is read from :mod:`~mapjax.models.layers.attention` at trace time: set it there.
"""

from mapjax.models.layers.activations import ACTIVATIONS, activation
from mapjax.models.layers.attention import (
    MASKED_LOGIT,
    attend_with_cache,
    cached_attention,
    dot_product_attention,
)
from mapjax.models.layers.axes import (
    EMBED,
    HEADS,
    KV_HEADS,
    LABELS,
    LOGICAL_AXES,
    MLP,
    NORM,
    POSITION,
    VOCAB,
    Axes,
    name_axes,
    param,
)
from mapjax.models.layers.cache import (
    AttentionContext,
    KVCache,
    advance_cache,
    attention_context,
    cache_bytes,
    last_token_index,
    run_layers,
)
from mapjax.models.layers.linear import Embedding, Linear
from mapjax.models.layers.norms import LayerNorm, RMSNorm
from mapjax.models.layers.rope import (
    RopeSpec,
    apply_rotary,
    rope_spec_from_hf_config,
    rope_spec_to_hf,
    rotary_attention_scaling,
    rotary_cos_sin,
    rotary_inverse_frequencies,
)

__all__ = [
    "ACTIVATIONS", "AttentionContext", "Axes", "EMBED", "Embedding", "HEADS", "KVCache",
    "KV_HEADS", "LABELS", "LOGICAL_AXES", "LayerNorm", "Linear", "MASKED_LOGIT", "MLP", "NORM", "POSITION",
    "RMSNorm", "RopeSpec", "VOCAB", "activation", "advance_cache", "apply_rotary", "attend_with_cache",
    "attention_context", "cache_bytes", "cached_attention", "dot_product_attention", "last_token_index", "name_axes", "param",
    "rope_spec_from_hf_config", "rope_spec_to_hf", "rotary_attention_scaling", "rotary_cos_sin",
    "rotary_inverse_frequencies", "run_layers",
]
