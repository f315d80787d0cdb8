"""The experiments' one config system (typed dataclasses from YAML, ``--set`` overrides) and output-folder rule."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from experiments import decoding_tables, feasibility_vs_m, mapf, pareto_and_region, sequential_vs_joint
from experiments.common import (
    CONFIGS,
    PILOT,
    ROOT,
    PaletteSet,
    apply_override,
    build_config,
    load_config,
    load_yaml,
    path_or_name,
    prepare_out,
)
from mapjax.errors import ConfigError, OutputExistsError


@dataclasses.dataclass
class Inner:
    points: int = 3
    scale: float = 1.0


@dataclasses.dataclass
class Example:
    name: str
    values: list[str]
    pool: Path = PILOT
    seed: int = 0
    rate: float = 0.5
    flag: bool = False
    limit: int | None = None
    levels: dict[str, float] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_overrides_apply_with_their_types(tmp_path):
    path = write(tmp_path, "name: demo\nvalues: [humor]\ninner: {points: 4}\n")
    config = load_config(Example, path, ["seed=7", "rate=1e-3", "flag=true", "values=[humor, diversity]",
                                         "inner.scale=2", "levels={humor: 1}", "limit=null", "pool=data/x.json"])
    assert config == Example(name="demo", values=["humor", "diversity"], pool=ROOT / "data" / "x.json", seed=7,
                             rate=0.001, flag=True, limit=None, levels={"humor": 1.0}, inner=Inner(4, 2.0))
    assert isinstance(config.rate, float) and isinstance(config.inner.scale, float)
    assert load_config(Example, path).inner == Inner(points=4, scale=1.0)   # unset keys keep their defaults


@pytest.mark.parametrize("overrides, message", [
    (["sede=1"], "sede: unknown setting"),
    (["inner.pionts=2"], "inner.pionts: unknown setting"),
    (["seed=one"], "seed: expected a whole number, got 'one'"),
    (["seed=1.5"], "seed: expected a whole number"),
    (["flag=1"], "flag: expected true or false"),
    (["rate=.nan"], "rate: expected a finite number"),
    (["values=humor"], "values: expected a list of text"),
    (["values=[humor, 3]"], r"values\[1\]: expected text"),
    (["levels={humor: high}"], "levels.humor: expected a finite number"),
    (["inner=5"], "inner: expected a mapping of settings"),
    (["limit=[1]"], "limit: expected a whole number or null"),
    (["seed"], "write it as key=value"),
])
def test_unknown_keys_and_wrong_types_name_the_key(tmp_path, overrides, message):
    path = write(tmp_path, "name: demo\nvalues: [humor]\n")
    with pytest.raises(ConfigError, match=message):
        load_config(Example, path, overrides)


def test_a_missing_setting_or_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="values is missing"):
        build_config(Example, {"name": "demo"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not a mapping"):
        load_yaml(write(tmp_path, "- a list\n"))


def test_apply_override_creates_nested_keys():
    data = {"a": {"b": 1}}
    apply_override(data, "a.c=[x, y]")
    apply_override(data, "d.e=3")
    assert data == {"a": {"b": 1, "c": ["x", "y"]}, "d": {"e": 3}}


def test_relative_paths_are_taken_from_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # any working directory
    config = build_config(PaletteSet, {"values": ["humor"], "palettes": {}, "pool": "data/opt1.3b-anthropic-harmless.json.gz"})
    assert config.pool == PILOT and config.pool.is_file()
    assert path_or_name("configs/tiny_decoding.yaml") == str(CONFIGS / "tiny_decoding.yaml")
    assert path_or_name("facebook/opt-1.3b") == "facebook/opt-1.3b" and path_or_name("hh-rlhf") == "hh-rlhf"


def test_the_output_folder_rule(tmp_path):
    config = Example(name="demo", values=["humor"])
    out = tmp_path / "out"
    assert prepare_out(out, force=False, config=config) is False
    assert (out / "config.json").is_file()
    with pytest.raises(OutputExistsError, match="is not empty; pass --force"):
        prepare_out(out, force=False, config=config)          # a non-empty folder needs --force ...
    assert prepare_out(out, force=True, config=config) is False
    assert prepare_out(out, force=False, config=config, resumable=True) is True   # ... unless it resumes this run
    with pytest.raises(OutputExistsError, match="holds no run of this config"):
        prepare_out(out, force=False, config=dataclasses.replace(config, seed=1), resumable=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_out(tmp_path / "file", force=True)


def test_every_shipped_config_loads_into_its_experiment():
    pools = [load_config(PaletteSet, CONFIGS / "opt_pilot_palettes.yaml").pool,
             load_config(feasibility_vs_m.FeasibilityConfig, CONFIGS / "feasibility_vs_m.yaml").pool,
             load_config(sequential_vs_joint.SequentialConfig, CONFIGS / "sequential_vs_joint.yaml").pool,
             load_config(pareto_and_region.ParetoConfig, CONFIGS / "pareto_and_region.yaml").pool]
    assert pools == [PILOT] * 4
    assert load_config(pareto_and_region.ParetoConfig, CONFIGS / "pareto_and_region.yaml").region.points == 40
    assert load_config(mapf.MapfConfig, CONFIGS / "mapf_opt_hh.yaml").samples == 16
    for name, (_, path) in decoding_tables.TABLES.items():
        assert decoding_tables.resolve_config(load_yaml(path), name).table == name
    for path in CONFIGS.glob("*.yaml"):
        assert "../shared" not in path.read_text(), path


def test_experiment_specific_checks_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="upper 'q2'"):
        load_config(feasibility_vs_m.FeasibilityConfig, CONFIGS / "feasibility_vs_m.yaml",
                    ["modes={bad: {upper: q2}}"])
    with pytest.raises(ConfigError, match="palette 'HHH-99' is not among the named palettes"):
        load_config(PaletteSet, CONFIGS / "opt_pilot_palettes.yaml").pick(["HHH-99"])
    with pytest.raises(ConfigError, match="finetune.learning_rate: `mapjax finetune` has no option --learning-rate"):
        mapf.run({"policy": "x", "prompts": "hh-rlhf", "values": ["diversity"], "palette": "diversity>=mean",
                  "finetune": {"learning_rate": 1e-5}}, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_script_reports_a_config_error_in_one_line_and_exits_2(tmp_path, capsys):
    code = sequential_vs_joint.main(["--out", str(tmp_path / "out"), "--set", "rouds=3"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: rouds: unknown setting; the config takes palettes, palettes_config, pool, rounds, plot_rounds, "
        "shown_values")
    assert not (tmp_path / "out").exists()
