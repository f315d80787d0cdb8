"""MAP-F as an experiment: build the policy's own pool (k samples per prompt), then finetune toward the palette
and evaluate, all from one YAML config.

    python -m experiments.mapf --config configs/mapf_opt_hh.yaml --out runs/mapf-opt
    python -m experiments.mapf --config configs/mapf_demo.yaml --out runs/mapf-demo [--set finetune.steps=10]

The config names the policy, the prompt source and count, the values, the samples per prompt, the palette, and
the `mapjax pool` / `mapjax finetune` options (any of their flags, without the dashes; an unknown one is an
error before anything runs). Both steps are the command-line tools, so a rerun of the same config resumes: the
pool build from its manifest, the finetuning from its orbax checkpoints. ``--force`` starts another config
afresh in a used folder (each step with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

from experiments.common import (
    CONFIGS,
    add_config_arguments,
    add_output_arguments,
    build_config,
    load_config,
    path_or_name,
    prepare_out,
    reports_errors,
)
from mapjax.errors import ConfigError


@dataclasses.dataclass
class MapfConfig:
    """configs/mapf_*.yaml."""

    policy: str        # packaged-smollm2, a .gguf file, an HF folder (relative to the repository) or a hub id
    prompts: str       # hh-rlhf, imdb, or a prompts file (relative to the repository)
    values: list[str]
    palette: str
    samples: int = 16
    count: int | None = None
    pool_options: dict[str, Any] = dataclasses.field(default_factory=dict)   # `mapjax pool` flags
    finetune: dict[str, Any] = dataclasses.field(default_factory=dict)       # `mapjax finetune` flags


def _flags(command: str, options: Mapping[str, Any], key: str) -> list[str]:
    """``options`` as ``mapjax <command>`` flags; a key that is not one of its options is a ConfigError."""
    from mapjax.cli import finetune, pool

    module = {"pool": pool, "finetune": finetune}[command]
    known = {option for action in module.register(argparse.ArgumentParser().add_subparsers())._actions
             for option in action.option_strings}
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if flag not in known:
            raise ConfigError(f"{key}.{name}: `mapjax {command}` has no option {flag}")
        if value is True:
            argv.append(flag)
        elif value is not False and value is not None:
            argv += [flag, str(value)]
    return argv


def _policy(value: str) -> str:
    """``packaged-smollm2`` names the packaged offline SmolLM2 GGUF; anything else is a path or a hub id."""
    if value == "packaged-smollm2":
        from mapjax.models.packaged import smollm2_gguf_path

        return str(smollm2_gguf_path())
    return path_or_name(value)


def run(config: MapfConfig | Mapping[str, Any], out: Path, *, force: bool = False) -> int:
    """Build the pool, then finetune and evaluate; returns the exit status of the step that failed, or 0."""
    from mapjax.cli import main as mapjax_main

    if not isinstance(config, MapfConfig):
        config = build_config(MapfConfig, config)
    out = Path(out)
    overwrite = ["--overwrite"] if force else []
    pool_file = out / "pool.jsonl"
    pool_argv = ["pool", "--policy", _policy(config.policy), "--prompts", path_or_name(config.prompts),
                 "--values", ",".join(config.values), "--samples", str(config.samples), "--out", str(pool_file),
                 *(["--count", str(config.count)] if config.count is not None else []),
                 *_flags("pool", config.pool_options, "pool_options"), *overwrite]
    finetune_argv = ["finetune", "--policy", _policy(config.policy), "--pool", str(pool_file), "--palette",
                     config.palette, "--out", str(out / "finetune"), *_flags("finetune", config.finetune, "finetune"),
                     *overwrite]
    prepare_out(out, force=force, config=config, resumable=True)
    return mapjax_main(pool_argv) or mapjax_main(finetune_argv)


@reports_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, CONFIGS / "mapf_demo.yaml")
    add_output_arguments(parser, resumable=True)
    args = parser.parse_args(argv)
    return run(load_config(MapfConfig, args.config, args.overrides), args.out, force=args.force)


if __name__ == "__main__":
    raise SystemExit(main())
