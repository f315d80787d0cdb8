"""Load Hugging Face checkpoints into mapjax NNX models, and write them back.

Public entry points
-------------------
``from_pretrained(path_or_id, dtype=jnp.float32)``
    Reads ``config.json`` + ``model.safetensors`` (or a sharded
    ``model.safetensors.index.json``; or ``pytorch_model.bin`` through torch when
    installed) with numpy, picks the builder registered for
    ``config.architectures[0]`` and returns the NNX model.
``export_pretrained(model, directory)``
    Writes ``config.json`` + ``model.safetensors`` that transformers' PyTorch
    classes load with ``from_pretrained(directory)``.

GGUF files are read by ``mapjax.models.gguf.from_gguf``.

Adding an architecture
----------------------
A model class derives from ``mapjax.models.base.PretrainedModel`` (decoders from
``CausalLMBase``), implements ``hf_parameters`` (its tensor-name map),
``config_from_hf`` and, where checkpoints vary, ``prepare_checkpoint``, and is
registered with the ``@register_model`` class decorator; loading and export then
work through the shared name map (see ``mapjax.models.base``).

Any other builder can be registered under an HF architecture name (the string in
``config.json``'s ``"architectures"`` list)::

    from mapjax.models.loading import register_architecture, take_tensor

    @register_architecture("MyModelForCausalLM")
    def build(hf_config, tensors, dtype):
        ...
        return model

Builder contract: ``builder(hf_config, tensors, dtype) -> nnx.Module``, where
``hf_config`` is what ``transformers.AutoConfig.from_pretrained(folder)`` returns,
``tensors`` maps the checkpoint's tensor names (PyTorch layout, floating tensors as
float32 numpy) and ``dtype`` is the parameter dtype asked for. The builder must
**remove** every tensor it consumes (``take_tensor`` does and checks the shape,
raising ``MissingTensorError`` / ``TensorShapeError``); whatever is left makes
``from_pretrained`` raise ``UnexpectedTensorsError``. Registering a name twice raises
unless ``overwrite=True``. For export a model implements ``hf_state_dict()`` and
``hf_config_dict()`` (``PretrainedModel`` provides both).

Calling convention of the models: ``model(input_ids, attention_mask)`` with int32
``[batch, seq]`` arrays (mask 1 = real token, 0 = padding; left or right padding).
Causal LMs return ``CausalLMOutput(logits [batch, seq, vocab], cache)``; classifiers
logits ``[batch, num_labels]``; base encoders an ``EncoderOutput`` with
``last_hidden_state [batch, seq, hidden]``. The frozen dataclass config is at ``model.config``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.base import (
    HFParameter,
    Layout,
    add_prefix_if_missing,
    build_abstract,
    check_fully_loaded,
    export_parameters,
    load_parameters,
    strip_prefix,
    take_tensor,
)
from mapjax.models.errors import (
    CheckpointError,
    MissingConfigError,
    MissingTensorError,
    ModelNotFoundError,
    TensorShapeError,
    UnexpectedTensorsError,
    UnknownArchitectureError,
)
from mapjax.models.registry import (
    Builder,
    get_builder,
    model_class,
    register_architecture,
    supported_architectures,
    unregister_architecture,
)

# The registry, the name-map helpers and the errors live in their own modules; they are importable from here
# too, where the builder contract above is documented.
__all__ = [
    "Builder", "CheckpointError", "HFParameter", "Layout", "MissingConfigError", "MissingTensorError",
    "ModelNotFoundError", "TensorShapeError", "UnexpectedTensorsError", "UnknownArchitectureError",
    "add_prefix_if_missing", "build_abstract", "build_from_tensors", "check_fully_loaded", "export_parameters",
    "export_pretrained", "from_pretrained", "get_builder", "load_hf_config", "load_parameters", "model_class",
    "read_checkpoint_tensors", "read_safetensors", "register_architecture", "resolve_model_directory",
    "strip_prefix", "supported_architectures", "take_tensor", "to_hf_tensors", "unregister_architecture",
]

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


def download_command(repo_id: str) -> str:
    """The command that puts ``repo_id`` into the local Hugging Face cache, for messages."""
    return f"hf download {repo_id}"


def resolve_model_directory(path_or_id: str | os.PathLike) -> Path:
    """A local folder for ``path_or_id``: the path itself, or a hub id from the local HF cache.

    A hub id that is not in the cache is downloaded when the hub is reachable and ``HF_HUB_OFFLINE`` is not set.
    Offline, it is a ``MissingConfigError`` that names the command to fetch it first (``hf download ID``, run
    where the network is reachable, with the same ``HF_HOME`` / ``HF_HUB_CACHE``); nothing is downloaded.
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
    except Exception:  # noqa: BLE001 - any cache miss falls through to a download attempt
        if _hub_offline():
            raise MissingConfigError(
                f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set "
                f"so it is not downloaded; fetch it first where the network is reachable: "
                f"`{download_command(repo_id)}` (huggingface_hub older than 0.34: `huggingface-cli download "
                f"{repo_id}`), or pass a local folder") from None
    try:
        directory = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(directory.glob("*.safetensors")):  # an old repo with pickle weights only
            directory = Path(snapshot_download(repo_id, allow_patterns=patterns + ["pytorch_model*.bin"]))
        return directory
    except Exception as download_error:  # noqa: BLE001
        raise MissingConfigError(f"{repo_id!r} is neither a local folder nor in the Hugging Face cache, and "
                                 f"downloading it failed: {download_error}; check the id, or fetch it with "
                                 f"`{download_command(repo_id)}`") from None


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (the environment now, or its constant set at import)."""
    import huggingface_hub.constants

    value = os.environ.get("HF_HUB_OFFLINE", "0").strip().lower()
    return value in ("1", "on", "yes", "true") or bool(getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False))


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
                    architecture: str | None = None, mesh: Any = None) -> nnx.Module:
    """Load an HF checkpoint folder (or cached hub id) as a mapjax NNX model.

    Args:
      path_or_id: folder with ``config.json`` and weights, or a hub id found in the local Hugging Face cache
        (downloaded when it is not there and the network is reachable; with ``HF_HUB_OFFLINE=1`` a missing id
        is a ``MissingConfigError`` naming ``hf download ID``, see :func:`resolve_model_directory`).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"`` (or ``jnp.float32`` / ``jnp.bfloat16``).
      architecture: override ``config.architectures[0]`` (e.g. load a base
        checkpoint into a classifier class).
      mesh: a device mesh or its spec (``mapjax.sharding.as_mesh``): each weight goes straight to its devices,
        laid out by its logical axes, so a model larger than one device loads. None: one device.
    """
    from mapjax.dtypes import resolve_dtype
    from mapjax.sharding import as_mesh, loading_onto

    dtype = resolve_dtype(dtype, error=ModelError)   # a bad value is named before any file is read
    mesh = as_mesh(mesh)
    directory = resolve_model_directory(path_or_id)
    hf_config = load_hf_config(directory)
    tensors = read_checkpoint_tensors(directory)
    with loading_onto(mesh):
        return build_from_tensors(hf_config, tensors, dtype, architecture, source=str(directory))


# --------------------------------------------------------------------------- #
# Export
# --------------------------------------------------------------------------- #
def to_hf_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights named and laid out as in its transformers PyTorch class."""
    if not hasattr(model, "hf_state_dict"):
        raise ModelError(f"{type(model).__name__} does not implement hf_state_dict(); it cannot be exported")
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
        raise ModelError(f"export dtype must be 'float32' or 'float16', got {dtype!r}")
    config = dict(model.hf_config_dict())
    config.setdefault("torch_dtype", dtype)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({name: np.ascontiguousarray(value) for name, value in tensors.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
