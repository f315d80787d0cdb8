"""The ``perplexity`` reward: −log perplexity of the full text under the generating model.

As in the paper's code, the full text (prompt + continuation) is encoded with the tokenizer's special tokens
(e.g. BOS), cut to the model's positions, and scored with the model's own next-token loss: the reward is the
mean log-probability of every token after the first, i.e. −mean NLL = −log PPL (higher is better). A text
that encodes to a single token has nothing to predict; it is scored after a prepended BOS token instead.
The log-softmax is taken in float32 whatever the model's parameter dtype, and the scores are float32.
With ``mesh=`` the texts are scored by ``token_logprobs`` on that device mesh (rows split over ``data`` x
``fsdp``, the policy's weights laid out by their logical axes, the policy itself left where it is).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from mapjax.dtypes import dtype_name, resolve_dtype
from mapjax.models.base import CausalLM
from mapjax.rewards.base import RewardError, check_pairs, check_scores, register_reward_factory
from mapjax.sharding import MeshLike, as_mesh, shard_model


class PerplexityReward:
    """``reward(prompts, continuations)`` = −mean token NLL of ``prompt + continuation`` under ``model``."""

    name = "perplexity"

    def __init__(self, model: CausalLM, tokenizer: Any, *, batch_size: int = 16, mesh: MeshLike = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.mesh = as_mesh(mesh)

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        from mapjax.generate import bos_token_id, token_logprobs

        check_pairs(self.name, prompts, continuations)
        if not len(prompts):
            return np.zeros((0,), np.float32)
        texts = [prompt + continuation for prompt, continuation in zip(prompts, continuations)]
        encoded = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        limit = self.model.max_positions
        bos = bos_token_id(self.tokenizer, self.model)
        sequences = []
        for index, ids in enumerate(encoded):
            ids = [int(t) for t in ids]
            ids = ids[:limit]   # the reference truncates at the model length, keeping the start
            if len(ids) < 2:
                if bos is None:
                    raise RewardError(f"reward 'perplexity': pair {index} encodes to {len(ids)} token(s) and the "
                                      "tokenizer has no BOS token to condition on")
                ids = [bos] + ids
            sequences.append(ids)
        per_token = token_logprobs(self.model, sequences, batch_size=self.batch_size, mesh=self.mesh)
        scores = np.array([values.astype(np.float64).mean() for values in per_token], np.float32)
        return check_scores(self.name, scores, len(prompts))


def make_perplexity_reward(model: CausalLM | None = None, tokenizer: Any = None, *,
                           model_path: str | os.PathLike | None = None, batch_size: int = 16,
                           dtype: Any = "float32", mesh: MeshLike = None) -> PerplexityReward:
    """Factory for ``get_reward("perplexity", ...)``: pass the generating ``model`` and ``tokenizer``, or
    ``model_path`` (a ``.gguf`` file, an HF folder or a cached hub id), loaded with parameters in ``dtype``
    (``"float32"`` or ``"bfloat16"``; a ``model`` passed in is used in its own dtype). ``mesh``: score on that
    device mesh (see :class:`PerplexityReward`)."""
    name = dtype_name(dtype, what="reward 'perplexity': dtype", error=RewardError)
    mesh = as_mesh(mesh)
    if model is None and model_path is None:
        raise RewardError("reward 'perplexity' scores under the generating model: pass model= and tokenizer=, "
                          "or model_path=")
    if model is None:
        from mapjax.generate import load_policy

        model, loaded_tokenizer = load_policy(model_path, resolve_dtype(name))
        shard_model(model, mesh)   # loaded here, so laid out here: no single-device copy stays behind
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise RewardError("reward 'perplexity': model= was given without tokenizer=")
    return PerplexityReward(model, tokenizer, batch_size=batch_size, mesh=mesh)


register_reward_factory("perplexity", make_perplexity_reward)
