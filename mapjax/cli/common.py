"""What every ``mapjax`` subcommand shares: exit statuses, argument types and the checks made before any work.

Each check here runs before a pool is solved or a model is loaded, so bad input costs a second, not an hour:
argument types reject malformed numbers and names while the command line is parsed (argparse prints the usage
and exits 2), and the ``check_*`` functions raise :class:`mapjax.errors.InputError` for what needs more than
one argument or a look at the disk (the command prints one line and exits 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

from mapjax.errors import InputError
from mapjax.pool import repeated_names

EXIT_OK = 0
EXIT_NOT_REACHED = 1   # the palette is infeasible, or the solver did not converge
EXIT_BAD_INPUT = 2     # an argument, file or setting that cannot be used

EXIT_STATUS_HELP = """exit status:
  0  success (the palette was solved, the command finished)
  1  the palette cannot be reached (infeasible), the solver did not converge, or finetuning diverged
  2  bad input: an argument, file or setting that cannot be used (one line on stderr says which)"""

PROMPT_SOURCES = ("hh-rlhf", "anthropic-harmless", "imdb")
PALETTE_HELP = 'e.g. "humor>=q0.8, gpt2-helpful>=max(mean,q0.8), diversity>=mean"'


def add_policy_argument(command: argparse.ArgumentParser) -> None:
    """``--policy``, read the same way by every command that samples a model."""
    command.add_argument("--policy", required=True, help="a .gguf file, an HF model folder, or a cached hub id")


def add_dtype_argument(command: argparse.ArgumentParser, help: str | None = None) -> None:
    """``--dtype float32|bfloat16``, the one spelling of the parameter dtype for every command that loads a
    model (checked while the command line is parsed, before anything is loaded)."""
    from mapjax.dtypes import DEFAULT_DTYPE, DTYPE_NAMES

    command.add_argument("--dtype", choices=DTYPE_NAMES, default=DEFAULT_DTYPE,
                         help=help or "parameter dtype of the policy and the reward models (and of the KV cache); "
                                      "norms, softmax and log-probabilities stay float32 (default: float32)")


def add_prompts_argument(command: argparse.ArgumentParser) -> None:
    """``--prompts``, a prompt source as :func:`mapjax.prompts.load_prompts` reads it."""
    command.add_argument("--prompts", required=True,
                         help="prompt source: hh-rlhf, imdb, or a .txt / .jsonl / .json file")


def add_parser(subparsers: Any, name: str, help: str, **options: Any) -> argparse.ArgumentParser:
    """A subcommand parser whose ``--help`` ends with the exit-status table."""
    return subparsers.add_parser(name, help=help, epilog=EXIT_STATUS_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **options)


def add_mesh_arguments(command: argparse.ArgumentParser) -> None:
    """``--mesh`` and the explicit multi-process form ``--coordinator/--num-processes/--process-id``, for every
    command that does batched work; :func:`setup_devices` acts on them. Specs are checked while the command line
    is parsed, before anything is loaded."""
    group = command.add_argument_group(
        "devices and processes",
        "one process per host runs the same command; SLURM (srun), Open MPI (mpirun) and multi-host TPU slices are "
        "detected, elsewhere give all three of --coordinator, --num-processes and --process-id")
    group.add_argument("--mesh", type=mesh_spec, default=None, metavar="SPEC",
                       help="shard the batched work over a device mesh, e.g. data=8 or data=2,fsdp=4 (axes: data, "
                            "fsdp, model; sizes multiply to the device count); results do not depend on it "
                            "(default: one device)")
    group.add_argument("--coordinator", type=coordinator_address, default=None, metavar="HOST:PORT",
                       help="process 0's address and a free port, the same on every process")
    group.add_argument("--num-processes", type=positive_int, default=None, metavar="N",
                       help="how many processes take part")
    group.add_argument("--process-id", type=non_negative_int, default=None, metavar="I",
                       help="this process's id, 0..N-1")


def check_device_arguments(args: argparse.Namespace) -> None:
    """The multi-process flags name all three or none, and ``--process-id`` is below ``--num-processes``
    (checked before any JAX call)."""
    flags = {"--coordinator": getattr(args, "coordinator", None),
             "--num-processes": getattr(args, "num_processes", None),
             "--process-id": getattr(args, "process_id", None)}
    given = [flag for flag, value in flags.items() if value is not None]
    if given and len(given) < len(flags):
        missing = [flag for flag in flags if flag not in given]
        raise InputError(f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run names all "
                         "three (or none, on SLURM, Open MPI or a TPU slice, which are detected)")
    if given and not flags["--process-id"] < flags["--num-processes"]:
        raise InputError(f"--process-id {flags['--process-id']} must be below --num-processes "
                         f"{flags['--num-processes']} (ids run 0..{flags['--num-processes'] - 1})")


def setup_devices(args: argparse.Namespace, *, per_process: bool = False) -> Any:
    """Start ``jax.distributed`` when the flags (or a detected cluster) ask for it, then return the ``--mesh`` as a
    ``jax.sharding.Mesh`` (None without ``--mesh``). Call it before anything else uses JAX in the process.

    ``per_process``: the mesh spans this process's own devices (commands where each process does its own share
    of the prompts: ``pool``, ``decode``); otherwise every process's devices (one program over all of them, as
    finetuning runs).
    """
    check_device_arguments(args)
    from mapjax.distributed import initialize

    initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
               getattr(args, "process_id", None))
    spec = getattr(args, "mesh", None)
    if spec is None:
        return None
    import jax

    from mapjax.sharding import as_mesh

    return as_mesh(spec, jax.local_devices() if per_process else None)


# ---------------------------------------------------------------------------------------------- argument types
def _number(text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def open_unit_interval(text: str) -> float:
    value = finite_float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {text!r}")
    return value


def half_open_unit_interval(text: str) -> float:
    value = finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text!r}")
    return value


def mesh_spec(text: str) -> dict[str, int]:
    """A mesh spec ``axis=size,...`` (axes data, fsdp, model) as ``{axis: size}``."""
    from mapjax.errors import MapjaxError
    from mapjax.sharding import parse_mesh_spec

    try:
        return parse_mesh_spec(text)
    except MapjaxError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def coordinator_address(text: str) -> str:
    """``HOST:PORT`` of process 0 (see :func:`mapjax.distributed.check_coordinator`)."""
    from mapjax.distributed import DistributedError, check_coordinator

    try:
        return check_coordinator(text)
    except DistributedError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def name_list(text: str) -> list[str]:
    """Comma-separated names: at least one, none empty, none repeated."""
    names = [name.strip() for name in text.split(",")]
    if not any(names) or "" in names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    repeated = repeated_names(names)
    if repeated:
        raise argparse.ArgumentTypeError(f"names {', '.join(repeated)} more than once: {text!r}")
    return names


# ----------------------------------------------------------------------------------------- checks before work
def check_input_file(path: str | Path, flag: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{flag} {path}: no such file")
    return path


def check_pool_output(path: str | Path, flag: str = "--out", *, overwrite: bool,
                      inputs: dict[str, Any] | None = None) -> Path:
    """A pool file to write: a known format, not a folder, none of the command's ``inputs`` ({flag: path}), and
    not an existing file unless ``overwrite``, which replaces only a mapjax pool or result
    (:func:`mapjax.outputs.check_file_output`)."""
    from mapjax.build import POOL_SUFFIXES
    from mapjax.outputs import check_file_output

    path = Path(path).expanduser()
    if path.suffix.lower() not in POOL_SUFFIXES:
        raise InputError(f"{flag} {path}: unknown pool format {path.suffix!r}; use {', '.join(POOL_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a pool file")
    return check_file_output(path, overwrite=overwrite, flag=flag, inputs=inputs)


def check_output_folder(path: str | Path, flag: str = "--out", *, overwrite: bool = False,
                        inputs: dict[str, Any] | None = None) -> Path:
    """A run folder to write: not the current folder or a parent of it, none of the command's ``inputs``, not a
    file, and not a folder holding files mapjax did not write (:func:`mapjax.outputs.check_output_folder`)."""
    from mapjax.outputs import check_output_folder as check_folder

    return check_folder(path, overwrite=overwrite, flag=flag, inputs=inputs)


def check_prompt_source(source: str, flag: str = "--prompts") -> None:
    """A named prompt set or an existing file."""
    if source in PROMPT_SOURCES:
        return
    if not Path(source).expanduser().is_file():
        raise InputError(f"{flag} {source!r} is neither {', '.join(PROMPT_SOURCES)} nor an existing file")


def check_policy(policy: str, flag: str = "--policy") -> None:
    """A policy that names a local file or folder must exist; ``owner/name`` hub ids are looked up on load."""
    path = Path(policy).expanduser()
    looks_local = path.suffix.lower() == ".gguf" or policy.startswith((".", "/", "~")) or policy.count("/") > 1
    if looks_local and not path.exists():
        raise InputError(f"{flag} {policy}: no such file or folder")


def check_reward_names(names: Sequence[str], flag: str = "--values") -> None:
    """Every name is a registered reward (``mapjax.rewards.available_rewards``)."""
    from mapjax.rewards import available_rewards

    known = available_rewards()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputError(f"{flag}: unknown reward {', '.join(map(repr, unknown))}; known rewards: {', '.join(known)}")


def check_palette(palette: str, values: Sequence[str] | None = None, *, flag: str = "--palette",
                  values_flag: str = "--values") -> Any:
    """The parsed palette; with ``values``, every value it constrains must be among them."""
    from mapjax.palette import parse

    parsed = parse(palette)
    if values is not None:
        missing = [name for name in parsed.names if name not in values]
        if missing:
            raise InputError(f"{flag} constrains {', '.join(missing)}, which {values_flag} does not score "
                             f"({', '.join(values)})")
    return parsed


def normaliser(per_prompt: bool) -> str:
    return "per_prompt" if per_prompt else "pooled"


def solution_status(solution: Any) -> int:
    """0 for a solved palette, 1 for an infeasible one or a solver that did not converge."""
    return EXIT_OK if solution.status == "optimal" else EXIT_NOT_REACHED


def print_json(value: Any) -> None:
    from mapjax.jsonio import dumps

    print(dumps(value))
