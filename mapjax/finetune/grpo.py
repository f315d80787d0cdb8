"""GRPO's pieces as pure functions: group-relative advantages, the clipped ratio objective, KL to the base model.

Online MAP-F maximises ``E_{y~p}[λᵀr(x, y)] − β KL(p(·|x) || p0(·|x))`` per prompt; its maximiser is
``p0 exp(λᵀr / β) / Z``, so ``β = 1`` makes it MAP's aligned model p_λ (Theorem 1 and 2). GRPO estimates the
policy gradient from G samples of each prompt:

- **advantages** (:func:`group_advantages`): ``A_i = R_i − mean_{j≠i} R_j`` over the prompt's G samples, the
  leave-one-out mean: a baseline independent of sample i, so the expected gradient (and the optimum) is that of
  ``E[λᵀr]``. GRPO's plain group mean includes sample i itself and shrinks the reward's gradient by
  ``(G − 1) / G`` against the KL term (optimum ``p0 exp((G − 1)/G · λᵀr)``: 6% short of λ at G = 16);
  ``leave_one_out=False`` gives it. DeepSeekMath's GRPO also divides by the group's standard deviation
  (``scale=True``); that rescales each prompt's reward by its own spread, so the optimum becomes
  ``p0 exp(λᵀr / (β σ_x))``, no longer p_λ: off by default here.
- **objective** (:func:`clipped_objective`): PPO's ``−min(ρ A, clip(ρ, 1 ± ε) A)`` per token with
  ``ρ = π_θ(y_t|·) / π_old(y_t|·)``; at ρ = 1 (the first pass over fresh samples) its gradient is ``−A ∇log π``.
- **KL to the frozen base** (``kl_estimator``):

  * ``"k1"`` (default): the sequence's log-ratio ``Σ_t (log π_old(y_t) − log p0(y_t))`` times β is taken off its
    reward before the group advantage (RLOO's KL in the reward; PPO's penalty, summed). Unbiased: the gradient
    of the sequence-level KL is ``E[(log π(y) − log p0(y)) ∇log π(y)]``. And at the optimum
    ``λᵀr − β log(π/p0) = β log Z(x)`` is the same for every sample of a prompt, so the advantages, and with them
    the gradient's noise, vanish there: the estimator that settles closest to p_λ at a given budget.
  * ``"full"``: the exact token-level KL over the whole vocabulary, ``Σ_v π(v) (log π(v) − log p0(v))``,
    at every generated position, in the loss, plus its *KL-to-go* in the advantage: the sequence-level
    ``KL(π || p0) = E_y Σ_t KL_t(s_t)`` has gradient ``E Σ_t [∇KL_t(s_t) + ∇log π(y_t|s_t) Σ_{t'>t} KL_t'(s_t')]``
    (later states depend on earlier tokens), so ``A_it = A_i − β Σ_{t'>t} KL_it'`` (:func:`token_advantages`)
    makes the whole gradient that of the sequence-level objective, and β = 1 targets p_λ exactly.
  * ``"k3"``: DeepSeekMath's per-token estimator ``exp(l0 − l) − (l0 − l) − 1`` of the sampled token
    (:func:`k3`). Cheap (no base-model logits over the vocabulary in the update), but its expected gradient is
    that of KL(p0 || π), the reverse direction, so its optimum is not p_λ; offered for comparison with the
    usual recipe.

- **aggregation** (:func:`loss_weights`): ``"token"`` divides the sum over every generated token of the batch by
  their count (a positive constant per batch: the gradient's direction is the sequence-level one);
  ``"sequence"`` averages each sequence's tokens, then the sequences (GRPO's original form, which weighs a
  token of a short answer more than one of a long answer).

Shapes: per-token arrays are ``[rows, positions]`` aligned with the *targets* of a right-padded batch (position
``t`` holds the log-probability of token ``t + 1``), ``mask`` is 1 on generated tokens. All arithmetic is float32.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from mapjax.errors import FinetuneError

Aggregation = Literal["token", "sequence"]
KL_ESTIMATORS = ("full", "k1", "k3")


def group_advantages(rewards: np.ndarray | jax.Array, *, leave_one_out: bool = True, scale: bool = False,
                     eps: float = 1e-6) -> np.ndarray:
    """Each sample's reward against its group: ``R_i − mean_{j≠i} R_j`` (``leave_one_out``, the default) or
    ``R_i − mean_j R_j``, then divided by the group's standard deviation + ``eps`` with ``scale``.

    ``rewards`` is ``[prompts, G]`` (one row per prompt, its G samples); float64 numpy in, float64 out. The
    leave-one-out mean equals ``G / (G − 1) · (R_i − mean_j R_j)``: the plain group mean contains the sample's own
    reward, which shrinks the reward's share of the expected gradient by ``(G − 1) / G`` against the KL term (the
    optimum becomes ``p0 exp((G − 1) / G · λᵀr)``); leaving it out (RLOO's baseline) keeps the gradient unbiased.
    The standard deviation is the population one (``ddof=0``), as in DeepSeekMath; a group whose samples all
    score alike gets advantage 0 either way.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise FinetuneError(f"group advantages need rewards [prompts, G] with G >= 2 samples per prompt, got "
                            f"shape {rewards.shape}")
    group = rewards.shape[1]
    centred = rewards - rewards.mean(axis=1, keepdims=True)
    if leave_one_out:
        centred = centred * (group / (group - 1))
    if scale:
        spread = rewards.std(axis=1, keepdims=True)
        centred = np.where(spread > 0, centred / np.where(spread > 0, spread + eps, 1.0), 0.0)
    return centred


def kl_to_go(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """``Σ_{t' > t} mask_t' kl_t'`` per position (the KL of the tokens after ``t``), ``[rows, positions]``."""
    kl = kl * mask
    inclusive = jnp.cumsum(kl[:, ::-1], axis=1)[:, ::-1]
    return inclusive - kl


def token_advantages(sequence_advantages: jax.Array, mask: jax.Array, kl: jax.Array | None = None,
                     kl_coef: float | jax.Array = 0.0) -> jax.Array:
    """Per-token advantages: each sequence's advantage on its generated tokens, minus ``kl_coef`` times the
    KL-to-go (:func:`kl_to_go` of the exact token KL of the sampling policy) when ``kl`` is given."""
    advantages = sequence_advantages[:, None] * mask
    if kl is not None:
        advantages = advantages - kl_coef * kl_to_go(kl, mask) * mask
    return advantages


def k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """DeepSeekMath's per-token KL estimate ``exp(l0 − l) − (l0 − l) − 1`` (>= 0; its mean under π is
    KL(π || p0) of that position)."""
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0


def exact_kl(log_probs: jax.Array, ref_log_probs: jax.Array) -> jax.Array:
    """``Σ_v π(v) (log π(v) − log p0(v))`` over the last axis (log-softmaxed logits of policy and base)."""
    return jnp.sum(jnp.exp(log_probs) * (log_probs - ref_log_probs), axis=-1)


def clipped_objective(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_range: float
                      ) -> tuple[jax.Array, jax.Array]:
    """``(−min(ρ A, clip(ρ, 1 − ε, 1 + ε) A), clipped)`` per token, ``ρ = exp(logp − old_logp)``; ``clipped``
    is 1.0 where the clipped term was the smaller one (the token's gradient is cut)."""
    ratio = jnp.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return jnp.maximum(unclipped, clipped), (clipped > unclipped).astype(jnp.float32)


def loss_weights(mask: np.ndarray, aggregation: Aggregation = "token") -> np.ndarray:
    """The weight of each token in a (mini-)batch's loss, so that the loss is ``Σ weight · per-token loss``:
    ``mask / Σ mask`` (``"token"``) or ``mask / (len_i · rows)`` (``"sequence"``). numpy float32."""
    mask = np.asarray(mask, np.float32)
    if aggregation == "token":
        return mask / max(float(mask.sum()), 1.0)
    if aggregation == "sequence":
        lengths = mask.sum(axis=-1, keepdims=True)
        rows = max(int((lengths > 0).sum()), 1)
        return np.where(lengths > 0, mask / np.maximum(lengths, 1.0), 0.0).astype(np.float32) / rows
    raise FinetuneError(f"loss aggregation must be 'token' or 'sequence', got {aggregation!r}")


def grpo_token_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, kl: jax.Array,
                    kl_coef: float | jax.Array, clip_range: float) -> tuple[jax.Array, jax.Array]:
    """GRPO's per-token loss ``clipped objective + kl_coef · kl`` (``kl`` from :func:`exact_kl` or :func:`k3`
    at the current parameters) and the clipped indicator."""
    objective, clipped = clipped_objective(logp, old_logp, advantages, clip_range)
    return objective + kl_coef * kl, clipped
