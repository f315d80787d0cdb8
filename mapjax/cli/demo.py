"""``mapjax demo``: the MAP procedure end to end, offline, on the packaged models (``mapjax.demo``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapjax.cli.common import EXIT_OK, add_dtype_argument, add_parser, check_reward_names, name_list, positive_int


def register(subparsers: Any) -> argparse.ArgumentParser:
    from mapjax.demo import DEFAULT_PALETTE, DEFAULT_VALUES

    command = add_parser(subparsers, "demo", help="the MAP procedure end to end, offline, on the packaged models")
    command.add_argument("--out", type=Path, default=Path("mapjax-demo"), help="output folder (default: mapjax-demo)")
    command.add_argument("--palette", default=DEFAULT_PALETTE)
    command.add_argument("--values", type=name_list, default=list(DEFAULT_VALUES),
                         help="rewards to score, comma-separated")
    command.add_argument("--pool-prompts", type=positive_int, default=32)
    command.add_argument("--heldout-prompts", type=positive_int, default=16)
    command.add_argument("--k", type=positive_int, default=8, help="samples per request, in the pool and for MAP-D")
    command.add_argument("--max-new-tokens", type=positive_int, default=40)
    command.add_argument("--batch-size", type=positive_int, default=32)
    command.add_argument("--seed", type=int, default=0)
    add_dtype_argument(command, help="parameter dtype of the policy, MiniLM and the KV cache; norms, softmax "
                                     "and log-probabilities stay float32 (default: float32)")
    command.add_argument("--force", action="store_true", help="rebuild the pools even if the folder holds others")
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax.demo import DemoSettings, run_demo

    check_reward_names(args.values)
    settings = DemoSettings(out=args.out, palette=args.palette, values=tuple(args.values),
                            pool_prompts=args.pool_prompts, heldout_prompts=args.heldout_prompts, k=args.k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                            force=args.force, dtype=args.dtype)
    run_demo(settings)
    return EXIT_OK
