"""Save and restore NNX model state with orbax-checkpoint.

The checkpoint holds the model's ``nnx.State`` as a pure dict of arrays (every
variable type, not only ``Param``); the graph comes from ``model_like`` at restore
time, which may be a real model or an abstract one from ``nnx.eval_shape``.
For an interchange format readable by transformers use
``mapjax.models.export_pretrained`` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import jax
from flax import nnx

from mapjax.errors import OutputExistsError
from mapjax.models.errors import ModelNotFoundError

ModuleT = TypeVar("ModuleT", bound=nnx.Module)


def save_checkpoint(model: nnx.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model``'s state to ``directory`` (created; must not exist unless ``overwrite``)."""
    directory = Path(directory).expanduser().absolute()
    if directory.exists() and not overwrite:
        raise OutputExistsError(f"checkpoint directory {directory} already exists; pass overwrite=True")
    import orbax.checkpoint as ocp  # imported on use: it is slow to import and most callers never need it

    state = nnx.to_pure_dict(nnx.state(model))
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory, state, force=overwrite)
    checkpointer.wait_until_finished()
    checkpointer.close()
    return directory


def restore_checkpoint(directory: str | os.PathLike, model_like: ModuleT) -> ModuleT:
    """A new model with ``model_like``'s structure and the state saved in ``directory``.

    ``model_like`` is not modified; shapes and dtypes must match the saved ones
    (orbax raises naming the mismatching entry otherwise).
    """
    directory = Path(directory).expanduser().absolute()
    if not directory.exists():
        raise ModelNotFoundError(f"no checkpoint at {directory}")
    import orbax.checkpoint as ocp

    graphdef, abstract_state = nnx.split(model_like)
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
                          nnx.to_pure_dict(abstract_state))
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(directory, target)
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
