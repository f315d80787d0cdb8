"""The dual on a sharded pool: on 8 host devices, λ, statuses and measurements equal the one-device solve.

The multi-device part runs once, in a subprocess with 8 host devices (``host_devices``; XLA fixes the device
count when it starts), and writes every result beside the one-device result of the same process to
an ``.npz``; the tests here read it. Cases: the packaged pilot (pooled: its samples split), and random pools whose sizes are not multiples of 8 (so the padding is exercised), pooled
and per prompt, with the groups split (many prompts) and with the slots split (few prompts, many samples), each
with an infeasible palette among feasible ones.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from mapjax import solve_many
from mapjax.errors import MeshError

# Each case (name, pool, palettes, normaliser, mesh, dtype) is solved without and with its mesh.
SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    from mapjax import RewardPool, evaluate_lambdas, solve_many, solve_sequential
    from mapjax.problem import DualProblem, precision
    from mapjax.solver.placement import Placement
    import jax

    assert jax.device_count() == 8, jax.devices()
    pilot_file, out = sys.argv[1], sys.argv[2]


    def random_pool(seed, prompts, samples, values=3):
        rng = np.random.default_rng(seed)
        mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
        rewards = rng.normal(size=(prompts, samples, values)) @ mixing + rng.normal(size=(prompts, 1, values))
        counts = rng.integers(1, samples + 1, size=prompts)
        counts[0] = samples  # the widest prompt fills every slot
        mask = np.arange(samples)[None, :] < counts[:, None]
        return RewardPool(rewards, mask, tuple(f"v{i}" for i in range(values)))


    pilot = RewardPool.load(pilot_file)
    tall = random_pool(1, prompts=37, samples=5)   # per prompt: more groups than slots -> groups split
    wide = random_pool(2, prompts=3, samples=45)   # per prompt: more slots than groups -> slots split
    assert tall.mask.sum() % 8 and wide.mask.sum() % 8 and 37 % 8 and 45 % 8
    random_palettes = ["v0>=q0.7", "v0>=q0.6, v1>=q0.6", "v0>=q0.999, v1>=q0.999, v2>=q0.999", "v2>=mean"]
    pilot_palettes = ["humor>=q0.5, gpt2-harmless>=q0.6", "humor>=q0.8",
                      "humor>=q0.99, gpt2-harmless>=q0.99, gpt2-helpful>=q0.99"]
    cases = [
        ("pilot_data8", pilot, pilot_palettes, "pooled", "data=8", "float64"),
        ("tall_pooled", tall, random_palettes, "pooled", "data=2,fsdp=4", "float64"),
        ("tall_per_prompt", tall, random_palettes, "per_prompt", "data=2,fsdp=2,model=2", "float64"),
        ("wide_per_prompt", wide, random_palettes, "per_prompt", "fsdp=8", "float64"),
        ("tall_model8", tall, random_palettes, "per_prompt", "model=8", "float64"),
    ]
    results = {"tall/count": np.array(tall.mask.sum())}
    for name, pool, palettes, normaliser, mesh, dtype in cases:
        for layout, where in (("single", None), ("sharded", mesh)):
            solutions = solve_many(pool, palettes, normaliser=normaliser, dtype=dtype, mesh=where,
                                   sensitivity=True)
            for field in ("lam", "status", "realised", "kl", "ess", "sensitivity"):
                results[f"{name}/{layout}/{field}"] = np.asarray(getattr(solutions, field))
        # where the samples went: the split axis padded to a multiple of the devices, on all 8 of them
        placement = Placement.of(mesh)
        with precision(dtype) as jdtype:
            scaled = placement.problem_arrays(DualProblem.from_pool(pool, normaliser), jdtype)[0]
        results[f"{name}/placement"] = np.array([len(scaled.sharding.device_set), *scaled.shape])
        results[f"{name}/devices"] = np.array([placement.sample_devices, placement.palette_devices])

    lam = np.array([[1.0, 0.5, 0.0], [0.0, 0.0, 2.0]])
    for layout, where in (("single", None), ("sharded", "data=2,fsdp=4")):
        given = evaluate_lambdas(tall, lam, normaliser="per_prompt", mesh=where)
        results[f"given/{layout}/realised"] = given.realised
        history = solve_sequential(wide, "v0>=q0.6, v1>=q0.6", rounds=2, mesh=where, normaliser="per_prompt")
        results[f"sequential/{layout}/lam"] = np.stack([step.lam for step in history])
    np.savez(out, **results)
''')

CASES = ["pilot_data8", "tall_pooled", "tall_per_prompt", "wide_per_prompt", "tall_model8"]


@pytest.fixture(scope="module")
def sharded(pilot_file, tmp_path_factory, host_devices):
    """The subprocess's results: ``{"case/single|sharded/field": array}``."""
    out = tmp_path_factory.mktemp("solver-sharded") / "results.npz"
    done = host_devices.run(["-c", SCRIPT, str(pilot_file), str(out)], devices=8)
    assert done.returncode == 0, done.stderr[-4000:]
    with np.load(out) as results:
        return dict(results)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_sharded_lambda_equals_one_device(sharded, case):
    assert list(sharded[f"{case}/sharded/status"]) == list(sharded[f"{case}/single/status"])
    assert "infeasible" in list(sharded[f"{case}/single/status"])
    for field in ("lam", "realised", "kl", "ess"):
        np.testing.assert_allclose(sharded[f"{case}/sharded/{field}"], sharded[f"{case}/single/{field}"],
                                   rtol=1e-6, atol=1e-6, err_msg=f"{case}: {field}")
    np.testing.assert_allclose(sharded[f"{case}/sharded/sensitivity"], sharded[f"{case}/single/sensitivity"],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_pilot_has_feasible_and_infeasible_palettes(sharded):
    assert list(sharded["pilot_data8/single/status"]) == ["optimal", "optimal", "infeasible"]
    assert np.all(np.isfinite(sharded["pilot_data8/sharded/lam"][:2]))


@pytest.mark.slow
def test_samples_are_split_and_padded_over_the_batch_axes(sharded, pilot):
    # pilot: one group of all its samples, its slots split over the 8 devices
    assert list(sharded["pilot_data8/placement"]) == [8, 1, -(-int(pilot.mask.sum()) // 8) * 8, 6]
    assert list(sharded["pilot_data8/devices"]) == [8, 1]
    # tall pooled: 1 group of all its samples (not a multiple of 8), padded to the next multiple of 8
    count = int(sharded["tall/count"])
    assert count % 8 and list(sharded["tall_pooled/placement"]) == [8, 1, count + (-count % 8), 3]
    assert list(sharded["tall_per_prompt/devices"]) == [4, 2]
    # tall per prompt: 37 groups -> 40; wide per prompt: 45 slots -> 48
    assert list(sharded["tall_per_prompt/placement"]) == [8, 40, 5, 3]
    assert list(sharded["wide_per_prompt/placement"]) == [8, 3, 48, 3]
    # model=8 alone: the samples stay whole (replicated), only the palettes are split
    assert list(sharded["tall_model8/placement"]) == [8, 37, 5, 3]
    assert list(sharded["tall_model8/devices"]) == [1, 8]


@pytest.mark.slow
def test_given_lambdas_and_sequential_solve_on_a_mesh(sharded):
    np.testing.assert_allclose(sharded["given/sharded/realised"], sharded["given/single/realised"],
                               rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sharded["sequential/sharded/lam"], sharded["sequential/single/lam"],
                               rtol=1e-6, atol=1e-6)


def test_a_bad_mesh_is_refused_before_any_work(ragged_pool):
    with pytest.raises(MeshError, match="unknown mesh axis 'gpu'"):
        solve_many(ragged_pool, "v0>=q0.5", mesh="gpu=2")
    with pytest.raises(MeshError, match="needs 3 devices"):
        solve_many(ragged_pool, "v0>=q0.5", mesh="data=3")


@pytest.mark.slow
def test_a_one_device_mesh_gives_the_one_device_answer(ragged_pool):
    palettes = ["v0>=q0.7", "v0>=q0.6, v1>=q0.6"]
    plain = solve_many(ragged_pool, palettes)
    meshed = solve_many(ragged_pool, palettes, mesh="data=1")
    assert list(meshed.status) == list(plain.status)
    np.testing.assert_allclose(meshed.lam, plain.lam, rtol=1e-9, atol=1e-12)
