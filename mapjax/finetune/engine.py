"""The one training engine under every MAP-F route (weighted, DPO, GRPO, PPO).

- :class:`TrainState`: what a step changes and what it reads (trainable parameters keyed by path, the frozen
  rest, the optimizer state, the update count), a ``flax.struct`` dataclass.
- :class:`Policy`: the static description of the model (graph, trainable keys, compute dtype, PPO's value head)
  that rebuilds it from a state inside compiled code.
- :func:`optimizer` / :func:`learning_rate_schedule`: the one AdamW and its schedule. The optimizer runs at unit
  rate and each update's rate is an argument of the compiled update, so runs of any length, rate or schedule
  share one compilation.
- :class:`Engine`: a model split for training (every weight, or LoRA adapters over a frozen, optionally quantized
  base), laid out on a mesh by the parameters' logical axes, with the one jitted gradient-accumulation update
  that takes an *objective* (the route's loss, a hashable dataclass: see ``offline.py`` and ``online.py``).
- :class:`RunFolder`: a run's folder: the output checks, staging under ``--overwrite``, the run marker,
  checkpoints keyed by parameter path (Orbax), the metrics trail, and the final replacement of ``out``.

Checkpoints hold ``{"trainable": {path: array}, "opt": {path: array}}``: a parameter is restored by its name
(``layers.0.self_attn.q_proj.weight``), never by its position, so a renamed or reordered submodule is an error
naming the parameters that differ rather than tensors restored into the wrong places. A checkpoint of an older
mapjax, which keyed parameters by leaf order, is refused with the fix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mapjax.errors import DivergenceError, FinetuneError
from mapjax.finetune.config import TrainingConfig
from mapjax.models.base import CausalLM

CHECKPOINT_FORMAT = 2   # 1 (unmarked): parameters keyed by leaf order, refused


# --------------------------------------------------------------------------------------------------------- #
# State and graph
# --------------------------------------------------------------------------------------------------------- #
@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes."""

    # float32 master copies of what the optimizer moves, keyed by parameter path: every weight of the policy, or
    # only its LoRA adapters; PPO's value head under ``value_head.*``
    trainable: dict[str, jax.Array]
    # the rest of the model, never updated: under LoRA the base weights (in their dtype, quantized under QLoRA),
    # else the model's non-parameter state; passed to each step without being copied
    frozen: Any
    # the optax state of ``trainable`` (Adam's moments keyed like it, the update count)
    opt_state: Any
    # optimizer updates applied so far (an int32 scalar); keys the adapters' dropout
    step: jax.Array


def parameter_key(path: tuple[Any, ...]) -> str:
    """A parameter's checkpoint key: its path in the model joined by dots (``layers.0.q_proj.weight``)."""
    key = jax.tree_util.keystr(path, simple=True, separator=".")
    return key[:-len(".value")] if key.endswith(".value") else key


@dataclasses.dataclass(frozen=True)
class Policy:
    """The model as compiled code sees it: the graph and the trainable leaves' structure (static), rebuilt with
    :meth:`model` from a :class:`TrainState`'s arrays. Hashable, so it is a static argument of compiled steps and
    runs of the same model share compilations."""

    graphdef: Any
    treedef: Any                       # the trainable nnx.State's structure
    keys: tuple[str, ...]              # the trainable leaves' keys, in ``treedef``'s order
    dtype: str                         # compute dtype of the forward
    head: tuple[Any, Any, tuple[str, ...]] | None = None   # PPO's value head: graph, structure, keys
    # LoRA with dropout: the graph without it (scoring, sampling, reference passes); training passes bind a key
    eval_graphdef: Any = None
    dropout_key: Any = dataclasses.field(default=None, compare=False, hash=False)

    def model(self, trainable: Mapping[str, jax.Array], frozen: Any) -> Any:
        """The model at ``trainable`` (cast to the compute dtype) over ``frozen``; with adapter dropout, drawing
        its masks from the bound ``dropout_key`` (see :meth:`with_key`), or without dropout when none is bound."""
        compute = jnp.bfloat16 if self.dtype == "bfloat16" else jnp.float32
        leaves = [trainable[key] for key in self.keys]
        cast = [leaf.astype(compute) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for leaf in leaves]
        state = jax.tree.unflatten(self.treedef, cast)
        if self.eval_graphdef is None:
            return nnx.merge(self.graphdef, state, frozen)
        if self.dropout_key is None:
            return nnx.merge(self.eval_graphdef, state, frozen)
        from mapjax.finetune import lora

        return lora.with_dropout_key(nnx.merge(self.graphdef, state, frozen), self.dropout_key)

    def with_key(self, key: jax.Array) -> "Policy":
        """This policy drawing adapter dropout from ``key`` (inside a compiled step; never hashed)."""
        return dataclasses.replace(self, dropout_key=key)

    def logits(self, trainable: Mapping[str, jax.Array], frozen: Any, ids: jax.Array, attention: jax.Array
               ) -> jax.Array:
        """float32 logits ``[rows, seq, vocab]``."""
        return self.model(trainable, frozen)(ids, attention).logits.astype(jnp.float32)

    def apply(self, frozen: Any) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """``apply(trainable, ids, attention) -> logits`` over ``frozen``: the form the losses take."""
        return lambda trainable, ids, attention: self.logits(trainable, frozen, ids, attention)

    def value_head(self, trainable: Mapping[str, jax.Array]) -> Any:
        graphdef, treedef, keys = self.head
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, [trainable[key] for key in keys]))


class Objective(Protocol):
    """A route's loss: a frozen (hashable) dataclass, a static argument of the compiled update."""

    def totals(self, batch: Mapping[str, jax.Array]) -> Any:
        """Whole-batch quantities every micro-batch's share is taken of (e.g. token counts)."""

    def __call__(self, policy: Policy, frozen: Any, trainable: Mapping[str, jax.Array], reference: Any,
                 micro: Mapping[str, jax.Array], totals: Any, dynamic: Any) -> tuple[jax.Array, dict[str, Any]]:
        """``(loss, metrics)`` of one micro-batch (its share of the batch's loss)."""


# --------------------------------------------------------------------------------------------------------- #
# The optimizer
# --------------------------------------------------------------------------------------------------------- #
@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """What the compiled optimizer reads (the rate is an argument): weight decay and gradient clipping."""

    weight_decay: float
    clip_norm: float | None


def optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
    """AdamW at unit learning rate after global-norm clipping: its update times the step's rate is AdamW's update
    at that rate (``adamw = scale_by_adam, add_decayed_weights, scale_by_learning_rate``)."""
    parts = [optax.clip_by_global_norm(settings.clip_norm)] if settings.clip_norm else []
    parts.append(optax.adamw(1.0, weight_decay=settings.weight_decay))
    return optax.chain(*parts)


def learning_rate_schedule(config: TrainingConfig, total_updates: int) -> Callable[[int], float]:
    """The learning rate of each optimizer update (from 0): linear warm-up over ``warmup_steps`` updates, then
    constant, or cosine decay to 0 at ``total_updates``."""
    warmup = min(config.warmup_steps, total_updates)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warmup, 1) if warmup else 0,
                                                      max(total_updates, warmup + 1))
    elif warmup:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                         optax.constant_schedule(config.learning_rate)], [warmup])
    else:
        schedule = optax.constant_schedule(config.learning_rate)
    return lambda index: float(np.float32(schedule(index)))


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (one boolean, computed on the device)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def accumulated_gradients(trainable, frozen, reference, batch, dynamic, dropout_key, *, policy, objective):
    """``(gradients, metrics)`` of a batch ``[accum, micro, ...]``: a scan over micro-batches summing both (each
    micro-batch's loss is its share of the whole batch's, so the sums are the batch's). With adapter dropout
    each micro-batch draws its masks from its own key, split from ``dropout_key``."""
    totals = objective.totals(batch)
    accum = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.random.split(dropout_key, accum) if policy.eval_graphdef is not None else jnp.zeros((accum,))

    def loss(params, micro, key):
        bound = policy.with_key(key) if policy.eval_graphdef is not None else policy
        return objective(bound, frozen, params, reference, micro, totals, dynamic)

    grad_fn = jax.value_and_grad(loss, has_aux=True)

    def body(summed, inputs):
        micro, key = inputs
        (_, metrics), grads = grad_fn(trainable, micro, key)
        return jax.tree.map(jnp.add, summed, grads), metrics

    grads, metrics = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, trainable), (batch, keys))
    return grads, jax.tree.map(lambda values: jnp.sum(values, axis=0), metrics)


def _update(trainable, opt_state, step, frozen, reference, batch, learning_rate, dynamic, run_key, *, policy,
            objective, settings):
    """One optimizer update: the batch's accumulated gradients, then AdamW at ``learning_rate``. Adapter dropout
    keys come from the run's key and the update count, so a resumed run draws the same masks."""
    grads, metrics = accumulated_gradients(trainable, frozen, reference, batch, dynamic,
                                           jax.random.fold_in(run_key, step), policy=policy, objective=objective)
    updates, opt_state = optimizer(settings).update(grads, opt_state, trainable)
    updates = jax.tree.map(lambda update: learning_rate * update, updates)
    trainable = optax.apply_updates(trainable, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = all_finite(trainable)
    return trainable, opt_state, step + 1, metrics


_gradients_jit = jax.jit(accumulated_gradients, static_argnames=("policy", "objective"))
_STATIC = ("policy", "objective", "settings")
_update_jit = jax.jit(_update, donate_argnums=(0, 1, 2), static_argnames=_STATIC)
_MESH_UPDATES: dict[Any, Callable] = {}   # per layout: out_shardings keep the state where it was


# --------------------------------------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------------------------------------- #
class Engine:
    """A model split for training, its state, layout and update.

    Args:
        model: the base policy; not modified (its arrays are copied into float32 masters, or, under LoRA, shared
            as the frozen base).
        config: the run's settings (optimizer, dtype, adapters).
        total_updates: optimizer updates in the run (the schedule's length).
        mesh: a ``Mesh`` (None: one device): trainable parameters, their moments and the frozen base laid out by
            their logical axes (:func:`mapjax.sharding.parameter_sharding`), everything else replicated.
        value_head: PPO's value head module, trained with the policy (None for other routes).
        needs_reference: whether the route reads the base model (a KL term, DPO's reference): without adapters
            that costs a frozen copy of the initial weights, kept only when asked for.
    """

    def __init__(self, model: Any, config: TrainingConfig, total_updates: int, mesh: Mesh | None = None,
                 value_head: Any = None, needs_reference: bool = True):
        self.config, self.mesh, self.total_updates = config, mesh, total_updates
        self.adapters = config.adapters
        if self.adapters is not None:
            from mapjax.finetune import lora

            model = lora.add_adapters(model, self.adapters, seed=config.seed)
            graphdef, params, frozen = nnx.split(model, nnx.LoRAParam, ...)
        else:
            graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
        with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        keys = tuple(parameter_key(path) for path, _ in with_paths)
        self.param_dtypes = {key: leaf.dtype for key, (_, leaf) in zip(keys, with_paths)}
        head = None
        head_leaves: dict[str, jax.Array] = {}
        if value_head is not None:
            head_graphdef, head_state = nnx.split(value_head)
            head_paths, head_treedef = jax.tree_util.tree_flatten_with_path(head_state)
            head_keys = tuple("value_head." + parameter_key(path) for path, _ in head_paths)
            head = (head_graphdef, head_treedef, head_keys)
            head_leaves = {key: leaf for key, (_, leaf) in zip(head_keys, head_paths)}
        eval_graphdef = None
        if self.adapters is not None and self.adapters.dropout:
            from mapjax.finetune import lora

            eval_graphdef = nnx.graphdef(lora.dropout_free(model))
        self.policy = Policy(graphdef, treedef, keys, config.dtype, head, eval_graphdef)
        self.run_key = jax.random.fold_in(jax.random.key(0), config.seed)
        self.settings = OptimizerSettings(float(config.weight_decay), config.clip_norm)
        self.tx = optimizer(self.settings)
        self.learning_rate = learning_rate_schedule(config, total_updates)

        leaves = dict(zip(keys, (leaf for _, leaf in with_paths)))
        self.shardings: dict[str, Any] | None = None
        if mesh is not None:
            from mapjax.sharding import parameter_sharding, replicate

            laid = jax.tree.leaves(parameter_sharding(params, mesh), is_leaf=lambda n: isinstance(n, NamedSharding))
            if len(laid) != len(keys):
                raise FinetuneError(f"the mesh layout covers {len(laid)} of the model's {len(keys)} parameter arrays")
            replicated = NamedSharding(mesh, P())
            self.shardings = {**dict(zip(keys, laid)), **{key: replicated for key in head_leaves}}
            # placed before the float32 copy, so that no whole float32 copy is made on one device
            leaves = {key: place(leaf, self.shardings[key]) for key, leaf in leaves.items()}
            head_leaves = {key: place(leaf, replicated) for key, leaf in head_leaves.items()}
            frozen = _place_frozen(frozen, mesh) if self.adapters is not None else replicate(frozen, mesh)
        # copies: the update donates its parameters, and the caller's model must stay intact
        trainable = {key: jnp.array(leaf, jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype,
                                    copy=True) for key, leaf in {**leaves, **head_leaves}.items()}
        # The KL and DPO reference: the base itself. Under LoRA that is the adapters switched off (zero
        # adapters add nothing), not a second copy of the model; else a frozen copy of the initial weights.
        policy_keys = set(keys)
        initial = {key: value for key, value in trainable.items() if key in policy_keys}
        if self.adapters is not None:
            self.reference = jax.tree.map(jnp.zeros_like, initial)
        elif needs_reference:
            self.reference = jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), initial)
        else:
            self.reference = None
        if mesh is None:
            opt_state = self.tx.init(trainable)
            self._update = _update_jit
        else:
            opt_shardings = _optimizer_shardings(self.tx, trainable, self.shardings, mesh)
            # made on the mesh in its layout: no whole copy of a moment ever sits on one device
            opt_state = jax.jit(self.tx.init, out_shardings=opt_shardings)(trainable)
            self._update = _mesh_update(self.shardings, opt_shardings, mesh)
        self.state = TrainState(trainable=trainable, frozen=frozen, opt_state=opt_state,
                                step=jnp.zeros((), jnp.int32))

    # -- training ------------------------------------------------------------------------------------------ #
    def update(self, batch: Mapping[str, Any], objective: Objective, index: int, dynamic: Any = None
               ) -> dict[str, float]:
        """Optimizer update number ``index`` (from 0 over the run: it sets the learning rate) on ``batch``
        (``[accum, micro, ...]`` arrays, placed on the mesh here); returns its metrics as floats."""
        batch = self.place_batch(batch)
        state = self.state
        trainable, opt_state, step, metrics = self._update(
            state.trainable, state.opt_state, state.step, state.frozen, self.reference, batch,
            jnp.float32(self.learning_rate(index)), dynamic, self.run_key, policy=self.policy, objective=objective,
            settings=self.settings)
        self.state = state.replace(trainable=trainable, opt_state=opt_state, step=step)
        out = {key: float(value) for key, value in metrics.items()}
        out["learning_rate"] = self.learning_rate(index)
        return out

    def gradients(self, batch: Mapping[str, Any], objective: Objective, dynamic: Any = None) -> tuple[Any, Any]:
        """``(gradients keyed like the trainable parameters, metrics)`` of ``batch`` at the current state,
        without updating (for checks and benchmarks)."""
        return _gradients_jit(self.state.trainable, self.state.frozen, self.reference, self.place_batch(batch),
                              dynamic, jax.random.fold_in(self.run_key, self.state.step), policy=self.policy,
                              objective=objective)

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """A batch ``[accum, micro, ...]`` on device: on a mesh its micro axis (the rows) split over ``data`` x
        ``fsdp``, the accumulation axis whole (the update scans over it)."""
        if self.mesh is None:
            return {key: jnp.asarray(value) for key, value in batch.items()}
        from mapjax.sharding import rows_sharding

        rows = NamedSharding(self.mesh, P(None, *rows_sharding(self.mesh).spec))
        return {key: place(value, rows) for key, value in batch.items()}

    def place_rows(self, array: Any) -> jax.Array:
        """An array whose leading axis is rows, split over ``data`` x ``fsdp`` on a mesh."""
        if self.mesh is None:
            return jnp.asarray(array)
        from mapjax.sharding import rows_sharding

        return place(array, rows_sharding(self.mesh))

    # -- what it holds --------------------------------------------------------------------------------------- #
    def trainable_count(self) -> int:
        """Parameters the optimizer moves (the policy's; adapters only under LoRA)."""
        return int(sum(math.prod(self.state.trainable[key].shape) for key in self.policy.keys))

    def model(self, copy: bool = True) -> Any:
        """The policy at the current parameters, in the model's dtypes, with adapters if any (``copy=False``
        shares the float32 masters: for sampling before the next update, which donates them)."""
        trainable = {key: jnp.array(self.state.trainable[key], self.param_dtypes[key], copy=copy)
                     for key in self.policy.keys}
        leaves = [trainable[key] for key in self.policy.keys]
        return nnx.merge(self.policy.graphdef, jax.tree.unflatten(self.policy.treedef, leaves), self.state.frozen)

    def plain_model(self) -> Any:
        """The trained policy as a plain model of its architecture: adapters merged into the weights under LoRA
        (the base dequantized under QLoRA), else :meth:`model`."""
        if self.adapters is None:
            return self.model()
        from mapjax.finetune import lora

        return lora.merge_adapters(self.model())

    def sampling_model(self) -> Any:
        """The current policy for sampling and scoring between updates: shares the float32 masters (the next
        update donates them, so use it before), adapters without dropout."""
        model = self.model(copy=False)
        if self.policy.eval_graphdef is not None:
            from mapjax.finetune import lora

            model = lora.dropout_free(model)
        return model

    def value_head(self) -> Any:
        return None if self.policy.head is None else self.policy.value_head(self.state.trainable)

    # -- checkpoints ---------------------------------------------------------------------------------------- #
    def state_tree(self) -> dict[str, dict[str, Any]]:
        """``{"trainable": {key: array}, "opt": {key: array}}``: what a checkpoint holds, keyed by path."""
        opt = {_opt_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(self.state.opt_state)[0]}
        return {"trainable": dict(self.state.trainable), "opt": opt}

    def restore_target(self) -> dict[str, dict[str, Any]]:
        """Shapes, dtypes and shardings of :meth:`state_tree`: restored onto this run's layout (its mesh, or its
        one device) whatever layout saved it, each device reading its own shards."""
        def target(leaf):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)

        return jax.tree.map(target, self.state_tree())

    def load_state_tree(self, tree: Mapping[str, Mapping[str, Any]], step: int) -> None:
        with_paths, structure = jax.tree_util.tree_flatten_with_path(self.state.opt_state)
        opt_state = jax.tree.unflatten(structure, [jnp.asarray(tree["opt"][_opt_key(path)])
                                                   for path, _ in with_paths])
        trainable = {key: jnp.asarray(tree["trainable"][key]) for key in self.state.trainable}
        self.state = self.state.replace(trainable=trainable, opt_state=opt_state,
                                        step=jnp.asarray(step, jnp.int32))

    def parameter_keys(self) -> list[str]:
        return sorted(self.state.trainable)


def _opt_key(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _mesh_update(shardings: Mapping[str, NamedSharding], opt_shardings: Any, mesh: Mesh) -> Callable:
    """The update jitted with the state's shardings as its output shardings (the layout never drifts; the
    compiler reduces the gradients across devices), one per layout."""
    opt_leaves, opt_structure = jax.tree.flatten(opt_shardings)
    key = (tuple(sorted(shardings.items(), key=lambda item: item[0])), opt_structure, tuple(opt_leaves))
    if key not in _MESH_UPDATES:
        replicated = NamedSharding(mesh, P())
        _MESH_UPDATES[key] = jax.jit(_update, donate_argnums=(0, 1, 2), static_argnames=_STATIC,
                                     out_shardings=(dict(shardings), opt_shardings, replicated, replicated))
    return _MESH_UPDATES[key]


def _optimizer_shardings(tx: optax.GradientTransformation, trainable: dict[str, jax.Array],
                         shardings: Mapping[str, NamedSharding], mesh: Mesh) -> Any:
    """Every leaf of ``tx``'s state: a sub-tree keyed like ``trainable`` (Adam's moments) takes the parameters'
    shardings key by key; anything else (counts) is replicated."""
    structure = jax.tree.structure(trainable)
    replicated = NamedSharding(mesh, P())

    def like_params(node: Any) -> bool:
        return jax.tree.structure(node) == structure

    return jax.tree.map(lambda node: dict(shardings) if like_params(node) else replicated,
                        jax.eval_shape(tx.init, trainable), is_leaf=like_params)


def _place_frozen(frozen: Any, mesh: Mesh) -> Any:
    """The frozen base of a LoRA run on ``mesh``: its parameters by their logical axes, the rest replicated."""
    from mapjax.sharding import shard_model_state

    return shard_model_state(frozen, mesh)


def place(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` laid out with ``sharding``; on a mesh spanning processes each process supplies its own shards
    of the value it holds whole."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def whole_on_every_process(model: Any) -> Any:
    """``model`` itself in one process. Under ``jax.distributed`` its sharded arrays span hosts that each hold a
    part, so the parameters are gathered: every process gets the whole trained model on its own devices."""
    if jax.process_count() == 1:
        return model
    from jax.experimental import multihost_utils

    def whole(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jnp.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return leaf

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(whole, state))   # same leaf order on every process


# --------------------------------------------------------------------------------------------------------- #
# Divergence
# --------------------------------------------------------------------------------------------------------- #
def stop_if_diverged(metrics: dict[str, float], where: str, route: str, checkpoint: Callable[[], str]) -> None:
    """Raise :class:`DivergenceError` when a step's loss or parameters are not finite; ``metrics`` loses its
    ``finite`` flag (what callbacks see is the step's numbers only). ``where`` names the step, ``checkpoint()``
    says what is kept (asked only on divergence)."""
    finite = bool(metrics.pop("finite", True))
    loss = metrics.get("loss", 0.0)
    if finite and math.isfinite(loss):
        return
    what = "loss" if not math.isfinite(loss) else "parameters"
    raise DivergenceError(f"finetuning ({route}) diverged at {where}: the {what} became non-finite (loss {loss}); "
                          f"stopped without exporting a model, {checkpoint()}. Lower the learning rate (--lr) or "
                          "clip the gradients harder")


# --------------------------------------------------------------------------------------------------------- #
# The run folder
# --------------------------------------------------------------------------------------------------------- #
class RunFolder:
    """A run's folder, from the first check to the final replacement.

    ``out`` was checked by :func:`mapjax.outputs.check_output_folder` before any work. Under ``overwrite`` the
    run is made in a staging folder beside ``out`` (resumed there after an interruption) and takes ``out``'s
    place only in :meth:`finish`, once complete. ``out=None``: no folder, no checkpoints, no metrics file (the
    TensorBoard / W&B options need a folder, except W&B, which logs to its own).
    """

    def __init__(self, out: Any, *, overwrite: bool, method: str, fingerprint: str, save_every: int,
                 what: str, engine: Engine, tensorboard: bool = False, wandb: str | None = None,
                 config: Mapping[str, Any] | None = None):
        from mapjax.finetune.metrics import MetricsLog

        self.out = Path(out) if out is not None else None
        self.folder = self.out
        self.manager = None
        self.meta: dict[str, Any] | None = None
        self.fingerprint, self.engine, self.method = fingerprint, engine, method
        resume = 0
        if self.out is not None:
            from mapjax.distributed import is_primary
            from mapjax.outputs import staging_folder, write_run_marker

            self.folder = staging_folder(self.out, overwrite)
            if is_primary():
                write_run_marker(self.folder, "finetune", method=method)
            # In a staging folder, checkpoints of another run are those of an abandoned replacement: discard them.
            self.manager, latest, self.meta = _open_manager(self.folder, fingerprint, save_every,
                                                            discard_other=self.folder != self.out, what=what)
            if latest is not None:
                _check_saved_keys(self.meta, engine, self.folder)
                engine.load_state_tree(_restore(self.manager, latest, engine.restore_target()),
                                       int(self.meta.get("updates", 0)))
                resume = int(self.meta["step"])
        self.resume_step = resume
        self.metrics = MetricsLog(self.folder, resume_step=resume, tensorboard=tensorboard, wandb_project=wandb,
                                  run_name=f"mapjax-{method}", config=config)

    def save(self, step: int, meta: dict[str, Any], force: bool) -> None:
        """Checkpoint the engine's state at ``step`` (when the interval says so, or ``force``)."""
        if self.manager is None:
            return
        import orbax.checkpoint as ocp

        if not (force or self.manager.should_save(step)):
            return
        meta = {**meta, "step": step, "fingerprint": self.fingerprint, "format": CHECKPOINT_FORMAT,
                "updates": int(self.engine.state.step), "parameters": self.engine.parameter_keys()}
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.engine.state_tree()),
                                                        meta=ocp.args.JsonSave(meta)), force=force)
        self.manager.wait_until_finished()

    def kept(self) -> str:
        """How a diverged run's message names what it kept: the last finite checkpoint, or none."""
        step = self.manager.latest_step() if self.manager is not None else None
        if step is None:
            return "no checkpoint was saved"
        return f"the last finite checkpoint (step {step}) is kept in {self.folder / 'checkpoints'}"

    def close(self) -> None:
        self.metrics.close()
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()

    def finish(self, write: Callable[[Path], None]) -> None:
        """``write(folder)`` the run's final files (one writer under ``jax.distributed``), then put the staged
        run in ``out``'s place; every process waits until the files are in place."""
        if self.folder is None:
            return
        from mapjax.distributed import barrier, is_primary
        from mapjax.outputs import replace_folder

        if is_primary():
            write(self.folder)
            if self.folder != self.out:
                replace_folder(self.folder, self.out)
        barrier("mapjax-finetune-written")


def _open_manager(folder: Path, fingerprint: str, save_every: int, *, discard_other: bool, what: str
                  ) -> tuple[Any, int | None, dict[str, Any] | None]:
    """The checkpoint manager of ``folder/checkpoints``, the latest step and its JSON meta (None, None: nothing to
    resume). Checkpoints of another run are refused (or deleted with ``discard_other``), and those of an older
    mapjax (parameters keyed by leaf order) refused with the fix."""
    import shutil

    import orbax.checkpoint as ocp

    directory = (folder / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=2, create=True)
    manager = ocp.CheckpointManager(directory, options=options)
    latest = manager.latest_step()
    if latest is None:
        return manager, None, None
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    old_format = meta.get("format") != CHECKPOINT_FORMAT
    if old_format or meta.get("fingerprint") != fingerprint:
        manager.close()
        if discard_other:
            shutil.rmtree(directory)
            return _open_manager(folder, fingerprint, save_every, discard_other=False, what=what)
        if old_format:
            raise FinetuneError(f"{directory} holds checkpoints of an older mapjax, which keyed parameters by their "
                                "order and cannot be restored safely; start the run again with overwrite=True "
                                "(--overwrite) or another --out")
        raise FinetuneError(f"{directory} holds checkpoints of another run (other {what}); use another --out or "
                            "pass overwrite=True (--overwrite) to replace it")
    return manager, latest, meta


def _check_saved_keys(meta: Mapping[str, Any], engine: Engine, folder: Path) -> None:
    """The checkpoint's parameters are the engine's, name for name (a renamed submodule is an error)."""
    saved, wanted = set(meta.get("parameters", [])), set(engine.parameter_keys())
    if saved != wanted:
        missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
        raise FinetuneError(f"{folder / 'checkpoints'} does not hold this model's parameters: missing "
                            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}; start again with --overwrite")


def _restore(manager: Any, step: int, target: Any) -> Any:
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


@dataclasses.dataclass
class FinetuneResult:
    """A finished run: the trained model (a plain model of the base's architecture; adapters merged under LoRA),
    each step's loss, the number of steps, the step it resumed from, its folder, the examples it trained on."""

    model: CausalLM
    losses: list[float]
    steps: int
    resumed_from: int
    out: Path | None
    examples: int
    trainable_parameters: int = 0


def export_policy(trained: Any, tokenizer: Any, folder: Path, engine: Engine) -> None:
    """``folder/model``: the trained policy in Hugging Face format (adapters merged under LoRA) with its
    tokenizer; under LoRA also ``folder/adapter``, the adapters alone in PEFT's format."""
    from mapjax.models import export_pretrained

    export_pretrained(trained, folder / "model")
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(folder / "model"))
    if engine.adapters is not None:
        from mapjax.finetune import lora

        lora.export_peft(engine.model(), folder / "adapter", engine.adapters)


# --------------------------------------------------------------------------------------------------------- #
# The loop shell
# --------------------------------------------------------------------------------------------------------- #
def run_steps(run: RunFolder, total_steps: int, step: Callable[[int], tuple[dict[str, Any], dict[str, Any]]], *,
              description: str, postfix: Callable[[Mapping[str, Any]], str],
              callback: Callable[[int, dict[str, Any]], None] | None, progress: bool) -> None:
    """Steps ``run.resume_step .. total_steps - 1``: each ``step(s) -> (metrics, meta)`` (raising on divergence
    before anything is saved), then its metrics line, its checkpoint (``meta`` joins the JSON), the bar and the
    callback, in that order: a run killed between the line and the checkpoint redoes the step, and the metrics
    log drops the line it wrote for it."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=run.resume_step, desc=description, unit="step")
    try:
        for index in range(run.resume_step, total_steps):
            started = time.perf_counter()
            metrics, meta = step(index)
            elapsed = time.perf_counter() - started
            tokens = metrics.pop("tokens", None)
            trail = {key: value for key, value in metrics.items() if key != "step"}
            trail["step_time"] = elapsed
            if tokens is not None:
                trail["tokens_per_s"] = tokens / elapsed if elapsed > 0 else None
            run.metrics.log(index + 1, trail)
            run.save(index + 1, meta, force=index + 1 == total_steps)
            if bar is not None:
                bar.set_postfix_str(postfix(metrics), refresh=False)
                bar.update(1)
            if callback is not None:
                callback(index + 1, metrics)
    finally:
        if bar is not None:
            bar.close()
        run.close()
