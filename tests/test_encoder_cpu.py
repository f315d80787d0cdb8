"""Encoders on CPU: the working set split into blocks of rows, the encoder attention, and opt-in tanh GELU.

No test here times anything; each checks that a CPU-motivated layout gives the same result as the plain one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import encoder_layers
from mapjax.models.bert import BertModel
from mapjax.models.encoder_layers import (
    EncoderConfig,
    encoder_activation,
    encoder_attention,
    rows_per_block,
    use_approximate_gelu,
)
from mapjax.models.layers import ACTIVATIONS, dot_product_attention


def _tiny_bert(hidden_act: str = "gelu") -> BertModel:
    config = EncoderConfig(model_type="bert", vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=32, type_vocab_size=2,
                           layer_norm_eps=1e-12, hidden_act=hidden_act, pad_token_id=0)
    model = BertModel(config, rngs=nnx.Rngs(0))
    # Larger weights than the 0.02 init, so that GELU sees inputs where its forms differ.
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(1)
    state = jax.tree.map(lambda leaf: leaf if leaf.ndim < 2 else jnp.asarray(
        rng.normal(scale=0.3, size=leaf.shape).astype(np.float32)), state)
    return nnx.merge(graphdef, state)


def _padded_batch(rows: int = 6, seq: int = 10) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(2)
    lengths = np.array([10, 3, 7, 1, 10, 5][:rows])
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    mask[1] = mask[1][::-1]  # one left-padded row
    ids = np.where(mask == 1, rng.integers(1, 50, size=(rows, seq)), 0)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


@pytest.mark.parametrize(("batch", "row_size", "budget", "expected"), [
    (64, 128, 1024, 8),    # 1024 tokens of 128 per block
    (64, 100, 2048, 16),   # 20 fit; 16 is the largest divisor of 64 under 20
    (7, 128, 2048, 7),     # all fit
    (7, 128, 300, 1),      # 2 would fit but does not divide 7
    (8, 10_000, 2048, 1),  # a single row over budget still runs, alone
    (8, 1, 0, 8),          # budget 0: no blocks
])
def test_rows_per_block_is_the_largest_fitting_divisor(batch, row_size, budget, expected):
    assert rows_per_block(batch, row_size, budget) == expected


@pytest.mark.slow
@pytest.mark.parametrize("block_tokens", [10, 20, 30])  # rows of 10 tokens: blocks of 1, 2 and 3 rows
def test_encoder_blocks_of_rows_give_the_whole_batch_result(monkeypatch, block_tokens):
    model = _tiny_bert()
    ids, mask = _padded_batch()
    forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
    monkeypatch.setattr(encoder_layers, "ENCODER_BLOCK_TOKENS", 0)
    whole = forward(model, ids, mask)
    monkeypatch.setattr(encoder_layers, "ENCODER_BLOCK_TOKENS", block_tokens)
    blocked = nnx.jit(lambda model, ids, mask: model(ids, mask))(model, ids, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(blocked.last_hidden_state)[real], np.asarray(whole.last_hidden_state)[real],
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(blocked.pooler_output), np.asarray(whole.pooler_output), atol=1e-5)


def test_encoder_attention_matches_the_shared_attention():
    rng = np.random.default_rng(3)
    query, key, value = (jnp.asarray(rng.normal(size=(3, 7, 4, 8)).astype(np.float32)) for _ in range(3))
    key_allowed = jnp.asarray(np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [0] * 7], bool))  # last row: no keys
    ours = encoder_attention(query, key, value, key_allowed, scale=0.35)
    shared = dot_product_attention(query, key, value, key_allowed[:, None, None, :], scale=0.35)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(shared), rtol=1e-5, atol=1e-6)
    # No keys at all: uniform weights, the mean of the values (never NaN).
    np.testing.assert_allclose(np.asarray(ours[2]), np.broadcast_to(np.asarray(value[2]).mean(0), (7, 4, 8)),
                               rtol=1e-5, atol=1e-6)


def test_encoder_activation_is_exact_unless_approximation_is_asked_for():
    x = jnp.linspace(-6.0, 6.0, 101, dtype=jnp.float32)
    assert encoder_activation("gelu") is ACTIVATIONS["gelu"]
    assert encoder_activation("gelu", approximate_gelu=True) is ACTIVATIONS["gelu_pytorch_tanh"]
    assert encoder_activation("relu", approximate_gelu=True) is ACTIVATIONS["relu"]
    difference = np.abs(np.asarray(encoder_activation("gelu", approximate_gelu=True)(x) - encoder_activation("gelu")(x)))
    assert 1e-5 < difference.max() < 1e-3


@pytest.mark.slow
def test_approximate_gelu_is_opt_in_close_and_reversible():
    ids, mask = _padded_batch()
    model = _tiny_bert()
    exact = np.asarray(model(ids, mask).last_hidden_state)
    assert use_approximate_gelu(model) is model
    approximate = np.asarray(model(ids, mask).last_hidden_state)
    difference = np.abs(approximate - exact)[np.asarray(mask, bool)].max()
    assert 0 < difference < 1e-2
    use_approximate_gelu(model, enabled=False)
    np.testing.assert_array_equal(np.asarray(model(ids, mask).last_hidden_state), exact)


def test_approximate_gelu_refuses_models_it_cannot_change():
    with pytest.raises(ModelError, match="not the exact GELU"):
        use_approximate_gelu(_tiny_bert(hidden_act="relu"))
    with pytest.raises(ModelError, match="no BERT-family encoder blocks"):
        use_approximate_gelu(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
