"""Reward-weighted likelihood: the loss that projects p_λ ∝ p0 exp(λᵀr) onto the model.

For a prompt's k samples from p0 the weights w = softmax(λᵀr) are p_λ's self-normalised importance weights, so
minimising ``-Σ_i w_i log p_θ(y_i | x_i)`` over the pool minimises KL(p_λ || p_θ) on those samples. The loss
here is token-level: ``Σ_i w_i Σ_t m_it (-log p_θ(y_it | ...)) / Σ_i w_i Σ_t m_it`` (``normalize="token"``) or
per sequence, ``... / Σ_i w_i`` (``normalize="sequence"``, the exact projection objective); ``m`` masks prompt
tokens and padding out. An optional penalty adds ``kl_coef`` times the mean over continuation tokens of
KL(p_θ(·|prefix) || p0(·|prefix)) over the whole vocabulary.

All arithmetic of the loss is float32 whatever the model's compute dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.errors import FinetuneError
from mapjax.models.base import CausalLM

Apply = Callable[[Any, jax.Array, jax.Array], jax.Array]


def target_logprobs(logits: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(log p(ids[:, t+1] | ids[:, :t+1]) [rows, seq-1], log_softmax(logits[:, :-1]) [rows, seq-1, vocab])``."""
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)[..., 0]
    return picked, log_probs


def denominators(batch: dict[str, jax.Array], normalize: str) -> tuple[jax.Array, jax.Array]:
    """``(loss denominator, KL denominator)`` over a whole (accumulated) batch; data only, no parameters."""
    mask = batch["loss_mask"][..., 1:]
    weight = batch["weight"]
    if normalize == "token":
        den = jnp.sum(weight[..., None] * mask)
    elif normalize == "sequence":
        den = jnp.sum(weight * (jnp.sum(mask, axis=-1) > 0))
    else:
        raise FinetuneError(f"normalize must be 'token' or 'sequence', got {normalize!r}")
    return jnp.maximum(den, 1e-30), jnp.maximum(jnp.sum(mask), 1.0)


def micro_loss(apply: Apply, params: Any, reference_params: Any, micro: dict[str, jax.Array], den: jax.Array,
               kl_den: jax.Array, kl_coef: float) -> jax.Array:
    """One micro-batch's share of the loss (its numerator over the whole batch's denominators)."""
    ids, mask = micro["ids"], micro["loss_mask"][:, 1:]
    logits = apply(params, ids, micro["attention"])
    picked, log_probs = target_logprobs(logits, ids)
    loss = -jnp.sum(micro["weight"][:, None] * mask * picked) / den
    if kl_coef:
        reference = jax.lax.stop_gradient(apply(reference_params, ids, micro["attention"]))
        _, reference_log_probs = target_logprobs(reference, ids)
        kl = jnp.sum(jnp.exp(log_probs) * (log_probs - reference_log_probs), axis=-1)
        loss = loss + kl_coef * jnp.sum(mask * kl) / kl_den
    return loss


def batch_loss(apply: Apply, params: Any, reference_params: Any, batch: dict[str, jax.Array], *,
               normalize: str = "token", kl_coef: float = 0.0) -> jax.Array:
    """The loss of a batch ``[accum, micro, ...]`` (the sum of its micro-batches' shares)."""
    den, kl_den = denominators(batch, normalize)
    total = 0.0
    for index in range(batch["ids"].shape[0]):
        micro = {key: value[index] for key, value in batch.items()}
        total = total + micro_loss(apply, params, reference_params, micro, den, kl_den, kl_coef)
    return total


def weighted_loss(model: CausalLM, batch: dict[str, np.ndarray], *, normalize: str = "token",
                  kl_coef: float = 0.0, reference_model: CausalLM | None = None) -> float:
    """The weighted loss of ``model`` on a batch from ``mapjax.finetune.examples.weighted_batch`` (eager, for
    checking and evaluation)."""
    from flax import nnx

    batch = {key: jnp.asarray(value) for key, value in batch.items()}
    graphdef, state = nnx.split(model)
    reference = None
    if reference_model is not None:
        reference_graphdef, reference = nnx.split(reference_model)
        if reference_graphdef != graphdef:
            raise FinetuneError("reference_model must have the same architecture as model")
    return float(_weighted_loss_jit(graphdef, state, reference, batch, normalize, float(kl_coef)))


def _weighted_loss(graphdef, state, reference, batch, normalize, kl_coef):
    from flax import nnx

    def apply(params, ids, attention):
        return nnx.merge(graphdef, params)(ids, attention).logits.astype(jnp.float32)

    return batch_loss(apply, state, reference, batch, normalize=normalize, kl_coef=kl_coef)


_weighted_loss_jit = jax.jit(_weighted_loss, static_argnames=("graphdef", "normalize", "kl_coef"))
