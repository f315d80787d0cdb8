"""Which builder turns a Hugging Face architecture name (``config.json``'s ``"architectures"``) into a model.

Model classes register themselves with the :func:`register_model` class decorator; any other builder with
:func:`register_architecture`. The architecture modules are imported on first use of the registry, so their
registrations have run whatever the caller imported.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np
from flax import nnx

from mapjax.errors import ModelError
from mapjax.models.errors import UnknownArchitectureError

Builder = Callable[[Any, dict[str, np.ndarray], Any], nnx.Module]

_REGISTRY: dict[str, Builder] = {}
_MODEL_CLASSES: dict[str, type] = {}
# Imported on first use of the registry so that their registrations run.
_ARCHITECTURE_MODULES = (
    "mapjax.models.gpt2",
    "mapjax.models.opt",
    "mapjax.models.llama",
    "mapjax.models.mistral",
    "mapjax.models.qwen2",
    "mapjax.models.phi3",
    "mapjax.models.gemma",
    "mapjax.models.sequence_classification",
    "mapjax.models.bert",
    "mapjax.models.distilbert",
    "mapjax.models.roberta",
    "mapjax.models.deberta_v2",
)
_registry_populated = False


def register_architecture(name: str, builder: Builder | None = None, *, overwrite: bool = False):
    """Register ``builder(hf_config, tensors, dtype) -> model`` for the HF architecture ``name``.

    Usable as a decorator. See ``mapjax.models.loading`` for the builder contract. Registering a name twice
    raises ``ModelError`` unless ``overwrite=True``.
    """

    def add(function: Builder) -> Builder:
        # != rather than "is not": a class's bound from_checkpoint is a new object at every access.
        if name in _REGISTRY and _REGISTRY[name] != function and not overwrite:
            raise ModelError(f"architecture {name!r} is already registered (by {_describe(_REGISTRY[name])}); "
                             "pass overwrite=True to replace it")
        _REGISTRY[name] = function
        return function

    return add if builder is None else add(builder)


def _describe(builder: Builder) -> str:
    owner = getattr(builder, "__self__", None)   # a class's from_checkpoint
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return f"{builder.__module__}.{builder.__qualname__}"


def register_model(cls: type) -> type:
    """Class decorator for a ``mapjax.models.base.PretrainedModel`` class: register ``cls.from_checkpoint`` as
    the builder of ``cls.architecture``, and the class itself (see :func:`model_class`)."""
    register_architecture(cls.architecture, cls.from_checkpoint)
    _MODEL_CLASSES[cls.architecture] = cls
    return cls


def model_class(name: str) -> type:
    """The model class registered for the HF architecture ``name`` (e.g. to build one with random weights:
    ``model_class("LlamaForCausalLM").from_config(config)``)."""
    _populate_registry()
    if name not in _MODEL_CLASSES:
        raise UnknownArchitectureError(f"no model class is registered for architecture {name!r}; model classes: "
                                       f"{', '.join(sorted(_MODEL_CLASSES))}")
    return _MODEL_CLASSES[name]


def unregister_architecture(name: str) -> None:
    """Remove ``name`` from the registry (tests, notebooks redefining a builder)."""
    _MODEL_CLASSES.pop(name, None)
    if _REGISTRY.pop(name, None) is None:
        raise UnknownArchitectureError(f"architecture {name!r} is not registered")


def _populate_registry() -> None:
    global _registry_populated
    if _registry_populated:
        return
    for module_name in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only "this optional module is not written yet" is tolerated; a missing dependency *inside* the
            # module must surface.
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
