"""Machinery shared by the model-based rewards: loading, tokenizing, batched jitted forward passes.

Every model-based reward tokenizes its texts without padding, sorts the rows by length, and runs them in
batches right-padded to a power-of-two length (capped at the model's maximum) and a power-of-two batch size
(capped at ``batch_size``), with the buckets of ``mapjax.models.padding``. Only a handful of shapes ever occur,
so the jitted forward pass compiles a few times and is then reused for every later call.

On a device mesh (``JittedForward(..., mesh=)``, see :mod:`mapjax.sharding`) the rows of a batch are split over
the mesh's ``data`` x ``fsdp`` axes, so a batch holds a multiple of ``row_multiple(mesh)`` rows, and the model's
parameters are laid out by their logical axes; scores are the unsharded ones up to float rounding.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.models.errors import CheckpointError
from mapjax.models.padding import length_bucket, pad_rows, rows_per_batch
from mapjax.rewards.base import RewardError
from mapjax.sharding import MeshLike, as_mesh, row_multiple, shard_model_state, shard_rows


def resolve_model_folder(reward_name: str, path_or_id: str | os.PathLike) -> Path:
    """The local folder of a model: the path itself or a hub id found in (or fetched into) the HF cache."""
    from mapjax.models.loading import resolve_model_directory

    try:
        return resolve_model_directory(path_or_id)
    except CheckpointError as error:
        raise RewardError(f"reward {reward_name!r}: cannot find model {str(path_or_id)!r}: {error}") from None


def load_tokenizer(reward_name: str, folder: Path) -> Any:
    """The transformers tokenizer saved with the model (local files only: the folder is already resolved)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # noqa: BLE001 - transformers raises many kinds; the user needs the folder
        raise RewardError(f"reward {reward_name!r}: cannot load a tokenizer from {folder}: {error}") from None


def load_model(reward_name: str, folder: Path, dtype: Any = "float32", architecture: str | None = None
               ) -> nnx.Module:
    """The mapjax NNX model of a checkpoint folder with parameters in ``dtype`` (``"float32"`` or
    ``"bfloat16"``), with errors that name the reward."""
    from mapjax.dtypes import resolve_dtype
    from mapjax.models.loading import from_pretrained

    dtype = resolve_dtype(dtype, what=f"reward {reward_name!r}: dtype", error=RewardError)
    try:
        return from_pretrained(folder, dtype, architecture=architecture)
    except CheckpointError as error:
        raise RewardError(f"reward {reward_name!r}: cannot load the model in {folder}: {error}") from None


def truncation_length(tokenizer: Any, model: nnx.Module, requested: int | None = None) -> int:
    """Inputs are cut to the smallest of: what the caller asks, the tokenizer's limit, the model's limit."""
    model_limit = getattr(model, "max_positions", None)
    if not isinstance(model_limit, int) or model_limit < 1:
        raise RewardError(f"cannot tell the maximum input length of {type(model).__name__} (it has no "
                          "max_positions)")
    limits = [model_limit]
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < 1_000_000:  # unset limits are ~1e30
        limits.append(tokenizer_limit)
    if requested is not None:
        if requested < 1:
            raise RewardError(f"max_length must be positive, got {requested}")
        limits.append(requested)
    return min(limits)


def tokenize(reward_name: str, tokenizer: Any, texts: Sequence[str], max_length: int,
             pairs: Sequence[str] | None = None, *, add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per text (or per text pair), truncated to ``max_length``, unpadded.

    Pairs are passed to the tokenizer as pairs, so its own pair template and its ``longest_first`` truncation
    apply, as in ``tokenizer(question, answer, truncation=True)``. ``add_special_tokens=False`` is for texts
    that already carry their special tokens (a rendered chat template starts with its own BOS; adding the
    tokenizer's would give two).
    """
    if not texts:
        return []
    arguments: dict[str, Any] = dict(truncation=True, max_length=max_length, padding=False,
                                     add_special_tokens=add_special_tokens)
    encoded = tokenizer(list(texts), list(pairs), **arguments) if pairs is not None else \
        tokenizer(list(texts), **arguments)
    ids = [list(row) for row in encoded["input_ids"]]
    for index, row in enumerate(ids):
        if not row:
            raise RewardError(f"reward {reward_name!r}: pair {index} has no tokens (empty text and no special "
                              "tokens); the model cannot score it")
    return ids


def padded_batches(token_ids: Sequence[Sequence[int]], batch_size: int, cap: int, pad_id: int, *,
                   multiple: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(row_indices, input_ids, attention_mask)`` batches, right padded, rows sorted by length.

    Rows are grouped by length so little padding is wasted; the batch is filled up to a power of two with
    copies of its last row (their scores are dropped) so the batch dimension also repeats. ``multiple``: every
    batch's row count is a multiple of it (a mesh's ``row_multiple``; ``batch_size`` is rounded up to one).
    """
    if batch_size < 1:
        raise RewardError(f"batch_size must be positive, got {batch_size}")
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise RewardError(f"multiple must be a positive integer, got {multiple!r}")
    batch_size = -(-batch_size // multiple) * multiple
    order = np.argsort([len(row) for row in token_ids], kind="stable")
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        length = length_bucket(max(len(token_ids[index]) for index in indices), cap)
        rows = -(-rows_per_batch(len(indices), batch_size) // multiple) * multiple
        filled = [token_ids[indices[min(slot, len(indices) - 1)]][:length] for slot in range(rows)]
        input_ids, attention_mask = pad_rows(filled, length, pad_id, side="right")
        yield indices, input_ids, attention_mask


class JittedForward:
    """``forward(model, input_ids, attention_mask) -> array`` compiled once per shape.

    The model is split into its graph definition (static) and its state (an argument), so the weights are
    not baked into the compiled program as constants. With a ``mesh`` the state is laid out on it by its
    logical axes (arrays already so placed do not move: see ``mapjax.sharding.shard_model``) and each call's
    rows, a multiple of ``row_multiple``, are split over ``data`` x ``fsdp``.
    """

    def __init__(self, model: nnx.Module, forward: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array],
                 mesh: MeshLike = None):
        self.mesh = as_mesh(mesh)
        self.row_multiple = row_multiple(self.mesh)
        self.graphdef, state = nnx.split(model)
        self.state = shard_model_state(state, self.mesh)

        def run(state: Any, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
            return forward(nnx.merge(self.graphdef, state), input_ids, attention_mask)

        self._compiled = jax.jit(run)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.mesh is None:
            return np.asarray(self._compiled(self.state, jnp.asarray(input_ids), jnp.asarray(attention_mask)))
        return np.asarray(self._compiled(self.state, *shard_rows((np.asarray(input_ids), np.asarray(attention_mask)),
                                                                  self.mesh)))


def run_batched(token_ids: Sequence[Sequence[int]], forward: JittedForward, *, batch_size: int, cap: int,
                pad_id: int) -> np.ndarray:
    """Run ``forward`` over all rows in length buckets; outputs back in the input order (float32). Batches hold a
    multiple of ``forward.row_multiple`` rows (a forward without one: any number)."""
    outputs: np.ndarray | None = None
    multiple = int(getattr(forward, "row_multiple", 1))
    for indices, input_ids, attention_mask in padded_batches(token_ids, batch_size, cap, pad_id, multiple=multiple):
        result = np.asarray(forward(input_ids, attention_mask), dtype=np.float32)[:len(indices)]
        if outputs is None:
            outputs = np.zeros((len(token_ids), *result.shape[1:]), np.float32)
        outputs[indices] = result
    return outputs if outputs is not None else np.zeros((0,), np.float32)


def full_texts(prompts: Sequence[str], continuations: Sequence[str]) -> list[str]:
    """Prompt + continuation as decoded together: plain concatenation (the continuation keeps its own spacing)."""
    return [prompt + continuation for prompt, continuation in zip(prompts, continuations)]
