"""``mapjax pool``: sample a policy, score each value, write a reward pool (resumable; see ``mapjax.build``).

``--mesh`` shards each process's batches over its devices; launched as several processes (one per host, under
SLURM/Open MPI or with ``--coordinator/--num-processes/--process-id``) each builds its share of the prompts and
process 0 merges the parts into ``--out``, which must be on a filesystem every process sees.
"""

from __future__ import annotations

import argparse
from typing import Any

from mapjax.cli.common import (
    EXIT_OK,
    add_dtype_argument,
    add_mesh_arguments,
    add_parser,
    add_policy_argument,
    add_prompts_argument,
    check_policy,
    check_prompt_source,
    check_reward_names,
    half_open_unit_interval,
    name_list,
    non_negative_int,
    positive_float,
    positive_int,
    setup_devices,
)
from mapjax.errors import InputError


def register(subparsers: Any) -> argparse.ArgumentParser:
    command = add_parser(subparsers, "pool", help="sample a policy, score each value, write a reward pool (resumable)")
    add_policy_argument(command)
    add_prompts_argument(command)
    command.add_argument("--values", required=True, type=name_list,
                         help="comma-separated reward names, e.g. diversity,perplexity")
    command.add_argument("--samples", type=positive_int, default=1, help="continuations per prompt (default 1)")
    command.add_argument("--out", required=True, help="pool file: .jsonl, .json or .parquet")
    command.add_argument("--count", type=positive_int, default=None, help="use the first N prompts")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--max-new-tokens", type=positive_int, default=50)
    command.add_argument("--top-k", type=non_negative_int, default=50, help="0 disables top-k")
    command.add_argument("--top-p", type=half_open_unit_interval, default=1.0)
    command.add_argument("--temperature", type=positive_float, default=1.0)
    command.add_argument("--batch-size", type=positive_int, default=16)
    command.add_argument("--chunk-size", type=positive_int, default=64, help="prompts per saved chunk")
    add_dtype_argument(command)
    command.add_argument("--chat-template", action="store_true",
                         help="show the policy each prompt wrapped in its tokenizer's chat template (instruct models, "
                              "as `mapjax demo` does); the rewards and the pool keep the raw prompt, and the build "
                              "manifest records it so `mapjax finetune` samples the same way")
    command.add_argument("--overwrite", action="store_true",
                         help="start afresh; an existing pool is replaced only once the new one is complete")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_arguments(command)
    command.set_defaults(run=run)
    return command


def run(args: argparse.Namespace) -> int:
    from mapjax.build import build_pool, check_output
    from mapjax.distributed import is_primary
    from mapjax.dtypes import resolve_dtype
    from mapjax.generate import load_policy
    from mapjax.limits import check_sampled_rows
    from mapjax.prompts import chat_formatter, load_prompts

    check_output(args.out, overwrite=args.overwrite, inputs={"--prompts": args.prompts, "--policy": args.policy},
                 flag="--out")
    check_policy(args.policy)
    check_prompt_source(args.prompts)
    check_reward_names(args.values)
    mesh = setup_devices(args, per_process=True)   # before anything else uses JAX
    prompts = load_prompts(args.prompts, count=args.count)
    check_sampled_rows(len(prompts), args.samples, max_new_tokens=args.max_new_tokens, values=len(args.values),
                       batch_size=args.batch_size, chunk_size=args.chunk_size,
                       prompt_chars=sum(map(len, prompts)) / max(1, len(prompts)))   # before the policy is loaded
    model, tokenizer = load_policy(args.policy, resolve_dtype(args.dtype), mesh=mesh)
    format_prompt = None
    if args.chat_template:
        format_prompt = chat_formatter(tokenizer)
        if format_prompt is None:
            raise InputError(f"--chat-template: the tokenizer of {args.policy} has no chat template")
    pool = build_pool(model, tokenizer, prompts, args.values, samples_per_prompt=args.samples, out=args.out,
                      chunk_size=args.chunk_size, seed=args.seed, max_new_tokens=args.max_new_tokens,
                      top_k=args.top_k or None, top_p=args.top_p, temperature=args.temperature,
                      batch_size=args.batch_size, progress=not args.quiet, overwrite=args.overwrite,
                      dtype=args.dtype, mesh=mesh, format_prompt=format_prompt)
    if is_primary():
        print(f"{args.out}: {pool.num_prompts} prompts, {pool.num_samples} samples, values {list(pool.value_names)}")
    return EXIT_OK
