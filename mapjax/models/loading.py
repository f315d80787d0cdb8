"""Load Hugging Face checkpoints into mapjax NNX models, and write them back.

Public entry points
-------------------
``from_pretrained(path_or_id, dtype=jnp.float32)``
    Reads ``config.json`` + ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``; or ``pytorch_model.bin`` through torch when
    installed) with numpy, picks the builder registered for
    ``config.architectures[0]`` and returns the NNX model.
``from_gguf(path, dtype=jnp.float32)``
    Loads a Llama-architecture GGUF file, returns ``(model, tokenizer)``.
``export_pretrained(model, directory)``
    Writes ``config.json`` + ``model.safetensors`` that transformers' PyTorch
    classes load with ``from_pretrained(directory)``.

Contract for architecture modules (read this if you add a model)
-----------------------------------------------------------------
1. Register a builder under the Hugging Face architecture name (the string that
   appears in ``config.json``'s ``"architectures"`` list)::

       from mapjax.models.loading import register_architecture, take_tensor

       @register_architecture("BertForSequenceClassification")
       def build_bert_classifier(hf_config, tensors, dtype):
           ...
           return model

   or, without a decorator, ``register_architecture("BertModel", build_bert_model)``.
   Registering the same name twice raises ``ValueError`` unless
   ``overwrite=True``.

2. Builder signature:
   ``builder(hf_config: transformers.PretrainedConfig, tensors: dict[str, np.ndarray], dtype) -> nnx.Module``

   * ``hf_config`` is what ``transformers.AutoConfig.from_pretrained(folder)``
     returns (the folder's ``config.json``).  Build your frozen dataclass config
     from it.
   * ``tensors`` maps the checkpoint's tensor names, exactly as stored in the
     safetensors file (PyTorch layout, e.g. ``nn.Linear`` weights are
     ``[out, in]``), to numpy arrays (float32 for floating tensors).
   * The builder must **remove** every tensor it consumes from ``tensors``
     (``take_tensor`` does that and checks the shape). Tensors that a
     checkpoint may legitimately carry but the model does not need (tied
     ``lm_head.weight``, ``position_ids`` buffers, ...) should be removed with
     ``tensors.pop(name, None)``.  After the builder returns, ``from_pretrained``
     raises ``UnexpectedTensorsError`` naming whatever is left over.
   * Use ``take_tensor(tensors, name, expected_shape)`` to read a tensor: it
     raises ``MissingTensorError`` / ``TensorShapeError`` (both ``ValueError``
     subclasses) whose messages name the tensor and the shapes.
   * ``dtype`` is the parameter dtype the user asked for (``jnp.float32`` or
     ``jnp.bfloat16``); cast parameters with ``jnp.asarray(array, dtype)``.
   * Strip or add a base-model prefix yourself if checkpoints vary (e.g.
     ``strip_prefix(tensors, "bert.")``/``add_prefix_if_missing`` helpers below).

3. Export: every model class that should round-trip implements

   * ``hf_state_dict(self) -> dict[str, np.ndarray]``: tensor names and layouts
     exactly as transformers' PyTorch class expects them (float32 numpy).
   * ``hf_config_dict(self) -> dict``: the ``config.json`` content, including
     ``"architectures": [name]`` and ``"model_type"``.

   ``to_hf_tensors(model)`` and ``export_pretrained(model, dir)`` call these.

4. Calling convention of the models: ``model(input_ids, attention_mask)`` with
   int32 ``[batch, seq]`` arrays (mask 1 = real token, 0 = padding; left or right
   padding).  Causal LMs return logits ``[batch, seq, vocab]``; classifiers
   ``[batch, num_labels]``; base encoders an output with ``last_hidden_state``
   ``[batch, seq, hidden]``.  Keep the frozen dataclass config at ``model.config``.

5. Encoder modules ``mapjax.models.bert``, ``mapjax.models.distilbert`` and
   ``mapjax.models.roberta`` are imported lazily the first time the registry is
   consulted, so their ``@register_architecture`` decorators run; a module that
   does not exist yet is skipped (only that exact ``ModuleNotFoundError``).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Builder = Callable[[Any, dict[str, np.ndarray], Any], nnx.Module]

# "linear": the mapjax parameter has the checkpoint's layout.
# "transpose": the checkpoint stores the transpose (GPT-2's Conv1D keeps [in, out]).
Layout = Literal["linear", "transpose"]


# --------------------------------------------------------------------------- #
# Errors a user can act on
# --------------------------------------------------------------------------- #
class CheckpointError(ValueError):
    """Base class of every loading error; messages name the file/tensor/field."""


class UnknownArchitectureError(CheckpointError):
    pass


class MissingTensorError(CheckpointError):
    pass


class UnexpectedTensorsError(CheckpointError):
    pass


class TensorShapeError(CheckpointError):
    pass


class MissingConfigError(CheckpointError, FileNotFoundError):
    pass


# --------------------------------------------------------------------------- #
# Registry
# --------------------------------------------------------------------------- #
_REGISTRY: dict[str, Builder] = {}
# Imported on first use of the registry so their @register_architecture lines run.
_ARCHITECTURE_MODULES = (
    "mapjax.models.gpt2",
    "mapjax.models.opt",
    "mapjax.models.llama",
    "mapjax.models.bert",
    "mapjax.models.distilbert",
    "mapjax.models.roberta",
)
_registry_populated = False


def register_architecture(name: str, builder: Builder | None = None, *, overwrite: bool = False):
    """Register ``builder`` for the HF architecture ``name``; usable as a decorator.

    See the module docstring for the builder contract.
    """

    def add(function: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not function and not overwrite:
            raise ValueError(f"architecture {name!r} is already registered "
                             f"(by {_REGISTRY[name].__module__}.{_REGISTRY[name].__qualname__}); "
                             "pass overwrite=True to replace it")
        _REGISTRY[name] = function
        return function

    return add if builder is None else add(builder)


def _populate_registry() -> None:
    global _registry_populated
    if _registry_populated:
        return
    for module_name in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only "this optional module is not written yet" is tolerated; a
            # missing dependency *inside* the module must surface.
            if error.name != module_name:
                raise
    _registry_populated = True


def supported_architectures() -> list[str]:
    """Names of every registered HF architecture."""
    _populate_registry()
    return sorted(_REGISTRY)


def get_builder(name: str) -> Builder:
    """The builder registered for ``name``, or ``UnknownArchitectureError`` listing the known ones."""
    _populate_registry()
    if name not in _REGISTRY:
        raise UnknownArchitectureError(
            f"unknown architecture {name!r}; supported architectures: {', '.join(supported_architectures())}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- #
# Helpers for builders
# --------------------------------------------------------------------------- #
def take_tensor(tensors: dict[str, np.ndarray], name: str, expected_shape: Iterable[int] | None = None
                ) -> np.ndarray:
    """Remove ``name`` from ``tensors`` and return it, checking its shape."""
    if name not in tensors:
        close = [key for key in tensors if key.split(".")[-1] == name.split(".")[-1]][:5]
        hint = f"; tensors with the same suffix: {close}" if close else ""
        raise MissingTensorError(f"checkpoint is missing tensor {name!r}{hint}")
    array = tensors.pop(name)
    if expected_shape is not None and tuple(array.shape) != tuple(expected_shape):
        raise TensorShapeError(f"tensor {name!r} has shape {tuple(array.shape)}, expected "
                               f"{tuple(expected_shape)}")
    return array


def strip_prefix(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Drop ``prefix`` from every name that has it (checkpoints saved from a base model vs a head)."""
    return {(key[len(prefix):] if key.startswith(prefix) else key): value for key, value in tensors.items()}


def add_prefix_if_missing(tensors: dict[str, np.ndarray], prefix: str, keep: Iterable[str] = ()
                          ) -> dict[str, np.ndarray]:
    """Add ``prefix`` to every name when no name has it yet (e.g. the bare ``gpt2`` hub checkpoint).

    Names in ``keep`` (head weights such as ``lm_head.weight``) are left alone.
    """
    if any(key.startswith(prefix) for key in tensors):
        return tensors
    keep = set(keep)
    return {(key if key in keep else prefix + key): value for key, value in tensors.items()}


def parameter_shape(param: nnx.Variable) -> tuple[int, ...]:
    return tuple(param.get_value().shape)


def load_parameters(mapping: Iterable[tuple[str, nnx.Variable, Layout]], tensors: dict[str, np.ndarray],
                    dtype: Any) -> None:
    """Fill each ``(hf_name, param, layout)`` of ``mapping`` from ``tensors`` (consuming them)."""
    for hf_name, param, layout in mapping:
        shape = parameter_shape(param)
        expected = shape[::-1] if layout == "transpose" else shape
        array = take_tensor(tensors, hf_name, expected)
        if layout == "transpose":
            array = array.T
        param.set_value(jnp.asarray(array, dtype=dtype))


def export_parameters(mapping: Iterable[tuple[str, nnx.Variable, Layout]]) -> dict[str, np.ndarray]:
    """``{hf_name: float32 numpy array}`` in the checkpoint layout, from a model's mapping."""
    out: dict[str, np.ndarray] = {}
    for hf_name, param, layout in mapping:
        array = np.asarray(jax.device_get(param.get_value()).astype(np.float32))
        out[hf_name] = np.ascontiguousarray(array.T if layout == "transpose" else array)
    return out


def build_abstract(constructor: Callable[[], nnx.Module]) -> nnx.Module:
    """Build a module without allocating random weights (every Param holds a ShapeDtypeStruct)."""
    return nnx.eval_shape(constructor)


def check_fully_loaded(model: nnx.Module) -> None:
    """Raise if a parameter was left abstract (a builder forgot to map it)."""
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        leaf = value.get_value() if isinstance(value, nnx.Variable) else value
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise CheckpointError(f"parameter {'.'.join(map(str, path))} was not loaded by the builder")


# --------------------------------------------------------------------------- #
# Reading checkpoints
# --------------------------------------------------------------------------- #
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors`` file as numpy; floating tensors become float32.

    Parses the format directly (8-byte header length, JSON header, raw buffer) so
    bfloat16 checkpoints load without torch; numpy has no bfloat16, so those are
    widened bit-exactly to float32.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path} is not a valid safetensors file: {error}") from None
    buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_length)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype_name = info["dtype"]
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        begin, end = info["data_offsets"]
        raw = buffer[begin:end]
        shape = tuple(info["shape"])
        if dtype_name == "BF16":
            array = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        else:
            array = raw.view(_SAFETENSORS_DTYPES[dtype_name]).reshape(shape)
            if np.issubdtype(array.dtype, np.floating):
                array = array.astype(np.float32)
            else:
                array = np.array(array)
        tensors[name] = array
    return tensors


def _read_pytorch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ModuleNotFoundError:
        raise CheckpointError(f"{path} is a PyTorch pickle checkpoint and torch is not installed; install torch "
                              "or convert the checkpoint to model.safetensors") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {name: (value.float() if value.is_floating_point() else value).numpy() for name, value in state.items()}


def read_checkpoint_tensors(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF folder: ``model.safetensors``, its sharded index, or ``pytorch_model.bin``."""
    directory = Path(directory)
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = directory / shard
            if not shard_path.exists():
                raise CheckpointError(f"{index} lists shard {shard!r}, which is missing from {directory}")
            tensors.update(read_safetensors(shard_path))
        return tensors
    for name in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
        if (directory / name).exists():
            if name.endswith(".json"):
                weight_map = json.loads((directory / name).read_text())["weight_map"]
                tensors = {}
                for shard in sorted(set(weight_map.values())):
                    tensors.update(_read_pytorch_bin(directory / shard))
                return tensors
            return _read_pytorch_bin(directory / name)
    raise CheckpointError(f"no weights in {directory}: expected model.safetensors, "
                          "model.safetensors.index.json or pytorch_model.bin")


def resolve_model_directory(path_or_id: str | os.PathLike) -> Path:
    """A local folder for ``path_or_id``: the path itself, or a hub id from the local HF cache.

    Downloads only when the hub is reachable and ``HF_HUB_OFFLINE`` is not set.
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that holds config.json")
    repo_id = str(path_or_id)
    if repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        raise MissingConfigError(f"model folder {repo_id} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError:
        raise MissingConfigError(f"{repo_id!r} is not a local folder and huggingface_hub is not installed") from None
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=patterns))
    except Exception as cache_error:  # noqa: BLE001 - any cache miss falls through to a download attempt
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise MissingConfigError(f"{repo_id!r} is neither a local folder nor in the Hugging Face cache "
                                     f"(HF_HUB_OFFLINE is set): {cache_error}") from None
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(directory.glob("*.safetensors")):  # an old repo with pickle weights only
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin"]))
        return directory
    except Exception as download_error:  # noqa: BLE001
        raise MissingConfigError(f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and "
                                 f"downloading it failed: {download_error}") from None


def load_hf_config(directory: str | os.PathLike) -> Any:
    """``transformers.AutoConfig`` for a folder, with an error naming the missing ``config.json``."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise MissingConfigError(f"missing config.json in {directory}")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(directory))


def build_from_tensors(hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32,
                       architecture: str | None = None, source: str = "checkpoint") -> nnx.Module:
    """Run the registered builder and check that it consumed every tensor."""
    if architecture is None:
        architectures = getattr(hf_config, "architectures", None) or []
        if not architectures:
            raise UnknownArchitectureError(
                f"{source}: config.json has no 'architectures' field; pass architecture= one of "
                f"{', '.join(supported_architectures())}")
        architecture = architectures[0]
    builder = get_builder(architecture)
    tensors = dict(tensors)
    model = builder(hf_config, tensors, dtype)
    leftovers = sorted(name for name in tensors if not name.endswith(("position_ids", "rotary_emb.inv_freq")))
    if leftovers:
        shown = ", ".join(leftovers[:10]) + (f" ... ({len(leftovers)} in all)" if len(leftovers) > 10 else "")
        raise UnexpectedTensorsError(f"{source}: unexpected tensors for {architecture}: {shown}")
    return model


def from_pretrained(path_or_id: str | os.PathLike, dtype: Any = jnp.float32, *,
                    architecture: str | None = None) -> nnx.Module:
    """Load an HF checkpoint folder (or cached hub id) as a mapjax NNX model.

    Args:
      path_or_id: folder with ``config.json`` and weights, or a hub id found in the
        local Hugging Face cache (downloaded only when the network is reachable).
      dtype: parameter dtype, ``jnp.float32`` or ``jnp.bfloat16``.
      architecture: override ``config.architectures[0]`` (e.g. load a base
        checkpoint into a classifier class).
    """
    directory = resolve_model_directory(path_or_id)
    hf_config = load_hf_config(directory)
    tensors = read_checkpoint_tensors(directory)
    return build_from_tensors(hf_config, tensors, dtype, architecture, source=str(directory))


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def to_hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights named and laid out as in its transformers PyTorch class."""
    if not hasattr(model, "hf_state_dict"):
        raise TypeError(f"{type(model).__name__} does not implement hf_state_dict(); it cannot be exported")
    return model.hf_state_dict()


def export_pretrained(model: nnx.Module, directory: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by transformers' PyTorch classes.

    ``dtype`` is the stored tensor dtype, ``"float32"`` or ``"float16"`` (numpy has no
    bfloat16, so bfloat16 models are written widened to float32).  Returns ``directory``.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_tensors(model)
    if dtype == "float16":
        tensors = {name: value.astype(np.float16) for name, value in tensors.items()}
    elif dtype != "float32":
        raise ValueError(f"export dtype must be 'float32' or 'float16', got {dtype!r}")
    config = dict(model.hf_config_dict())
    config.setdefault("torch_dtype", dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


# --------------------------------------------------------------------------- #
# GGUF (llama.cpp) files
# --------------------------------------------------------------------------- #
def from_gguf(path: str | os.PathLike, dtype: Any = jnp.float32, *, with_tokenizer: bool = True):
    """Load a Llama-architecture GGUF file; returns ``(model, tokenizer)``.

    Quantised tensors are dequantised to float32 with ``gguf.quants.dequantize``;
    see ``mapjax.models.llama.llama_from_gguf`` for the name map and the q/k row permutation.
    ``tokenizer`` is ``None`` when ``with_tokenizer=False``.
    """
    from mapjax.models.llama import llama_from_gguf

    return llama_from_gguf(path, dtype, with_tokenizer=with_tokenizer)
