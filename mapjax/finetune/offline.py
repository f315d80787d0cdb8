"""Offline MAP-F on a pool's samples: reward-weighted likelihood (``weighted``) and DPO (``dpo``), loops on the
engine (:mod:`mapjax.finetune.engine`).

>>> from mapjax.finetune import finetune, FinetuneConfig
>>> result = finetune(model, tokenizer, pool, solution, method="weighted", out="runs/map-f",
...                   config=FinetuneConfig(steps=200, batch_size=8, learning_rate=1e-5))
>>> result.model, result.losses                 # trained model (also in runs/map-f/model, HF format)

Step ``s`` trains on positions ``s·B .. (s+1)·B`` of a stream of epochs, each a seeded permutation, so the step
number is the data position. A run killed at any point and started again with the same call restores the latest
checkpoint and continues; its final parameters equal an uninterrupted run's bit for bit (the step is
deterministic on a given device), and its ``metrics.jsonl`` holds each step once.

On a device mesh (``finetune(..., mesh="data=2,fsdp=4")``, see :mod:`mapjax.sharding`) the float32 master
parameters and the optimizer's moments are laid out by their logical axes, each micro-batch's rows are split
over ``data`` x ``fsdp``, and the compiler reduces the gradients across devices. Checkpoints are written
sharded and restored onto the mesh of the run that resumes: a run saved on 8 devices continues on 4 or on 1
(exact on the same layout; to rounding on another, where sums run in another order). Under ``jax.distributed``
every process runs the loop and one writes the run's files.

Divergence is a failure: a step whose loss or updated parameters are not finite raises
:class:`mapjax.errors.DivergenceError` at once, before that step is saved, so ``out/checkpoints`` keeps the last
finite state and nothing is exported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from mapjax.errors import FinetuneError
from mapjax.finetune import dpo as dpo_module
from mapjax.finetune import examples as data_module
from mapjax.finetune import weighted as weighted_module
from mapjax.finetune.config import FinetuneConfig
from mapjax.finetune.engine import (
    Engine,
    FinetuneResult,
    Policy,
    RunFolder,
    export_policy,
    run_steps,
    stop_if_diverged,
    whole_on_every_process,
)
from mapjax.models.base import CausalLM
from mapjax.models.padding import pad_token_id


@dataclasses.dataclass(frozen=True)
class WeightedObjective:
    """Reward-weighted token (or sequence) NLL with an optional token-level KL to the base."""

    normalize: str
    kl_coef: float

    def totals(self, batch):
        return weighted_module.denominators(batch, self.normalize)

    def __call__(self, policy: Policy, frozen, trainable, reference, micro, totals, dynamic):
        den, kl_den = totals
        loss = weighted_module.micro_loss(policy.apply(frozen), trainable, reference, micro, den, kl_den,
                                          self.kl_coef)
        return loss, {"loss": loss}


@dataclasses.dataclass(frozen=True)
class DpoObjective:
    """DPO on (chosen, rejected) pairs against the base's log-probabilities, computed once before training."""

    beta: float

    def totals(self, batch):
        return dpo_module.denominator(batch)

    def __call__(self, policy: Policy, frozen, trainable, reference, micro, totals, dynamic):
        loss = dpo_module.micro_loss(policy.apply(frozen), trainable, micro, totals, self.beta)
        return loss, {"loss": loss}


def objective_for(method: str, config: FinetuneConfig) -> WeightedObjective | DpoObjective:
    """The route's objective; settings that do not enter it are left out, so runs differing only there share
    one compilation."""
    if method == "weighted":
        return WeightedObjective(config.normalize, float(config.kl_coef))
    return DpoObjective(float(config.beta))


def _sequence_logps(policy, frozen, trainable, ids, attention, loss_mask):
    return dpo_module.sequence_logps(policy.apply(frozen), trainable, ids, attention, loss_mask)


_sequence_logps_jit = jax.jit(_sequence_logps, static_argnames=("policy",))


def reference_logps(engine: Engine, pairs: data_module.Pairs, pad_id: int, rows: int = 8) -> np.ndarray:
    """log π0 of each pair's chosen and rejected continuation, ``[pairs, 2]``, under the base (the engine's
    reference); on the engine's mesh ``rows`` is rounded up to a multiple of its ``data`` x ``fsdp`` devices."""
    if engine.mesh is not None:
        from mapjax.sharding import round_up_rows

        rows = round_up_rows(rows, engine.mesh)
    out = np.zeros((len(pairs), 2), np.float32)
    for start in range(0, len(pairs), rows):
        index = np.arange(start, start + rows) % len(pairs)
        batch = data_module.dpo_batch(pairs, out, index, 1, pad_id)
        values = _sequence_logps_jit(engine.policy, engine.state.frozen, engine.reference,
                                     engine.place_rows(batch["ids"][0]), engine.place_rows(batch["attention"][0]),
                                     engine.place_rows(batch["loss_mask"][0]))
        count = min(rows, len(pairs) - start)
        out[start:start + count] = np.asarray(values)[:count]
    return out


def resolve_lambda(pool: Any, lam: Any) -> np.ndarray:
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
    from mapjax.scoring import model_fingerprint

    digest = hashlib.sha256()
    digest.update(json.dumps({"method": method, "config": dataclasses.asdict(config)}, sort_keys=True).encode())
    digest.update(model_fingerprint(model).encode())
    parts = [examples] if isinstance(examples, data_module.Examples) else [examples.chosen, examples.rejected]
    for part in parts:
        digest.update(json.dumps([part.prompt_ids, part.continuation_ids]).encode())
        digest.update(np.ascontiguousarray(part.weights, np.float32).tobytes())
    return digest.hexdigest()


def check_mesh(config: FinetuneConfig, mesh: Any) -> Any:
    """The run's mesh (coerced), refused before any work when a micro-batch's rows cannot be split evenly over
    its ``data`` x ``fsdp`` devices."""
    from mapjax.sharding import mesh_for_micro_batches

    micro = config.batch_size // config.grad_accum
    return mesh_for_micro_batches(mesh, micro, f"batch_size {config.batch_size} / grad_accum {config.grad_accum}",
                                  "batch_size / grad_accum", FinetuneError)


def train_offline(model: CausalLM, tokenizer: Any, pool: Any, lam: Any, *, method: str, config: FinetuneConfig,
                  out: Any, callback: Callable[[int, dict[str, float]], None] | None, progress: bool,
                  overwrite: bool, export: bool, mesh: Any, format_prompt: Callable[[str], str] | None,
                  tensorboard: bool = False, wandb: str | None = None) -> FinetuneResult:
    """The weighted and DPO routes (arguments: :func:`mapjax.finetune.finetune`, already checked)."""
    lam_vector = resolve_lambda(pool, lam)
    if method == "weighted":
        examples = data_module.weighted_examples(pool, tokenizer, lam_vector, model=model,
                                                 max_length=config.max_length, format_prompt=format_prompt)
    else:
        examples = data_module.dpo_pairs(pool, tokenizer, lam_vector, model=model, max_length=config.max_length,
                                         format_prompt=format_prompt)
    count = len(examples)
    total_steps = config.steps or max(1, math.ceil(config.epochs * count / config.batch_size))
    pad_id = pad_token_id(tokenizer, model)
    engine = Engine(model, config, total_steps, mesh, needs_reference=method == "dpo" or bool(config.kl_coef))
    objective = objective_for(method, config)
    ref_logps = reference_logps(engine, examples, pad_id) if method == "dpo" else None
    run = RunFolder(out, overwrite=overwrite, method=method, fingerprint=_fingerprint(method, config, model, examples),
                    save_every=config.save_every, what="model, pool, λ or settings", engine=engine,
                    tensorboard=tensorboard, wandb=wandb, config={"method": method, **dataclasses.asdict(config)})
    losses: list[float] = [float(v) for v in (run.meta or {}).get("losses", [])]

    def step(index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        indices = data_module.step_indices(count, config.seed, index, config.batch_size)
        if method == "weighted":
            batch = data_module.weighted_batch(examples, indices, config.grad_accum, pad_id)
        else:
            batch = data_module.dpo_batch(examples, ref_logps, indices, config.grad_accum, pad_id)
        metrics = engine.update(batch, objective, index)
        # before the step is saved: a diverged state never replaces the last finite checkpoint
        stop_if_diverged(metrics, f"step {index + 1}", method, run.kept)
        losses.append(metrics["loss"])
        metrics["tokens"] = int(np.sum(batch["attention"]))
        return metrics, {"losses": list(losses)}

    run_steps(run, total_steps, step, description=f"finetune ({method})",
              postfix=lambda metrics: f"loss {metrics['loss']:.4f}", callback=callback, progress=progress)
    trained = whole_on_every_process(engine.plain_model())

    def write(folder: Path) -> None:
        from mapjax.jsonio import write_json

        write_json(folder / "losses.json", {"method": method, "config": dataclasses.asdict(config),
                                            "losses": losses, "trainable_parameters": engine.trainable_count()})
        if export:
            export_policy(trained, tokenizer, folder, engine)

    run.finish(write)
    return FinetuneResult(trained, losses, total_steps, run.resume_step, run.out, count, engine.trainable_count())
