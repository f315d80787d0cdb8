"""MAP-F as an experiment: build the policy's own pool (k samples per prompt), then finetune toward the palette
and evaluate, all from one YAML config.

    python experiments/mapf.py --config configs/mapf_opt_hh.yaml --out runs/mapf-opt
    python experiments/mapf.py --config configs/mapf_demo.yaml --out runs/mapf-demo

The config names the policy, the prompt source and count, the values, the samples per prompt, the palette, and
the `mapjax finetune` options (any of its flags, without the dashes). Both steps are the command-line tools, so a
rerun resumes: the pool build from its manifest, the finetuning from its orbax checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the scripts' shared helpers
from common import ROOT  # noqa: E402

from mapjax.cli import main as mapjax_main  # noqa: E402


def _flags(options: Mapping[str, Any]) -> list[str]:
    argv = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
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
    return _repository_path(value)


def _repository_path(value: str) -> str:
    """Paths in a config are relative to the repository; hub ids and source names pass through."""
    candidate = ROOT / value
    return str(candidate) if ("/" in value or value.endswith((".gguf", ".txt", ".jsonl", ".json"))) and candidate.exists() else value


def run(config: Mapping[str, Any], out: Path) -> int:
    """Build the pool, then finetune and evaluate; returns the exit code of the step that failed, or 0."""
    out.mkdir(parents=True, exist_ok=True)
    policy = _policy(str(config["policy"]))
    pool_file = out / "pool.jsonl"
    pool_argv = ["pool", "--policy", policy, "--prompts", _repository_path(str(config["prompts"])),
                 "--values", ",".join(config["values"]), "--samples", str(config["samples"]),
                 "--out", str(pool_file), *_flags(config.get("pool_options", {}))]
    if "count" in config:
        pool_argv += ["--count", str(config["count"])]
    code = mapjax_main(pool_argv)
    if code:
        return code
    finetune_argv = ["finetune", "--policy", policy, "--pool", str(pool_file), "--palette", config["palette"],
                     "--out", str(out / "finetune"), *_flags(config.get("finetune", {}))]
    return mapjax_main(finetune_argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="run folder (a rerun resumes)")
    args = parser.parse_args(argv)
    return run(yaml.safe_load(args.config.read_text()), args.out)


if __name__ == "__main__":
    sys.exit(main())
