"""Encoder benchmark: mapjax's jitted BERT against transformers' PyTorch ``BertModel``.

``encoder_benchmark_cases()`` is what ``benchmarks/models.py`` imports; each case knows how
to build a timed JAX callable and its PyTorch counterpart on the same inputs.  Run this
file directly for the encoder table alone::

    python benchmarks/models_encoders.py [--repeats 5] [--batch 64] [--seq 128]

The model is the packaged all-MiniLM-L6-v2 (6 layers, hidden 384), float32, one forward
pass over a full ``batch x seq`` block of tokens (no padding, so every position is a token).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class BenchmarkCase:
    """One side-by-side measurement.

    Attributes:
        name: row label in the table.
        unit: what the throughput counts per second (here ``"tokens/s"``).
        work_per_call: units of work one call performs (tokens in the batch).
        make_jax: builds (and compiles) the JAX side; returns a zero-argument callable that
            runs one call and waits for its result.
        make_torch: the same for the PyTorch reference.
    """

    name: str
    unit: str
    work_per_call: int
    make_jax: Callable[[], Callable[[], Any]]
    make_torch: Callable[[], Callable[[], Any]]


def minilm_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 checkpoint folder."""
    from mapjax.models.packaged import minilm_path

    return minilm_path()


def _token_block(batch: int, seq: int, vocab_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # Ids above 1000 avoid BERT's special tokens; every position is a real token.
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab_size, size=(batch, seq), dtype=np.int64)
    return ids, np.ones_like(ids)


def _make_mapjax_forward(folder: Path, ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mapjax.models.loading import from_pretrained

    model = from_pretrained(folder, dtype=jnp.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask).last_hidden_state

    device_ids = jnp.asarray(ids, jnp.int32)
    device_mask = jnp.asarray(mask, jnp.int32)
    forward(state, device_ids, device_mask).block_until_ready()  # compile outside the timing

    def run() -> Any:
        return forward(state, device_ids, device_mask).block_until_ready()

    return run


def _make_torch_forward(folder: Path, ids: np.ndarray, mask: np.ndarray) -> Callable[[], Any]:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.BertModel.from_pretrained(folder).eval().to(device)
    torch_ids = torch.tensor(ids, device=device)
    torch_mask = torch.tensor(mask, device=device)

    def run() -> Any:
        with torch.inference_mode():
            out = model(input_ids=torch_ids, attention_mask=torch_mask).last_hidden_state
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def encoder_benchmark_cases(batch: int = 64, seq: int = 128, seed: int = 0) -> list[BenchmarkCase]:
    """The encoder rows of the model benchmark: MiniLM-L6 forward, ``batch x seq`` tokens.

    Returns an empty list (with nothing imported) when the packaged MiniLM is missing.
    """
    try:
        folder = minilm_folder()
    except ModuleNotFoundError:
        return []
    vocab_size = 30522
    ids, mask = _token_block(batch, seq, vocab_size, seed)
    return [
        BenchmarkCase(
            name=f"MiniLM-L6 encoder forward fp32 ({batch}x{seq})",
            unit="tokens/s",
            work_per_call=batch * seq,
            make_jax=lambda: _make_mapjax_forward(folder, ids, mask),
            make_torch=lambda: _make_torch_forward(folder, ids, mask),
        )
    ]


def time_calls(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds per call of each ``runs[name]()``.

    Calls alternate between the contestants round by round, so load from other
    processes on a shared machine hits both sides alike.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def measure(case: BenchmarkCase, repeats: int = 5) -> dict[str, Any]:
    """Time both sides of ``case``; throughput in ``case.unit`` and the PyTorch/JAX time ratio."""
    seconds = time_calls({"mapjax": case.make_jax(), "pytorch": case.make_torch()}, repeats)
    return {
        "case": case.name,
        "unit": case.unit,
        "mapjax": case.work_per_call / seconds["mapjax"],
        "pytorch": case.work_per_call / seconds["pytorch"],
        "speedup": seconds["pytorch"] / seconds["mapjax"],
    }


def main() -> None:
    """Print the encoder table (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    import jax

    print(f"device: jax {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    print("| case | mapjax | PyTorch | mapjax / PyTorch |")
    print("|---|---|---|---|")
    for case in encoder_benchmark_cases(args.batch, args.seq):
        row = measure(case, args.repeats)
        print(f"| {row['case']} | {row['mapjax']:,.0f} {row['unit']} | {row['pytorch']:,.0f} {row['unit']} "
              f"| {row['speedup']:.2f}x |")


if __name__ == "__main__":
    main()
