"""Preference reward models on a (question, answer) pair: ``gpt2-helpful`` and ``gpt2-harmless``.

Both are GPT-2 large models with a one-logit score head (``Ray2333/gpt2-large-helpful-reward_model`` and
``Ray2333/gpt2-large-harmless-reward_model``), trained on Anthropic hh-rlhf dialogues. As the paper's code
does, each pair is presented in the training format

    question = "\\n\\nHuman: " + prompt + " \\n\\nAssistant:"      answer = continuation, stripped

and tokenized as a *pair* by the model's tokenizer (``tokenizer(question, answer, truncation=True)``: the two
are tokenized separately and joined, longest-first truncation to 1024 tokens). The score is the raw logit at
the last token. The authors scored one pair at a time; we batch with right padding and read the last real
token, which gives the same number.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from mapjax.dtypes import dtype_name, resolve_dtype
from mapjax.models.padding import pad_token_id
from mapjax.rewards import batching
from mapjax.rewards.base import RewardError, check_pairs, check_scores, register_reward_factory
from mapjax.rewards.classifier import classifier_logits

HELPFUL_MODEL = "Ray2333/gpt2-large-helpful-reward_model"
HARMLESS_MODEL = "Ray2333/gpt2-large-harmless-reward_model"
TRUNCATION = 1024


def dialogue_question(prompt: str) -> str:
    """The human turn in the hh-rlhf format the reward models were trained on."""
    return "\n\nHuman: " + prompt + " \n\nAssistant:"


class PairRewardModel:
    """Raw score of a one-logit reward model on (dialogue question, stripped continuation) pairs.

    Args:
      model_id_or_path: hub id (from the local cache when offline) or a folder with weights and tokenizer.
      name: the reward's name in errors and pools.
      batch_size: pairs per forward pass.
      max_length: truncation length in tokens (the paper's 1024; lowered to the model's limit if smaller).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"`` (or a JAX dtype); scores are float32.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, *, name: str | None = None, batch_size: int = 16,
                 max_length: int = TRUNCATION, dtype: Any = "float32"):
        self.name = name or str(model_id_or_path)
        self.dtype = dtype_name(dtype, what=f"reward {self.name!r}: dtype", error=RewardError)
        if batch_size < 1:
            raise RewardError(f"reward {self.name!r}: batch_size must be positive, got {batch_size}")
        folder = batching.resolve_model_folder(self.name, model_id_or_path)
        self.model = batching.load_model(self.name, folder, resolve_dtype(self.dtype))
        if getattr(self.model.config, "num_labels", 0) != 1:
            raise RewardError(f"reward {self.name!r}: expected a reward model with one output, {folder} has "
                              f"{getattr(self.model.config, 'num_labels', 0)}")
        self.tokenizer = batching.load_tokenizer(self.name, folder)
        self.batch_size = batch_size
        self.max_length = batching.truncation_length(self.tokenizer, self.model, max_length)
        self.pad_id = pad_token_id(self.tokenizer, self.model)
        self._forward = batching.JittedForward(self.model, classifier_logits)

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        check_pairs(self.name, prompts, continuations)
        if not prompts:
            return np.zeros((0,), np.float32)
        questions = [dialogue_question(prompt) for prompt in prompts]
        answers = [continuation.strip() for continuation in continuations]
        token_ids = batching.tokenize(self.name, self.tokenizer, questions, self.max_length, pairs=answers)
        scores = batching.run_batched(token_ids, self._forward, batch_size=self.batch_size, cap=self.max_length,
                                      pad_id=self.pad_id).reshape(len(prompts), -1)[:, 0]
        return check_scores(self.name, scores, len(prompts))


def gpt2_helpful_reward(model: str | os.PathLike = HELPFUL_MODEL, *, batch_size: int = 16,
                        max_length: int = TRUNCATION, name: str = "gpt2-helpful", dtype: Any = "float32"
                        ) -> PairRewardModel:
    """``gpt2-helpful``: raw score of ``Ray2333/gpt2-large-helpful-reward_model``."""
    return PairRewardModel(model, name=name, batch_size=batch_size, max_length=max_length, dtype=dtype)


def gpt2_harmless_reward(model: str | os.PathLike = HARMLESS_MODEL, *, batch_size: int = 16,
                         max_length: int = TRUNCATION, name: str = "gpt2-harmless", dtype: Any = "float32"
                         ) -> PairRewardModel:
    """``gpt2-harmless``: raw score of ``Ray2333/gpt2-large-harmless-reward_model``."""
    return PairRewardModel(model, name=name, batch_size=batch_size, max_length=max_length, dtype=dtype)


register_reward_factory("gpt2-helpful", gpt2_helpful_reward)
register_reward_factory("gpt2-harmless", gpt2_harmless_reward)
