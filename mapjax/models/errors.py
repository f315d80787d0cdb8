"""The errors of loading, building and calling models; all are :class:`mapjax.errors.ModelError`.

Messages name the file, tensor, field or argument and what was expected.
"""

from __future__ import annotations

from mapjax.errors import ModelError


class CheckpointError(ModelError):
    """A checkpoint (folder, file or tensor set) that cannot be loaded into a model."""


class UnknownArchitectureError(CheckpointError):
    """No builder is registered for the architecture a config names."""


class MissingTensorError(CheckpointError):
    """A tensor the model needs is not in the checkpoint."""


class UnexpectedTensorsError(CheckpointError):
    """The checkpoint holds tensors the model has no place for."""


class TensorShapeError(CheckpointError):
    """A checkpoint tensor has another shape than the model's parameter."""


class MissingConfigError(CheckpointError, FileNotFoundError):
    """No ``config.json`` (or no such folder / hub id) where a model was looked for."""


class ModelNotFoundError(CheckpointError, FileNotFoundError):
    """A model file, checkpoint folder or packaged model that does not exist."""
