"""The MAP-F training loop: one jitted train step, optax AdamW, gradient accumulation, Orbax checkpoints.

>>> from mapjax.finetune import finetune, FinetuneConfig
>>> result = finetune(model, tokenizer, pool, solution, method="weighted", out="runs/map-f",
...                   config=FinetuneConfig(steps=200, batch_size=8, learning_rate=1e-5))
>>> result.model, result.losses                 # trained model (also in runs/map-f/model, HF format)

State: the model's ``nnx.Param`` leaves (float32 master copy, cast to ``config.dtype`` for the forward) and the
optax state, both flattened to ``{"00000": array}`` dicts, plus the step number, which is the data position:
step ``s`` trains on positions ``s·B .. (s+1)·B`` of a stream of epochs, each a seeded permutation. A run killed
at any point and started again with the same call restores the latest checkpoint and continues; its final
parameters equal an uninterrupted run's bit for bit (the step is deterministic on a given device).

On a device mesh (``finetune(..., mesh="data=2,fsdp=4")``, see :mod:`mapjax.sharding`) the float32 master
parameters and the optimizer's moments are laid out by :func:`mapjax.sharding.parameter_sharding` (split over
``fsdp``/``model`` by their logical axes), each micro-batch's rows are split over ``data`` x ``fsdp``, and the
compiler reduces the gradients across devices from those shardings (the step is jitted with the state's
shardings as its output shardings, so the layout never drifts). Checkpoints are written sharded by Orbax, each
device its own shards, and restored onto the shardings of the mesh of the run that resumes: a run saved on 8
devices continues on 4 or on 1. Resuming on the same layout is still exact; on another layout the sums run in
another order, so it agrees to rounding.

Divergence is a failure: a step whose loss or updated parameters are not finite (NaN or inf, e.g. from a
learning rate far too high) raises :class:`mapjax.errors.DivergenceError` at once, before that step is saved,
so ``out/checkpoints`` keeps the last finite state and nothing is exported (:func:`stop_if_diverged`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mapjax.dtypes import dtype_name, known_dtype_name
from mapjax.errors import DivergenceError, FinetuneError
from mapjax.finetune import dpo as dpo_module
from mapjax.finetune import examples as data_module
from mapjax.finetune import weighted as weighted_module
from mapjax.jsonio import write_json
from mapjax.models.base import CausalLM
from mapjax.models.padding import pad_token_id
from mapjax.outputs import check_output_folder, replace_folder, staging_folder, write_run_marker

if TYPE_CHECKING:
    from mapjax.sharding import MeshLike

METHODS = ("weighted", "dpo")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Settings of a run (all part of the checkpoint fingerprint: a resume with other settings is refused).

    batch_size: examples (weighted) or pairs (dpo) per optimizer step, split into ``grad_accum`` micro-batches.
    steps: optimizer steps; ``None``: ``epochs`` passes over the examples.
    learning_rate, warmup_steps, weight_decay, clip_norm: AdamW with linear warm-up, then constant (or cosine
        decay to 0 with ``schedule="cosine"``), gradients clipped to a global norm (None: no clipping).
    kl_coef: weight of the token-level KL(p_θ || p0) penalty (weighted method only).
    beta: DPO temperature.
    normalize: ``"token"`` (weighted token-level NLL) or ``"sequence"`` (weighted sequence NLL).
    dtype: compute dtype of the forward and backward pass, ``"float32"`` or ``"bfloat16"`` (or ``jnp.float32`` /
        ``jnp.bfloat16``, stored by name): parameters are cast to it for each step while the master weights and
        the optimizer state stay float32, and the loss is computed in float32 from float32 logits.
    max_length: cut sequences to this many tokens (None: the model's position limit).
    save_every: checkpoint every N steps (and at the end).
    seed: data order.
    """

    batch_size: int = 8
    grad_accum: int = 1
    steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    kl_coef: float = 0.0
    beta: float = 0.1
    normalize: str = "token"
    dtype: str = "float32"
    max_length: int | None = None
    save_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        # A JAX dtype is kept by its name: the config is hashed (a static argument of the compiled step) and
        # written to JSON (the checkpoint fingerprint, losses.json). A bad value is left for validate to name.
        name = known_dtype_name(self.dtype)
        if name is not None:
            object.__setattr__(self, "dtype", name)

    def validate(self, method: str) -> None:
        if method not in METHODS:
            raise FinetuneError(f"method must be one of {list(METHODS)} (online: 'grpo', 'ppo'), got {method!r}")
        for name in ("batch_size", "grad_accum", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinetuneError(f"{name} must be an integer >= 1, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise FinetuneError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise FinetuneError(f"steps must be an integer >= 1 or None, got {self.steps!r}")
        dtype_name(self.dtype, error=FinetuneError)
        if self.normalize not in ("token", "sequence"):
            raise FinetuneError(f"normalize must be 'token' or 'sequence', got {self.normalize!r}")
        if self.schedule not in ("constant", "cosine"):
            raise FinetuneError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise FinetuneError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or isinstance(self.max_length, bool)
                                            or self.max_length < 2):
            raise FinetuneError(f"max_length must be an integer >= 2 or None, got {self.max_length!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise FinetuneError(f"seed must be an integer, got {self.seed!r}")
        # A NaN or infinite setting would train a NaN model without any error: refuse it here.
        _check_finite("learning_rate", self.learning_rate, allow_zero=False)
        _check_finite("epochs", self.epochs, allow_zero=False)
        _check_finite("weight_decay", self.weight_decay, allow_zero=True)
        if self.clip_norm is not None:
            _check_finite("clip_norm", self.clip_norm, allow_zero=False)
        _check_finite("kl_coef", self.kl_coef, allow_zero=True)
        _check_finite("beta", self.beta, allow_zero=False)


def _check_finite(name: str, value: Any, *, allow_zero: bool) -> None:
    """``value`` is a finite real number > 0 (>= 0 with ``allow_zero``), else a FinetuneError naming ``name``."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise FinetuneError(f"{name} must be a finite number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise FinetuneError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclasses.dataclass
class FinetuneResult:
    model: CausalLM
    losses: list[float]
    steps: int
    resumed_from: int
    out: Path | None
    examples: int


def optimizer(config: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up (then constant or cosine decay) after global-norm clipping."""
    warmup = min(config.warmup_steps, total_steps)
    if config.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, max(warmup, 1) if warmup else 0,
                                                      max(total_steps, warmup + 1))
    elif warmup:
        schedule = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup),
                                         optax.constant_schedule(config.learning_rate)], [warmup])
    else:
        schedule = optax.constant_schedule(config.learning_rate)
    parts = [optax.clip_by_global_norm(config.clip_norm)] if config.clip_norm else []
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.chain(*parts)


class Stepper:
    """A model split into graph, trainable ``Param`` leaves and the rest, with the jitted train step.

    With a ``mesh`` (a ``Mesh`` from :func:`mapjax.sharding.as_mesh`) the parameters, the optimizer state and
    the rest of the model live on it (see the module docstring); ``None``: one device, as always.
    """

    def __init__(self, model: CausalLM, method: str, config: FinetuneConfig, total_steps: int,
                 mesh: Mesh | None = None):
        self.method, self.config, self.mesh = method, config, mesh
        self.graphdef, params, self.rest = nnx.split(model, nnx.Param, ...)
        leaves, self.treedef = jax.tree.flatten(params)
        self.param_dtypes = [leaf.dtype for leaf in leaves]
        self.tx = optimizer(config, total_steps)
        self.param_shardings: list[NamedSharding] | None = None
        self.opt_shardings: Any = None
        if mesh is not None:
            # placed before the float32 copy, so that no whole float32 copy is made on one device
            self.param_shardings = _parameter_shardings(params, mesh, len(leaves))
            leaves = [_place(leaf, sharding) for leaf, sharding in zip(leaves, self.param_shardings)]
        # copies: the train step donates its parameters, and the caller's model must stay intact
        self.params = [jnp.array(leaf, jnp.float32 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf.dtype,
                                 copy=True) for leaf in leaves]
        if mesh is None:
            self.opt_state = self.tx.init(self.params)
        else:
            self._place_on_mesh(mesh)
        self.compute_dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
        self.total_steps = total_steps
        # settings that do not change the compiled step are normalised away so that such runs share it
        step_config = dataclasses.replace(config, seed=0, save_every=1, steps=None, epochs=1.0, max_length=None)
        self._static = dict(graphdef=self.graphdef, treedef=self.treedef, method=method, config=step_config,
                            total_steps=total_steps)

    def _place_on_mesh(self, mesh: Mesh) -> None:
        """Lay the optimizer state and the rest of the model out on ``mesh`` (the parameters already are)."""
        from mapjax.sharding import replicate

        assert self.param_shardings is not None
        self.rest = replicate(self.rest, mesh)
        self.opt_shardings = _optimizer_shardings(self.tx, self.params, self.param_shardings, mesh)
        # Made on the mesh in its layout: no whole copy of a moment ever sits on one device.
        self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.params)
        self._mesh_step = _mesh_train_step(self.param_shardings, self.opt_shardings, mesh)

    def place_like_params(self, leaves: list[Any]) -> list[Any]:
        """``leaves`` (arrays shaped like the parameters, e.g. a frozen reference copy) in the parameters'
        layout on the mesh; unchanged without one."""
        if self.param_shardings is None:
            return leaves
        return [_place(leaf, sharding) for leaf, sharding in zip(leaves, self.param_shardings)]

    def place_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A batch ``[accum, micro, ...]`` on device: on a mesh its micro axis (the rows) split over
        ``data`` x ``fsdp``, the accumulation axis whole (the step scans over it)."""
        if self.mesh is None:
            return {key: jnp.asarray(value) for key, value in batch.items()}
        from mapjax.sharding import rows_sharding

        rows = NamedSharding(self.mesh, P(None, *rows_sharding(self.mesh).spec))
        return {key: _place(value, rows) for key, value in batch.items()}

    def place_rows(self, array: np.ndarray) -> jax.Array:
        """An array whose leading axis is rows, split over ``data`` x ``fsdp`` on a mesh."""
        if self.mesh is None:
            return jnp.asarray(array)
        from mapjax.sharding import rows_sharding

        return _place(array, rows_sharding(self.mesh))

    def apply(self, params: Any, ids: jax.Array, attention: jax.Array) -> jax.Array:
        """The forward pass (float32 logits) of the model at ``params`` (a list of leaves)."""
        return _apply(self.graphdef, self.treedef, self.config.dtype, self.rest, params, ids, attention)

    def _logps(self, params, ids, attention, loss_mask):
        return _sequence_logps_jit(self.graphdef, self.treedef, self.config.dtype, self.rest, params, ids,
                                   attention, loss_mask)

    def loss_and_grad(self, params: Any, reference: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, Any]:
        return _loss_and_grad(self.graphdef, self.treedef, self.method, self.config, self.rest, params, reference,
                              batch)

    def step(self, reference: Any, batch: dict[str, np.ndarray]) -> dict[str, float]:
        batch = self.place_batch(batch)
        train_step = _train_step_jit if self.mesh is None else self._mesh_step
        self.params, self.opt_state, metrics = train_step(self.params, self.opt_state, self.rest, reference,
                                                          batch, **self._static)
        return {key: float(value) for key, value in metrics.items()}

    def model(self) -> Any:
        """A model holding the current parameters (in the model's original dtypes)."""
        leaves = [jnp.array(leaf, dtype, copy=True) for leaf, dtype in zip(self.params, self.param_dtypes)]
        return nnx.merge(self.graphdef, jax.tree.unflatten(self.treedef, leaves), self.rest)

    # checkpoint trees: flat dicts of arrays with fixed-width string keys
    def state_tree(self) -> dict[str, dict[str, Any]]:
        return {"params": {f"{i:05d}": leaf for i, leaf in enumerate(self.params)},
                "opt": {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(self.opt_state))}}

    def load_state_tree(self, tree: dict[str, dict[str, Any]]) -> None:
        self.params = [jnp.asarray(tree["params"][f"{i:05d}"]) for i in range(len(self.params))]
        opt_leaves, opt_def = jax.tree.flatten(self.opt_state)
        self.opt_state = jax.tree.unflatten(opt_def, [jnp.asarray(tree["opt"][f"{i:05d}"])
                                                     for i in range(len(opt_leaves))])


# The compiled functions are module-level with the graph, the tree structure and the (frozen, hashable) config
# as static arguments, so runs with the same model and settings share one compilation.
def _apply(graphdef, treedef, dtype, rest, params, ids, attention):
    compute = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    cast = [leaf.astype(compute) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf for leaf in params]
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, cast), rest)
    return model(ids, attention).logits.astype(jnp.float32)


def _sequence_logps(graphdef, treedef, dtype, rest, params, ids, attention, loss_mask):
    apply = functools.partial(_apply, graphdef, treedef, dtype, rest)
    return dpo_module.sequence_logps(apply, params, ids, attention, loss_mask)


_sequence_logps_jit = jax.jit(_sequence_logps, static_argnums=(0, 1, 2))


def _loss_and_grad(graphdef, treedef, method, config, rest, params, reference, batch):
    """Loss and gradient of a batch ``[accum, micro, ...]``: a scan over micro-batches summing gradients."""
    apply = functools.partial(_apply, graphdef, treedef, config.dtype, rest)
    if method == "weighted":
        den, kl_den = weighted_module.denominators(batch, config.normalize)

        def micro_loss(p, micro):
            return weighted_module.micro_loss(apply, p, reference, micro, den, kl_den, config.kl_coef)
    else:
        den = dpo_module.denominator(batch)

        def micro_loss(p, micro):
            return dpo_module.micro_loss(apply, p, micro, den, config.beta)

    grad_fn = jax.value_and_grad(micro_loss)

    def body(carry, micro):
        loss, grads = grad_fn(params, micro)
        return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch)
    return loss, grads


def _train_step(params, opt_state, rest, reference, batch, *, graphdef, treedef, method, config, total_steps):
    """One optimizer step: accumulated gradients, clipping, AdamW."""
    loss, grads = _loss_and_grad(graphdef, treedef, method, config, rest, params, reference, batch)
    tx = optimizer(config, total_steps)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "finite": all_finite(params)}


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point leaf of ``tree`` is finite (one boolean, computed on the device)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


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


def kept_checkpoint(manager: Any, run_folder: Path | None) -> str:
    """How a diverged run's message names what it kept: the last finite checkpoint, or none."""
    step = manager.latest_step() if manager is not None else None
    if step is None:
        return "no checkpoint was saved"
    return f"the last finite checkpoint (step {step}) is kept in {run_folder / 'checkpoints'}"


_STATIC = ("graphdef", "treedef", "method", "config", "total_steps")
_train_step_jit = jax.jit(_train_step, donate_argnums=(0, 1), static_argnames=_STATIC)
# The train step on a mesh, per layout: jitted with the state's shardings as output shardings, so that the
# updated parameters and moments come back in the layout they went in (the compiler reduces the gradients).
_MESH_STEPS: dict[Any, Callable] = {}


def _mesh_train_step(param_shardings: list[NamedSharding], opt_shardings: Any, mesh: Mesh) -> Callable:
    opt_leaves, opt_structure = jax.tree.flatten(opt_shardings)
    key = (tuple(param_shardings), opt_structure, tuple(opt_leaves))
    if key not in _MESH_STEPS:
        replicated = NamedSharding(mesh, P())
        _MESH_STEPS[key] = jax.jit(_train_step, donate_argnums=(0, 1), static_argnames=_STATIC,
                                   out_shardings=(list(param_shardings), opt_shardings, replicated))
    return _MESH_STEPS[key]


def _parameter_shardings(params: nnx.State, mesh: Mesh, count: int) -> list[NamedSharding]:
    """The sharding of each parameter leaf, in ``jax.tree.leaves(params)`` order. The logical axes are read from
    the ``Param`` variables, so they come from the split State, not from the bare leaves."""
    from mapjax.sharding import parameter_sharding

    shardings = jax.tree.leaves(parameter_sharding(params, mesh), is_leaf=lambda node: isinstance(node, NamedSharding))
    if len(shardings) != count:
        raise FinetuneError(f"the mesh layout covers {len(shardings)} of the model's {count} parameter arrays")
    return shardings


def _optimizer_shardings(tx: optax.GradientTransformation, params: list[jax.Array],
                         param_shardings: list[NamedSharding], mesh: Mesh) -> Any:
    """The sharding of every leaf of ``tx``'s state: a sub-tree shaped like the parameter list (Adam's moments)
    takes the parameters' shardings, leaf for leaf; anything else (step counts) is replicated. Matched by tree
    structure, not by shape, since two parameters of one shape can be laid out differently."""
    structure = jax.tree.structure(params)
    replicated = NamedSharding(mesh, P())

    def like_params(node: Any) -> bool:
        return jax.tree.structure(node) == structure

    return jax.tree.map(lambda node: list(param_shardings) if like_params(node) else replicated,
                        jax.eval_shape(tx.init, params), is_leaf=like_params)


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    """``value`` laid out with ``sharding``; on a mesh spanning processes each process supplies its own shards
    of the value it holds whole."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _resolve_lambda(pool: Any, lam: Any) -> np.ndarray:
    """λ as a vector over the pool's values; a palette spec (str / dict of levels) is solved first."""
    from mapjax.solver import lambda_for

    if isinstance(lam, str) or (isinstance(lam, dict) and any(isinstance(v, str) for v in lam.values())):
        from mapjax import solve

        solution = solve(pool, lam, normaliser="per_prompt")
        if solution.status != "optimal":
            raise FinetuneError(f"the palette {lam!r} has no λ on this pool (status {solution.status}): "
                                f"{solution.certificate.explain() if solution.certificate is not None else ''}")
        lam = solution
    return lambda_for(pool, lam)


def _fingerprint(method: str, config: FinetuneConfig, model: CausalLM, examples: Any) -> str:
    from mapjax.build import model_fingerprint

    digest = hashlib.sha256()
    digest.update(json.dumps({"method": method, "config": dataclasses.asdict(config)}, sort_keys=True).encode())
    digest.update(model_fingerprint(model).encode())
    parts = [examples] if isinstance(examples, data_module.Examples) else [examples.chosen, examples.rejected]
    for part in parts:
        digest.update(json.dumps([part.prompt_ids, part.continuation_ids]).encode())
        digest.update(np.ascontiguousarray(part.weights, np.float32).tobytes())
    return digest.hexdigest()


def reference_logps(stepper: Stepper, pairs: data_module.Pairs, pad_id: int, rows: int = 8) -> np.ndarray:
    """log π0 of each pair's chosen and rejected continuation, [pairs, 2] (frozen base model); on the stepper's
    mesh, ``rows`` is rounded up to a multiple of its ``data`` x ``fsdp`` devices and split over them."""
    if stepper.mesh is not None:
        from mapjax.sharding import round_up_rows

        rows = round_up_rows(rows, stepper.mesh)
    out = np.zeros((len(pairs), 2), np.float32)
    for start in range(0, len(pairs), rows):
        index = np.arange(start, start + rows) % len(pairs)
        batch = data_module.dpo_batch(pairs, out, index, 1, pad_id)
        values = stepper._logps(stepper.params, stepper.place_rows(batch["ids"][0]),
                                stepper.place_rows(batch["attention"][0]), stepper.place_rows(batch["loss_mask"][0]))
        count = min(rows, len(pairs) - start)
        out[start:start + count] = np.asarray(values)[:count]
    return out


def finetune(model: CausalLM, tokenizer: Any, pool: Any, lam: Any, *, method: str = "weighted",
             config: FinetuneConfig | None = None, out: str | os.PathLike | None = None,
             callback: Callable[[int, dict[str, float]], None] | None = None, progress: bool = True,
             overwrite: bool = False, export: bool = True, mesh: "MeshLike" = None,
             format_prompt: Callable[[str], str] | None = None) -> FinetuneResult:
    """Finetune ``model`` towards p_λ on ``pool``'s samples; returns the trained model (a new module).

    Args:
        model, tokenizer: the base policy (a mapjax causal LM) and its tokenizer; ``model`` is not modified.
        pool: a RewardPool with prompt and generated texts, sampled from this policy.
        lam: a Solution, a {value: λ} mapping (numbers), a λ vector in the pool's value order, or a palette
            spec string such as ``"humor>=q0.8, diversity>=mean"`` (solved on the pool with the per-prompt
            normaliser; an unreachable palette is an error).
        method: ``"weighted"`` (reward-weighted likelihood), ``"dpo"`` (DPO on highest- vs lowest-λᵀr pairs),
            or an online route, ``"grpo"`` / ``"ppo"``: the policy samples the pool's prompts itself and is scored
            by the pool's values (reward names) at every step (:func:`mapjax.finetune.online.finetune_online`,
            with ``config`` an :class:`~mapjax.finetune.online.OnlineConfig`).
        out: run folder: ``checkpoints/`` (Orbax; resumed when present), ``model/`` (HF format, at the end),
            ``losses.json``. ``None``: no checkpoints.
        callback: called as ``callback(step, metrics)`` after each step (step counts from 1).
        overwrite: replace another run in ``out`` instead of refusing to resume from its checkpoints. The new
            run is made in ``<out>.replacing`` beside it (resumed there after an interruption) and takes the
            place of ``out`` only once it is complete, so ``out`` never mixes the two runs and the old one
            survives an interrupted replacement. ``out`` must be new, empty or a mapjax run (its
            ``.mapjax-run.json`` marker): a folder of the user's, the working folder or a file is refused, with
            ``overwrite`` or without (:func:`mapjax.outputs.check_output_folder`).
        mesh: a device mesh (or its spec, e.g. ``"data=2,fsdp=4"``; None: one device): parameters and optimizer
            state sharded over its ``fsdp``/``model`` axes, each micro-batch's rows over ``data`` x ``fsdp``
            (``batch_size / grad_accum`` must be a multiple of their product). Checkpoints are saved sharded and
            restored onto this mesh, whatever mesh saved them.
        format_prompt: how the pool's policy saw each prompt when it sampled (e.g. its chat template;
            ``mapjax.finetune.against_base.pool_prompt_format(pool_file, tokenizer)`` reads it from the pool's
            manifest): prompts are tokenized (and, online, sampled) through it. None: raw (the paper's setting).
    """
    from mapjax.finetune import online

    if method in online.METHODS:
        if config is not None and not isinstance(config, online.OnlineConfig):
            raise FinetuneError(f"method {method!r} takes an OnlineConfig, got {type(config).__name__}")
        return online.finetune_online(model, tokenizer, list(pool.prompts), list(pool.value_names), lam,
                                      method=method, config=config, out=out, format_prompt=format_prompt,
                                      mesh=mesh, callback=callback, progress=progress, overwrite=overwrite,
                                      pool=pool, export=export)
    config = config or FinetuneConfig()
    config.validate(method)
    if out is not None:   # before any work: never the working folder, a file, or a folder of the user's
        check_output_folder(out, overwrite=overwrite, flag="out")
    mesh = _check_mesh(config, mesh)
    lam_vector = _resolve_lambda(pool, lam)
    if method == "weighted":
        examples = data_module.weighted_examples(pool, tokenizer, lam_vector, model=model,
                                                 max_length=config.max_length, format_prompt=format_prompt)
    else:
        examples = data_module.dpo_pairs(pool, tokenizer, lam_vector, model=model, max_length=config.max_length,
                                         format_prompt=format_prompt)
    count = len(examples)
    total_steps = config.steps or max(1, math.ceil(config.epochs * count / config.batch_size))
    pad_id = pad_token_id(tokenizer, model)
    stepper = Stepper(model, method, config, total_steps, mesh)
    reference = None
    if method == "weighted" and config.kl_coef:
        # frozen p0 (params are donated), in the parameters' layout
        reference = stepper.place_like_params([jnp.array(leaf, copy=True) for leaf in stepper.params])
    ref_logps = reference_logps(stepper, examples, pad_id) if method == "dpo" else None

    manager, losses, start = None, [], 0
    fingerprint = _fingerprint(method, config, model, examples)
    out = Path(out) if out is not None else None
    run_folder = out
    if out is not None:
        run_folder = staging_folder(out, overwrite)
        from mapjax.distributed import is_primary

        if is_primary():
            write_run_marker(run_folder, "finetune", method=method)
        # In a staging folder, checkpoints of another run are those of an abandoned replacement: discard them.
        manager, start, losses = _open_checkpoints(run_folder, fingerprint, stepper, config,
                                                   discard_other=run_folder != out)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start, desc=f"finetune ({method})", unit="step")
    try:
        for step in range(start, total_steps):
            indices = data_module.step_indices(count, config.seed, step, config.batch_size)
            if method == "weighted":
                batch = data_module.weighted_batch(examples, indices, config.grad_accum, pad_id)
            else:
                batch = data_module.dpo_batch(examples, ref_logps, indices, config.grad_accum, pad_id)
            metrics = stepper.step(reference, batch)
            # before the step is saved: a diverged state never replaces the last finite checkpoint
            stop_if_diverged(metrics, f"step {step + 1}", method, lambda: kept_checkpoint(manager, run_folder))
            losses.append(metrics["loss"])
            if manager is not None:
                _save(manager, step + 1, stepper, fingerprint, losses, force=step + 1 == total_steps)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                bar.update(1)
            if callback is not None:
                callback(step + 1, metrics)
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    trained = _whole_on_every_process(stepper.model())
    from mapjax.distributed import barrier, is_primary

    if run_folder is not None and is_primary():   # one writer: every process holds the same run
        write_json(run_folder / "losses.json", {"method": method, "config": dataclasses.asdict(config),
                                                "losses": losses})
        if export:
            from mapjax.models import export_pretrained

            export_pretrained(trained, run_folder / "model")
            if hasattr(tokenizer, "save_pretrained"):
                tokenizer.save_pretrained(str(run_folder / "model"))
        if run_folder != out:
            replace_folder(run_folder, out)
    if run_folder is not None:
        barrier("mapjax-finetune-written")   # no process returns before the run's files are in place
    return FinetuneResult(trained, losses, total_steps, start, out, count)


def _whole_on_every_process(model: Any) -> Any:
    """``model`` itself in one process. Under ``jax.distributed`` its sharded arrays span hosts that each hold a
    part, so the parameters are gathered: every process gets the whole trained model on its own devices (to
    export, evaluate, or keep training from)."""
    if jax.process_count() == 1:
        return model
    from jax.experimental import multihost_utils

    def whole(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jnp.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return leaf

    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(whole, state))   # same leaf order on every process


def _check_mesh(config: FinetuneConfig, mesh: "MeshLike") -> Mesh | None:
    """The run's mesh (``mesh`` coerced), refused before any work when a micro-batch's rows cannot be split
    evenly over its ``data`` x ``fsdp`` devices."""
    from mapjax.sharding import mesh_for_micro_batches

    micro = config.batch_size // config.grad_accum
    return mesh_for_micro_batches(mesh, micro, f"batch_size {config.batch_size} / grad_accum {config.grad_accum}",
                                  "batch_size / grad_accum", FinetuneError)


def open_checkpoints(out: Path, fingerprint: str, save_every: int, *, discard_other: bool = False,
                     what: str = "model, pool, λ or settings") -> tuple[Any, int | None, dict[str, Any] | None]:
    """The checkpoint manager of ``out/checkpoints``, the latest step and its JSON ``meta`` (None, None: nothing to
    resume), for every finetuning route. Checkpoints of another run (another ``fingerprint``; ``what`` says what
    it covers) are refused, or deleted with ``discard_other``."""
    import shutil

    import orbax.checkpoint as ocp

    directory = (out / "checkpoints").absolute()
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=2, create=True)
    manager = ocp.CheckpointManager(directory, options=options)
    latest = manager.latest_step()
    if latest is None:
        return manager, None, None
    meta = manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if meta.get("fingerprint") != fingerprint:
        manager.close()
        if discard_other:
            shutil.rmtree(directory)
            return open_checkpoints(out, fingerprint, save_every, what=what)
        raise FinetuneError(f"{directory} holds checkpoints of another run (other {what}); use another --out or "
                            "pass overwrite=True (--overwrite) to replace it")
    return manager, latest, meta


def restore_state(manager: Any, step: int, target: Any) -> Any:
    """The state tree saved at ``step``, restored onto ``target``'s shapes, dtypes and shardings."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def save_checkpoint(manager: Any, step: int, state: Any, meta: dict[str, Any], force: bool) -> None:
    """Save ``state`` (a tree of arrays) and ``meta`` (JSON) at ``step`` when the manager's interval says so, or
    ``force``; returns once it is on disk."""
    import orbax.checkpoint as ocp

    if not (force or manager.should_save(step)):
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                 force=force)
    manager.wait_until_finished()


def _open_checkpoints(out: Path, fingerprint: str, stepper: Stepper, config: FinetuneConfig, *,
                      discard_other: bool = False):
    """The checkpoint manager of ``out/checkpoints`` and the run's (step, losses) to resume from."""
    manager, latest, meta = open_checkpoints(out, fingerprint, config.save_every, discard_other=discard_other)
    if latest is None:
        return manager, 0, []
    # Restored onto this run's layout (its mesh's shardings, or its one device), whatever layout saved it.
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
                          stepper.state_tree())
    stepper.load_state_tree(restore_state(manager, latest, target))
    return manager, int(meta["step"]), list(meta["losses"])


def _save(manager: Any, step: int, stepper: Stepper, fingerprint: str, losses: list[float], force: bool) -> None:
    save_checkpoint(manager, step, stepper.state_tree(), {"step": step, "fingerprint": fingerprint,
                                                          "losses": list(losses)}, force)
