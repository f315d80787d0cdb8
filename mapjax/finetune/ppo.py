"""PPO as the paper ran it (TRL's PPOTrainer), as pure functions and a value head.

Per sampled continuation the reward of token ``t`` is ``−β kl_t`` and, on its last token, the sequence's score
``λᵀr`` (:func:`token_rewards`); ``kl_t = log π_old(y_t) − log p0(y_t)`` (TRL's ``"kl"``, here ``"k1"``) or the
exact KL over the vocabulary at that position (TRL's ``"full"``). With β = 1 the return of a sequence is
``λᵀr − (log π(y) − log p0(y))``, whose expectation is the KL-regularised objective maximised by p_λ, so PPO
with β = 1 targets MAP's aligned model (Theorem 2); TRL's default β = 0.2 with the adaptive controller
(:func:`adaptive_kl_update`, Ziegler et al. 2019) targets ``p0 exp(λᵀr / β)`` for whatever β it settles at.

- :func:`gae`: generalised advantage estimation with γ and λ_GAE over the generated tokens, returns
  ``advantages + values`` (the value targets), both before whitening.
- :func:`whiten`: masked whitening of the advantages over the whole batch (mean 0, variance 1, Bessel-corrected
  as TRL does). A batch-wide shift is a constant baseline and a positive scale keeps the gradient's direction,
  so whitening changes step sizes, not the optimum.
- :func:`policy_loss` / :func:`value_loss`: the clipped surrogate and the clipped value loss
  ``0.5 max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)``; total ``policy + vf_coef · value``.
- :class:`ValueHead`: a linear head on the policy's final hidden state (the input of its output head), shared
  trunk as in TRL's ``AutoModelForCausalLMWithValueHead`` (without its dropout: every step is deterministic).
  :func:`hidden_and_logits` reads that hidden state from any mapjax decoder.

Per-token arrays are ``[rows, positions]`` aligned with the targets of a right-padded batch (position ``t`` holds
token ``t + 1``); ``mask`` is 1 on generated tokens. All arithmetic is float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mapjax.finetune.grpo import clipped_objective

KL_ESTIMATORS = ("k1", "full")


class ValueHead(nnx.Module):
    """``V(s_t) = w · h_t + b`` on the policy's final hidden state ``h_t`` (float32; zero-initialised, so every
    value starts at 0 and the first advantages are the plain rewards-to-go)."""

    def __init__(self, features: int):
        self.weight = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((), jnp.float32))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        return jnp.einsum("...d,d->...", hidden.astype(jnp.float32), self.weight.get_value()) + self.bias.get_value()


def _output_embedding(model: Any) -> Any:
    """The tied input embedding a model without ``lm_head`` computes its logits with."""
    from mapjax.models.layers import Embedding

    vocab = getattr(model.config, "vocab_size", None)
    tables = [module for _, module in nnx.iter_graph(model)
              if isinstance(module, Embedding) and module.num_embeddings == vocab]
    if len(tables) != 1:
        from mapjax.errors import FinetuneError

        raise FinetuneError(f"{type(model).__name__}: cannot find its output head (no lm_head and {len(tables)} "
                            f"embedding tables of the vocabulary size {vocab}); PPO's value head needs the final "
                            "hidden state")
    return tables[0]


def hidden_and_logits(model: Any, ids: jax.Array, attention: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(final hidden state [rows, seq, d], float32 logits [rows, seq, vocab])`` of one forward pass.

    Models with ``hidden_states`` / ``logits_from_hidden`` (the Llama family) are called through them. The
    others (GPT-2, OPT) compute ``logits = head(hidden)`` with an ``lm_head`` or their tied embedding's
    ``attend``; the head is wrapped, on this (merged, call-local) copy of the model only, to keep its input.
    Call it on a model from ``nnx.merge`` inside a traced function, never on a model you keep.
    """
    if callable(getattr(model, "hidden_states", None)) and callable(getattr(model, "logits_from_hidden", None)):
        hidden, _ = model.hidden_states(ids, attention)
        return hidden, model.logits_from_hidden(hidden).astype(jnp.float32)
    kept: list[jax.Array] = []
    head = getattr(model, "lm_head", None)
    if head is not None:
        def tapped_head(x, **options):
            kept.append(x)
            return head(x, **options)

        object.__setattr__(model, "lm_head", tapped_head)
    else:
        table = _output_embedding(model)
        attend = table.attend

        def tapped_attend(x):
            kept.append(x)
            return attend(x)

        object.__setattr__(table, "attend", tapped_attend)
    logits = model(ids, attention).logits.astype(jnp.float32)
    return kept[-1], logits


def token_rewards(scores: jax.Array, kl: jax.Array, mask: jax.Array, kl_coef: float | jax.Array) -> jax.Array:
    """``−kl_coef · kl_t`` on every generated token plus the sequence's score on its last one (TRL's
    ``compute_rewards``)."""
    positions = jnp.arange(mask.shape[1])
    last = jnp.max(jnp.where(mask > 0, positions[None, :], -1), axis=1)
    at_last = (positions[None, :] == last[:, None]).astype(jnp.float32)
    return (-kl_coef * kl + scores[:, None] * at_last) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float, lam: float
        ) -> tuple[jax.Array, jax.Array]:
    """``(advantages, returns)`` by generalised advantage estimation over each row's generated tokens.

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γ λ A_{t+1}``, with ``V`` and ``A`` past the last generated
    token taken as 0 (the sequence ends there); ``returns = A + V``. Positions outside ``mask`` come out 0.
    """
    rewards, values, mask = (jnp.asarray(a, jnp.float32) for a in (rewards, values, mask))
    values = values * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def backwards(carry, column):
        delta, keep = column
        advantage = delta + gamma * lam * carry * keep
        return advantage, advantage

    _, advantages = jax.lax.scan(backwards, jnp.zeros(rewards.shape[0], jnp.float32),
                                 (deltas.T, next_mask.T), reverse=True)
    advantages = advantages.T * mask
    return advantages, (advantages + values) * mask


def whiten(values: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """Masked whitening over every generated token of the batch (TRL's ``masked_whiten``: Bessel-corrected
    variance); positions outside ``mask`` come out 0."""
    mask = jnp.asarray(mask, jnp.float32)
    count = jnp.maximum(jnp.sum(mask), 1.0)
    mean = jnp.sum(values * mask) / count
    variance = jnp.sum(jnp.square(values - mean) * mask) / count
    variance = variance * count / jnp.maximum(count - 1.0, 1.0)
    whitened = (values - mean) * jax.lax.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_range: float
                ) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped surrogate per token and where it was clipped (:func:`mapjax.finetune.grpo.clipped_objective`)."""
    return clipped_objective(logp, old_logp, advantages, clip_range)


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, clip_range_value: float
               ) -> tuple[jax.Array, jax.Array]:
    """``(0.5 · max((V − R)², (V_clip − R)²), clipped)`` per token, ``V_clip = V_old + clip(V − V_old, ±ε_v)``."""
    clipped_values = old_values + jnp.clip(values - old_values, -clip_range_value, clip_range_value)
    plain = jnp.square(values - returns)
    cut = jnp.square(clipped_values - returns)
    return 0.5 * jnp.maximum(plain, cut), (cut > plain).astype(jnp.float32)


def adaptive_kl_update(coef: float, current_kl: float, target: float, horizon: float, n_steps: int) -> float:
    """Ziegler et al.'s proportional controller (TRL's ``AdaptiveKLController``): the coefficient times
    ``1 + clip(KL / target − 1, −0.2, 0.2) · n_steps / horizon``. Plain Python floats: the value is kept in the
    checkpoint exactly."""
    error = min(max(float(current_kl) / float(target) - 1.0, -0.2), 0.2)
    return float(coef) * (1.0 + error * int(n_steps) / float(horizon))
