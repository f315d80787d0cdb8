import math

import numpy as np
import pytest

from mapjax import RewardPool, parse_palette, quantile_palette
from mapjax.palette import PaletteError, resolve


def test_string_forms_resolve_against_the_pool(pilot):
    spec = ("humor>=q0.8, gpt2-helpful>=max(mean,q0.5), gpt2-harmless>=q80%, diversity>=mean, "
            "coherence>=mean+log(1+0.25), perplexity>=-3.3")
    c = dict(zip(pilot.value_names, resolve(pilot, spec)))
    flat = {name: pilot.flat()[:, pilot.index_of(name)] for name in pilot.value_names}
    assert c["humor"] == pytest.approx(np.quantile(flat["humor"], 0.8))
    assert c["gpt2-helpful"] == pytest.approx(flat["gpt2-helpful"].mean())  # the median is below the mean
    assert c["gpt2-harmless"] == pytest.approx(np.quantile(flat["gpt2-harmless"], 0.8))
    assert c["diversity"] == pytest.approx(flat["diversity"].mean())
    assert c["coherence"] == pytest.approx(flat["coherence"].mean() + math.log(1.25))
    assert c["perplexity"] == -3.3


def test_unconstrained_values_are_nan(pilot):
    c = resolve(pilot, {"humor": "q0.6", "diversity": "mean-0.01"})
    constrained = [pilot.value_names[i] for i in np.flatnonzero(~np.isnan(c))]
    assert sorted(constrained) == ["diversity", "humor"]
    assert c[pilot.index_of("diversity")] == pytest.approx(pilot.means()[pilot.index_of("diversity")] - 0.01)


def test_paper_hhh_palettes(pilot):
    expected = {0.5: (2.460, -1.471, 0.354), 0.6: (2.492, -1.278, 0.675), 0.7: (2.513, -0.967, 0.937),
                0.8: (2.534, -0.613, 1.268)}
    for q, levels in expected.items():
        palette = quantile_palette(["humor", "gpt2-helpful", "gpt2-harmless"], q, ["diversity", "coherence", "perplexity"])
        c = dict(zip(pilot.value_names, palette.targets(pilot)))
        assert [round(c[n], 3) for n in ("humor", "gpt2-helpful", "gpt2-harmless")] == pytest.approx(levels, abs=1e-3)
        assert round(c["perplexity"], 3) == -3.337


def test_palette_prints_back():
    palette = parse_palette("humor >= q0.8 ; diversity>=mean")
    assert str(palette) == "humor>=q0.8, diversity>=mean"
    assert parse_palette(str(palette)) == palette


@pytest.mark.parametrize(
    "spec, message",
    [
        ("humor>q0.8", "no '>='"),
        ("humor>=often", "cannot read level 'often' of 'humor'"),
        ("humor>=q150%", "must lie in"),
        (">=1", "names no value"),
        ("humor>=1, humor>=2", "more than once"),
        ("", "constrains no value"),
        ({"humor": float("inf")}, "finite"),
        ({"humor": True}, "expected a number"),
        (42, "a string or a dict"),
    ],
)
def test_bad_palettes(spec, message):
    with pytest.raises(PaletteError, match=message):
        parse_palette(spec)


def test_unknown_value_lists_the_known(pilot):
    with pytest.raises(ValueError, match=r"unknown value 'humour'; this pool has \[.*'humor'"):
        resolve(pilot, "humour>=q0.8")


def test_levels_outside_the_data_range(pilot):
    with pytest.raises(PaletteError, match=r"level 3 of 'humor' is above its largest reward in the pool \(2.60"):
        resolve(pilot, "humor>=3")
    with pytest.raises(PaletteError, match=r"below its smallest reward.*sign and units"):
        resolve(pilot, "gpt2-helpful>=-9")


def test_constant_reward_column_cannot_be_constrained():
    pool = RewardPool.from_array(np.c_[np.arange(5.0), np.ones(5)], value_names=["a", "flat"])
    with pytest.raises(PaletteError, match="'flat' is constant"):
        resolve(pool, "flat>=1")
    assert resolve(pool, "a>=2")[0] == 2.0
