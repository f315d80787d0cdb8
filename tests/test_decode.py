import warnings

import numpy as np
import pytest
from scipy import stats

from mapjax import RewardPool, solve
from mapjax.decode import decode_pool, expected_levels, select, selected, selection_probabilities
from mapjax.errors import DecodeError
from mapjax.solver import lambda_for


def fixed_candidates():
    """3 prompts with 4, 3 and 4 candidates; texts so the kept ones can be checked."""
    rewards = np.array([
        [[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [0.5, 0.5]],
        [[1.0, 1.0], [0.0, 3.0], [3.0, 0.0], [0.0, 0.0]],
        [[0.2, 0.1], [0.1, 0.2], [0.3, 0.3], [0.0, 0.0]],
    ])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    generations = tuple(tuple(f"p{p}s{s}" for s in range(int(mask[p].sum()))) for p in range(3))
    return RewardPool(rewards, mask, ("a", "b"), ("p0", "p1", "p2"), generations)


def test_selection_frequencies_match_softmax():
    pool = fixed_candidates()
    lam = np.array([0.8, 0.5])
    probabilities = selection_probabilities(pool, lam)
    draws = 4000
    counts = np.zeros(pool.mask.shape)
    for seed in range(draws):
        counts[np.arange(3), select(pool, lam, seed=seed)] += 1
    for prompt in range(3):
        valid = pool.mask[prompt]
        expected = probabilities[prompt][valid] * draws
        result = stats.chisquare(counts[prompt][valid], expected)
        assert result.pvalue > 1e-3, (prompt, counts[prompt], expected)
    assert counts[1, 3] == 0  # never the empty slot


def test_zero_lambda_is_uniform_choice():
    pool = fixed_candidates()
    probabilities = selection_probabilities(pool, np.zeros(2))
    np.testing.assert_allclose(probabilities[0], 0.25)
    np.testing.assert_allclose(probabilities[1], [1 / 3, 1 / 3, 1 / 3, 0])


def test_softmax_is_stable_for_huge_lambda():
    pool = fixed_candidates()
    probabilities = selection_probabilities(pool, np.array([1e4, 0.0]))
    assert np.all(np.isfinite(probabilities))
    np.testing.assert_array_equal(np.argmax(probabilities, axis=1), [2, 2, 2])


def test_argmax_is_best_of_k_and_selected_pool_keeps_texts():
    pool = fixed_candidates()
    result = decode_pool(pool, {"a": 1.0, "b": 1.0}, rule="argmax")
    np.testing.assert_array_equal(result.choice, [2, 1, 2])  # prompt 1 ties at 3: the first wins
    assert result.result.generations == (("p0s2",), ("p1s1",), ("p2s2",))
    assert result.result.num_samples == 3
    np.testing.assert_array_equal(result.result.flat(), pool.rewards[np.arange(3), result.choice])


def test_expected_levels_average_the_per_prompt_weighted_means(ragged_pool):
    pool = ragged_pool
    lam = np.array([0.7, 0.0, 0.3])
    weights = selection_probabilities(pool, lam)
    manual = np.mean(np.einsum("pk,pkv->pv", weights, pool.rewards), axis=0)
    np.testing.assert_allclose(expected_levels(pool, lam), manual, rtol=1e-10)
    # ... and sampling many times converges to them.
    draws = np.mean([selected(pool, select(pool, lam, seed=s)).flat().mean(axis=0) for s in range(400)], axis=0)
    np.testing.assert_allclose(draws, manual, atol=0.03)


def test_lambda_from_a_solution_of_another_pool(pilot):
    solution = solve(pilot, "humor>=q0.6, gpt2-harmless>=q0.6")
    candidates = RewardPool.from_array(np.zeros((4, 2)), value_names=["gpt2-harmless", "humor"])
    vector = lambda_for(candidates, solution)
    assert vector[1] == solution.lam_by_name()["humor"] and vector[0] == solution.lam_by_name()["gpt2-harmless"]


def test_bad_lambda():
    pool = fixed_candidates()
    with pytest.raises(DecodeError, match="3 entries for the pool's 2 values"):
        select(pool, [1.0, 2.0, 3.0])
    with pytest.raises(DecodeError, match="non-negative"):
        select(pool, [-1.0, 0.0])
    with pytest.raises(DecodeError, match="infeasible palette has no λ"):
        select(pool, [np.nan, 0.0])
    with pytest.raises(DecodeError, match="not scored for it"):
        lambda_for(pool, {"humor": 1.0})
    with pytest.raises(DecodeError, match="rule must be"):
        select(pool, [0.0, 0.0], rule="greedy")
    with pytest.raises(DecodeError, match="a vector of numbers"):
        select(pool, ["high", "low"])


def test_an_infeasible_solution_is_refused_by_name(pilot):
    solution = solve(pilot, "humor>=q0.99, gpt2-helpful>=q0.99, gpt2-harmless>=q0.99")
    assert solution.status == "infeasible"
    for decode_with in (expected_levels, select, selection_probabilities, decode_pool):
        with pytest.raises(DecodeError, match="the palette is infeasible: infeasible: .*has no λ to decode with"):
            decode_with(pilot, solution)


@pytest.mark.slow
def test_a_degenerate_solution_is_used_with_a_warning_naming_ess():
    rng = np.random.default_rng(0)
    pool = RewardPool(rng.normal(size=(20, 4, 2)), np.ones((20, 4), bool), ("a", "b"))
    top = pool.flat()[:, 0].max()
    edge = solve(pool, {"a": top - 1e-3})  # just inside the largest reward: optimal, but p_λ is one sample
    assert edge.status == "optimal" and edge.degenerate and edge.ess < 2
    for decode_with in (expected_levels, select, selection_probabilities, decode_pool, lambda_for):
        with pytest.warns(UserWarning, match=r"degenerate λ: p_λ's effective sample size \(ESS\) is 1.1"):
            decode_with(pool, edge)
    comfortable = solve(pool, {"a": top - 0.5})
    assert comfortable.status == "optimal" and not comfortable.degenerate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_pool(pool, comfortable)


def test_bad_choices():
    pool = fixed_candidates()
    with pytest.raises(DecodeError, match=r"need one whole-number choice per prompt \(3\)"):
        selected(pool, [0, 1])
    with pytest.raises(DecodeError, match=r"need one whole-number choice per prompt"):
        selected(pool, [0.0, 1.0, 2.0])
    with pytest.raises(DecodeError, match=r"choice 4 of prompt row 2 is not a slot \(0..3\)"):
        selected(pool, [0, 1, 4])
    with pytest.raises(DecodeError, match="choice 3 of prompt row 1 is an empty slot"):
        selected(pool, [0, 3, 0])


def test_plain_arrays_decode_like_pools():
    pool = fixed_candidates()
    full = pool.rewards[[0, 2]]  # the two prompts with four candidates each
    lam = {"a": 0.8, "b": 0.5}
    as_array = decode_pool(full, lam, values=["a", "b"], rule="softmax", seed=3)
    as_pool = decode_pool(RewardPool(full, np.ones((2, 4), bool), ("a", "b")), lam, seed=3)
    np.testing.assert_array_equal(as_array.choice, as_pool.choice)
    np.testing.assert_allclose(as_array.expected, as_pool.expected, rtol=1e-12)
    np.testing.assert_allclose(selection_probabilities(full, [0.8, 0.5]), selection_probabilities(as_pool.candidates, [0.8, 0.5]))


@pytest.mark.slow
def test_decode_command_end_to_end(tmp_path, capsys, tiny_policy_folder):
    from mapjax.cli import main

    policy = tiny_policy_folder("gpt2")
    rng = np.random.default_rng(0)
    base = RewardPool.from_array(np.c_[rng.uniform(0.3, 1.0, 200), rng.uniform(-1, 1, 200)],
                                 value_names=["diversity", "sentiment"])
    base.save(tmp_path / "base.jsonl")
    (tmp_path / "prompts.txt").write_text("\n".join(f"w{3 + i} w{30 + i}" for i in range(6)))
    argv = ["decode", "--policy", policy, "--prompts", tmp_path / "prompts.txt", "--palette", "diversity>=q0.6",
            "--pool", tmp_path / "base.jsonl", "--k", 4, "--out", tmp_path / "result.jsonl", "--max-new-tokens", 5]
    assert main([str(a) for a in argv]) == 0
    result = RewardPool.load(tmp_path / "result.jsonl")
    candidates = RewardPool.load(tmp_path / "result.candidates.jsonl")
    assert result.num_prompts == 6 and result.num_samples == 6 and candidates.num_samples == 24
    assert "expected from the weights" in capsys.readouterr().out
    assert main([str(a) for a in argv]) == 2  # the result exists: not overwritten unasked
    assert "exists" in capsys.readouterr().err
