"""Multi-process (multi-host) runs with ``jax.distributed``: start it, find this process's share, wait for the rest.

One process per host (or per GPU) runs the same ``mapjax`` command; :func:`initialize` connects them through a
coordinator (process 0's ``HOST:PORT``). On SLURM (launched with ``srun``), Open MPI (``mpirun``) and multi-host
TPU slices JAX finds the coordinator, the process count and this process's id itself, so ``initialize()`` with no
arguments is enough; elsewhere give all three (``--coordinator/--num-processes/--process-id`` on the command line).
In a plain single process ``initialize()`` does nothing, so the same script runs on a laptop and on a cluster.

Work is split, not replicated: each process takes its contiguous share of the prompts (:func:`process_slice`) and
writes its own files; :func:`barrier` waits for every process before the primary one (:func:`is_primary`) merges
them. A row's random key depends only on the seed, its prompt and its sample index, so the result is the same
whatever the number of processes.

``jax.distributed.initialize`` must run before anything starts JAX's backend (before the first array, device
query or compiled call of the process); :func:`initialize` says so plainly when it is too late. On CPU the
processes exchange data through gloo collectives, which :func:`initialize` selects.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import numpy as np

from mapjax.errors import MapjaxError

# MAPJAX_DISTRIBUTED=1 lets JAX detect a cluster mapjax does not recognise (e.g. a TPU slice whose worker list is
# only in the VM's metadata); =0 never starts jax.distributed without explicit arguments.
AUTO_ENV = "MAPJAX_DISTRIBUTED"
_COORDINATOR = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]+)$")


class DistributedError(MapjaxError):
    """Bad or incomplete ``jax.distributed`` settings, or a start that comes too late; the message says which."""


def check_coordinator(address: str) -> str:
    """``address`` as ``HOST:PORT`` (a host name, an IPv4 address or a bracketed IPv6 one; a port 1-65535)."""
    if not isinstance(address, str):
        raise DistributedError(f"coordinator must be 'HOST:PORT' (process 0's address), got {address!r}")
    match = _COORDINATOR.match(address.strip())
    if match is None:
        raise DistributedError(f"coordinator {address!r} is not HOST:PORT (process 0's host and a free port, "
                               "e.g. node001:1234 or 10.0.0.1:1234)")
    port = int(match.group("port"))
    if not 1 <= port <= 65535:
        raise DistributedError(f"coordinator {address!r}: port {port} is not in 1..65535")
    return address.strip()


def check_settings(coordinator: str | None, num_processes: int | None, process_id: int | None
                   ) -> tuple[str, int, int] | None:
    """The explicit form checked before any JAX call: all three given and consistent, or none (None).

    Raises:
        DistributedError: some but not all are given, or one is malformed (named with its value).
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(value is None for value in given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        named = ", ".join(f"{name}={value!r}" for name, value in given.items() if value is not None)
        raise DistributedError(f"{named} given without {', '.join(missing)}: a multi-process run names all three "
                               "(coordinator HOST:PORT, num_processes, process_id), or none of them on a cluster "
                               "JAX detects (SLURM, Open MPI, TPU)")
    coordinator = check_coordinator(coordinator)
    for name in ("num_processes", "process_id"):
        value = given[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistributedError(f"{name} must be a whole number, got {value!r}")
    if num_processes < 1:
        raise DistributedError(f"num_processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id must be in 0..{num_processes - 1} (num_processes={num_processes}), "
                               f"got {process_id}")
    return coordinator, int(num_processes), int(process_id)


def detected_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher this process runs under, from its environment: ``"slurm"`` (an ``srun`` step
    of several tasks), ``"ompi"`` (``mpirun`` with several ranks), ``"tpu"`` (a multi-host TPU slice) or
    ``"env"`` (``MAPJAX_DISTRIBUTED=1``); None for a single process. One task or rank is a single process: it
    needs no coordinator, so none is started."""
    environ = os.environ if environ is None else environ
    setting = environ.get(AUTO_ENV, "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return None
    if setting in ("1", "true", "yes", "on"):
        return "env"

    def count(name: str) -> int:
        try:
            return int(environ.get(name, "1"))
        except ValueError:
            return 1

    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(name in environ for name in slurm):   # the variables JAX's SLURM detection reads
        if count("SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS") > 1:
            return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and count("OMPI_COMM_WORLD_SIZE") > 1:
        return "ompi"
    hosts = [host for host in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if host.strip()]
    if len(hosts) > 1 or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return None


def _backend_started() -> bool:
    """Whether this process already used JAX's backend (then ``jax.distributed`` can no longer start)."""
    try:
        from jax._src import xla_bridge
    except ImportError:   # a JAX without the module: let jax.distributed.initialize say it
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else False


def _use_gloo() -> None:
    """CPU collectives through gloo (JAX's CPU processes cannot exchange data otherwise); an explicit choice of
    the user (e.g. ``mpi``) is kept."""
    import jax

    current = getattr(jax.config, "jax_cpu_collectives_implementation", None)
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Start ``jax.distributed`` for a multi-process run; a no-op in a plain single process. Idempotent.

    Args:
        coordinator: ``HOST:PORT`` of process 0 (every process gives the same), or None.
        num_processes: how many processes take part, or None.
        process_id: this process's id in ``0..num_processes-1``, or None.

    With all three None, ``jax.distributed`` starts only when the environment shows a multi-process launch
    (:func:`detected_cluster`: SLURM ``srun``, Open MPI ``mpirun``, a multi-host TPU slice, or
    ``MAPJAX_DISTRIBUTED=1``), and JAX reads the three from it. Call it first thing, before any other JAX use.

    Raises:
        DistributedError: some but not all of the three are given, one is malformed, JAX's backend already
            started in this process, or it already runs as another process of another run.
    """
    explicit = check_settings(coordinator, num_processes, process_id)   # before touching JAX
    import jax

    if jax.distributed.is_initialized():
        if explicit is not None:
            _, count, index = explicit
            if (jax.process_count(), jax.process_index()) != (count, index):
                raise DistributedError(
                    f"jax.distributed already runs as process {jax.process_index()} of {jax.process_count()}; "
                    f"cannot start again as process {index} of {count}")
        return
    cluster = detected_cluster() if explicit is None else None
    if explicit is None and cluster is None:
        return   # a plain single process: nothing to connect
    if _backend_started():
        raise DistributedError(
            "jax.distributed must be initialised before any other JAX call, but this process already used JAX "
            "(an array, a device query or a compiled function came first); call mapjax.distributed.initialize "
            "at the very start of the program")
    _use_gloo()
    try:
        if explicit is None:
            jax.distributed.initialize()
        else:
            address, count, index = explicit
            jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    except (RuntimeError, ValueError) as error:
        launchers = {"slurm": "SLURM's srun", "ompi": "Open MPI's mpirun", "tpu": "the TPU slice",
                     "env": f"{AUTO_ENV}=1"}
        where = (f"as process {explicit[2]} of {explicit[1]} with coordinator {explicit[0]}" if explicit
                 else f"with the settings of {launchers.get(cluster, cluster)}")
        raise DistributedError(f"jax.distributed could not start {where}: {error}") from error


def contiguous_share(count: int, index: int, parts: int) -> slice:
    """Part ``index`` of ``count`` items cut into ``parts`` contiguous runs whose sizes differ by at most one
    (the first ``count % parts`` runs have the extra item); the runs cover ``range(count)`` in order."""
    for name, value in (("count", count), ("index", index), ("parts", parts)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise DistributedError(f"{name} must be a whole number, got {value!r}")
    if count < 0 or parts < 1 or not 0 <= index < parts:
        raise DistributedError(f"cannot take part {index} of {parts} of {count} items")
    size, extra = divmod(count, parts)
    start = index * size + min(index, extra)
    return slice(start, start + size + (1 if index < extra else 0))


def process_slice(count: int) -> slice:
    """This process's contiguous share of ``count`` items (all of them in a single process). Starts JAX's
    backend: call :func:`initialize` first."""
    import jax

    return contiguous_share(count, jax.process_index(), jax.process_count())


def is_primary() -> bool:
    """Whether this is process 0, the one that merges and writes shared results (True in a single process)."""
    import jax

    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (each must use the same name at the same point);
    returns at once in a single process."""
    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def gather(value: Any) -> np.ndarray:
    """Every process's ``value`` (a number or array of one shape and dtype on all of them), stacked in process
    order: ``[process_count, *shape]``. Every process must call it at the same point."""
    import jax

    array = np.asarray(value)
    if jax.process_count() == 1:
        return array[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=False))
