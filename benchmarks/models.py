"""Model forward throughput: mapjax (jitted) against transformers' PyTorch classes, same weights.

Rows: SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantised to float32) and a
GPT-2-small-sized random model, each a full causal-LM forward (logits included) over a
``batch x seq`` block; plus any rows that ``benchmarks/models_encoders.py`` provides
(``encoder_benchmark_cases``).  Prints one Markdown table with the ratio.

PyTorch loads SmolLM2's weights from mapjax's export with ``strict=True`` (GPT-2's go the other way, from
PyTorch's random model to mapjax). Before any timing, every row checks that the two sides computed the same
thing: the outputs of one call each (logits, or the encoder's hidden states) must match within the suite's
tolerance (``benchmarks/suite_cases.TOLERANCES["logits"]``: max |Δ| at most 1e-3 of the largest |value| in
float32, 5e-2 in bfloat16), or the run stops with :class:`Disagreement`. PyTorch's thread count is the faster
of 1 and all cores on one call each (``--torch-threads`` pins one); then the two sides alternate call by
call for ``--repeats`` rounds and the table gives the median call.

    python benchmarks/models.py [--device auto|cpu|gpu] [--batch 16] [--seq 128] [--repeats 3]
                                [--dtype float32|bfloat16] [--only smollm2,gpt2,encoders] [--tf32]
                                [--torch-threads N]

``--device auto`` uses a GPU for both frameworks when each sees one.  To add rows,
append a provider to ``CASE_PROVIDERS``: a function ``(args) -> list[BenchmarkCase]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))


@dataclasses.dataclass(frozen=True)
class BenchmarkCase:
    """One side-by-side row (same fields as ``models_encoders.BenchmarkCase``).

    ``make_jax``/``make_torch`` build, warm up and return a zero-argument callable that
    runs one forward and waits for the result (``block_until_ready``/``cuda.synchronize``).
    """

    name: str
    unit: str
    work_per_call: int
    make_jax: Callable[[], Callable[[], Any]]
    make_torch: Callable[[], Callable[[], Any]]


# --------------------------------------------------------------------------- #
# Shared plumbing
# --------------------------------------------------------------------------- #
def torch_device(requested: str) -> str:
    import torch

    if requested == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if requested == "gpu":
        raise SystemExit("--device gpu: PyTorch sees no CUDA device")
    return "cpu"


def torch_thread_counts(device: str, requested: int | None = None) -> list[int | None]:
    """The PyTorch CPU thread counts a benchmark times, reporting the faster: ``requested`` alone when given,
    else 1 and every core (on a small or shared CPU one thread often beats several, whose OpenMP workers wait on
    each other). On a GPU the thread count does not matter: ``[None]``, PyTorch as it is."""
    if device != "cpu":
        return [None]
    if requested:
        return [int(requested)]
    return sorted({1, os.cpu_count() or 1})


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """PyTorch's intra-op thread count set to ``count`` inside the block (None: left as it is), restored after."""
    import torch

    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pick_torch_threads(probe: Callable[[], Any], thread_counts: list[int | None]) -> tuple[int | None, dict]:
    """The faster of ``thread_counts`` for PyTorch on ``probe`` (a short piece of the timed work): each count
    runs it once to warm up, then once timed. Returns (the faster count, {count: probe seconds}). Timing the
    whole work at every count would double PyTorch's share of a run, and under load its multi-threaded runs can
    be ten times slower than its one-thread runs."""
    seconds: dict = {}
    for count in thread_counts:
        with torch_threads(count):
            probe()
            start = time.perf_counter()
            probe()
            seconds[count] = time.perf_counter() - start
    return min(seconds, key=seconds.get), seconds


def threads_label(count: int | None) -> str:
    return "default threads" if count is None else f"{count} thread{'s' if count > 1 else ''}"


def jitted_forward(model: Any, ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
    """Compile ``model(ids, mask).logits`` once (params passed as arguments) and return the timed call."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).logits)
    device_ids, device_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    forward(state, device_ids, device_mask).block_until_ready()  # compile + warm-up

    def run() -> Any:
        return forward(state, device_ids, device_mask).block_until_ready()

    return run


def torch_forward(model: Any, ids: np.ndarray, mask: np.ndarray, device: str, dtype: str) -> Callable[[], Any]:
    import torch

    model = model.eval().to(device)
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    torch_ids = torch.tensor(ids, dtype=torch.long, device=device)
    torch_mask = torch.tensor(mask, dtype=torch.long, device=device)

    def run() -> Any:
        with torch.inference_mode():
            logits = model(input_ids=torch_ids, attention_mask=torch_mask).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return logits

    run()  # warm-up (allocator, kernels)
    return run


def token_block(batch: int, seq: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(seed).integers(3, vocab_size, size=(batch, seq)).astype(np.int32)
    return ids, np.ones_like(ids)


def _jax_dtype(name: str) -> Any:
    import jax.numpy as jnp

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


# --------------------------------------------------------------------------- #
# Decoder rows
# --------------------------------------------------------------------------- #
def smollm2_case(args: argparse.Namespace) -> list[BenchmarkCase]:
    """SmolLM2-135M from the packaged GGUF; PyTorch gets the very same dequantised tensors."""
    from mapjax.models.packaged import smollm2_gguf_path

    try:
        path = smollm2_gguf_path()
    except FileNotFoundError as error:
        print(f"skipping SmolLM2: {error}", file=sys.stderr)
        return []
    ids, mask = token_block(args.batch, args.seq, 49152)
    loaded: dict[str, Any] = {}

    def mapjax_model() -> Any:
        if "model" not in loaded:
            from mapjax.models import from_gguf

            loaded["model"] = from_gguf(path, _jax_dtype(args.dtype), with_tokenizer=False)[0]
        return loaded["model"]

    def make_torch() -> Callable[[], Any]:
        import torch
        import transformers

        model = mapjax_model()
        hf_config = transformers.LlamaConfig(**{key: value for key, value in model.hf_config_dict().items()
                                                if key not in ("architectures", "model_type")})
        torch_model = transformers.LlamaForCausalLM(hf_config)
        state = {name: torch.from_numpy(value) for name, value in model.hf_state_dict().items()}
        if hf_config.tie_word_embeddings:  # the export holds the shared matrix once; strict loading wants both names
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        torch_model.load_state_dict(state, strict=True)  # every PyTorch parameter set from mapjax's weights
        torch_model.tie_weights()
        return torch_forward(torch_model, ids, mask, torch_device(args.device), args.dtype)

    return [BenchmarkCase(
        name=f"SmolLM2-135M causal LM forward {args.dtype} ({args.batch}x{args.seq})", unit="tokens/s",
        work_per_call=args.batch * args.seq,
        make_jax=lambda: jitted_forward(mapjax_model(), ids, mask), make_torch=make_torch)]


def gpt2_small_case(args: argparse.Namespace) -> list[BenchmarkCase]:
    """A random GPT-2-small (124M: 12 layers, 768 wide, 50257 vocab), weights handed over in memory."""
    ids, mask = token_block(args.batch, args.seq, 50257)
    models: dict[str, Any] = {}

    def torch_model() -> Any:
        if "torch" not in models:
            import torch
            import transformers

            torch.manual_seed(0)
            models["torch"] = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
        return models["torch"]

    def make_jax() -> Callable[[], Any]:
        from mapjax.models.loading import build_from_tensors

        reference = torch_model()
        tensors = {name: value.detach().float().numpy() for name, value in reference.state_dict().items()}
        model = build_from_tensors(reference.config, tensors, _jax_dtype(args.dtype),
                                   architecture="GPT2LMHeadModel")
        return jitted_forward(model, ids, mask)

    return [BenchmarkCase(
        name=f"GPT-2 small (random) causal LM forward {args.dtype} ({args.batch}x{args.seq})", unit="tokens/s",
        work_per_call=args.batch * args.seq, make_jax=make_jax,
        make_torch=lambda: torch_forward(torch_model(), ids, mask, torch_device(args.device), args.dtype))]


def encoder_cases(args: argparse.Namespace) -> list[BenchmarkCase]:
    """Rows from ``benchmarks/models_encoders.py``."""
    from benchmarks.models_encoders import encoder_benchmark_cases

    return list(encoder_benchmark_cases())


# Add rows here: each provider maps the parsed arguments to a list of cases.
CASE_PROVIDERS: dict[str, Callable[[argparse.Namespace], list[Any]]] = {
    "smollm2": smollm2_case,
    "gpt2": gpt2_small_case,
    "encoders": encoder_cases,
}


def benchmark_cases(args: argparse.Namespace) -> list[Any]:
    """Every case of the selected providers, in ``CASE_PROVIDERS`` order."""
    selected = args.only.split(",") if args.only else list(CASE_PROVIDERS)
    unknown = sorted(set(selected) - set(CASE_PROVIDERS))
    if unknown:
        raise SystemExit(f"--only: unknown providers {unknown}; known: {sorted(CASE_PROVIDERS)}")
    return [case for name in selected for case in CASE_PROVIDERS[name](args)]


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #
def median_seconds(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call; contestants alternate each round so background load hits both."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in samples.items()}


class Disagreement(AssertionError):
    """mapjax's and PyTorch's outputs differ by more than the benchmark's tolerance: the timings would compare
    two different computations."""


def as_numpy(output: Any) -> np.ndarray:
    """A JAX array or a PyTorch tensor (any dtype, any device) as float32 numpy."""
    if hasattr(output, "detach"):
        return output.detach().float().cpu().numpy()
    return np.asarray(output.astype("float32") if hasattr(output, "astype") else output, dtype=np.float32)


def assert_agreement(name: str, ours: Any, theirs: Any, tolerance: float) -> dict[str, float]:
    """Check that mapjax's output ``ours`` matches PyTorch's ``theirs`` for the row ``name``: same shape, finite,
    and max |ours − theirs| <= ``tolerance`` x max |theirs|. Returns {"max_abs_difference", "max_abs_value",
    "relative_difference"}; raises :class:`Disagreement` naming the row and the numbers otherwise."""
    ours, theirs = as_numpy(ours), as_numpy(theirs)  # float32: a 16x128 block's logits are 400 MB already
    if ours.shape != theirs.shape:
        raise Disagreement(f"{name}: mapjax's output has shape {ours.shape}, PyTorch's {theirs.shape}")
    if not (np.all(np.isfinite(ours)) and np.all(np.isfinite(theirs))):
        raise Disagreement(f"{name}: non-finite outputs (mapjax {int(np.sum(~np.isfinite(ours)))} values, "
                           f"PyTorch {int(np.sum(~np.isfinite(theirs)))})")
    difference = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    relative = difference / max(scale, 1e-30)
    if relative > tolerance:
        raise Disagreement(f"{name}: max |mapjax - PyTorch| = {difference:.3g} is {relative:.2e} of the largest "
                           f"|output| {scale:.3g}, above the tolerance {tolerance:.0e}")
    return {"max_abs_difference": difference, "max_abs_value": scale, "relative_difference": relative}


def logits_tolerance(dtype: str) -> float:
    """The suite's tolerance for logits and encoder outputs in ``dtype`` (relative to the largest |value|)."""
    from benchmarks.suite_cases import TOLERANCES

    return TOLERANCES[dtype]["logits"]


def measure(case: Any, repeats: int, tolerance: float = 1e-3,
            thread_counts: list[int | None] | None = None) -> dict[str, Any]:
    """Build both sides, check their outputs agree (:func:`assert_agreement`) before any timing, pick PyTorch's
    faster thread count on one call each (``thread_counts``; None: as it is), then time them alternating."""
    jax_run = case.make_jax()
    torch_run = case.make_torch()
    agreement = assert_agreement(case.name, jax_run(), torch_run(), tolerance)
    threads, probe_seconds = pick_torch_threads(torch_run, thread_counts or [None])
    with torch_threads(threads):
        seconds = median_seconds({"mapjax": jax_run, "pytorch": torch_run}, repeats)
    return {"case": case.name, "unit": case.unit,
            "mapjax": case.work_per_call / seconds["mapjax"],
            "pytorch": case.work_per_call / seconds["pytorch"],
            "ratio": seconds["pytorch"] / seconds["mapjax"],
            "torch_threads": threads, "torch_probe_s": probe_seconds, **agreement}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's CPU threads (default: the faster of 1 and all cores on one call each)")
    parser.add_argument("--only", default="", help="comma-separated providers: " + ",".join(CASE_PROVIDERS))
    parser.add_argument("--tf32", action="store_true",
                        help="let both frameworks use TF32 for float32 matmuls on GPU (JAX does by default, "
                             "PyTorch does not; without this flag both compute full float32)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # must precede the first jax import
    import jax
    import torch

    # Same arithmetic on both sides: JAX's default GPU precision for float32 dots is TF32.
    jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    jax_device = jax.devices()[0]
    if args.device == "gpu" and jax_device.platform != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU (install jax[cuda12])")
    device = torch_device(args.device)
    thread_counts = torch_thread_counts(device, args.torch_threads)
    tolerance = logits_tolerance(args.dtype)
    print(f"JAX {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}); "
          f"PyTorch {torch.__version__} on {device} (threads tried: "
          f"{', '.join(threads_label(count) for count in thread_counts)}); {os.cpu_count()} CPU cores; load average "
          f"{os.getloadavg()[0]:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M')}")
    rows = []
    for case in benchmark_cases(args):
        row = measure(case, args.repeats, tolerance, thread_counts)
        print(f"{row['case']}: outputs agree (max |Δ| {row['max_abs_difference']:.1e}, max |value| "
              f"{row['max_abs_value']:.1f}); PyTorch probe "
              + ", ".join(f"{threads_label(count)} {probe:.2f} s" for count, probe in row["torch_probe_s"].items()),
              file=sys.stderr, flush=True)
        rows.append(row)
    print(f"\nmedian of {args.repeats} alternating calls per side; outputs checked before timing (max |Δ| / max "
          f"|PyTorch output| <= {tolerance:.0e}); load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| case | mapjax | PyTorch (threads) | PyTorch time / mapjax time | max \\|Δ\\| (relative) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['mapjax']:,.0f} {row['unit']} | {row['pytorch']:,.0f} {row['unit']} "
              f"({threads_label(row['torch_threads'])}) | {row['ratio']:.2f}x "
              f"| {row['max_abs_difference']:.1e} ({row['relative_difference']:.1e}) |")


if __name__ == "__main__":
    main()
