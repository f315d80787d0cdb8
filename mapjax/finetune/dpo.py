"""DPO on λᵀr pairs: for each prompt the highest-λᵀr sample is preferred to the lowest.

``loss = -mean_pairs log σ(β [(log π(y_c|x) - log π0(y_c|x)) - (log π(y_r|x) - log π0(y_r|x))])`` with sequence
log-probabilities summed over continuation tokens and π0 the frozen base model (its log-probabilities are
computed once, before training).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.finetune.weighted import Apply, target_logprobs
from mapjax.models.base import CausalLM


def sequence_logps(apply: Apply, params: Any, ids: jax.Array, attention: jax.Array, loss_mask: jax.Array
                   ) -> jax.Array:
    """Sum of continuation-token log-probs per row; leading axes of ``ids`` beyond [rows, seq] are kept."""
    shape = ids.shape
    flat = lambda array: array.reshape((-1, shape[-1]))  # noqa: E731
    logits = apply(params, flat(ids), flat(attention))
    picked, _ = target_logprobs(logits, flat(ids))
    return jnp.sum(picked * flat(loss_mask)[:, 1:], axis=-1).reshape(shape[:-1])


def micro_loss(apply: Apply, params: Any, micro: dict[str, jax.Array], den: jax.Array, beta: float) -> jax.Array:
    logps = sequence_logps(apply, params, micro["ids"], micro["attention"], micro["loss_mask"])   # [micro, 2]
    margin = (logps[:, 0] - logps[:, 1]) - (micro["ref_logp"][:, 0] - micro["ref_logp"][:, 1])
    return -jnp.sum(micro["weight"] * jax.nn.log_sigmoid(beta * margin)) / den


def denominator(batch: dict[str, jax.Array]) -> jax.Array:
    return jnp.maximum(jnp.sum(batch["weight"]), 1e-30)


def dpo_loss(model: CausalLM, batch: dict[str, np.ndarray], *, beta: float = 0.1) -> float:
    """The DPO loss of ``model`` on a batch from ``mapjax.finetune.examples.dpo_batch`` (eager, for checking)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return float(_dpo_loss_jit(graphdef, state, {key: jnp.asarray(value) for key, value in batch.items()},
                               float(beta)))


def _dpo_loss(graphdef, state, batch, beta):
    from flax import nnx

    def apply(params, ids, attention):
        return nnx.merge(graphdef, params)(ids, attention).logits.astype(jnp.float32)

    den = denominator(batch)
    total = 0.0
    for index in range(batch["ids"].shape[0]):
        total = total + micro_loss(apply, state, {k: v[index] for k, v in batch.items()}, den, beta)
    return total


_dpo_loss_jit = jax.jit(_dpo_loss, static_argnames=("graphdef", "beta"))
