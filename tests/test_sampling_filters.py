"""Nucleus sampling with the top-k pre-cut against the full sort of the vocabulary.

Oracle: the full-sort implementation the pre-cut replaced (``argsort`` of the whole vocabulary, transformers'
TopPLogitsWarper rule via ``top_p_filter``, one ``jax.random.categorical`` draw per row), written out below, and
the nucleus distribution computed in float64 NumPy for the frequency checks. Peaked logits keep the nucleus
inside the pre-cut; flat logits push it out, so the fallback branch runs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.sampling import filters
from mapjax.sampling.filters import SamplingSettings, choose_tokens, nucleus_pre_cut_suffices, top_p_filter

VOCAB = 4096
ROWS = 16
TOP_PS = (0.1, 0.9, 0.999)
# Jitted once per settings: eager dispatch compiles every primitive on its own, which is slow on two cores.
choose = jax.jit(choose_tokens, static_argnums=2)


def settings(top_p: float = 1.0, top_k: int | None = None, temperature: float = 1.0) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=1, top_k=top_k, top_p=top_p, temperature=temperature, greedy=False,
                            eos_token_ids=(), pad_token_id=0)


def row_keys(rows: int, seed: int = 0) -> jax.Array:
    return jax.vmap(lambda row: jax.random.fold_in(jax.random.PRNGKey(seed), row))(jnp.arange(rows))


@functools.partial(jax.jit, static_argnums=2)
def full_sort_tokens(logits: jax.Array, keys: jax.Array, chosen: SamplingSettings) -> jax.Array:
    """The implementation before the pre-cut: sort the whole vocabulary (or top-k), filter, draw."""
    scaled = logits / chosen.temperature
    if chosen.top_k is not None:
        candidates, candidate_ids = jax.lax.top_k(scaled, chosen.top_k)
    else:
        candidate_ids = jnp.argsort(-scaled, axis=-1)
        candidates = jnp.take_along_axis(scaled, candidate_ids, axis=-1)
    if chosen.top_p < 1.0:
        candidates = top_p_filter(candidates, chosen.top_p)
    picked = jax.vmap(jax.random.categorical)(keys, candidates)
    return jnp.take_along_axis(candidate_ids, picked[:, None], axis=-1)[:, 0].astype(jnp.int32)


def peaked_logits(rows: int, vocab: int, seed: int = 1) -> jax.Array:
    """A few dozen likely tokens per row over a noisy floor, like a trained model's next-token logits."""
    base = 2.0 * jax.random.normal(jax.random.PRNGKey(seed), (rows, vocab))
    boosted = jax.random.randint(jax.random.PRNGKey(seed + 1), (rows, 40), 0, vocab)
    return base.at[jnp.arange(rows)[:, None], boosted].add(jnp.linspace(14.0, 8.0, 40))


def flat_logits(rows: int, vocab: int, seed: int = 3) -> jax.Array:
    return 0.05 * jax.random.normal(jax.random.PRNGKey(seed), (rows, vocab))


def reference_kept_ids(logits: np.ndarray, top_p: float) -> list[set[int]]:
    """Transformers' rule in float64: keep a token when the mass strictly above it is below top_p."""
    kept = []
    for row in np.asarray(logits, np.float64):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        mass_above = np.cumsum(probs) - probs
        kept.append(set(order[mass_above < top_p].tolist()))
    return kept


def kept_ids(logits: jax.Array, top_p: float, pre_cut: int) -> list[set[int]]:
    """The kept set as the pre-cut computes it (its first ``pre_cut`` candidates only)."""
    candidates, candidate_ids = jax.lax.top_k(logits, pre_cut)
    log_normaliser = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    keep = filters._nucleus_keep(filters._inclusive_mass(candidates, log_normaliser, pre_cut), top_p)
    return [set(np.asarray(ids)[np.asarray(mask)].tolist()) for ids, mask in zip(candidate_ids, keep)]


@pytest.mark.parametrize("top_p", TOP_PS)
def test_pre_cut_keeps_the_full_sorts_nucleus(top_p):
    logits = peaked_logits(ROWS, VOCAB)
    assert bool(jnp.all(nucleus_pre_cut_suffices(logits, top_p)))
    assert kept_ids(logits, top_p, filters.NUCLEUS_PRE_CUT) == reference_kept_ids(logits, top_p)


@pytest.mark.parametrize("shape", ["peaked", "flat"])
@pytest.mark.parametrize("top_p", TOP_PS)
def test_tokens_match_the_full_sort_for_the_same_keys(shape, top_p):
    logits = peaked_logits(ROWS, VOCAB) if shape == "peaked" else flat_logits(ROWS, VOCAB)
    # Peaked rows fit the pre-cut, flat ones take the fallback: both must give the full sort's tokens.
    assert bool(jnp.all(nucleus_pre_cut_suffices(logits, top_p))) == (shape == "peaked")
    for seed in range(3):
        keys = row_keys(ROWS, seed)
        expected = full_sort_tokens(logits, keys, settings(top_p))
        np.testing.assert_array_equal(choose(logits, keys, settings(top_p)), expected)


def test_flat_logits_need_the_fallback_and_peaked_ones_do_not():
    suffices = nucleus_pre_cut_suffices(jnp.concatenate([peaked_logits(4, VOCAB), flat_logits(4, VOCAB)]), 0.9)
    assert np.asarray(suffices).tolist() == [True] * 4 + [False] * 4
    # A tiny nucleus fits even flat logits' pre-cut, and a pre-cut covering the vocabulary always suffices.
    assert bool(jnp.all(nucleus_pre_cut_suffices(flat_logits(4, VOCAB), 0.01)))
    assert bool(jnp.all(nucleus_pre_cut_suffices(flat_logits(4, VOCAB), 0.999, pre_cut=VOCAB)))


@pytest.mark.slow
def test_fallback_branch_runs_when_one_row_needs_it(monkeypatch):
    """The branch is per batch: a flat row drags peaked rows into the full sort, with the same tokens."""
    taken = []
    original_cond = jax.lax.cond

    def recording_cond(predicate, on_true, on_false, *operands):
        taken.append(bool(predicate))
        return original_cond(predicate, on_true, on_false, *operands)

    monkeypatch.setattr(filters.jax.lax, "cond", recording_cond)
    monkeypatch.setattr(filters, "NUCLEUS_PRE_CUT", 64)
    peaked, keys = peaked_logits(4, 512), row_keys(5)
    alone = choose_tokens(peaked, keys[:4], settings(0.9))
    mixed = choose_tokens(jnp.concatenate([peaked, flat_logits(1, 512)]), keys, settings(0.9))
    assert taken == [True, False]
    np.testing.assert_array_equal(mixed[:4], alone)


def test_both_branches_draw_the_same_tokens():
    logits, keys = peaked_logits(ROWS, VOCAB), row_keys(ROWS)
    nucleus_tokens = jax.jit(filters._nucleus_tokens, static_argnums=(2, 3))
    pre_cut = nucleus_tokens(logits, keys, 0.9, 256)
    full = nucleus_tokens(logits, keys, 0.9, VOCAB)  # the pre-cut is the full sort here
    np.testing.assert_array_equal(pre_cut, full)


def test_position_dependent_noise_draws_over_the_vocabularys_length(monkeypatch):
    """Without prefix-stable noise the pre-cut pads its candidates to the vocabulary: still the same tokens."""
    logits, keys = peaked_logits(ROWS, VOCAB), row_keys(ROWS)
    expected = full_sort_tokens(logits, keys, settings(0.9))
    monkeypatch.setattr(filters, "_noise_is_prefix_stable", lambda keys: False)
    # A fresh function to jit: a cached trace of choose_tokens would not see the patch.
    tokens = jax.jit(lambda logits, keys: choose_tokens(logits, keys, settings(0.9)))(logits, keys)
    np.testing.assert_array_equal(tokens, expected)


def test_noise_is_prefix_stable_for_the_default_keys():
    """The premise of drawing over the pre-cut alone: threefry (partitionable) noise for n positions is the
    first n of the noise for more."""
    key = jax.random.PRNGKey(7)
    assert filters._noise_is_prefix_stable(row_keys(2))
    np.testing.assert_array_equal(jax.random.gumbel(key, (256,)), jax.random.gumbel(key, (VOCAB,))[:256])


@pytest.mark.slow
def test_typed_keys_and_ties_follow_the_full_sort():
    # Integer logits tie a lot: the pre-cut must order tied tokens as the full sort does (lower id first).
    logits = jnp.round(peaked_logits(ROWS, VOCAB))
    keys = jax.random.split(jax.random.key(11), ROWS)
    assert filters._noise_is_prefix_stable(keys)
    for top_p in (0.1, 0.9):
        expected = full_sort_tokens(logits, keys, settings(top_p))
        np.testing.assert_array_equal(choose(logits, keys, settings(top_p)), expected)


def test_temperature_and_jit():
    logits, keys = peaked_logits(ROWS, VOCAB), row_keys(ROWS)
    chosen = settings(0.9, temperature=1.7)
    jitted = jax.jit(choose_tokens, static_argnums=2)
    np.testing.assert_array_equal(jitted(logits, keys, chosen), full_sort_tokens(logits, keys, chosen))


@pytest.mark.parametrize("chosen", [settings(0.8, top_k=50), settings(1.0, top_k=50), settings(1.0)],
                         ids=["top_k_and_top_p", "top_k", "plain"])
def test_other_paths_are_unchanged(chosen):
    for logits in (peaked_logits(ROWS, VOCAB), flat_logits(ROWS, VOCAB)):
        keys = row_keys(ROWS, 4)
        if chosen.top_k is None:
            expected = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
        else:
            expected = full_sort_tokens(logits, keys, chosen)
        np.testing.assert_array_equal(choose(logits, keys, chosen), expected)


def nucleus_distribution(logits: np.ndarray, top_p: float) -> np.ndarray:
    """The nucleus distribution over the vocabulary in float64: kept tokens renormalised, the rest zero."""
    logits = np.asarray(logits, np.float64)
    order = np.argsort(-logits, kind="stable")
    probs = np.exp(logits[order] - logits.max())
    probs /= probs.sum()
    kept = (np.cumsum(probs) - probs) < top_p
    distribution = np.zeros_like(logits)
    distribution[order[kept]] = probs[kept] / probs[kept].sum()
    return distribution


@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_frequencies_follow_the_nucleus_distribution(shape, monkeypatch):
    vocab, draws, top_p = 64, 20000, 0.8
    # A pre-cut of 8 out of 64: the peaked row's nucleus fits it, the flat row's does not.
    monkeypatch.setattr(filters, "NUCLEUS_PRE_CUT", 8)
    if shape == "peaked":
        row = np.full(vocab, -4.0)
        row[[5, 17, 40, 63]] = [2.0, 1.5, 1.0, 0.2]
    else:
        row = np.random.default_rng(0).normal(0.0, 0.3, vocab)
    logits = jnp.broadcast_to(jnp.asarray(row, jnp.float32), (draws, vocab))
    assert bool(jnp.all(nucleus_pre_cut_suffices(logits[:1], top_p, 8))) == (shape == "peaked")
    # A fresh function to jit: a cached trace of choose_tokens would not see the patched pre-cut.
    tokens = np.asarray(jax.jit(lambda logits, keys: choose_tokens(logits, keys, settings(top_p)))(
        logits, row_keys(draws, 9)))
    expected = nucleus_distribution(row, top_p)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    chi_square = (((counts[kept] - draws * expected[kept]) ** 2) / (draws * expected[kept])).sum()
    # Mean of chi-square is the degrees of freedom (kept - 1); 3x that plus a margin is far in the tail.
    assert chi_square < 3 * (kept.sum() - 1) + 10, (chi_square, kept.sum())
