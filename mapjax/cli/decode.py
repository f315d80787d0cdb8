"""``mapjax decode``: solve a palette on a pool, then MAP-D on prompts with k candidates each (``mapjax.decode``).

Every argument is checked before the pool is solved or the policy loaded: the output's format and that it does
not exist, the palette, the values (known rewards, none twice, covering the palette), the prompt source and a
local policy path.

``--mesh`` shards the candidates' sampling and scoring over this process's devices; launched as several processes
(SLURM/Open MPI, or ``--coordinator/--num-processes/--process-id``) each process builds its share of the
candidates (``mapjax.build``), every process makes the same choice, and process 0 writes ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mapjax.cli.common import (
    EXIT_NOT_REACHED,
    EXIT_OK,
    add_dtype_argument,
    add_mesh_arguments,
    add_parser,
    add_policy_argument,
    add_prompts_argument,
    check_input_file,
    check_palette,
    check_policy,
    check_pool_output,
    check_prompt_source,
    check_reward_names,
    name_list,
    normaliser,
    positive_int,
    setup_devices,
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "decode", help="MAP-D: decode prompts toward a palette (k candidates each)")
    add_policy_argument(command)
    add_prompts_argument(command)
    command.add_argument("--palette", required=True, help='e.g. "humor>=q0.7, gpt2-harmless>=q0.7"')
    command.add_argument("--pool", required=True, help="the base model's reward pool the palette is solved on")
    command.add_argument("--k", type=positive_int, default=16, help="candidates per prompt (the paper: 16)")
    command.add_argument("--out", required=True, help="result pool (.jsonl/.json/.parquet), one sample per prompt")
    command.add_argument("--values", type=name_list,
                         help="rewards to score the candidates with (default: the pool's values)")
    command.add_argument("--count", type=positive_int, help="use the first N prompts")
    command.add_argument("--rule", choices=("softmax", "argmax"), default="softmax", help="argmax = best-of-k")
    command.add_argument("--per-prompt", action="store_true", help="solve with the per-prompt normaliser")
    command.add_argument("--max-new-tokens", type=positive_int, default=50)
    command.add_argument("--batch-size", type=positive_int, default=16)
    command.add_argument("--seed", type=int, default=0)
    add_dtype_argument(command)
    command.add_argument("--overwrite", action="store_true")
    add_mesh_arguments(command)
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax import solve
    from mapjax.decode import decode
    from mapjax.distributed import is_primary
    from mapjax.dtypes import resolve_dtype
    from mapjax.generate import load_policy
    from mapjax.limits import check_sampled_rows
    from mapjax.outputs import check_not_input
    from mapjax.pool import RewardPool
    from mapjax.prompts import load_prompts

    inputs = {"--pool": args.pool, "--prompts": args.prompts, "--policy": args.policy}
    out = check_pool_output(args.out, overwrite=args.overwrite, inputs=inputs)
    check_not_input(candidates_path(out), inputs, "--out's candidates file")
    check_input_file(args.pool, "--pool")
    check_policy(args.policy)
    check_prompt_source(args.prompts)
    check_palette(args.palette, args.values)
    if args.values:
        check_reward_names(args.values)
    mesh = setup_devices(args, per_process=True)   # before anything else uses JAX
    pool = RewardPool.load(args.pool)
    values = args.values or list(pool.value_names)
    if not args.values:
        check_reward_names(values, "--values (default: the pool's values)")
    prompts = load_prompts(args.prompts, count=args.count)
    check_sampled_rows(len(prompts), args.k, max_new_tokens=args.max_new_tokens, values=len(values), flag="--k",
                       batch_size=args.batch_size, prompt_chars=sum(map(len, prompts)) / max(1, len(prompts)))

    primary = is_primary()   # every process solves and chooses alike; process 0 speaks and writes
    solution = solve(pool, args.palette, normaliser=normaliser(args.per_prompt))
    if primary:
        print(solution.table())
    if not solution.feasible:
        if primary:
            print("\nthe palette is not reachable on this pool: try `mapjax adjust` for the nearest one that is")
        return EXIT_NOT_REACHED
    policy, tokenizer = load_policy(args.policy, resolve_dtype(args.dtype), mesh=mesh)
    result = decode(policy, tokenizer, prompts, solution, values, k=args.k, rule=args.rule, seed=args.seed,
                    candidates_out=candidates_path(out), max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch_size, overwrite=args.overwrite, dtype=args.dtype, mesh=mesh)
    if not primary:
        return EXIT_OK
    result.result.save(out, overwrite=args.overwrite)
    print(f"\n{out}: {result.result.num_prompts} prompts; levels (realised, expected from the weights):")
    for name, realised, expected in zip(result.result.value_names, result.result.means(), result.expected):
        print(f"  {name:<16} {realised:10.4f} {expected:10.4f}")
    return EXIT_OK


def candidates_path(out: Path) -> Path:
    """Where the k candidates per prompt are kept beside the result (a rerun resumes their build)."""
    return out.with_name(out.stem + ".candidates.jsonl")
