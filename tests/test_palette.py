import math
import re

import numpy as np
import pytest

from mapjax import RewardPool, parse_palette, quantile_palette
from mapjax.errors import MapjaxError
from mapjax.palette import PaletteError, palette_targets, parse_level


def resolve(pool, spec):
    """One palette's targets over the pool's values."""
    return palette_targets(pool, spec)[0]


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
        c = dict(zip(pilot.value_names, resolve(pilot, palette)))
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


def test_palette_error_is_the_package_error():
    from mapjax import palette

    assert palette.PaletteError is PaletteError and issubclass(PaletteError, MapjaxError)


@pytest.mark.parametrize(
    "text, fraction",
    [("q0", 0.0), ("q0.8", 0.8), ("q1", 1.0), ("q1.0", 1.0), ("q80", 0.8), ("q99", 0.99), ("q50", 0.5),
     ("q10", 0.1), ("q100", 1.0), ("q80%", 0.8), ("q2%", 0.02), ("q1.5%", 0.015), ("q0.5%", 0.005)],
)
def test_quantile_forms_that_are_clear(text, fraction):
    assert parse_level(text, "humor").number == pytest.approx(fraction, abs=1e-15)
    assert parse_level(f"max(mean,{text})", "humor").number == pytest.approx(fraction, abs=1e-15)


@pytest.mark.parametrize(
    "text, suggestion",
    [("q1.5", "'q0.015' or 'q1.5%'"), ("q1.01", "'q0.0101' or 'q1.01%'"), ("q2", "'q0.02' or 'q2%'"),
     ("q9", "'q0.09' or 'q9%'"), ("q2.5", "'q0.025' or 'q2.5%'"), ("q80.5", "'q0.805' or 'q80.5%'")],
)
def test_ambiguous_quantiles_are_refused_with_both_readings(text, suggestion):
    for form in (text, f"max(mean,{text})"):
        message = re.escape(f"quantile '{form}' of 'humor' is ambiguous") + ".*" + re.escape(f"write {suggestion}")
        with pytest.raises(PaletteError, match=message):
            parse_palette(f"humor>={form}")


@pytest.mark.parametrize("text", ["q100.5", "q150", "q101%", "q-0.1"])
def test_quantiles_out_of_range(text):
    with pytest.raises(PaletteError, match="must lie in|cannot read"):
        parse_palette(f"humor>={text}")


def test_quantile_palette_takes_a_fraction():
    with pytest.raises(PaletteError, match=r"fraction in \[0, 1\], got 70"):
        quantile_palette(["humor"], 70)


def test_palette_targets_reads_every_form(pilot):
    names = pilot.value_names
    spec = "humor>=q0.7, gpt2-harmless>=mean"
    from_spec = palette_targets(pilot, spec)
    assert from_spec.shape == (1, pilot.num_values)
    levels = {name: float(from_spec[0, pilot.index_of(name)]) for name in ("humor", "gpt2-harmless")}
    np.testing.assert_array_equal(palette_targets(pilot, levels), from_spec)
    np.testing.assert_array_equal(palette_targets(pilot, parse_palette(spec)), from_spec)
    np.testing.assert_array_equal(palette_targets(pilot, from_spec[0]), from_spec)  # a vector over all values
    np.testing.assert_array_equal(palette_targets(pilot, list(from_spec[0])), from_spec)
    over_named = palette_targets(pilot, [levels["gpt2-harmless"], levels["humor"]], values=["gpt2-harmless", "humor"])
    np.testing.assert_array_equal(over_named, from_spec)
    batch = palette_targets(pilot, [spec, "humor>=q0.6"])
    assert batch.shape == (2, len(names))
    np.testing.assert_array_equal(palette_targets(pilot, batch), batch)


@pytest.mark.parametrize(
    "palettes, values, message",
    [
        ([], None, "no palettes given"),
        (np.zeros((0, 6)), None, "no palettes given"),
        ([1.0, 2.0], None, r"2 columns for the pool's values .*pass values="),
        ([1.0, 2.0], ["humor"], r"2 columns for the named values \['humor'\]"),
        ([2.0, 2.0], ["humor", "humor"], r"values names \['humor'\] more than once"),
        (np.full(6, np.nan), None, "palette 0 constrains no value"),
        (["humor>=q0.5", [1.0] * 6], None, "not both"),
        (np.zeros((2, 2, 6)), None, "shape"),
        ([9.0], ["humor"], "above its largest reward"),
        (42, None, "got a int"),
    ],
)
def test_palette_targets_refuses_bad_forms(pilot, palettes, values, message):
    with pytest.raises(PaletteError, match=message):
        palette_targets(pilot, palettes, values)


def test_levels_outside_the_range_pass_when_not_checked(pilot):
    targets = palette_targets(pilot, "humor>=9", check_range=False)
    assert targets[0, pilot.index_of("humor")] == 9.0
