"""The benchmark suite's cases: each times mapjax against its PyTorch counterpart, same weights and inputs.

A case is a generator ``(context) -> Iterator[Row]`` (rows come out as they are measured); a row is one line
of the results table: mapjax's and PyTorch's throughput in the same unit, their ratio (mapjax / PyTorch: above
1 means mapjax is faster), compile and first call times apart from the steady state, and ``checks``, numbers
that show both sides computed the same thing (``agree`` says whether they are within the tolerance of the
run's dtype). ``CASES`` lists them in run order
with a conservative estimate of their wall time on one H100/H200, which the suite's time budget uses.

Steady state: after each side's first call (mapjax: tracing + compilation + one run; PyTorch: warm-up), the
two sides alternate call by call (so background load hits both alike) for at least ``min_repeats`` rounds and
until ``repeat_budget_s`` seconds have passed (at most ``max_repeats``); a rate is work over the median call.
"""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from benchmarks.suite_models import BOS_ID, PAD_ID, ModelSpec, build_mapjax_model, build_torch_twin, model_spec

REPO_ROOT = Path(__file__).resolve().parents[1]
PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"

# Agreement tolerances per compute dtype: logprobs of sampled tokens (absolute, nats), logits and encoder outputs
# (max |difference| relative to the largest |value|), training loss (relative), cosine similarity (absolute).
TOLERANCES = {
    "float32": dict(logprob=2e-3, logits=1e-3, loss=1e-4, cosine=1e-4),
    "bfloat16": dict(logprob=0.3, logits=0.05, loss=2e-2, cosine=2e-2),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The work of every case; one set per mode (GPU, CPU, ``--tiny``)."""

    generate_batches: tuple[int, ...]
    prompt_tokens: int          # every prompt has exactly this many tokens (BOS included): no padding anywhere
    new_tokens: int             # EOS ignored: every row makes exactly this many
    check_rows: int             # rows whose sampled tokens PyTorch re-scores
    forward_batch: int
    forward_seq: int
    train_batch: int
    train_seq: int
    encoder_pairs: int          # (prompt, continuation) pairs per encoder call
    encoder_seq: int
    palettes: int
    reference_palettes: int     # the PyTorch reference solves at most this many (one at a time, as its authors)
    reference_budget_s: float   # ... and stops after this long
    palette_values: tuple[int, ...]
    solver_dtypes: tuple[str, ...]
    large_samples: int
    large_values: int
    min_repeats: int
    max_repeats: int
    repeat_budget_s: float


GPU_SIZES = Sizes(generate_batches=(64, 256), prompt_tokens=32, new_tokens=50, check_rows=8, forward_batch=16,
                  forward_seq=512, train_batch=8, train_seq=512, encoder_pairs=256, encoder_seq=128, palettes=1000,
                  reference_palettes=100, reference_budget_s=10.0, palette_values=(3, 6),
                  solver_dtypes=("float64", "float32"), large_samples=1_000_000, large_values=8, min_repeats=3,
                  max_repeats=10, repeat_budget_s=6.0)
# The CPU mode follows the issue's CPU goals (sampling at batch 16 and 64) and the existing CPU benchmarks' sizes.
CPU_SIZES = Sizes(generate_batches=(16, 64), prompt_tokens=32, new_tokens=50, check_rows=4, forward_batch=16,
                  forward_seq=128, train_batch=4, train_seq=64, encoder_pairs=64, encoder_seq=128, palettes=1000,
                  reference_palettes=50, reference_budget_s=20.0, palette_values=(3, 6),
                  solver_dtypes=("float64", "float32"), large_samples=1_000_000, large_values=8, min_repeats=2,
                  max_repeats=5, repeat_budget_s=20.0)
TINY_SIZES = Sizes(generate_batches=(16,), prompt_tokens=8, new_tokens=8, check_rows=4, forward_batch=4,
                   forward_seq=32, train_batch=4, train_seq=32, encoder_pairs=16, encoder_seq=32, palettes=64,
                   reference_palettes=4, reference_budget_s=2.0, palette_values=(3,), solver_dtypes=("float64",),
                   large_samples=10_000, large_values=8, min_repeats=2, max_repeats=3, repeat_budget_s=0.5)


@dataclasses.dataclass
class Row:
    """One line of the results table."""

    name: str
    unit: str
    mapjax: float                     # throughput, ``unit``
    pytorch: float
    mapjax_first_call_s: float        # first call: tracing + compilation + one run
    pytorch_first_call_s: float       # PyTorch's warm-up call
    mapjax_compile_s: float           # first call minus a steady-state call
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    agree: bool | None = None         # checks within tolerance (None: nothing compared)
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.mapjax / self.pytorch

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


class Context:
    """What the cases share: device, dtype, sizes, and the models built so far (each built once)."""

    def __init__(self, *, device: str, torch_device: str, dtype: str, tiny: bool, sizes: Sizes):
        self.device, self.torch_device, self.dtype, self.tiny, self.sizes = device, torch_device, dtype, tiny, sizes
        self._pairs: dict[str, tuple[Any, Any]] = {}

    def spec(self, name: str) -> ModelSpec:
        return model_spec(name, self.tiny)

    def pair(self, name: str) -> tuple[Any, Any]:
        """(mapjax model, its PyTorch twin) of model ``name`` in the run's dtype, built on first use."""
        if name not in self._pairs:
            spec = self.spec(name)
            model = build_mapjax_model(spec, self.dtype)
            self._pairs[name] = (model, build_torch_twin(model, spec, self.torch_device, self.dtype))
        return self._pairs[name]

    def keep_only(self, names: set[str]) -> None:
        """Drop the models no later case needs (and the memory both frameworks hold for them)."""
        for name in list(self._pairs):
            if name not in names:
                del self._pairs[name]
        self.free_memory()

    def free_memory(self) -> None:
        import gc

        gc.collect()
        if self.torch_device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def sync_torch(self) -> None:
        if self.torch_device == "cuda":
            import torch

            torch.cuda.synchronize()

    def tolerance(self, what: str) -> float:
        return TOLERANCES[self.dtype][what]


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def first_call(function: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def steady_seconds(runs: dict[str, Callable[[int], Any]], sizes: Sizes) -> dict[str, float]:
    """Median seconds per call of each ``runs[name](repeat)``, the contestants alternating call by call."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    start = time.perf_counter()
    for repeat in range(1, sizes.max_repeats + 1):
        if repeat > sizes.min_repeats and time.perf_counter() - start > sizes.repeat_budget_s:
            break
        for name, run in runs.items():
            began = time.perf_counter()
            run(repeat)
            samples[name].append(time.perf_counter() - began)
    return {name: float(np.median(values)) for name, values in samples.items()}


def make_row(name: str, unit: str, work: float, seconds: dict[str, float], first: dict[str, float],
             checks: dict[str, Any], agree: bool | None, settings: dict[str, Any]) -> Row:
    return Row(name=name, unit=unit, mapjax=work / seconds["mapjax"], pytorch=work / seconds["pytorch"],
               mapjax_first_call_s=first["mapjax"], pytorch_first_call_s=first["pytorch"],
               mapjax_compile_s=max(first["mapjax"] - seconds["mapjax"], 0.0), checks=checks, agree=agree,
               settings={**settings, "mapjax_s_per_call": seconds["mapjax"], "pytorch_s_per_call": seconds["pytorch"]})


def relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    """max |ours - theirs| over max |theirs| (float64)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / max(float(np.max(np.abs(theirs))), 1e-30))


# --------------------------------------------------------------------------- #
# Sampling: mapjax.generate.generate against transformers' generate
# --------------------------------------------------------------------------- #
def generate_case(context: Context, name: str) -> Iterator[Row]:
    """Top-k 50 sampling, temperature 1, EOS ignored, ``new_tokens`` per row, at each batch size.

    Both sides get the same prompt ids (every prompt exactly ``prompt_tokens`` long, so neither pads). Check:
    PyTorch re-scores mapjax's samples with a full forward; the log-probabilities mapjax's KV-cache decode
    reported for its sampled tokens must match (``max_abs_logprob_difference``).
    """
    import torch
    import transformers

    from benchmarks.suite_models import word_prompts, word_tokenizer
    from mapjax.generate import generate, tokenize_prompts

    sizes, spec = context.sizes, context.spec(name)
    model, torch_model = context.pair(name)
    tokenizer = word_tokenizer(spec.vocab_size)
    new_tokens = sizes.new_tokens
    # EOS off on PyTorch's side: no EOS id in its generation config (the model config's would be merged in).
    torch_model.generation_config.eos_token_id = None
    generation_config = transformers.GenerationConfig(
        do_sample=True, top_k=50, top_p=1.0, temperature=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=None)
    for batch in sizes.generate_batches:
        prompts = word_prompts(batch, sizes.prompt_tokens, spec.vocab_size, seed=batch)
        prompt_ids = np.asarray(tokenize_prompts(tokenizer, prompts, model), np.int64)
        assert prompt_ids.shape == (batch, sizes.prompt_tokens), prompt_ids.shape
        torch_ids = torch.tensor(prompt_ids, device=context.torch_device)
        torch_mask = torch.ones_like(torch_ids)

        def run_mapjax(repeat: int, prompts=prompts, batch=batch) -> Any:
            result = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, top_k=50, top_p=1.0,
                              temperature=1.0, batch_size=batch, eos_token_id=[], seed=repeat)
            if int(result.lengths.sum()) != batch * new_tokens:
                raise AssertionError(f"mapjax made {int(result.lengths.sum())} tokens, not {batch * new_tokens}")
            return result

        def run_torch(repeat: int, torch_ids=torch_ids, torch_mask=torch_mask) -> Any:
            torch.manual_seed(repeat)
            with torch.inference_mode():
                out = torch_model.generate(input_ids=torch_ids, attention_mask=torch_mask,
                                           generation_config=generation_config)
            context.sync_torch()
            if out.shape[1] != sizes.prompt_tokens + new_tokens:
                raise AssertionError(f"PyTorch made {out.shape[1] - sizes.prompt_tokens} tokens, not {new_tokens}")
            return out

        mapjax_first, sample = first_call(partial(run_mapjax, 0))
        torch_first, _ = first_call(partial(run_torch, 0))
        seconds = steady_seconds({"mapjax": run_mapjax, "pytorch": run_torch}, sizes)
        checks = _rescore_samples(context, torch_model, prompt_ids, sample)
        yield make_row(
            f"{spec.label} sampling, batch {batch}", "tokens/s", batch * new_tokens, seconds,
            {"mapjax": mapjax_first, "pytorch": torch_first}, checks,
            checks["max_abs_logprob_difference"] <= context.tolerance("logprob"),
            dict(batch=batch, prompt_tokens=sizes.prompt_tokens, new_tokens=new_tokens, top_k=50, temperature=1.0,
                 dtype=context.dtype))


def _rescore_samples(context: Context, torch_model: Any, prompt_ids: np.ndarray, sample: Any) -> dict[str, Any]:
    """PyTorch's log-probabilities of mapjax's sampled tokens (first ``check_rows`` rows) against mapjax's own."""
    import torch

    count = min(context.sizes.check_rows, len(prompt_ids))
    tokens = np.asarray(sample.tokens[:count], np.int64)
    sequences = torch.tensor(np.concatenate([prompt_ids[:count], tokens], axis=1), device=context.torch_device)
    start = prompt_ids.shape[1] - 1
    with torch.inference_mode():
        logits = torch_model(input_ids=sequences).logits[:, start:start + tokens.shape[1]].float()
        picked = torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, start + 1:, None])[..., 0]
    difference = np.abs(picked.cpu().numpy() - np.asarray(sample.logprobs[:count], np.float64))
    return {"max_abs_logprob_difference": float(difference.max()),
            "mean_abs_logprob_difference": float(difference.mean()), "rows_rescored": count}


# --------------------------------------------------------------------------- #
# Sampling at realistic lengths: continuous batching vs static batches vs transformers
# --------------------------------------------------------------------------- #
LENGTHS_FILE = REPO_ROOT / "benchmarks" / "sampling_lengths.json"
LENGTHS_CAP = 256          # max_new_tokens off tiny mode; the measured lengths were capped here
LENGTHS_SAMPLES = 8        # samples per prompt (a pool's k)


def generate_lengths_case(context: Context, name: str) -> Iterator[Row]:
    """Sampling where rows end at different lengths. Random weights never emit EOS, so each row gets a stop
    length drawn (seeded) from SmolLM2-Instruct's real-EOS lengths measured on the demo's chat prompts on CPU
    (``sampling_lengths.json``, written by ``benchmarks/generate.py --case lengths``), applied alike to both
    mapjax engines and to transformers (a per-row stopping criterion). ``4 x slots`` rows, ``slots`` at a time.

    Row: mapjax's continuous engine against transformers, in useful tokens/s; the static path's rate and every
    engine's idle fraction are in ``settings``. Checks: both mapjax engines sample the same tokens (95% of rows
    at least), and PyTorch re-scores a few rows of mapjax's samples and of its own.
    """
    import json

    from benchmarks.generate_lengths import TorchRows, check_against_pytorch, check_engines_agree
    from benchmarks.suite_models import word_prompts, word_tokenizer
    from mapjax.generate import generate, last_run_stats, tokenize_prompts

    sizes, spec = context.sizes, context.spec(name)
    model, torch_model = context.pair(name)
    tokenizer = word_tokenizer(spec.vocab_size)
    slots = sizes.generate_batches[0]
    cap = sizes.new_tokens if context.tiny else LENGTHS_CAP
    prompts = word_prompts(max(1, 4 * slots // LENGTHS_SAMPLES), sizes.prompt_tokens, spec.vocab_size, seed=slots)
    rows = len(prompts) * LENGTHS_SAMPLES
    measured = np.asarray(json.loads(LENGTHS_FILE.read_text())["lengths"], np.int64)
    stops = np.minimum(np.random.RandomState(0).choice(measured, size=rows), cap)
    prompt_ids = [ids for ids in tokenize_prompts(tokenizer, prompts, model) for _ in range(LENGTHS_SAMPLES)]
    torch_rows = TorchRows(torch_model, prompt_ids, slots, (), PAD_ID, context.torch_device)
    options = dict(max_new_tokens=cap, num_samples=LENGTHS_SAMPLES, batch_size=slots, top_k=50, top_p=1.0,
                   temperature=1.0, eos_token_id=[], stop_lengths=stops)
    idle: dict[str, float] = {}
    samples: dict[str, Any] = {}

    def run_engine(engine: str, repeat: int) -> Any:
        result = generate(model, tokenizer, prompts, engine=engine, seed=repeat, **options)
        idle[engine] = last_run_stats().idle_fraction
        samples[engine] = result
        return result

    def run_torch(repeat: int) -> Any:
        out = torch_rows(repeat, cap, stops)
        context.sync_torch()
        idle["pytorch"] = 1 - out[1].sum() / out[2]
        samples["pytorch"] = out
        return out

    first = {}
    for label, run in (("static", partial(run_engine, "static")), ("mapjax", partial(run_engine, "continuous")),
                       ("pytorch", run_torch)):
        first[label], _ = first_call(partial(run, 0))
    agreement = check_engines_agree(samples["static"], samples["continuous"], context.tolerance("logprob"))
    torch_tokens, torch_lengths, _ = samples["pytorch"]
    pytorch_check = check_against_pytorch(model, torch_model, context.torch_device, samples["continuous"],
                                          torch_tokens, torch_lengths, prompt_ids, min(sizes.check_rows, rows),
                                          context.tolerance("logprob"))
    seconds = steady_seconds({"mapjax": partial(run_engine, "continuous"), "static": partial(run_engine, "static"),
                              "pytorch": run_torch}, sizes)
    useful = int(stops.sum())
    yield make_row(
        f"{spec.label} sampling, stops from measured lengths, {slots} slots", "useful tokens/s", useful, seconds,
        first, {"engines": agreement, "pytorch_rescoring": pytorch_check}, True,
        dict(slots=slots, rows=rows, max_new_tokens=cap, stop_percentiles=np.percentile(stops, [10, 50, 90]).tolist(),
             static_tokens_per_s=useful / seconds["static"], continuous_vs_static=seconds["static"] / seconds["mapjax"],
             idle_fraction=dict(idle), dtype=context.dtype))


# --------------------------------------------------------------------------- #
# Forward throughput (benchmarks/models.py's jitted forward and PyTorch eager forward)
# --------------------------------------------------------------------------- #
def forward_case(context: Context, name: str) -> Iterator[Row]:
    """A full causal-LM forward (logits included) over a ``forward_batch x forward_seq`` block."""
    from benchmarks.models import jitted_forward, token_block, torch_forward

    sizes, spec = context.sizes, context.spec(name)
    model, torch_model = context.pair(name)
    ids, mask = token_block(sizes.forward_batch, sizes.forward_seq, spec.vocab_size)
    mapjax_first, run_mapjax = first_call(lambda: jitted_forward(model, ids, mask))
    torch_first, run_torch = first_call(
        lambda: torch_forward(torch_model, ids, mask, context.torch_device, context.dtype))
    seconds = steady_seconds({"mapjax": lambda repeat: run_mapjax(), "pytorch": lambda repeat: run_torch()}, sizes)
    ours = np.asarray(run_mapjax()[0].astype("float32"))
    theirs = run_torch()[0].float().cpu().numpy()
    difference = relative_difference(ours, theirs)
    checks = {"max_abs_logits_difference_row0": float(np.max(np.abs(ours - theirs))),
              "relative_logits_difference_row0": difference}
    yield make_row(f"{spec.label} forward {sizes.forward_batch}x{sizes.forward_seq}", "tokens/s",
                     sizes.forward_batch * sizes.forward_seq, seconds,
                     {"mapjax": mapjax_first, "pytorch": torch_first}, checks,
                     difference <= context.tolerance("logits"),
                     dict(batch=sizes.forward_batch, seq=sizes.forward_seq, dtype=context.dtype))


# --------------------------------------------------------------------------- #
# One training step: mapjax.finetune's jitted step against the same loss and AdamW in PyTorch
# --------------------------------------------------------------------------- #
def _torch_weighted_step(torch_model: Any, trainable: list[Any], arrays: tuple[np.ndarray, ...], device: str,
                         autocast: bool, losses: list[float]) -> tuple[Callable[[int], None], Any]:
    """``(run, optimizer)``: ``run(repeat)`` is one MAP-F weighted step in PyTorch (AdamW lr 1e-5 on ``trainable``, clipping at 1, an
    optional bfloat16 autocast), appending its loss to ``losses``: the counterpart of mapjax's engine update."""
    import torch

    optimizer = torch.optim.AdamW(trainable, lr=1e-5, weight_decay=0.0, eps=1e-8)
    t_ids, t_attention, t_loss_mask, t_weights = (torch.as_tensor(array).to(device) for array in arrays)
    t_ids = t_ids.long()

    def run_torch(repeat: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            logits = torch_model(input_ids=t_ids, attention_mask=t_attention).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, t_ids[:, 1:, None])[..., 0]
        weighted = t_weights[:, None] * t_loss_mask[:, 1:]
        loss = -(weighted * picked).sum() / weighted.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))   # waits for the step

    return run_torch, optimizer


def train_case(context: Context, name: str) -> Iterator[Row]:
    """The MAP-F weighted train step (token-level weighted NLL, clip at 1, AdamW lr 1e-5, no weight decay).

    Float32 master weights on both sides; with bfloat16 the forward runs in bfloat16 (mapjax casts its
    parameters, PyTorch autocasts). Check: the loss of the first step (same weights, same batch) and of the
    last (both have taken the same number of steps).
    """

    from benchmarks.finetune import make_batch
    from mapjax.finetune import FinetuneConfig
    from mapjax.finetune.engine import Engine
    from mapjax.finetune.offline import objective_for

    sizes, spec = context.sizes, context.spec(name)
    model, _ = context.pair(name)
    ids, attention, loss_mask, weights = make_batch(sizes.train_batch, sizes.train_seq, spec.vocab_size)
    batch = {"ids": ids[None], "attention": attention[None], "loss_mask": loss_mask[None], "weight": weights[None]}
    config = FinetuneConfig(batch_size=sizes.train_batch, learning_rate=1e-5, clip_norm=1.0, weight_decay=0.0,
                            dtype=context.dtype)
    engine = Engine(model, config, total_updates=10_000, needs_reference=False)
    objective = objective_for("weighted", config)
    losses: dict[str, list[float]] = {"mapjax": [], "pytorch": []}

    def run_mapjax(repeat: int) -> None:
        losses["mapjax"].append(engine.update(batch, objective, len(losses["mapjax"]))["loss"])

    device = context.torch_device
    torch_model = build_torch_twin(model, spec, device, "float32").train()
    run_torch, _ = _torch_weighted_step(torch_model, list(torch_model.parameters()), (ids, attention, loss_mask, weights),
                                     device, context.dtype == "bfloat16", losses["pytorch"])

    mapjax_first, _ = first_call(partial(run_mapjax, 0))
    torch_first, _ = first_call(partial(run_torch, 0))
    seconds = steady_seconds({"mapjax": run_mapjax, "pytorch": run_torch}, sizes)
    first_gap = abs(losses["mapjax"][0] - losses["pytorch"][0]) / abs(losses["pytorch"][0])
    last_gap = abs(losses["mapjax"][-1] - losses["pytorch"][-1]) / abs(losses["pytorch"][-1])
    checks = {"loss_first": [losses["mapjax"][0], losses["pytorch"][0]],
              "loss_last": [losses["mapjax"][-1], losses["pytorch"][-1]], "steps": len(losses["mapjax"]),
              "relative_loss_difference_first": first_gap, "relative_loss_difference_last": last_gap}
    tokens = sizes.train_batch * sizes.train_seq
    yield make_row(f"{spec.label} train step {sizes.train_batch}x{sizes.train_seq}", "tokens/s", tokens, seconds,
                     {"mapjax": mapjax_first, "pytorch": torch_first}, checks,
                     max(first_gap, last_gap) <= context.tolerance("loss"),
                     dict(batch=sizes.train_batch, seq=sizes.train_seq, compute_dtype=context.dtype,
                          master_dtype="float32", steps_per_s_mapjax=1.0 / seconds["mapjax"],
                          steps_per_s_pytorch=1.0 / seconds["pytorch"]))


# --------------------------------------------------------------------------- #
# Full finetuning, LoRA and QLoRA: mapjax.finetune's Engine against PyTorch (PEFT for the adapters)
# --------------------------------------------------------------------------- #
LORA_RANK, LORA_ALPHA = 16, 32.0
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# QLoRA's PyTorch side runs over the unquantized base: the losses differ by the int8 rounding of the base
# (relative: 3e-4 to 7e-3 measured on SmolLM2-135M's real weights, 2e-5 on the tiny random Llama).
QLORA_LOSS_TOLERANCE = 3e-2


def _skipped_row(name: str, reason: str) -> Row:
    """A row saying a mode was not measured (NaN rates; agree None so the run stays healthy)."""
    nan = float("nan")
    return Row(name=f"{name}: skipped, {reason}", unit="tokens/s", mapjax=nan, pytorch=nan, mapjax_first_call_s=nan,
               pytorch_first_call_s=nan, mapjax_compile_s=nan, checks={"skipped": reason}, agree=None)


def _jax_device_memory() -> dict[str, int] | None:
    """JAX's device allocator counters (None where the platform keeps none, as on the CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "bytes_in_use" not in stats:
        return None
    return {"in_use": int(stats["bytes_in_use"]), "peak": int(stats.get("peak_bytes_in_use", 0))}


def _tree_nbytes(tree: Any) -> int:
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes")))


def train_lora_case(context: Context, name: str) -> Iterator[Row]:
    """The MAP-F weighted train step in three modes: every weight trained, LoRA (rank 16, alpha 32 on q, k, v, o,
    gate, up, down) over the frozen base, and QLoRA (the same adapters over an int8 base, through qwix).

    PyTorch: the same step on transformers' model, with PEFT LoRA adapters loaded from mapjax's ``export_peft``
    (identical A, B = 0: the adapted model equals the base at step 0) for LoRA, and for QLoRA the same PEFT LoRA
    over the unquantized base (PyTorch's QLoRA needs bitsandbytes; the row's name says so). Check: the first and
    last step's losses (the QLoRA row within the int8 rounding, ``QLORA_LOSS_TOLERANCE``). Reported per mode
    (``checks``): trainable parameters, the training state's bytes (trainable float32 + Adam moments + frozen;
    mapjax's full mode also keeps its initial weights as the KL reference), and the device memory a mode added
    over what was allocated before it (PyTorch: its allocator's peak; JAX: its peak where the mode raised it,
    JAX's counter cannot be reset). Without qwix (or PEFT) the adapter modes yield a row saying they were skipped.
    """
    import importlib.util

    sizes, spec = context.sizes, context.spec(name)
    model, _ = context.pair(name)
    arrays = _train_batch_arrays(sizes, spec.vocab_size)
    yield _lora_mode_row(context, name, spec, model, arrays, "full")
    context.free_memory()   # the mode's engine and PyTorch model went with its function's frame
    missing = [package for package in ("qwix", "peft") if importlib.util.find_spec(package) is None]
    if missing:
        yield _skipped_row(f"{spec.label} LoRA and QLoRA", f"{' and '.join(missing)} not installed")
        return
    for mode in ("lora", "qlora"):
        yield _lora_mode_row(context, name, spec, model, arrays, mode)
        context.free_memory()


def _train_batch_arrays(sizes: Sizes, vocab_size: int) -> tuple[np.ndarray, ...]:
    from benchmarks.finetune import make_batch

    return make_batch(sizes.train_batch, sizes.train_seq, vocab_size)


def _lora_mode_row(context: Context, name: str, spec: ModelSpec, model: Any, arrays: tuple[np.ndarray, ...],
                   mode: str) -> Row:
    import tempfile

    import torch

    from mapjax.finetune import FinetuneConfig
    from mapjax.finetune.engine import Engine
    from mapjax.finetune.offline import objective_for

    sizes, device = context.sizes, context.torch_device
    ids, attention, loss_mask, weights = arrays
    batch = {"ids": ids[None], "attention": attention[None], "loss_mask": loss_mask[None], "weight": weights[None]}
    adapters = {} if mode == "full" else dict(lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_targets=LORA_TARGETS,
                                              quantize_base="int8" if mode == "qlora" else "none")
    config = FinetuneConfig(batch_size=sizes.train_batch, learning_rate=1e-5, clip_norm=1.0, weight_decay=0.0,
                            dtype=context.dtype, **adapters)
    jax_before = _jax_device_memory()
    engine = Engine(model, config, total_updates=10_000, needs_reference=False)
    objective = objective_for("weighted", config)
    losses: dict[str, list[float]] = {"mapjax": [], "pytorch": []}

    def run_mapjax(repeat: int) -> None:
        losses["mapjax"].append(engine.update(batch, objective, len(losses["mapjax"]))["loss"])

    # PyTorch: float32 master weights when every weight trains (as train_case); under LoRA the frozen base in the
    # run's dtype (as mapjax keeps it) and PEFT's adapters in float32.
    if device == "cuda":
        torch.cuda.synchronize()
        torch_before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    torch_model = build_torch_twin(model, spec, device, "float32" if mode == "full" else context.dtype)
    if mode != "full":
        from peft import PeftModel

        from mapjax.finetune.lora import export_peft

        with tempfile.TemporaryDirectory() as folder:
            export_peft(engine.model(), folder, config.adapters)
            torch_model = PeftModel.from_pretrained(torch_model, folder, is_trainable=True)
    torch_model.train()
    trainable = [parameter for parameter in torch_model.parameters() if parameter.requires_grad]
    run_torch, optimizer = _torch_weighted_step(torch_model, trainable, (ids, attention, loss_mask, weights), device,
                                     context.dtype == "bfloat16", losses["pytorch"])

    mapjax_first, _ = first_call(partial(run_mapjax, 0))
    torch_first, _ = first_call(partial(run_torch, 0))
    seconds = steady_seconds({"mapjax": run_mapjax, "pytorch": run_torch}, sizes)

    first_gap = abs(losses["mapjax"][0] - losses["pytorch"][0]) / abs(losses["pytorch"][0])
    last_gap = abs(losses["mapjax"][-1] - losses["pytorch"][-1]) / abs(losses["pytorch"][-1])
    tolerance = QLORA_LOSS_TOLERANCE if mode == "qlora" else context.tolerance("loss")
    state = engine.state
    checks: dict[str, Any] = {
        "loss_first": [losses["mapjax"][0], losses["pytorch"][0]],
        "loss_last": [losses["mapjax"][-1], losses["pytorch"][-1]], "steps": len(losses["mapjax"]),
        "relative_loss_difference_first": first_gap, "relative_loss_difference_last": last_gap,
        "loss_tolerance": tolerance,
        "trainable_parameters": [engine.trainable_count(), sum(parameter.numel() for parameter in trainable)],
        "mapjax_state_bytes": {"trainable": _tree_nbytes(state.trainable), "adam_moments": _tree_nbytes(state.opt_state),
                               "frozen": _tree_nbytes(state.frozen), "reference": _tree_nbytes(engine.reference)},
        "pytorch_state_bytes": {
            "trainable": sum(p.numel() * p.element_size() for p in trainable),
            "adam_moments": sum(value.numel() * value.element_size() for entry in optimizer.state.values()
                                for value in entry.values() if torch.is_tensor(value)),
            "frozen": sum(p.numel() * p.element_size() for p in torch_model.parameters() if not p.requires_grad)},
    }
    jax_after = _jax_device_memory()
    if jax_before is not None and jax_after is not None:
        checks["mapjax_device_bytes_added_in_use"] = jax_after["in_use"] - jax_before["in_use"]
        # the peak counter covers the whole process: it is this mode's only where the mode raised it
        checks["mapjax_device_peak_bytes_added"] = (jax_after["peak"] - jax_before["in_use"]
                                                    if jax_after["peak"] > jax_before["peak"] else None)
    if device == "cuda":
        checks["pytorch_device_peak_bytes_added"] = torch.cuda.max_memory_allocated() - torch_before
    label = {"full": "full finetuning", "lora": f"LoRA r{LORA_RANK}",
             "qlora": f"QLoRA int8 r{LORA_RANK} (PyTorch: LoRA, unquantized base)"}[mode]
    row = make_row(f"{spec.label} {label} train step {sizes.train_batch}x{sizes.train_seq}", "tokens/s",
                   sizes.train_batch * sizes.train_seq, seconds, {"mapjax": mapjax_first, "pytorch": torch_first},
                   checks, max(first_gap, last_gap) <= tolerance,
                   dict(mode=mode, batch=sizes.train_batch, seq=sizes.train_seq, compute_dtype=context.dtype,
                        lora_rank=None if mode == "full" else LORA_RANK,
                        lora_alpha=None if mode == "full" else LORA_ALPHA,
                        lora_targets=None if mode == "full" else list(LORA_TARGETS),
                        quantize_base="int8" if mode == "qlora" else "none",
                        steps_per_s_mapjax=1.0 / seconds["mapjax"], steps_per_s_pytorch=1.0 / seconds["pytorch"]))
    return row


# --------------------------------------------------------------------------- #
# Coherence scoring: MiniLM encoder, mean pooling, cosine of prompt and continuation embeddings
# --------------------------------------------------------------------------- #
def _right_padded_block(rows: int, seq: int, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style right-padded ids (real tokens above the special ids, lengths seq/4..seq) and their mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(seq // 4, 2), seq + 1, size=rows)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(min(1000, vocab_size // 2), vocab_size, size=(rows, seq)), 0)
    return ids.astype(np.int32), mask


def encoder_case(context: Context, name: str = "minilm") -> Iterator[Row]:
    """What the ``coherence`` reward computes per pair: prompt and continuation encoded in one call (mean
    pooling over real tokens, as ``mapjax.rewards.coherence.embed``), then their cosine similarity."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from mapjax.models.encoder_layers import mean_pool

    sizes, spec = context.sizes, context.spec(name)
    model, torch_model = context.pair(name)
    pairs = sizes.encoder_pairs
    ids, mask = _right_padded_block(2 * pairs, sizes.encoder_seq, spec.vocab_size, seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def embed(state, ids, mask):
        return mean_pool(nnx.merge(graphdef, state)(ids, mask).last_hidden_state, mask)

    device_ids, device_mask = jnp.asarray(ids), jnp.asarray(mask)

    def cosine(vectors: np.ndarray) -> np.ndarray:   # float64 on the host, as the reward does
        first, second = vectors[:pairs].astype(np.float64), vectors[pairs:].astype(np.float64)
        norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
        return np.sum(first * second, axis=1) / np.maximum(norms, 1e-12)

    def run_mapjax(repeat: int) -> np.ndarray:
        return cosine(np.asarray(jax.device_get(embed(state, device_ids, device_mask))))

    torch_ids = torch.tensor(ids, dtype=torch.long, device=context.torch_device)
    torch_mask = torch.tensor(mask, dtype=torch.long, device=context.torch_device)

    def run_torch(repeat: int) -> np.ndarray:
        with torch.inference_mode():
            hidden = torch_model(input_ids=torch_ids, attention_mask=torch_mask).last_hidden_state.float()
            weights = torch_mask[..., None].float()
            vectors = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return cosine(vectors.cpu().numpy())

    mapjax_first, ours = first_call(partial(run_mapjax, 0))
    torch_first, theirs = first_call(partial(run_torch, 0))
    seconds = steady_seconds({"mapjax": run_mapjax, "pytorch": run_torch}, sizes)
    difference = float(np.max(np.abs(ours - theirs)))
    yield make_row(f"{spec.label} coherence scoring ({pairs} pairs, <= {sizes.encoder_seq} tokens each side)",
                     "pairs/s", pairs, seconds, {"mapjax": mapjax_first, "pytorch": torch_first},
                     {"max_abs_cosine_difference": difference}, difference <= context.tolerance("cosine"),
                     dict(pairs=pairs, seq=sizes.encoder_seq, tokens_per_call=int(mask.sum()), dtype=context.dtype))


# --------------------------------------------------------------------------- #
# The λ solver: mapjax's exact batched solver against the authors' Adam solver in PyTorch
# --------------------------------------------------------------------------- #
def _palette_pool() -> tuple[Any, tuple[str, ...], str]:
    """The OPT-1.3B pilot set shipped in data/ (values in the paper's order), else a synthetic pool."""
    from mapjax import RewardPool

    if PILOT.is_file():
        from benchmarks.solver import VALUES

        return RewardPool.load(PILOT), VALUES, "OPT-1.3B pilot set"
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(12_500, 6)) @ (np.eye(6) + rng.normal(size=(6, 6)) / 6)
    names = tuple(f"v{i}" for i in range(6))
    return RewardPool.from_array(rewards, names), names, "synthetic 12,500 x 6 pool (pilot set missing)"


def _torch_reference(context: Context, rewards: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, float, int]:
    """The authors' solver (benchmarks/torch_reference.py) on the run's PyTorch device, palette by palette,
    for at most ``reference_palettes`` palettes or ``reference_budget_s`` seconds: (success, seconds, count)."""
    import torch

    from benchmarks.torch_reference import reference_lambda

    sizes = context.sizes
    with torch.device(context.torch_device):
        torch_rewards = torch.tensor(np.ascontiguousarray(rewards.T), dtype=torch.float32)
        torch_targets = torch.tensor(targets, dtype=torch.float32)
        context.sync_torch()
        successes = []
        start = time.perf_counter()
        for index in range(min(len(targets), sizes.reference_palettes)):
            if index and time.perf_counter() - start > sizes.reference_budget_s:
                break
            successes.append(reference_lambda(torch_rewards, torch_targets[index])[1])
        seconds = time.perf_counter() - start
    return np.asarray(successes, bool), seconds, len(successes)


def solver_palettes_case(context: Context) -> Iterator[Row]:
    """``solve_many`` on random palettes (c_i ~ U(mean_i, max r_i), seed 0) of m values, all in one call,
    against the authors' solver in PyTorch looping over them (timed on a subset). Check: no exact λ left
    unconverged; the share of the reference's verdicts (feasible or not) that the exact solver shares."""
    from benchmarks.solver import random_palettes
    from mapjax import solve_many

    sizes = context.sizes
    pool, values, pool_name = _palette_pool()
    for m in sizes.palette_values:
        sub = pool.select(values[:m])
        palettes = random_palettes(sub, values[:m], sizes.palettes, seed=0)
        reference_ok, reference_s, reference_count = _torch_reference(context, sub.flat(), palettes)
        for dtype in sizes.solver_dtypes:
            solve = partial(solve_many, sub, palettes, dtype=dtype)
            mapjax_first, _ = first_call(solve)
            timings = [first_call(solve) for _ in range(sizes.min_repeats)]
            seconds = float(np.median([elapsed for elapsed, _ in timings]))
            exact = timings[-1][1]
            not_converged = int(np.sum(exact.status == "not_converged"))
            agreement = float(np.mean(exact.feasible[:reference_count] == reference_ok))
            yield Row(
                name=f"solver, {sizes.palettes} random palettes, m={m}, exact {dtype}", unit="palettes/s",
                mapjax=sizes.palettes / seconds, pytorch=reference_count / reference_s,
                mapjax_first_call_s=mapjax_first, pytorch_first_call_s=reference_s / reference_count,
                mapjax_compile_s=max(mapjax_first - seconds, 0.0),
                checks={"exact_not_converged": not_converged, "exact_feasible": int(exact.feasible.sum()),
                        "verdict_agreement_with_reference": agreement, "reference_palettes_timed": reference_count},
                agree=not_converged == 0,
                settings=dict(pool=pool_name, samples=int(sub.flat().shape[0]), m=m, palettes=sizes.palettes,
                              dtype=dtype, reference_device=context.torch_device))


def solver_large_case(context: Context) -> Iterator[Row]:
    """One palette on a synthetic pool of ``large_samples x large_values`` correlated rewards (levels at the 0.6
    quantiles, as benchmarks/solver.py), ``solve_many`` against the PyTorch reference's 150 Adam steps."""
    from mapjax import RewardPool, solve_many

    sizes = context.sizes
    rng = np.random.default_rng(0)
    values = sizes.large_values
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    rewards = rng.normal(size=(sizes.large_samples, values)) @ mixing
    pool = RewardPool.from_array(rewards)
    target = np.quantile(rewards, 0.6, axis=0)[None]
    solve = partial(solve_many, pool, target)
    mapjax_first, _ = first_call(solve)
    timings = [first_call(solve) for _ in range(sizes.min_repeats)]
    seconds = float(np.median([elapsed for elapsed, _ in timings]))
    solution = timings[-1][1][0]
    reference_first_ok, reference_first_s, _ = _torch_reference(context, rewards.astype(np.float32), target)
    reference_ok, reference_s, _ = _torch_reference(context, rewards.astype(np.float32), target)
    yield Row(name=f"solver, one palette on a {sizes.large_samples:,} x {values} pool", unit="solves/s",
                mapjax=1.0 / seconds, pytorch=1.0 / reference_s, mapjax_first_call_s=mapjax_first,
                pytorch_first_call_s=reference_first_s, mapjax_compile_s=max(mapjax_first - seconds, 0.0),
                checks={"exact_status": str(solution.status), "exact_kkt_residual": float(solution.kkt_residual),
                        "exact_iterations": int(solution.iterations), "reference_success": bool(reference_ok[0]),
                        "reference_first_success": bool(reference_first_ok[0])},
                agree=str(solution.status) == "optimal" and math.isfinite(float(solution.kkt_residual)),
                settings=dict(samples=sizes.large_samples, values=values, dtype="float64",
                              reference_device=context.torch_device))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Context], Iterator[Row]]
    models: tuple[str, ...]       # models it builds (kept until the last case that needs them)
    gpu_estimate_s: float         # conservative wall time on one H100/H200, compilation included
    description: str


# Run order: sampling first (the headline), then forward, encoder, solver, training (the slowest to
# compile); a case that would not fit in what is left of the time budget is skipped and says so.
CASES: tuple[Case, ...] = (
    Case("generate-smollm2", partial(generate_case, name="smollm2"), ("smollm2",), 90,
         "SmolLM2-135M sampling tokens/s, mapjax generate vs transformers generate"),
    Case("generate-llama1b", partial(generate_case, name="llama1b"), ("llama1b",), 80,
         "Llama-3.2-1B-size sampling tokens/s"),
    Case("generate-lengths", partial(generate_lengths_case, name="smollm2"), ("smollm2",), 240,
         "SmolLM2-135M sampling with per-row stops from measured lengths: continuous vs static vs transformers"),
    Case("forward-smollm2", partial(forward_case, name="smollm2"), ("smollm2",), 20, "SmolLM2-135M forward"),
    Case("forward-gpt2", partial(forward_case, name="gpt2"), ("gpt2",), 20, "GPT-2 small forward"),
    Case("forward-llama1b", partial(forward_case, name="llama1b"), ("llama1b",), 25, "Llama-1B-size forward"),
    Case("encoder-minilm", partial(encoder_case, name="minilm"), ("minilm",), 15,
         "MiniLM-L6 coherence scoring (encoder forward, mean pooling, cosine)"),
    Case("solver-palettes", solver_palettes_case, (), 60, "λ solver, 1000 random palettes (m = 3, 6)"),
    Case("solver-large", solver_large_case, (), 20, "λ solver, one palette on a 10^6 x 8 pool"),
    Case("train-smollm2", partial(train_case, name="smollm2"), ("smollm2",), 45, "SmolLM2-135M train step"),
    Case("train-gpt2", partial(train_case, name="gpt2"), ("gpt2",), 35, "GPT-2 small train step"),
    Case("train-llama1b", partial(train_case, name="llama1b"), ("llama1b",), 60, "Llama-1B-size train step"),
    Case("train-lora", partial(train_lora_case, name="llama1b"), ("llama1b",), 150,
         "Llama-1B-size train step: full, LoRA r16 and QLoRA int8 (memory and step time)"),
)
CASE_NAMES = tuple(case.name for case in CASES)
