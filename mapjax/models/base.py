"""What every model class shares: its Hugging Face name map and (de)serialisation, random init, and the
causal-LM contract.

Name map
--------
Every model class lists its parameters with ``hf_parameters(prefix="")``: an iterator of
``(hf_name, parameter, layout)``, ``hf_name`` being the tensor's name in the transformers PyTorch class's
``state_dict`` (prefixed by ``prefix``) and ``layout`` ``"linear"`` (same layout) or ``"transpose"`` (the
checkpoint stores the transpose, e.g. GPT-2's ``Conv1D``). Loading (:func:`load_parameters`) and export
(:func:`export_parameters`) both walk that one map, so the two directions cannot drift apart.

:class:`PretrainedModel` turns the map into the rest: ``hf_state_dict()``, ``hf_config_dict()``,
``from_config(config)`` (random weights, e.g. for tests), ``from_hf_tensors(config, tensors)`` and
``from_checkpoint(hf_config, tensors)``, the builder :func:`register_model` registers under the class's
``architecture``. A class implements ``hf_parameters``, ``config_from_hf`` and, where checkpoints vary in
naming or carry unused tensors, ``prepare_checkpoint``.

Causal LMs
----------
:class:`CausalLM` is the protocol the sampler, the rewards and finetuning type against; decoder classes derive
from :class:`CausalLMBase`, which gives them ``init_cache``. A call always returns a :class:`CausalLMOutput`.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Iterator, Literal, Protocol, runtime_checkable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models.errors import CheckpointError, MissingTensorError, TensorShapeError
from mapjax.models.layers import KVCache
from mapjax.models.registry import register_model

__all__ = [
    "CausalLM", "CausalLMBase", "CausalLMOutput", "HFParameter", "Layout", "PretrainedModel",
    "add_prefix_if_missing", "build_abstract", "check_fully_loaded", "export_parameters", "load_parameters",
    "parameter_shape", "register_model", "rename_in_place", "strip_prefix", "take_tensor",
]

# "linear": the mapjax parameter has the checkpoint's layout.
# "transpose": the checkpoint stores the transpose (GPT-2's Conv1D keeps [in, out]).
Layout = Literal["linear", "transpose"]
HFParameter = tuple[str, nnx.Variable, Layout]


# --------------------------------------------------------------------------- #
# Tensors by name
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
    """Drop ``prefix`` from every name that has it (checkpoints saved from a task model vs a base model)."""
    return {(key[len(prefix):] if key.startswith(prefix) else key): value for key, value in tensors.items()}


def add_prefix_if_missing(tensors: dict[str, np.ndarray], prefix: str, keep: Iterable[str] = ()
                          ) -> dict[str, np.ndarray]:
    """Add ``prefix`` to every name when no name has it yet (e.g. the bare ``gpt2`` hub checkpoint).

    Names in ``keep`` and names starting with one of them followed by a dot (head weights such as
    ``lm_head.weight`` or ``classifier.dense.bias``) are left alone.
    """
    if any(key.startswith(prefix) for key in tensors):
        return tensors
    keep = tuple(keep)
    kept = lambda key: key in keep or key.startswith(tuple(f"{name}." for name in keep))  # noqa: E731
    return {(key if kept(key) else prefix + key): value for key, value in tensors.items()}


def rename_in_place(tensors: dict[str, np.ndarray], renamed: dict[str, np.ndarray]) -> None:
    """Replace the contents of ``tensors`` by ``renamed`` (builders consume from the caller's dict)."""
    if renamed is not tensors:
        tensors.clear()
        tensors.update(renamed)


def parameter_shape(param: nnx.Variable) -> tuple[int, ...]:
    return tuple(param.get_value().shape)


def load_parameters(mapping: Iterable[HFParameter], tensors: dict[str, np.ndarray], dtype: Any) -> None:
    """Fill each ``(hf_name, param, layout)`` of ``mapping`` from ``tensors`` (consuming them). Inside
    ``mapjax.sharding.loading_onto(mesh)`` each tensor's shards go straight to their devices."""
    from mapjax.sharding import place_loaded_parameter

    for hf_name, param, layout in mapping:
        shape = parameter_shape(param)
        expected = shape[::-1] if layout == "transpose" else shape
        array = take_tensor(tensors, hf_name, expected)
        if layout == "transpose":
            array = array.T
        param.set_value(place_loaded_parameter(param, array, dtype))


def export_parameters(mapping: Iterable[HFParameter]) -> dict[str, np.ndarray]:
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
# Model classes
# --------------------------------------------------------------------------- #
class PretrainedModel:
    """Mixin of every mapjax model class (``class X(PretrainedModel, nnx.Module)``).

    The class sets ``architecture`` (the HF name, e.g. ``"LlamaForCausalLM"``), keeps its frozen dataclass
    config at ``self.config`` (with ``max_positions`` and ``to_hf_dict(architecture)``), takes
    ``(config, *, dtype, rngs, **options)`` in its constructor and implements the methods marked below.
    """

    architecture: ClassVar[str]
    config: Any

    # -- implemented by each class ------------------------------------------------------------------- #
    def hf_parameters(self, prefix: str = "") -> Iterator[HFParameter]:
        """Every parameter as ``(hf_name, parameter, layout)``, named as in the transformers class."""
        raise NotImplementedError

    @classmethod
    def config_from_hf(cls, hf_config: Any) -> Any:
        """This class's config from a ``transformers`` config (what ``AutoConfig`` reads from config.json)."""
        raise NotImplementedError

    @classmethod
    def prepare_checkpoint(cls, config: Any, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
        """Bring checkpoint names to this class's (in place), drop tensors it may carry but does not use;
        return constructor options read off the checkpoint (e.g. whether it has a pooler)."""
        del config, tensors
        return {}

    # -- shared ------------------------------------------------------------------------------------- #
    @property
    def max_positions(self) -> int:
        """The longest sequence, in tokens, the model reads (its position table or trained context)."""
        return int(self.config.max_positions)

    def hf_state_dict(self) -> dict[str, np.ndarray]:
        """Tensors named and laid out as the transformers PyTorch class expects them (float32 numpy)."""
        return export_parameters(self.hf_parameters())

    def hf_config_dict(self) -> dict[str, Any]:
        """The ``config.json`` content, with ``architectures`` and ``model_type``."""
        return self.config.to_hf_dict(self.architecture)

    @classmethod
    def from_config(cls, config: Any, *, dtype: Any = jnp.float32, seed: int = 0, **options: Any):
        """A model with random weights (normal, std 0.02; unit norms, zero biases) for ``config``."""
        return cls(config, dtype=dtype, rngs=nnx.Rngs(seed), **options)

    @classmethod
    def from_hf_tensors(cls, config: Any, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32,
                        **options: Any):
        """A model whose weights come from HF-named ``tensors`` (consumed), without a random init first."""
        model = build_abstract(lambda: cls(config, dtype=dtype, rngs=nnx.Rngs(0), **options))
        load_parameters(model.hf_parameters(), tensors, dtype)
        check_fully_loaded(model)
        return model

    @classmethod
    def from_checkpoint(cls, hf_config: Any, tensors: dict[str, np.ndarray], dtype: Any = jnp.float32):
        """The registry's builder: ``hf_config`` + checkpoint tensors (consumed) -> model."""
        config = cls.config_from_hf(hf_config)
        options = cls.prepare_checkpoint(config, tensors)
        return cls.from_hf_tensors(config, tensors, dtype, **options)


@flax.struct.dataclass
class CausalLMOutput:
    """What a causal LM call returns.

    Attributes:
        logits: ``[batch, seq, vocab]``, float32 whatever the parameter dtype (the output head accumulates in
            float32: log-softmax and sampling need the precision).
        cache: the advanced ``KVCache`` when the call was given one, else ``None``.
    """

    logits: jax.Array
    cache: KVCache | None = None


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model as the sampler, the rewards and finetuning use it.

    ``config`` carries ``eos_token_id``, ``bos_token_id`` and ``pad_token_id`` (each may be ``None``).
    """

    config: Any

    @property
    def max_positions(self) -> int: ...

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache: ...

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 cache: KVCache | None = None, positions: jax.Array | None = None) -> CausalLMOutput: ...


class CausalLMBase(PretrainedModel):
    """Mixin of the decoder classes: ``init_cache`` from the config's ``num_layers``, ``num_kv_heads`` and
    ``head_dim``; the class sets ``self.dtype`` and returns :class:`CausalLMOutput` from its call."""

    dtype: Any

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of at most ``max_len`` tokens."""
        config = self.config
        return KVCache.create(num_layers=config.num_layers, batch=batch, max_len=max_len,
                              kv_heads=config.num_kv_heads, head_dim=config.head_dim, dtype=dtype or self.dtype)
