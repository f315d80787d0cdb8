"""XLA:CPU settings: mapjax's XLA_FLAGS defaults (``mapjax.xla_cpu``) and the encoders' CPU working-set layout.

Flags are read when JAX's backend starts, so every flag test runs a fresh Python in a subprocess (with
``XLA_FLAGS`` and ``MAPJAX_XLA_DEFAULTS`` cleared first) and checks what it printed. A flag that takes
effect is recognised by the program XLA compiles: ``--xla_cpu_experimental_ynn_fusion_type=+eltwise`` moves
elementwise operations into YNNPACK fusions, so the compiled HLO has more ``__ynn_fusion`` kernels.
No test here times anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
from mapjax.xla_cpu import DEFAULT_FLAGS, merged_flags, opted_out

REPO_ROOT = Path(__file__).resolve().parents[1]
YNN_ELTWISE = {"xla_cpu_experimental_ynn_fusion_type": "+eltwise"}

# Prints, as JSON: XLA_FLAGS after the call, the flags added, and how many YNNPACK fusions a small
# matmul + GELU compiles to (so the test sees whether the flags reached XLA).
_PROBE = """
import json, os, sys
{before}
import mapjax.xla_cpu as xla_cpu
added = xla_cpu.apply_defaults(defaults={defaults})
import jax, jax.numpy as jnp
compiled = jax.jit(lambda x, w: jax.nn.gelu(x @ w, approximate=False)).lower(
    jnp.ones((128, 128)), jnp.ones((128, 128))).compile().as_text()
print(json.dumps({{"xla_flags": os.environ.get("XLA_FLAGS"), "added": added,
                  "ynn_fusions": compiled.count('"kind":"__ynn_fusion"')}}))
"""


def _clean_environment(**variables: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("XLA_FLAGS", "MAPJAX_XLA_DEFAULTS")}
    environment.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT), **variables)
    return environment


def _run_python(code: str, **variables: str) -> dict:
    completed = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO_ROOT, capture_output=True,
                               text=True, env=_clean_environment(**variables), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _probe(defaults: dict[str, str], before: str = "", **variables: str) -> dict:
    return _run_python(_PROBE.format(before=before, defaults=repr(defaults)), **variables)


@pytest.fixture(scope="module")
def untouched_ynn_fusions() -> int:
    """YNNPACK fusions in the probe program under XLA's own defaults."""
    return _probe({})["ynn_fusions"]


def test_defaults_are_added_before_the_backend_starts_and_reach_xla(untouched_ynn_fusions):
    result = _probe(YNN_ELTWISE)
    assert result["added"] == ["--xla_cpu_experimental_ynn_fusion_type=+eltwise"]
    assert result["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type=+eltwise"
    assert result["ynn_fusions"] > untouched_ynn_fusions


def test_a_users_own_value_of_the_flag_is_kept(untouched_ynn_fusions):
    # The user turned YNNPACK off; the default must neither replace nor append a second value.
    users = "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_min_max=false"
    result = _probe(YNN_ELTWISE, XLA_FLAGS=users)
    assert result["added"] == []
    assert result["xla_flags"] == users
    assert result["ynn_fusions"] == 0 < untouched_ynn_fusions


def test_other_user_flags_stay_and_missing_defaults_are_appended():
    flags, added = merged_flags("--xla_cpu_enable_fast_min_max=false", {"xla_cpu_enable_fast_min_max": "true",
                                                                       "xla_cpu_prefer_vector_width": "512"})
    assert added == ["--xla_cpu_prefer_vector_width=512"]
    assert flags == "--xla_cpu_enable_fast_min_max=false --xla_cpu_prefer_vector_width=512"


def test_opt_out_adds_nothing(untouched_ynn_fusions):
    result = _probe(YNN_ELTWISE, MAPJAX_XLA_DEFAULTS="0")
    assert result["added"] == []
    assert result["xla_flags"] is None
    assert result["ynn_fusions"] == untouched_ynn_fusions


@pytest.mark.parametrize(("value", "expected"), [("0", True), ("false", True), (" OFF ", True), ("no", True),
                                                 ("1", False), ("", False), (None, False)])
def test_opt_out_values(value, expected):
    environment = {} if value is None else {"MAPJAX_XLA_DEFAULTS": value}
    assert opted_out(environment) is expected


def test_nothing_is_changed_once_the_backend_has_started():
    result = _probe(YNN_ELTWISE, before="import jax.numpy as jnp; jnp.ones(1).block_until_ready()")
    assert result["added"] == []
    assert result["xla_flags"] is None


def test_importing_mapjax_applies_exactly_the_documented_defaults():
    result = _run_python("""
        import json, os
        import mapjax
        print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", "")}))
    """)
    expected = " ".join(f"--{name}={value}" for name, value in DEFAULT_FLAGS.items())
    assert result["xla_flags"] == expected


_TINY_FORWARD = """
import json
import numpy as np
import mapjax  # applies (or, opted out, skips) the defaults
import jax.numpy as jnp
from flax import nnx
from mapjax.models.llama import LlamaConfig, LlamaForCausalLM
from mapjax.models.layers import RopeSpec
ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)), jnp.int32)
llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                     rope=RopeSpec(rotary_dim=8)), rngs=nnx.Rngs(0))
print(json.dumps({"logits": np.asarray(nnx.jit(lambda model, ids: model(ids).logits)(llama, ids)).tolist()}))
"""


def test_tiny_model_outputs_are_the_same_with_and_without_the_defaults():
    with_defaults = np.asarray(_run_python(_TINY_FORWARD)["logits"])
    without = np.asarray(_run_python(_TINY_FORWARD, MAPJAX_XLA_DEFAULTS="0")["logits"])
    np.testing.assert_allclose(with_defaults, without, rtol=1e-5, atol=1e-5 * np.abs(without).max())


# --------------------------------------------------------------------------- #
# Encoders on CPU: blocks of rows, attention, opt-in tanh GELU.
# --------------------------------------------------------------------------- #
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
