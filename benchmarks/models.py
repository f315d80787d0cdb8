"""Model forward throughput: mapjax (jitted) against transformers' PyTorch classes, same weights.

Rows: SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantised to float32) and a
GPT-2-small-sized random model, each a full causal-LM forward (logits included) over a
``batch x seq`` block; plus any rows that ``benchmarks/models_encoders.py`` provides
(``encoder_benchmark_cases``).  Prints one Markdown table with the ratio.

    python benchmarks/models.py [--device auto|cpu|gpu] [--batch 16] [--seq 128] [--repeats 3]
                                [--dtype float32|bfloat16] [--only smollm2,gpt2,encoders] [--tf32]

``--device auto`` uses a GPU for both frameworks when each sees one.  To add rows,
append a provider to ``CASE_PROVIDERS``: a function ``(args) -> list[BenchmarkCase]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

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
        torch_model.load_state_dict(state, strict=False)
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


def measure(case: Any, repeats: int) -> dict[str, Any]:
    jax_run = case.make_jax()
    torch_run = case.make_torch()
    seconds = median_seconds({"mapjax": jax_run, "pytorch": torch_run}, repeats)
    return {"case": case.name, "unit": case.unit,
            "mapjax": case.work_per_call / seconds["mapjax"],
            "pytorch": case.work_per_call / seconds["pytorch"],
            "ratio": seconds["pytorch"] / seconds["mapjax"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
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
    print(f"JAX {jax.__version__} on {jax_device.platform} ({jax_device.device_kind}); "
          f"PyTorch {torch.__version__} on {torch_device(args.device)} ({torch.get_num_threads()} threads)")
    rows = [measure(case, args.repeats) for case in benchmark_cases(args)]
    print("| case | mapjax | PyTorch | PyTorch time / mapjax time |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['case']} | {row['mapjax']:,.0f} {row['unit']} | {row['pytorch']:,.0f} {row['unit']} "
              f"| {row['ratio']:.2f}x |")


if __name__ == "__main__":
    main()
