"""Device meshes for batched work: one mesh spec, logical axis names on parameters, and the rules between them.

Every batched entry point (``generate``, ``token_logprobs``, the model-based rewards, ``build_pool``, MAP-D,
finetuning, the solver) takes ``mesh: MeshLike = None`` and coerces it once with :func:`as_mesh`:

- ``None``: one device, the path mapjax always ran: no transfers added, the same compiled programs;
- a spec, ``"data=8"`` or ``"data=2,fsdp=4"``, or a mapping ``{"data": 2, "fsdp": 4}``: a mesh over the run's
  devices with those axes, whose sizes multiply to the device count;
- a ``jax.sharding.Mesh`` whose axis names are among ``MESH_AXES``.

The axes (a mesh has any subset, always in this order, ``data`` outermost: it is the one to stretch across
hosts, ``model`` innermost: it talks the most):

``data``
    rows (prompt x sample) are split over it; parameters are replicated along it.
``fsdp``
    rows are split over it too, and every parameter is sharded along its ``embed`` dimension (fully sharded
    data parallel): a model ``fsdp`` times larger than one device's memory still runs, XLA gathering a layer's
    weights where it is used.
``model``
    tensor parallel: attention heads, MLP columns and the vocabulary are split over it.

Rows of a batch are split over ``data`` x ``fsdp``, so a batch has a multiple of :func:`row_multiple` rows; the
callers pad it with filler rows as they already pad to power-of-two batch sizes.

Logical axes
------------
Parameters carry the names of their dimensions in the NNX metadata ``logical_axes`` (set in
:mod:`mapjax.models.layers` and the ports; MaxText's vocabulary: ``vocab``, ``embed``, ``heads``, ``kv_heads``,
``mlp``, ``norm``, ...), and :data:`DEFAULT_RULES` maps a logical name to mesh axes. A dimension takes the first
rule for its name whose mesh axes (those of size > 1 on the mesh) are not taken by an earlier dimension of the
same array and whose total size divides the dimension; otherwise it stays whole. A layout therefore never
changes what is computed, only where: tokens come out identical and floats agree to rounding (the order of a
sharded sum may differ). A parameter without names (a port that does not annotate one) is sharded over
``fsdp`` along its largest dimension that the fsdp size divides when it has two or more dimensions, and
replicated otherwise.

The names sit in a metadata key of mapjax's own rather than in Flax's ``out_sharding``: Flax shards an
``out_sharding`` variable eagerly when it is created and refuses to create one without a mesh in context, and
``nnx.Optimizer`` copies a parameter's metadata onto its moments, so building an optimizer would need a mesh
too. ``logical_axes`` is inert: it survives ``nnx.eval_shape``, ``set_value`` (checkpoint loading), ``nnx.split``
/ ``nnx.merge``, and the optimizer's moments carry it, so :func:`parameter_sharding` lays them out like their
parameters.

>>> from mapjax.sharding import as_mesh, shard_model
>>> mesh = as_mesh("data=2,fsdp=4")                          # 8 devices
>>> generate(model, tokenizer, prompts, mesh=mesh)            # same tokens as without a mesh
>>> shard_model(model, mesh)   # place the weights once, so that repeated calls move nothing
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mapjax.errors import MeshError

__all__ = [
    "BATCH_AXES", "DEFAULT_RULES", "LOGICAL_AXES", "MESH_AXES", "MeshLike", "Rules", "as_mesh", "axis_size",
    "batch_axes", "constrain_rows", "logical_axes", "logical_spec", "mesh_spec", "parameter_sharding",
    "parameter_specs", "parse_mesh_spec", "place", "replicate", "round_up_rows", "row_multiple", "rows_sharding", "shard_model",
    "shard_model_state", "shard_rows",
]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "model")
"""The mesh axis names mapjax knows, in mesh order (outermost first)."""

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
"""The mesh axes a batch's rows are split over."""

MeshLike = Union[Mesh, str, Mapping[str, int], None]
"""What every ``mesh=`` argument accepts: a ``Mesh``, a spec ``"data=2,fsdp=4"``, a mapping, or ``None``."""

LOGICAL_AXES = "logical_axes"
"""The NNX metadata key that holds a parameter's logical axis names, one per dimension (``None`` = unnamed)."""

Rules = Sequence[tuple[str, Union[str, tuple[str, ...], None]]]

DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),    # rows of activations, KV caches, per-row keys
    ("vocab", "model"),             # embedding tables and output heads
    ("heads", "model"),             # query (and fused q/k/v) projections' head dimension, output projections' input
    ("kv_heads", "model"),          # key/value projections and the KV cache's head axis
    ("mlp", "model"),               # MLP columns
    ("embed", "fsdp"),              # the model width: FSDP shards every weight matrix along it
    ("kv", None),                   # a head's own dimension
    ("length", None),               # cache slots / sequence positions
    ("position", None),             # position tables
    ("norm", None),                 # norm scales and shifts
    ("labels", None),               # classifier outputs
)
"""Logical axis -> mesh axes, MaxText-style; the first usable rule for a name wins (see the module doc)."""

_SPEC_PART = re.compile(r"^\s*([^=\s]*)\s*=\s*(.*?)\s*$")


# --------------------------------------------------------------------------------------------------------- #
# Building a mesh
# --------------------------------------------------------------------------------------------------------- #
def parse_mesh_spec(text: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (in the order written); ``MeshError`` naming the bad part.

    Axis names must be among ``MESH_AXES``, each at most once, with an integer size >= 1.
    """
    if not isinstance(text, str):
        raise MeshError(f"a mesh spec is a string such as 'data=8' or 'data=2,fsdp=4', got {type(text).__name__}")
    if not text.strip():
        raise MeshError("the mesh spec is empty; write e.g. 'data=8' or 'data=2,fsdp=4' (axes: "
                        f"{', '.join(MESH_AXES)})")
    sizes: dict[str, int] = {}
    for part in text.split(","):
        match = _SPEC_PART.match(part)
        if not part.strip() or match is None:
            raise MeshError(f"mesh spec {text!r}: part {part.strip()!r} is not AXIS=SIZE (e.g. 'data=8'; axes: "
                            f"{', '.join(MESH_AXES)})")
        name, size = match.groups()
        _check_axis_name(name, where=f"mesh spec {text!r}")
        if name in sizes:
            raise MeshError(f"mesh spec {text!r} names axis {name!r} twice")
        if not re.fullmatch(r"\+?[0-9]+", size) or int(size) < 1:
            raise MeshError(f"mesh spec {text!r}: the size of axis {name!r} must be an integer >= 1, got {size!r}")
        sizes[name] = int(size)
    return sizes


def _check_axis_name(name: Any, where: str) -> None:
    if name not in MESH_AXES:
        raise MeshError(f"{where}: unknown mesh axis {name!r}; the axes are {', '.join(MESH_AXES)}")


def _check_sizes(sizes: Mapping[Any, Any]) -> dict[str, int]:
    """A mapping of axis sizes, checked and put in ``MESH_AXES`` order."""
    if not sizes:
        raise MeshError("the mesh has no axes; give at least one of " + ", ".join(MESH_AXES))
    for name, size in sizes.items():
        _check_axis_name(name, where="mesh")
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise MeshError(f"mesh axis {name!r} must have an integer size >= 1, got {size!r}")
    return {name: int(sizes[name]) for name in MESH_AXES if name in sizes}


def mesh_spec(mesh: Mesh | Mapping[str, int] | None) -> str:
    """The spec string of a mesh (``"data=2,fsdp=4"``; ``""`` for ``None``): what ``--mesh`` takes and what
    manifests and logs record. ``as_mesh(mesh_spec(m))`` rebuilds ``m``'s shape."""
    if mesh is None:
        return ""
    sizes = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
    return ",".join(f"{name}={int(size)}" for name, size in sizes.items())


def _device_count_message(sizes: dict[str, int], needed: int, devices: list[Any], given: bool) -> str:
    spec = mesh_spec(sizes)
    if given:
        return f"mesh {spec} needs {needed} devices, {len(devices)} were given"
    if jax.process_count() > 1:
        return (f"mesh {spec} needs {needed} devices, this run has {len(devices)} "
                f"({jax.local_device_count()} on each of {jax.process_count()} processes)")
    return f"mesh {spec} needs {needed} devices, this process has {len(devices)}"


def _auto_mesh(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type Auto (XLA propagates shardings), which the model code is written for;
    Explicit axes would make every ambiguous contraction an error."""
    if all(kind == AxisType.Auto for kind in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def as_mesh(mesh: MeshLike, devices: Sequence[Any] | None = None) -> Mesh | None:
    """The one coercion of a ``mesh=`` argument: ``None`` stays ``None``; a spec string or a mapping becomes a
    mesh over ``devices`` (default: all of the run's devices, ``jax.devices()``; pass ``jax.local_devices()``
    for a mesh of this process's devices only); a ``Mesh`` is checked and returned (its axes made Auto).

    Raises ``MeshError`` for an unknown or repeated axis, a size that is not an integer >= 1, or sizes whose
    product is not the number of devices.
    """
    if mesh is None:
        return None
    if isinstance(mesh, Mesh):
        names = tuple(mesh.axis_names)
        for name in names:
            _check_axis_name(name, where=f"mesh {dict(mesh.shape)}")
        return _auto_mesh(mesh)
    if isinstance(mesh, str):
        sizes = _check_sizes(parse_mesh_spec(mesh))
    elif isinstance(mesh, Mapping):
        sizes = _check_sizes(mesh)
    else:
        raise MeshError(f"mesh must be a jax.sharding.Mesh, a spec such as 'data=2,fsdp=4', a mapping "
                        f"{{axis: size}} or None, got {type(mesh).__name__}")
    given = devices is not None
    device_list = list(jax.devices() if devices is None else devices)
    needed = math.prod(sizes.values())
    if needed != len(device_list):
        raise MeshError(_device_count_message(sizes, needed, device_list, given))
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types=(AxisType.Auto,) * len(sizes),
                         devices=device_list)


def axis_size(mesh: Mesh | None, name: str) -> int:
    """The size of axis ``name`` of ``mesh``: 1 when ``mesh`` is ``None`` or has no such axis."""
    if mesh is None:
        return 1
    return int(dict(mesh.shape).get(name, 1))


def batch_axes(mesh: Mesh | None) -> tuple[str, ...]:
    """The mesh axes rows are split over: those of ``BATCH_AXES`` the mesh has with size > 1."""
    return tuple(name for name in BATCH_AXES if axis_size(mesh, name) > 1)


def row_multiple(mesh: Mesh | None) -> int:
    """Rows of a batch must be a multiple of this (``data`` x ``fsdp``); 1 without a mesh."""
    return axis_size(mesh, "data") * axis_size(mesh, "fsdp")


def mesh_for_micro_batches(mesh: MeshLike, rows: int, described: str, setting: str,
                           error: type[Exception] = MeshError) -> Mesh | None:
    """``mesh`` coerced, refused with ``error`` before any work when a training micro-batch of ``rows`` rows
    (``described``, e.g. "batch_size 12 / grad_accum 2"; ``setting`` names what the user changes) cannot be split
    evenly over its ``data`` x ``fsdp`` devices: a training batch is data, not padding, so it is never filled up."""
    mesh = as_mesh(mesh)
    if mesh is None:
        return None
    multiple = row_multiple(mesh)
    if rows % multiple:
        raise error(f"a micro-batch of {rows} rows ({described}) cannot be split over the {multiple} devices of mesh "
                    f"{mesh_spec(mesh)}'s data x fsdp axes; make {setting} a multiple of {multiple}")
    return mesh


def round_up_rows(rows: int, mesh: Mesh | None) -> int:
    """``rows`` rounded up to a multiple of :func:`row_multiple` (unchanged without a mesh)."""
    multiple = row_multiple(mesh)
    return -(-int(rows) // multiple) * multiple


# --------------------------------------------------------------------------------------------------------- #
# Placing arrays
# --------------------------------------------------------------------------------------------------------- #
def _rows_spec(mesh: Mesh | None) -> PartitionSpec:
    axes = batch_axes(mesh)
    if not axes:
        return PartitionSpec()
    return PartitionSpec(axes[0] if len(axes) == 1 else axes)


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of an array whose leading dimension is rows: split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, _rows_spec(mesh))


def _put(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` laid out with ``sharding``: nothing moves when it already is; on a mesh spanning processes every
    process holds the whole value and keeps its own shards."""
    if isinstance(value, jax.Array) and value.sharding == sharding:
        return value
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = value if isinstance(value, jax.Array) else np.asarray(value)
    return jax.make_array_from_callback(tuple(np.shape(host)), sharding, lambda index: np.asarray(host[index]))


def place(tree: Any, shardings: Any) -> Any:
    """Every array of ``tree`` laid out with the ``NamedSharding`` at the same place in ``shardings`` (a tree of
    the same structure); arrays already so placed do not move."""
    return jax.tree.map(_put, tree, shardings)


def shard_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of ``tree`` with its leading dimension (rows) split over ``data`` x ``fsdp``; scalars
    replicated. ``tree`` unchanged without a mesh. ``MeshError`` when a leading dimension is not a multiple of
    :func:`row_multiple` (pad the batch first)."""
    if mesh is None:
        return tree
    multiple = row_multiple(mesh)
    rows, scalar = rows_sharding(mesh), NamedSharding(mesh, PartitionSpec())

    def place(leaf: Any) -> jax.Array:
        shape = np.shape(leaf)
        if not shape:
            return _put(leaf, scalar)
        if shape[0] % multiple:
            raise MeshError(f"a batch of {shape[0]} rows (array of shape {tuple(shape)}) cannot be split over the "
                            f"{multiple} devices of mesh {mesh_spec(mesh)}'s data x fsdp axes; pad it to a "
                            f"multiple of {multiple} rows")
        return _put(leaf, rows)

    return jax.tree.map(place, tree)


def replicate(tree: Any, mesh: Mesh | None) -> Any:
    """Every array of ``tree`` copied whole onto every device of ``mesh`` (unchanged without a mesh)."""
    if mesh is None:
        return tree
    everywhere = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: _put(leaf, everywhere), tree)


def constrain_rows(tree: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: ask XLA to keep every array of ``tree`` split by rows (scalars replicated). Without a
    mesh it returns ``tree`` untouched, so the traced program is the unsharded one."""
    if mesh is None:
        return tree
    rows, scalar = rows_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda leaf: jax.lax.with_sharding_constraint(leaf, rows if np.ndim(leaf) else scalar),
                        tree)


# --------------------------------------------------------------------------------------------------------- #
# Logical axes -> partition specs
# --------------------------------------------------------------------------------------------------------- #
def _check_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...] | None], ...]:
    checked = []
    for index, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise MeshError(f"sharding rule {index} must be (logical_name, mesh_axes), got {rule!r}")
        logical, target = rule
        if target is None:
            checked.append((logical, None))
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        for axis in axes:
            _check_axis_name(axis, where=f"sharding rule {logical!r}")
        checked.append((logical, axes))
    return tuple(checked)


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    return {str(name): int(size) for name, size in dict(mesh.shape).items()}


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Any, rules: Rules = DEFAULT_RULES
                 ) -> PartitionSpec:
    """The ``PartitionSpec`` of an array of ``shape`` whose dimensions are named ``axes``, on ``mesh`` (a
    ``Mesh`` or an ``AbstractMesh``): per dimension, the first rule for its name whose mesh axes of size > 1
    are still free and divide it; a dimension no rule fits stays whole."""
    if len(axes) != len(shape):
        raise MeshError(f"{len(axes)} logical axes {tuple(axes)} for an array of shape {tuple(shape)}")
    sizes = _mesh_sizes(mesh)
    checked = _check_rules(rules)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, dim in zip(axes, shape):
        chosen: tuple[str, ...] = ()
        for logical, target in checked:
            if name is None or logical != name:
                continue
            if target is None:
                break
            candidate = tuple(axis for axis in target if sizes.get(axis, 1) > 1)
            if candidate and not used.intersection(candidate) \
                    and int(dim) % math.prod(sizes[axis] for axis in candidate) == 0:
                chosen = candidate
                break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _fallback_spec(shape: Sequence[int], mesh: Any) -> PartitionSpec:
    """Unnamed arrays: ``fsdp`` on the largest dimension it divides (two or more dimensions), else replicated."""
    fsdp = _mesh_sizes(mesh).get("fsdp", 1)
    if len(shape) < 2 or fsdp == 1:
        return PartitionSpec()
    divisible = [index for index, dim in enumerate(shape) if int(dim) % fsdp == 0]
    if not divisible:
        return PartitionSpec()
    best = max(divisible, key=lambda index: (int(shape[index]), -index))
    return PartitionSpec(*([None] * best + ["fsdp"]))


def logical_axes(variable: Any) -> tuple[str | None, ...] | None:
    """The logical axis names of an NNX variable (``None`` when it has none)."""
    if not isinstance(variable, nnx.Variable):
        return None
    axes = variable.get_metadata().get(LOGICAL_AXES)
    return None if axes is None else tuple(axes)


def _leaf_spec(leaf: Any, mesh: Any, rules: Rules) -> PartitionSpec | None:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    if not hasattr(value, "shape"):
        return None
    shape = tuple(value.shape)
    axes = logical_axes(leaf)
    if axes is not None and len(axes) == len(shape):
        return logical_spec(axes, shape, mesh, rules)
    return _fallback_spec(shape, mesh)


def parameter_specs(state: Any, mesh: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """The ``PartitionSpec`` of every array of ``state`` (a tree like it, variables holding their spec) on
    ``mesh``, which may be a ``jax.sharding.AbstractMesh``: how a model would be laid out on a mesh this
    machine does not have (capacity planning, tests)."""
    _check_rules(rules)
    for name in dict(mesh.shape):
        _check_axis_name(name, where=f"mesh {dict(mesh.shape)}")

    def spec_of(leaf: Any) -> Any:
        spec = _leaf_spec(leaf, mesh, rules)
        if spec is None:
            return leaf
        return leaf.replace(spec) if isinstance(leaf, nnx.Variable) else spec

    return jax.tree.map(spec_of, state, is_leaf=lambda node: isinstance(node, nnx.Variable))


def parameter_sharding(state: Any, mesh: MeshLike, rules: Rules = DEFAULT_RULES) -> Any:
    """The ``NamedSharding`` of every array of ``state`` (an ``nnx.State``, a module's, an optimizer's, or an
    abstract one from ``nnx.eval_shape``; also a plain tree of arrays, laid out by the unnamed rule), as a tree of
    the same structure: variables come back holding their sharding. For ``jax.jit(out_shardings=...)`` and for
    orbax (``nnx.to_pure_dict`` of it is the restore target's shardings). ``None`` without a mesh."""
    mesh = as_mesh(mesh)
    if mesh is None:
        return None
    _check_rules(rules)

    def sharding_of(leaf: Any) -> Any:
        spec = _leaf_spec(leaf, mesh, rules)
        if spec is None:
            return leaf
        sharding = NamedSharding(mesh, spec)
        return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

    return jax.tree.map(sharding_of, state, is_leaf=lambda node: isinstance(node, nnx.Variable))


def shard_model_state(state: Any, mesh: MeshLike, rules: Rules = DEFAULT_RULES) -> Any:
    """``state`` with its arrays placed on ``mesh`` as :func:`parameter_sharding` lays them out (arrays already
    so placed do not move); ``state`` itself without a mesh."""
    mesh = as_mesh(mesh)
    if mesh is None:
        return state
    shardings = parameter_sharding(state, mesh, rules)
    is_variable = lambda node: isinstance(node, nnx.Variable)  # noqa: E731

    def place(leaf: Any, sharding: Any) -> Any:
        if isinstance(leaf, nnx.Variable):
            target = sharding.get_value() if isinstance(sharding, nnx.Variable) else sharding
            value = leaf.get_value()
            return leaf.replace(_put(value, target)) if isinstance(target, NamedSharding) else leaf
        return _put(leaf, sharding) if isinstance(sharding, NamedSharding) else leaf

    return jax.tree.map(place, state, shardings, is_leaf=is_variable)


def shard_model(model: nnx.Module, mesh: MeshLike, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place ``model``'s arrays on ``mesh`` in place (and return it): later sharded calls then move nothing, and
    no single-device copy of the weights stays behind. A model placed this way still runs without a mesh
    (XLA follows the arrays' shardings). ``model`` unchanged without a mesh."""
    mesh = as_mesh(mesh)
    if mesh is not None:
        nnx.update(model, shard_model_state(nnx.state(model), mesh, rules))
    return model


# --------------------------------------------------------------------------- #
# Loading straight onto a mesh
# --------------------------------------------------------------------------- #
_LOADING_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mapjax_loading_mesh", default=None)


@contextlib.contextmanager
def loading_onto(mesh: MeshLike) -> Iterator[Mesh | None]:
    """Within the block, checkpoint loaders (``mapjax.models.base.load_parameters``, and so every registered
    builder, ``from_pretrained``, ``from_gguf``, ``load_policy``) put each tensor's shards straight on their
    devices, one tensor at a time, so a model larger than one device loads. A context rather than a builder
    argument keeps the builder contract ``builder(hf_config, tensors, dtype)`` as it is for user builders."""
    token = _LOADING_MESH.set(as_mesh(mesh))
    try:
        yield _LOADING_MESH.get()
    finally:
        _LOADING_MESH.reset(token)


def place_loaded_parameter(variable: nnx.Variable, array: np.ndarray, dtype: Any) -> jax.Array:
    """``array`` as ``variable``'s value: on the loading mesh (see :func:`loading_onto`) laid out by the
    variable's logical axes, else a plain device array."""
    mesh = _LOADING_MESH.get()
    if mesh is None:
        return jnp.asarray(array, dtype=dtype)
    sharding = NamedSharding(mesh, _leaf_spec(variable, mesh, DEFAULT_RULES) or PartitionSpec())
    return jax.device_put(np.asarray(array).astype(jnp.dtype(dtype)), sharding)
