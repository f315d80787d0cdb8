"""Sequence-classifier rewards: a model id plus a scoring rule.

``classifier_reward(model, label=1, scale="logit", text="full")`` scores each pair with one class of a Hugging
Face sequence classifier (any architecture ``mapjax.models.from_pretrained`` loads). Two are registered:

- ``humor``: ``mohameddhiab/humor-no-humor``, logit of class 1 ("humor") on the full text (the paper's choice).
- ``positive``: ``lvwerra/distilbert-imdb``, **log-probability** of class 1 ("positive") on the full text.
  The authors' pilot used the probability in one place and the logit in another; we use log p everywhere,
  because the paper's IMDB palettes are c = E r + log(1 + κ): on the log p scale that level means "the
  positive class is (1 + κ) times as likely on average", which is what the paper says it means.

Inputs follow the authors: the texts go through the model's own tokenizer with truncation at its limit
(512 tokens for these models), and "full text" is prompt + continuation as decoded.
"""

from __future__ import annotations

import os
from typing import Any, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mapjax.dtypes import dtype_name, resolve_dtype
from mapjax.models.padding import pad_token_id
from mapjax.rewards import batching
from mapjax.rewards.base import RewardError, check_pairs, check_scores, register_reward_factory
from mapjax.sharding import MeshLike, as_mesh, shard_model

Scale = Literal["logit", "log_prob", "prob"]
TextPart = Literal["full", "continuation"]
SCALES = ("logit", "log_prob", "prob")
TEXT_PARTS = ("full", "continuation")

HUMOR_MODEL = "mohameddhiab/humor-no-humor"
POSITIVE_MODEL = "lvwerra/distilbert-imdb"


def classifier_logits(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Logits ``[batch, labels]`` of a right-padded batch, for every classifier architecture.

    GPT-2 classifiers read the rightmost token that is not the pad id. transformers does that on the
    unpadded row (how the reward models' authors call them, one text at a time); we restrict it to the real
    tokens so padding added for batching cannot change the score, and need no pad id in the config.
    """
    from mapjax.models.gpt2 import GPT2ForSequenceClassification

    if isinstance(model, GPT2ForSequenceClassification):
        hidden, _ = model.transformer(input_ids, attention_mask)
        real = attention_mask != 0
        if model.config.pad_token_id is not None:
            real = real & (input_ids != model.config.pad_token_id)
        positions = jnp.arange(input_ids.shape[1])[None, :]
        last = jnp.argmax(positions * real, axis=1)
        return model.score(hidden[jnp.arange(input_ids.shape[0]), last]).astype(jnp.float32)
    return model(input_ids, attention_mask).astype(jnp.float32)


def label_index(reward_name: str, model: nnx.Module, label: int | str, num_labels: int) -> int:
    """A class index from an index or a label name of the config's ``id2label``."""
    if isinstance(label, str):
        config = getattr(model, "config", None)
        names = dict(getattr(config, "id2label", ()) or ())
        matches = [index for index, name in names.items() if name.lower() == label.lower()]
        if not matches:
            raise RewardError(f"reward {reward_name!r}: the model has no label {label!r}; labels: "
                              f"{sorted(names.values()) or list(range(num_labels))}")
        return int(matches[0])
    if not 0 <= int(label) < num_labels:
        raise RewardError(f"reward {reward_name!r}: label {label} is out of range; the model has {num_labels} "
                          "classes")
    return int(label)


def apply_scale(logits: np.ndarray, index: int, scale: str) -> np.ndarray:
    """One class's logit, log-probability or probability; a single-logit head is a sigmoid classifier."""
    logits = logits.astype(np.float64)
    if logits.shape[1] == 1:
        logit = logits[:, 0]
        if scale == "logit":
            return logit
        log_prob = -np.logaddexp(0.0, -logit)  # log sigmoid, stable for large |logit|
    else:
        if scale == "logit":
            return logits[:, index]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_prob = shifted[:, index] - np.log(np.exp(shifted).sum(axis=1))
    return log_prob if scale == "log_prob" else np.exp(log_prob)


class ClassifierReward:
    """Scores pairs with one class of a sequence classifier.

    Args:
      model_id_or_path: hub id (found in the local cache when offline) or a folder with ``config.json``,
        weights and tokenizer files.
      label: class index, or a label name from the config's ``id2label``.
      scale: ``"logit"`` (raw class logit), ``"log_prob"`` (log softmax, or log sigmoid for a one-logit
        head) or ``"prob"``.
      text: ``"full"`` scores prompt + continuation, ``"continuation"`` the continuation alone.
      batch_size: rows per forward pass.
      max_length: truncation length in tokens (default: the tokenizer's and the model's limit).
      name: the reward's name in errors and pools (default: the model id).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"`` (or ``jnp.float32`` / ``jnp.bfloat16``);
        logits and scores are float32 either way.
      mesh: a device mesh (``"data=8"``, ``{"data": 2, "fsdp": 4}``, a ``Mesh``; see :mod:`mapjax.sharding`): the
        model is laid out on it (in place) and each batch's rows split over ``data`` x ``fsdp``; same scores.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, *, label: int | str = 1, scale: Scale = "logit",
                 text: TextPart = "full", batch_size: int = 32, max_length: int | None = None,
                 name: str | None = None, dtype: Any = "float32", mesh: MeshLike = None):
        self.name = name or str(model_id_or_path)
        self.dtype = dtype_name(dtype, what=f"reward {self.name!r}: dtype", error=RewardError)
        self.mesh = as_mesh(mesh)
        if scale not in SCALES:
            raise RewardError(f"reward {self.name!r}: scale must be one of {SCALES}, got {scale!r}")
        if text not in TEXT_PARTS:
            raise RewardError(f"reward {self.name!r}: text must be one of {TEXT_PARTS}, got {text!r}")
        if batch_size < 1:
            raise RewardError(f"reward {self.name!r}: batch_size must be positive, got {batch_size}")
        folder = batching.resolve_model_folder(self.name, model_id_or_path)
        self.model = batching.load_model(self.name, folder, resolve_dtype(self.dtype))
        self.tokenizer = batching.load_tokenizer(self.name, folder)
        self.num_labels = self._count_labels()
        self.label = label_index(self.name, self.model, label, self.num_labels)
        self.scale, self.text, self.batch_size = scale, text, batch_size
        self.max_length = batching.truncation_length(self.tokenizer, self.model, max_length)
        self.pad_id = pad_token_id(self.tokenizer, self.model)
        self._forward = batching.JittedForward(shard_model(self.model, self.mesh), classifier_logits, mesh=self.mesh)

    def _count_labels(self) -> int:
        count = getattr(self.model.config, "num_labels", 0)
        if not type(self.model).__name__.endswith("ForSequenceClassification") or not count:
            raise RewardError(f"reward {self.name!r}: {type(self.model).__name__} is not a sequence classifier")
        return int(count)

    def logits(self, texts: Sequence[str]) -> np.ndarray:
        """Classifier logits ``[n, labels]`` (float32) for ``texts``."""
        token_ids = batching.tokenize(self.name, self.tokenizer, texts, self.max_length)
        return batching.run_batched(token_ids, self._forward, batch_size=self.batch_size, cap=self.max_length,
                                    pad_id=self.pad_id).reshape(len(texts), -1)

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        check_pairs(self.name, prompts, continuations)
        texts = batching.full_texts(prompts, continuations) if self.text == "full" else list(continuations)
        if not texts:
            return np.zeros((0,), np.float32)
        scores = apply_scale(self.logits(texts), self.label, self.scale)
        return check_scores(self.name, scores, len(prompts))


def classifier_reward(model_id_or_path: str | os.PathLike, label: int | str = 1, scale: Scale = "logit",
                      text: TextPart = "full", *, batch_size: int = 32, max_length: int | None = None,
                      name: str | None = None, dtype: Any = "float32", mesh: MeshLike = None) -> ClassifierReward:
    """A reward from a model id plus a scoring rule; see :class:`ClassifierReward` for the options."""
    return ClassifierReward(model_id_or_path, label=label, scale=scale, text=text, batch_size=batch_size,
                            max_length=max_length, name=name, dtype=dtype, mesh=mesh)


def humor_reward(model: str | os.PathLike = HUMOR_MODEL, *, label: int | str = 1, scale: Scale = "logit",
                 text: TextPart = "full", batch_size: int = 32, max_length: int | None = None,
                 name: str = "humor", dtype: Any = "float32", mesh: MeshLike = None) -> ClassifierReward:
    """``humor``: logit of class 1 of ``mohameddhiab/humor-no-humor`` on the full text (the paper's)."""
    return classifier_reward(model, label, scale, text, batch_size=batch_size, max_length=max_length, name=name,
                             dtype=dtype, mesh=mesh)


def positive_reward(model: str | os.PathLike = POSITIVE_MODEL, *, label: int | str = 1,
                    scale: Scale = "log_prob", text: TextPart = "full", batch_size: int = 32,
                    max_length: int | None = None, name: str = "positive", dtype: Any = "float32",
                    mesh: MeshLike = None) -> ClassifierReward:
    """``positive``: log p(class 1 = positive) of ``lvwerra/distilbert-imdb`` on the full text.

    log p is the one scale used for this value, so a palette level mean + log(1 + κ) means "positive is
    (1 + κ) times as likely".
    """
    return classifier_reward(model, label, scale, text, batch_size=batch_size, max_length=max_length, name=name,
                             dtype=dtype, mesh=mesh)


register_reward_factory("humor", humor_reward)
register_reward_factory("positive", positive_reward)
register_reward_factory("classifier", classifier_reward)
