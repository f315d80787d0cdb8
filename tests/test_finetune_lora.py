"""LoRA / QLoRA adapters (mapjax.finetune.lora, through qwix) on every decoder port.

The adapted forward is checked against the merged model (``W + alpha/rank (A B)^T``), the merged export against
transformers, and the PEFT export against ``peft.PeftModel`` over the exported base (PyTorch oracles, fp32).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_DECODERS, build_tiny_model
from flax import nnx

from mapjax.errors import FinetuneError
from mapjax.finetune.lora import (
    TARGET_MODULES,
    TARGETS,
    LoraConfig,
    adapter_parameter_count,
    add_adapters,
    dropout_free,
    export_peft,
    merge_adapters,
    module_names,
    with_dropout_key,
)
from mapjax.models import export_pretrained, model_class
from mapjax.models.layers import Linear

# qwix 0.1.8 still uses flax APIs that flax 0.12 deprecates (``.value``, ``m.iter_modules()``, VariableState).
pytestmark = [pytest.mark.filterwarnings("ignore:.*(iter_modules|'.value' access|'VariableState'):DeprecationWarning")]

RANK = 2
TIGHT = 1e-5
# Causal LMs of conftest's table, plus the Llama-derived families (built here from transformers' configs).
_FAMILY_BASE = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_FAMILY_BASE, sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_FAMILY_BASE, tie_word_embeddings=False)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(_FAMILY_BASE)),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", dict(_FAMILY_BASE, head_dim=8, query_pre_attn_scalar=12,
                                                          final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(_FAMILY_BASE, head_dim=8, query_pre_attn_scalar=12)),
}
DECODERS = [name for name, (architecture, _, _) in TINY_DECODERS.items() if architecture.endswith("ForCausalLM")
            or architecture == "GPT2LMHeadModel"] + list(FAMILIES)


def build(name: str):
    """Tiny decoder ``name`` (conftest's table or :data:`FAMILIES`) with random weights."""
    if name in TINY_DECODERS:
        return build_tiny_model(name)
    import transformers

    architecture, config_class, fields = FAMILIES[name]
    cls = model_class(architecture)
    return cls.from_config(cls.config_from_hf(getattr(transformers, config_class)(**fields)), seed=0)


def token_batch(seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """Two rows of 7 tokens, the second left-padded by 2."""
    ids = np.random.default_rng(seed).integers(3, 100, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0
    return jnp.asarray(ids), jnp.asarray(mask)


def adapted_linears(model) -> list[tuple[tuple, Linear]]:
    return [(path, module) for path, module in nnx.iter_modules(model) if hasattr(module, "weight_lora_b")]


def randomize_adapters(model, seed: int = 0, scale: float = 0.05) -> None:
    """Nonzero B (it starts at zero, which would make every adapter check vacuous)."""
    rng = np.random.default_rng(seed)
    for _, linear in adapted_linears(model):
        value = linear.weight_lora_b.get_value()
        linear.weight_lora_b.set_value(jnp.asarray(rng.standard_normal(value.shape) * scale, value.dtype))


def logits(model, ids, mask) -> np.ndarray:
    return np.asarray(model(ids, mask).logits)


def max_diff(first, second) -> float:
    return float(np.max(np.abs(np.asarray(first, np.float64) - np.asarray(second, np.float64))))


# --------------------------------------------------------------------------------------------------------- #
# Settings
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.parametrize("fields, option", [
    (dict(rank=0), "--lora-rank"),
    (dict(rank=1.5), "--lora-rank"),
    (dict(rank=2, alpha=-1.0), "--lora-alpha"),
    (dict(rank=2, alpha=float("nan")), "--lora-alpha"),
    (dict(rank=2, targets=("q", "qq")), "--lora-targets"),
    (dict(rank=2, targets=()), "--lora-targets"),
    (dict(rank=2, dropout=1.5), "--lora-dropout"),
    (dict(rank=2, dropout=-0.1), "--lora-dropout"),
    (dict(rank=2, quantize_base="int3"), "--quantize-base"),
])
def test_bad_settings_name_the_option(fields, option):
    with pytest.raises(FinetuneError, match=option):
        LoraConfig(**fields).validate()


def test_add_adapters_validates_before_touching_the_model():
    with pytest.raises(FinetuneError, match="--lora-targets.*'qq'"):
        add_adapters(nnx.Module(), LoraConfig(rank=RANK, targets=("qq",)))


@pytest.mark.parametrize("name, targets, expected", [
    ("llama", TARGETS, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    ("opt_pre_ln", TARGETS, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ("gpt2", TARGETS, ["c_attn", "attn_c_proj", "c_fc", "mlp_c_proj"]),
    ("gpt2", ("v",), ["c_attn"]),
    ("phi3", ("q", "up"), ["qkv_proj", "gate_up_proj"]),
    ("phi3", TARGETS, ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    ("opt_pre_ln", ("gate", "down"), ["fc2"]),   # no gate in OPT: skipped, down still matches
])
def test_module_names_per_architecture(name, targets, expected):
    assert module_names(build(name), targets) == expected


def test_targets_matching_nothing_are_an_error():
    with pytest.raises(FinetuneError, match="--lora-targets.*match no layer"):
        module_names(build("opt_pre_ln"), ("gate",))


def test_every_target_maps_somewhere():
    assert set(TARGET_MODULES) == set(TARGETS)


# --------------------------------------------------------------------------------------------------------- #
# Adapted forward == merged forward, on every decoder
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("name", DECODERS)
def test_adapted_forward_matches_merged_model(name):
    model = build(name)
    ids, mask = token_batch()
    base_logits = logits(model, ids, mask)
    adapted = add_adapters(model, LoraConfig(rank=RANK, alpha=4.0))

    # B = 0 at init: the adapters change nothing.
    assert max_diff(logits(adapted, ids, mask), base_logits) <= TIGHT
    expected_count = sum(RANK * (linear.in_features + linear.out_features) for _, linear in adapted_linears(adapted))
    assert adapter_parameter_count(adapted) == expected_count > 0
    names = set(module_names(model, TARGETS))
    assert {path[-1] for path, _ in adapted_linears(adapted)} == names
    assert len(adapted_linears(adapted)) == len(names) * model.config.num_layers

    randomize_adapters(adapted)
    adapted_logits = logits(adapted, ids, mask)
    assert max_diff(adapted_logits, base_logits) > 1e-3          # the adapters do act
    merged = merge_adapters(adapted)
    assert type(merged) is type(model)
    assert nnx.graphdef(merged) == nnx.graphdef(model)           # a plain model again
    assert max_diff(logits(merged, ids, mask), adapted_logits) <= TIGHT
    # The caller's model is untouched.
    assert not any(hasattr(module, "weight_lora_a") for _, module in nnx.iter_modules(model))
    assert max_diff(logits(model, ids, mask), base_logits) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gemma2", "phi3"])
def test_hidden_states_path_is_adapted(name):
    """PPO's value head calls hidden_states + logits_from_hidden: the adapters apply there too (and once only)."""
    adapted = add_adapters(build(name), LoraConfig(rank=RANK))
    randomize_adapters(adapted)
    ids, mask = token_batch()
    hidden, _ = adapted.hidden_states(ids, mask)
    assert max_diff(adapted.logits_from_hidden(hidden), logits(adapted, ids, mask)) <= TIGHT
    assert max_diff(logits(merge_adapters(adapted), ids, mask), logits(adapted, ids, mask)) <= TIGHT


def test_adapter_axes_fit_their_shapes():
    adapted = add_adapters(build("llama"), LoraConfig(rank=RANK, targets=("up",)))
    linear = adapted.layers[0].up_proj
    assert linear.weight_lora_a.get_value().shape == (32, RANK)
    assert linear.weight_lora_a.get_metadata()["logical_axes"] == ("embed", None)
    assert linear.weight_lora_b.get_metadata()["logical_axes"] == (None, "mlp")


def test_misuse_is_an_error():
    model = build("gpt2")
    with pytest.raises(FinetuneError, match="no adapters"):
        merge_adapters(model)
    adapted = add_adapters(model, LoraConfig(rank=RANK, targets=("o",)))
    with pytest.raises(FinetuneError, match="already has LoRA adapters"):
        add_adapters(adapted, LoraConfig(rank=RANK))


# --------------------------------------------------------------------------------------------------------- #
# QLoRA
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("qtype, tolerance", [("int8", 5e-3), ("int4", 5e-2)])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_qlora_stores_the_base_quantized(name, qtype, tolerance):
    model = build(name)
    ids, mask = token_batch()
    base_logits = logits(model, ids, mask)
    adapted = add_adapters(model, LoraConfig(rank=RANK, quantize_base=qtype))
    for _, linear in adapted_linears(adapted):
        assert not isinstance(linear.weight, nnx.Variable)          # qwix's WithAux
        assert linear.weight.array.qvalue.get_value().dtype == jnp.dtype(qtype)
        assert linear.weight.array.qvalue.get_metadata()["logical_axes"] is not None
        assert linear.weight_lora_a.get_value().dtype == jnp.float32
    # Only the base changed: the quantization error, small against the logits' spread.
    assert 0 < max_diff(logits(adapted, ids, mask), base_logits) <= tolerance

    randomize_adapters(adapted)
    merged = merge_adapters(adapted)
    assert all(isinstance(linear.weight, nnx.Param) and linear.weight.get_value().dtype == jnp.float32
               for _, linear in nnx.iter_modules(merged) if isinstance(linear, Linear))
    assert max_diff(logits(merged, ids, mask), logits(adapted, ids, mask)) <= TIGHT


# --------------------------------------------------------------------------------------------------------- #
# Training: only the adapters, dropout keyed by step
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_jitted_step_with_dropout_is_a_function_of_the_key():
    adapted = add_adapters(build("llama"), LoraConfig(rank=RANK, dropout=0.3, quantize_base="int8"))
    randomize_adapters(adapted)
    ids, mask = token_batch()
    graphdef, adapters, frozen = nnx.split(adapted, nnx.LoRAParam, ...)
    run_key = jax.random.key(7)

    @jax.jit
    def loss_and_grads(adapters, frozen, step):
        def loss(adapters):
            model = with_dropout_key(nnx.merge(graphdef, adapters, frozen), jax.random.fold_in(run_key, step))
            return jnp.mean(model(ids, mask).logits ** 2)
        return jax.value_and_grad(loss)(adapters)

    first, grads = loss_and_grads(adapters, frozen, 0)
    again, _ = loss_and_grads(adapters, frozen, 0)
    other, _ = loss_and_grads(adapters, frozen, 1)
    assert float(first) == float(again) != float(other)
    assert jax.tree.structure(grads) == jax.tree.structure(adapters)
    assert all(float(jnp.abs(leaf).max()) > 0 for leaf in jax.tree.leaves(grads))
    assert nnx.graphdef(adapted) == graphdef                     # with_dropout_key left the model as it was

    # Sampling and reference passes: the same states in the dropout-free graph are deterministic and equal
    # the merged model.
    free = nnx.merge(nnx.graphdef(dropout_free(adapted)), adapters, frozen)
    assert max_diff(logits(free, ids, mask), logits(free, ids, mask)) == 0.0
    assert max_diff(logits(free, ids, mask), logits(merge_adapters(adapted), ids, mask)) <= TIGHT


def test_dropout_free_is_the_model_itself_without_dropout():
    adapted = add_adapters(build("gpt2"), LoraConfig(rank=RANK, targets=("o",)))
    assert dropout_free(adapted) is adapted


# --------------------------------------------------------------------------------------------------------- #
# Exports read by transformers and peft
# --------------------------------------------------------------------------------------------------------- #
def _torch_logits(torch_model, ids, mask) -> np.ndarray:
    import torch

    # Positions count real tokens, as mapjax counts them (GPT-2 would otherwise number left padding too).
    positions = np.maximum(np.cumsum(np.asarray(mask), axis=1) - 1, 0)
    with torch.no_grad():
        output = torch_model(input_ids=torch.as_tensor(np.array(ids), dtype=torch.long),
                             attention_mask=torch.as_tensor(np.array(mask), dtype=torch.long),
                             position_ids=torch.as_tensor(positions, dtype=torch.long))
    return output.logits.float().numpy()


def _masked(array: np.ndarray, mask) -> np.ndarray:
    """Padding positions' logits differ between implementations by convention; compare real tokens only."""
    return np.asarray(array)[np.asarray(mask).astype(bool)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2", "opt_pre_ln", "phi3"])
def test_merged_export_loads_in_transformers(name, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    adapted = add_adapters(build(name), LoraConfig(rank=RANK, alpha=8.0))
    randomize_adapters(adapted)
    merged = merge_adapters(adapted)
    export_pretrained(merged, tmp_path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = token_batch()
    assert max_diff(_masked(_torch_logits(torch_model, ids, mask), mask),
                    _masked(logits(merged, ids, mask), mask)) <= TIGHT


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "opt_pre_ln", "gpt2", "phi3"])
def test_peft_export_matches_peft_model(name, tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    model = build(name)
    config = LoraConfig(rank=RANK, alpha=8.0, dropout=0.1)
    adapted = add_adapters(model, config)
    randomize_adapters(adapted)
    export_pretrained(model, tmp_path / "base")
    export_peft(adapted, tmp_path / "adapter", config, base_model_name_or_path=str(tmp_path / "base"))

    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["peft_type"], written["task_type"], written["r"], written["lora_alpha"]) == (
        "LORA", "CAUSAL_LM", RANK, 8.0)
    assert written["fan_in_fan_out"] is (name == "gpt2")
    assert len(written["target_modules"]) == len(adapted_linears(adapted))

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert sorted(peft_model.peft_config["default"].target_modules) == sorted(written["target_modules"])
    ids, mask = token_batch()
    ours = logits(dropout_free(adapted), ids, mask)
    assert max_diff(_masked(_torch_logits(peft_model, ids, mask), mask), _masked(ours, mask)) <= TIGHT


def test_export_peft_refuses_another_rank(tmp_path):
    adapted = add_adapters(build("gpt2"), LoraConfig(rank=RANK, targets=("o",)))
    with pytest.raises(FinetuneError, match="--lora-rank 4"):
        export_peft(adapted, tmp_path, LoraConfig(rank=4, targets=("o",)))
