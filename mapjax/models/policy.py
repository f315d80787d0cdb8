"""Loading a policy to sample from: ``(model, tokenizer)`` from a ``.gguf`` file, an HF folder, or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mapjax.errors import GenerationError
from mapjax.models.base import CausalLM


def load_policy(path_or_id: str | os.PathLike, dtype: Any = "float32", *, mesh: Any = None
                ) -> tuple[CausalLM, Any]:
    """``(model, tokenizer)`` from a ``.gguf`` file, an HF folder, or a hub id in the local HF cache.

    ``dtype`` (``"float32"`` or ``"bfloat16"``, or the JAX dtype) is the parameter dtype, and so the KV cache's
    when the model samples (see :mod:`mapjax.dtypes`). ``mesh`` (a mesh or its spec): each weight is loaded
    straight onto the mesh, laid out by its logical axes (``mapjax.sharding``), so a model larger than one device
    loads; None: one device.
    """
    from mapjax.dtypes import resolve_dtype
    from mapjax.sharding import as_mesh

    dtype = resolve_dtype(dtype, error=GenerationError)   # before the folder is even looked up
    mesh = as_mesh(mesh)
    path = Path(path_or_id).expanduser()
    if path.suffix.lower() == ".gguf":
        from mapjax.models import from_gguf

        return from_gguf(path, dtype, mesh=mesh)
    from transformers import AutoTokenizer

    from mapjax.models import from_pretrained
    from mapjax.models.loading import resolve_model_directory

    directory = resolve_model_directory(path_or_id)
    model = from_pretrained(directory, dtype, mesh=mesh)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer
