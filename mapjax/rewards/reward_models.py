"""Reward models as rewards.

``reward_model(path_or_id)`` (registered as ``reward_model``): any sequence-classifier reward model, scalar or
multi-objective. Modern reward models are ``*ForSequenceClassification`` heads (Llama, Qwen2, Mistral, Phi-3,
Gemma 2, DeBERTa-v2/v3, GPT-2, BERT family: whatever ``mapjax.models.from_pretrained`` loads) read as raw
scores. How a (prompt, response) pair is shown to the model is ``format``:

- ``"chat"`` (default): the conversation ``[system?, user: prompt, assistant: response]`` rendered by the
  tokenizer's chat template, as decoder reward models are trained and documented (the rendered text carries
  the template's own BOS, so the tokenizer adds no second one);
- ``"pair"``: ``tokenizer(prompt, response)``, the tokenizer's pair template (DeBERTa reward models);
- ``"full"``: prompt + response concatenated, one text.

A head with k outputs (a regression head naming each output in ``id2label``, or a names file) is a
multi-objective reward: :meth:`RewardModel.scores` returns all k columns from one forward pass and ``.names``
names them ``"<name>/<label>"``; a pool built with it gets k columns (``mapjax.build`` expands it).

The paper's preference reward models on a (question, answer) pair, ``gpt2-helpful`` and ``gpt2-harmless``
(:class:`PairRewardModel`, with their own hh-rlhf formatting). Both are GPT-2 large models with a one-logit score head (``Ray2333/gpt2-large-helpful-reward_model`` and
``Ray2333/gpt2-large-harmless-reward_model``), trained on Anthropic hh-rlhf dialogues. As the paper's code
does, each pair is presented in the training format

    question = "\\n\\nHuman: " + prompt + " \\n\\nAssistant:"      answer = continuation, stripped

and tokenized as a *pair* by the model's tokenizer (``tokenizer(question, answer, truncation=True)``: the two
are tokenized separately and joined, longest-first truncation to 1024 tokens). The score is the raw logit at
the last token. The authors scored one pair at a time; we batch with right padding and read the last real
token, which gives the same number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from mapjax.dtypes import dtype_name, resolve_dtype
from mapjax.models.padding import pad_token_id
from mapjax.rewards import batching
from mapjax.rewards.base import RewardError, check_pairs, register_reward_factory
from mapjax.rewards.classifier import classifier_logits
from mapjax.sharding import MeshLike, as_mesh, shard_model

__all__ = ["FORMATS", "PairRewardModel", "RewardModel", "chat_texts", "dialogue_question", "gpt2_harmless_reward",
           "gpt2_helpful_reward", "model_labels", "read_names", "reward_model"]

Format = Literal["chat", "pair", "full"]
FORMATS = ("chat", "pair", "full")


def chat_texts(tokenizer: Any, prompts: Sequence[str], continuations: Sequence[str], *,
               system_prompt: str | None = None, model_name: str | None = None) -> list[str]:
    """Each pair as the conversation ``[system?, user: prompt, assistant: continuation]`` rendered (untokenized)
    by the tokenizer's chat template. ``model_name`` names the model in the error raised when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise RewardError(f"the tokenizer of {model_name or type(tokenizer).__name__} has no chat template; score "
                          "with format='pair' (the tokenizer's pair template) or format='full' (prompt + response "
                          "as one text) instead")
    system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    texts = []
    for prompt, continuation in zip(prompts, continuations):
        messages = system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": continuation}]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as error:  # noqa: BLE001 - jinja raises many kinds (a template refusing a system turn)
            raise RewardError(f"the chat template of {model_name or type(tokenizer).__name__} failed on a "
                              f"{'system, ' if system else ''}user, assistant conversation: {error}") from None
        texts.append(str(text))
    return texts


def model_labels(model: Any) -> tuple[str, ...]:
    """The names of a classifier's outputs: its config's ``labels`` / ``id2label``, ``LABEL_i`` where unnamed."""
    config = model.config
    count = int(getattr(config, "num_labels", 0) or 0)
    labels = getattr(config, "labels", None)
    if isinstance(labels, tuple) and len(labels) == count:
        return tuple(str(label) for label in labels)
    names = {int(index): str(label) for index, label in dict(getattr(config, "id2label", None) or ()).items()}
    return tuple(names.get(index, f"LABEL_{index}") for index in range(count))


def read_names(reward_name: str, source: Sequence[str] | str | os.PathLike) -> tuple[str, ...]:
    """Output names from a list, or from a file: a JSON list of strings (``.json``) or one name per line."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise RewardError(f"reward {reward_name!r}: names file {path} does not exist (pass a list of names or "
                              "a file with one name per line or a JSON list)")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                names = json.loads(text)
            except json.JSONDecodeError as error:
                raise RewardError(f"reward {reward_name!r}: names file {path} is not valid JSON: {error}") from None
            if not isinstance(names, list):
                raise RewardError(f"reward {reward_name!r}: names file {path} must hold a JSON list of strings, "
                                  f"not a {type(names).__name__}")
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        where = f"names file {path}"
    else:
        names, where = list(source), "names"
    if not names or not all(isinstance(name, str) and name.strip() for name in names):
        raise RewardError(f"reward {reward_name!r}: {where} must be a non-empty list of non-empty strings, got "
                          f"{names!r}")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise RewardError(f"reward {reward_name!r}: {where} repeats {repeated}")
    return tuple(name.strip() for name in names)


class RewardModel:
    """Raw scores of a sequence-classifier reward model on (prompt, continuation) pairs, one or k per pair.

    Args:
      model_id_or_path: hub id (found in the local cache when offline) or a folder with ``config.json``,
        weights and tokenizer files.
      format: ``"chat"`` (the tokenizer's chat template, the default), ``"pair"`` or ``"full"``; see the module.
      outputs: which outputs to keep, by index or label (default: all, in order).
      names: a name per model output (overriding the config's ``id2label``): a list, or a file with one name
        per line or a JSON list (``.json``).
      name: the reward's name (default: the model id); with k > 1 outputs, column i is ``"<name>/<label i>"``.
      system_prompt: a system turn before each prompt (``format="chat"`` only).
      batch_size: pairs per forward pass.
      max_length: truncation length in tokens (default: the tokenizer's and the model's limit).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"`` (or a JAX dtype); scores are float32 either way.
      mesh: a device mesh (``"data=8"``, ``{"data": 2, "fsdp": 4}``, a ``Mesh``; see :mod:`mapjax.sharding`): the
        model is laid out on it (in place) and each batch's rows split over ``data`` x ``fsdp``; same scores.

    ``scores(prompts, continuations)`` is float32 ``[n, k]``; calling the reward gives ``[n]`` when k == 1.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, *, format: Format = "chat",
                 outputs: Sequence[int | str] | int | str | None = None,
                 names: Sequence[str] | str | os.PathLike | None = None, name: str | None = None,
                 system_prompt: str | None = None, batch_size: int = 16, max_length: int | None = None,
                 dtype: Any = "float32", mesh: MeshLike = None):
        self.name = name or str(model_id_or_path)
        self.dtype = dtype_name(dtype, what=f"reward {self.name!r}: dtype", error=RewardError)
        self.mesh = as_mesh(mesh)
        if format not in FORMATS:
            raise RewardError(f"reward {self.name!r}: format must be one of {FORMATS}, got {format!r}")
        if system_prompt is not None and format != "chat":
            raise RewardError(f"reward {self.name!r}: system_prompt applies to format='chat' only, not {format!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RewardError(f"reward {self.name!r}: batch_size must be a positive integer, got {batch_size!r}")
        override = None if names is None else read_names(self.name, names)   # a bad file fails before loading
        folder = batching.resolve_model_folder(self.name, model_id_or_path)
        self.model = batching.load_model(self.name, folder, resolve_dtype(self.dtype))
        if not type(self.model).__name__.endswith("ForSequenceClassification") or \
                not getattr(self.model.config, "num_labels", 0):
            raise RewardError(f"reward {self.name!r}: {type(self.model).__name__} in {folder} is not a sequence "
                              "classifier (a reward model is a *ForSequenceClassification checkpoint)")
        self.tokenizer = batching.load_tokenizer(self.name, folder)
        self.format, self.system_prompt, self.batch_size = format, system_prompt, batch_size
        if format == "chat" and not getattr(self.tokenizer, "chat_template", None):
            chat_texts(self.tokenizer, [], [], model_name=str(model_id_or_path))   # raises the no-template error
        labels = model_labels(self.model)
        if override is not None:
            if len(override) != len(labels):
                raise RewardError(f"reward {self.name!r}: {len(override)} names given for a model with "
                                  f"{len(labels)} outputs ({list(labels)})")
            labels = override
        self.labels = labels
        self.outputs = self._select(outputs, labels)
        selected = [labels[index] for index in self.outputs]
        self.names = (self.name,) if len(selected) == 1 else tuple(f"{self.name}/{label}" for label in selected)
        self.max_length = batching.truncation_length(self.tokenizer, self.model, max_length)
        self.pad_id = pad_token_id(self.tokenizer, self.model)
        self._forward = batching.JittedForward(shard_model(self.model, self.mesh), classifier_logits, mesh=self.mesh)

    def _select(self, outputs: Sequence[int | str] | int | str | None, labels: tuple[str, ...]) -> tuple[int, ...]:
        if outputs is None:
            return tuple(range(len(labels)))
        requested = [outputs] if isinstance(outputs, (int, str)) else list(outputs)
        if not requested:
            raise RewardError(f"reward {self.name!r}: outputs is empty; name at least one of {list(labels)}")
        indices = []
        for output in requested:
            if isinstance(output, str):
                if output not in labels:
                    raise RewardError(f"reward {self.name!r}: the model has no output {output!r}; outputs: "
                                      f"{list(labels)}")
                indices.append(labels.index(output))
            elif isinstance(output, (int, np.integer)) and not isinstance(output, bool) and \
                    0 <= int(output) < len(labels):
                indices.append(int(output))
            else:
                raise RewardError(f"reward {self.name!r}: output {output!r} is not a label or an index below "
                                  f"{len(labels)}; outputs: {list(labels)}")
        if len(set(indices)) != len(indices):
            raise RewardError(f"reward {self.name!r}: outputs {requested} select the same output twice")
        return tuple(indices)

    def token_ids(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[int]]:
        """Token ids of each pair as the model sees it (in ``format``), truncated, unpadded."""
        if self.format == "chat":
            rendered = chat_texts(self.tokenizer, prompts, continuations, system_prompt=self.system_prompt,
                                  model_name=self.name)
            return batching.tokenize(self.name, self.tokenizer, rendered, self.max_length, add_special_tokens=False)
        if self.format == "pair":
            return batching.tokenize(self.name, self.tokenizer, list(prompts), self.max_length,
                                     pairs=list(continuations))
        return batching.tokenize(self.name, self.tokenizer, batching.full_texts(prompts, continuations),
                                 self.max_length)

    def scores(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        """Float32 ``[n, k]``: the selected outputs for each pair, in the order of ``.names``; one batched pass."""
        check_pairs(self.name, prompts, continuations)
        if not prompts:
            return np.zeros((0, len(self.names)), np.float32)
        token_ids = self.token_ids(prompts, continuations)
        logits = batching.run_batched(token_ids, self._forward, batch_size=self.batch_size, cap=self.max_length,
                                      pad_id=self.pad_id).reshape(len(prompts), -1)
        scores = np.ascontiguousarray(logits[:, list(self.outputs)], dtype=np.float32)
        bad = ~np.isfinite(scores)
        if bad.any():
            row, column = map(int, np.argwhere(bad)[0])
            raise RewardError(f"reward {self.names[column]!r} gave {scores[row, column]} for pair {row}; scores "
                              "must be finite")
        return scores

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        if len(self.names) != 1:
            raise RewardError(f"reward {self.name!r} has {len(self.names)} outputs {list(self.names)}; call "
                              ".scores(prompts, continuations) for all of them as [n, k], or pick one with outputs=")
        return self.scores(prompts, continuations)[:, 0]


def reward_model(path: str | os.PathLike, *, format: Format = "chat",
                 outputs: Sequence[int | str] | int | str | None = None,
                 names: Sequence[str] | str | os.PathLike | None = None, name: str | None = None,
                 system_prompt: str | None = None, batch_size: int = 16, max_length: int | None = None,
                 dtype: Any = "float32", mesh: MeshLike = None) -> RewardModel:
    """A reward from any sequence-classifier reward model by folder or hub id; see :class:`RewardModel`.
    Registered as ``"reward_model"``: ``get_reward("reward_model", path=..., format="pair")``."""
    return RewardModel(path, format=format, outputs=outputs, names=names, name=name, system_prompt=system_prompt,
                       batch_size=batch_size, max_length=max_length, dtype=dtype, mesh=mesh)


register_reward_factory("reward_model", reward_model)


HELPFUL_MODEL = "Ray2333/gpt2-large-helpful-reward_model"
HARMLESS_MODEL = "Ray2333/gpt2-large-harmless-reward_model"
TRUNCATION = 1024


def dialogue_question(prompt: str) -> str:
    """The human turn in the hh-rlhf format the reward models were trained on."""
    return "\n\nHuman: " + prompt + " \n\nAssistant:"


class PairRewardModel(RewardModel):
    """Raw score of a one-logit reward model on (dialogue question, stripped continuation) pairs: a
    :class:`RewardModel` in ``"pair"`` format whose pairs are put in the hh-rlhf training format first.

    Args:
      model_id_or_path: hub id (from the local cache when offline) or a folder with weights and tokenizer.
      name: the reward's name in errors and pools.
      batch_size: pairs per forward pass.
      max_length: truncation length in tokens (the paper's 1024; lowered to the model's limit if smaller).
      dtype: parameter dtype, ``"float32"`` or ``"bfloat16"`` (or a JAX dtype); scores are float32.
      mesh: a device mesh (``"data=8"``, ``{"data": 2, "fsdp": 4}``, a ``Mesh``; see :mod:`mapjax.sharding`): the
        model is laid out on it (in place) and each batch's rows split over ``data`` x ``fsdp``; same scores.
    """

    def __init__(self, model_id_or_path: str | os.PathLike, *, name: str | None = None, batch_size: int = 16,
                 max_length: int = TRUNCATION, dtype: Any = "float32", mesh: MeshLike = None):
        super().__init__(model_id_or_path, format="pair", name=name, batch_size=batch_size, max_length=max_length,
                         dtype=dtype, mesh=mesh)
        if len(self.labels) != 1:
            raise RewardError(f"reward {self.name!r}: expected a reward model with one output, "
                              f"{model_id_or_path} has {len(self.labels)}")

    def token_ids(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[int]]:
        """``tokenizer(dialogue_question(prompt), continuation.strip())`` per pair, truncated, unpadded."""
        questions = [dialogue_question(prompt) for prompt in prompts]
        answers = [continuation.strip() for continuation in continuations]
        return batching.tokenize(self.name, self.tokenizer, questions, self.max_length, pairs=answers)


def gpt2_helpful_reward(model: str | os.PathLike = HELPFUL_MODEL, *, batch_size: int = 16,
                        max_length: int = TRUNCATION, name: str = "gpt2-helpful", dtype: Any = "float32",
                        mesh: MeshLike = None) -> PairRewardModel:
    """``gpt2-helpful``: raw score of ``Ray2333/gpt2-large-helpful-reward_model``."""
    return PairRewardModel(model, name=name, batch_size=batch_size, max_length=max_length, dtype=dtype, mesh=mesh)


def gpt2_harmless_reward(model: str | os.PathLike = HARMLESS_MODEL, *, batch_size: int = 16,
                         max_length: int = TRUNCATION, name: str = "gpt2-harmless", dtype: Any = "float32",
                         mesh: MeshLike = None) -> PairRewardModel:
    """``gpt2-harmless``: raw score of ``Ray2333/gpt2-large-harmless-reward_model``."""
    return PairRewardModel(model, name=name, batch_size=batch_size, max_length=max_length, dtype=dtype, mesh=mesh)


register_reward_factory("gpt2-helpful", gpt2_helpful_reward)
register_reward_factory("gpt2-harmless", gpt2_harmless_reward)
