"""Where a solve's arrays live: on one device, or on a device mesh with the samples and the palettes sharded.

A pool too big for one device (10^8 samples) is split over the mesh's batch axes (``data`` and ``fsdp``, see
:mod:`mapjax.sharding`): each device holds a slice of the samples, and the log-sum-exp, the moments and the
Hessian of the dual, all sums over samples, are reduced across devices by the compiler (GSPMD) from the
arrays' ``NamedSharding``; the kernel's code is the one-device code. A batch of palettes (the kernel's leading,
vmapped axis) is split over the mesh's ``model`` axis, which the solver has no other use for: ``model=8`` solves
eight slices of a palette batch side by side on a replicated pool, ``data=2,model=4`` does both.

Which sample axis is split: the pooled problem is one group of all samples, so its slots; the per-prompt
problem its groups (prompts), or its slots when there are fewer prompts than samples per prompt. The split
axis is padded to a multiple of the devices with entries that change no reduction: a padded slot has
log p0 = -inf (weight exactly 0, like the empty slots of a ragged pool), a padded group has weight 0 in the
sum over groups and one zero-reward slot (so its own log-normaliser is a finite 0). Results differ from a
one-device solve only by the order of the floating-point sums (about 1e-15 in float64).

With ``mesh=None`` nothing here adds any work: the arrays are put on the default device once per problem, as
they always were, and the kernels are the plain jitted ones.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mapjax.problem import DualProblem
from mapjax.solver import newton

# Mesh axes the samples are split over, and the axis the palette batch is split over.
SAMPLE_AXES = ("data", "fsdp")
PALETTE_AXES = ("model",)

# Device copies of each problem's arrays, per (dtype, mesh), so repeated solves on one pool transfer them once.
_ON_DEVICE: "weakref.WeakKeyDictionary[DualProblem, dict]" = weakref.WeakKeyDictionary()
# Kernels jitted with replicated outputs, per mesh.
_MESH_KERNELS: dict[Mesh, tuple[Callable, Callable, Callable]] = {}


@dataclass(frozen=True)
class Placement:
    """The mesh of a solve (None: one device) and the mesh axes its samples and its palettes are split over."""

    mesh: Mesh | None = None  # as :func:`mapjax.sharding.as_mesh` makes it (Auto axis types)
    sample_axes: tuple[str, ...] = ()  # mesh axes that split the samples (a subset of SAMPLE_AXES)
    palette_axes: tuple[str, ...] = ()  # mesh axes that split the palette batch (a subset of PALETTE_AXES)

    @classmethod
    def of(cls, mesh: Any) -> "Placement":
        """The placement for a ``mesh`` in any form :func:`mapjax.sharding.as_mesh` takes (None: one device)."""
        if mesh is None:
            return ONE_DEVICE
        from mapjax.sharding import as_mesh

        mesh = as_mesh(mesh)  # axes of type Auto: the compiler places the kernel's intermediate arrays
        if mesh is None:
            return ONE_DEVICE
        names = tuple(mesh.axis_names)
        return cls(mesh, tuple(a for a in SAMPLE_AXES if a in names), tuple(a for a in PALETTE_AXES if a in names))

    @property
    def sample_devices(self) -> int:
        """How many slices the samples are split into."""
        return _product(self.mesh, self.sample_axes)

    @property
    def palette_devices(self) -> int:
        """How many slices a palette batch is split into (its padded size is a multiple of this)."""
        return _product(self.mesh, self.palette_axes)

    def problem_arrays(self, problem: DualProblem, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(scaled, log_base, group_weight) of ``problem`` on device in ``dtype``, transferred once per problem,
        dtype and mesh; on a mesh padded and split over :attr:`sample_axes` (see the module docstring)."""
        copies = _ON_DEVICE.setdefault(problem, {})
        key = jnp.dtype(dtype).name if self.mesh is None else (jnp.dtype(dtype).name, self.mesh)
        if key not in copies:
            arrays = (problem.scaled, problem.log_base, problem.group_weight)
            if self.mesh is None:
                copies[key] = tuple(jnp.asarray(array, dtype) for array in arrays)
            else:
                copies[key] = self._shard_problem(*arrays, dtype)
        return copies[key]

    def _shard_problem(self, scaled, log_base, group_weight, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
        num_groups, num_slots = log_base.shape
        devices = self.sample_devices
        split = self.sample_axes or None
        # The pooled problem is one group: split its slots; per prompt, split the longer of groups and slots.
        if num_groups >= num_slots:
            extra = -num_groups % devices
            scaled = np.pad(scaled, ((0, extra), (0, 0), (0, 0)))
            padded_base = np.full((extra, num_slots), -np.inf)
            padded_base[:, 0] = 0.0  # one zero-reward sample: a finite log-normaliser of 0 ...
            log_base = np.concatenate([log_base, padded_base])
            group_weight = np.pad(group_weight, (0, extra))  # ... weighted 0 in every sum over groups
            specs = (P(split, None, None), P(split, None), P(split))
        else:
            extra = -num_slots % devices
            scaled = np.pad(scaled, ((0, 0), (0, extra), (0, 0)))
            log_base = np.pad(log_base, ((0, 0), (0, extra)), constant_values=-np.inf)  # weight exactly 0
            specs = (P(None, split, None), P(None, split), P(None))
        return tuple(self._put(array, spec, dtype) for array, spec in zip((scaled, log_base, group_weight), specs))

    def palettes(self, array: np.ndarray, dtype: Any = None) -> jax.Array:
        """A palette batch ``[B, ...]`` on device: split over :attr:`palette_axes` on a mesh (B must be a multiple
        of :attr:`palette_devices`, see :func:`padded_rows`)."""
        if self.mesh is None:
            return jnp.asarray(array, dtype)
        spec = P(self.palette_axes or None, *([None] * (np.ndim(array) - 1)))
        return self._put(array, spec, dtype)

    def scalar(self, value: Any, dtype: Any) -> jax.Array:
        """A scalar argument of a kernel (replicated on a mesh)."""
        if self.mesh is None:
            return jnp.asarray(value, dtype)
        return self._put(np.asarray(value), P(), dtype)

    def _put(self, array: np.ndarray, spec: P, dtype: Any) -> jax.Array:
        # Built shard by shard from the host copy, which every process of a multi-host run holds in full.
        host = np.asarray(array, dtype)
        sharding = NamedSharding(self.mesh, spec)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def kernels(self) -> tuple[Callable, Callable, Callable]:
        """(projected Newton, measure, mean) jitted for this placement: on a mesh with replicated outputs (they
        are small, [B, m, m] at most), so every process can read them."""
        if self.mesh is None:
            return newton.projected_newton, newton.measure_at, newton.mean_at
        if self.mesh not in _MESH_KERNELS:
            replicated = NamedSharding(self.mesh, P())
            _MESH_KERNELS[self.mesh] = tuple(
                jax.jit(kernel, out_shardings=replicated)
                for kernel in (newton.newton_kernel, newton.measure_kernel, newton.mean_kernel)
            )
        return _MESH_KERNELS[self.mesh]


ONE_DEVICE = Placement()


def _product(mesh: Mesh | None, axes: tuple[str, ...]) -> int:
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape[axis] for axis in axes], dtype=np.int64))


__all__ = ["ONE_DEVICE", "PALETTE_AXES", "Placement", "SAMPLE_AXES"]
