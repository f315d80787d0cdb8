"""Encoder benchmark: mapjax's jitted BERT against transformers' PyTorch ``BertModel``.

``encoder_benchmark_cases()`` is what ``benchmarks/models.py`` imports; each case knows how
to build a timed JAX callable and its PyTorch counterpart on the same inputs.  Run this
file directly for the encoder tables alone::

    python benchmarks/models_encoders.py [--repeats 5] [--batch 64] [--seq 128] [--pairs 256]
                                         [--only forward,coherence,gelu-accuracy]

* ``forward``: the packaged all-MiniLM-L6-v2 (6 layers, hidden 384), float32, one forward
  pass over a full ``batch x seq`` block of tokens (no padding, so every position is a token);
* ``coherence``: the ``coherence`` reward (MiniLM, mean pooling, cosine of prompt and
  continuation, batch 64, the pilot set's prompts) against the same computation in PyTorch;
* ``gelu-accuracy``: how far the opt-in tanh GELU (``encoder_layers.use_approximate_gelu``)
  moves MiniLM's embeddings and coherence scores from the exact GELU, on random and on the
  real weights, and what it saves in time (mapjax against itself: this part has no PyTorch side).

Timed calls alternate between the contestants round by round (medians), and the process CPU
time per call is reported beside the wall time: on a shared machine the wall time also counts
other processes' turns.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))


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


def coherence_texts(pairs: int) -> tuple[list[str], list[str]]:
    """Prompts (the pilot set's first ``pairs``) and continuations, as ``benchmarks/generate.py`` builds them."""
    from mapjax import RewardPool

    prompts = list(RewardPool.load(REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz").prompts[:pairs])
    continuations = [f"{prompt} Here is a longer answer that goes on for a while about it." * 2 for prompt in prompts]
    return prompts, continuations


def _make_mapjax_coherence(prompts: list[str], continuations: list[str], batch: int,
                           approximate_gelu: bool = False) -> Callable[[], Any]:
    from mapjax.rewards import batching
    from mapjax.rewards.coherence import CoherenceReward, embed

    reward = CoherenceReward(batch_size=batch)
    if approximate_gelu:
        from mapjax.models.encoder_layers import use_approximate_gelu

        use_approximate_gelu(reward.model)  # before the forward is split for jit again
        reward._forward = batching.JittedForward(reward.model, lambda model, ids, mask: embed(model, ids, mask, "mean"))
    reward(prompts, continuations)  # compile every length bucket outside the timing
    return lambda: reward(prompts, continuations)


def _make_torch_coherence(folder: Path, prompts: list[str], continuations: list[str], batch: int
                          ) -> Callable[[], Any]:
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.BertModel.from_pretrained(folder).eval()

    def embed(texts: list[str]) -> Any:
        vectors = []
        for start in range(0, len(texts), batch):
            encoded = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
            hidden = model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
        return torch.cat(vectors)

    def run() -> Any:
        with torch.inference_mode():
            scores = torch.nn.functional.cosine_similarity(embed(prompts), embed([c.strip() for c in continuations]))
        return scores.numpy()

    return run


def coherence_benchmark_cases(pairs: int = 256, batch: int = 64) -> list[BenchmarkCase]:
    """The ``coherence`` reward on ``pairs`` pilot prompts: mapjax's reward against the same in PyTorch."""
    try:
        folder = minilm_folder()
    except ModuleNotFoundError:
        return []
    prompts, continuations = coherence_texts(pairs)
    return [
        BenchmarkCase(
            name=f"coherence reward, MiniLM mean pooling ({pairs} pairs, batch {batch})",
            unit="pairs/s",
            work_per_call=pairs,
            make_jax=lambda: _make_mapjax_coherence(prompts, continuations, batch),
            make_torch=lambda: _make_torch_coherence(folder, prompts, continuations, batch),
        )
    ]


def time_calls(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds per call of each ``runs[name]()`` (see ``time_calls_with_cpu``)."""
    return {name: wall for name, (wall, _) in time_calls_with_cpu(runs, repeats, warmup).items()}


def time_calls_with_cpu(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
                        ) -> dict[str, tuple[float, float]]:
    """Median wall-clock and process CPU seconds per call of each ``runs[name]()``.

    Calls alternate between the contestants round by round, so load from other
    processes on a shared machine hits both sides alike.
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    walls: dict[str, list[float]] = {name: [] for name in runs}
    cpus: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {name: (float(np.median(walls[name])), float(np.median(cpus[name]))) for name in runs}


def measure(case: BenchmarkCase, repeats: int = 5) -> dict[str, Any]:
    """Time both sides of ``case``; throughput in ``case.unit`` and the PyTorch/JAX time ratio."""
    seconds = time_calls_with_cpu({"mapjax": case.make_jax(), "pytorch": case.make_torch()}, repeats)
    (jax_wall, jax_cpu), (torch_wall, torch_cpu) = seconds["mapjax"], seconds["pytorch"]
    return {
        "case": case.name,
        "unit": case.unit,
        "mapjax": case.work_per_call / jax_wall,
        "pytorch": case.work_per_call / torch_wall,
        "speedup": torch_wall / jax_wall,
        "cpu_speedup": torch_cpu / jax_cpu,
    }


def _random_minilm(seed: int) -> Any:
    """A BertModel at all-MiniLM-L6-v2's config with numpy-drawn weights (normal, std 0.02)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mapjax.models.bert import BertModel
    from mapjax.models.encoder_layers import EncoderConfig

    config = EncoderConfig(model_type="bert", vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12,
                           intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
                           layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0)
    graphdef, state = nnx.split(BertModel(config, add_pooling_layer=False, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda leaf: leaf if leaf.ndim < 2 else jnp.asarray(
        (rng.standard_normal(leaf.shape) * 0.02).astype(np.float32)), state)
    return nnx.merge(graphdef, state)


def gelu_accuracy(pairs: int = 256, batch: int = 64, repeats: int = 5) -> list[dict[str, Any]]:
    """Max |difference| between the exact and the tanh GELU in MiniLM's mean-pooled embeddings and in the
    cosine scores of ``pairs`` pairs, on random and on the real weights; plus the time each takes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mapjax.models.encoder_layers import mean_pool, use_approximate_gelu
    from mapjax.models.loading import from_pretrained
    from mapjax.rewards.coherence import cosine_similarity

    rng = np.random.default_rng(0)
    lengths = rng.integers(8, 65, size=2 * pairs)  # right-padded rows of 8 to 64 tokens
    ids = rng.integers(1000, 30522, size=(2 * pairs, 64))
    mask = (np.arange(64)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0)

    def embeddings(model: Any) -> tuple[np.ndarray, Callable[[], Any]]:
        graphdef, state = nnx.split(model)
        forward = jax.jit(lambda state, ids, mask: mean_pool(nnx.merge(graphdef, state)(ids, mask).last_hidden_state,
                                                               mask))
        blocks = [(jnp.asarray(ids[start:start + batch]), jnp.asarray(mask[start:start + batch]))
                  for start in range(0, len(ids), batch)]

        def run() -> np.ndarray:
            return np.concatenate([np.asarray(forward(state, *block)) for block in blocks])

        return run(), run

    rows = []
    models = {"random weights": lambda: _random_minilm(1)}
    try:
        folder = minilm_folder()
        models["all-MiniLM-L6-v2"] = lambda: from_pretrained(folder, dtype=jnp.float32)
    except ModuleNotFoundError:
        pass
    for label, build in models.items():
        exact, exact_run = embeddings(build())
        approximate, approximate_run = embeddings(use_approximate_gelu(build()))
        scores_exact = cosine_similarity(exact[:pairs], exact[pairs:])
        scores_approximate = cosine_similarity(approximate[:pairs], approximate[pairs:])
        seconds = time_calls_with_cpu({"exact": exact_run, "tanh": approximate_run}, repeats)
        rows.append({
            "weights": label,
            "embedding_max_abs_diff": float(np.max(np.abs(exact - approximate))),
            "embedding_max_abs": float(np.max(np.abs(exact))),
            "score_max_abs_diff": float(np.max(np.abs(scores_exact - scores_approximate))),
            "speedup": seconds["exact"][0] / seconds["tanh"][0],
            "cpu_speedup": seconds["exact"][1] / seconds["tanh"][1],
        })
    return rows


def main() -> None:
    """Print the encoder tables (Markdown)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=256, help="pairs scored by the coherence rows")
    parser.add_argument("--only", default="forward,coherence,gelu-accuracy")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    import os
    import platform

    import jax
    import torch

    print(f"device: jax {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores); torch threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d %H:%M')}")
    cases = []
    if "forward" in parts:
        cases += encoder_benchmark_cases(args.batch, args.seq)
    if "coherence" in parts:
        cases += coherence_benchmark_cases(args.pairs, args.batch)
    if cases:
        print("| case | mapjax | PyTorch | mapjax / PyTorch (wall) | (CPU time) |")
        print("|---|---|---|---|---|")
        for case in cases:
            row = measure(case, args.repeats)
            print(f"| {row['case']} | {row['mapjax']:,.0f} {row['unit']} | {row['pytorch']:,.0f} {row['unit']} "
                  f"| {row['speedup']:.2f}x | {row['cpu_speedup']:.2f}x |", flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    if "gelu-accuracy" in parts:
        print(f"\ntanh GELU (opt-in) against the exact GELU: {args.pairs} pairs of right-padded random token "
              "rows (8-64 tokens), mean pooling, batch 64")
        print("| weights | max abs diff, embeddings (max abs value) | max abs diff, cosine scores "
              "| exact time / tanh time (wall) | (CPU time) |")
        print("|---|---|---|---|---|")
        for row in gelu_accuracy(args.pairs, args.batch, args.repeats):
            print(f"| {row['weights']} | {row['embedding_max_abs_diff']:.1e} ({row['embedding_max_abs']:.2f}) "
                  f"| {row['score_max_abs_diff']:.1e} | {row['speedup']:.2f}x | {row['cpu_speedup']:.2f}x |")


if __name__ == "__main__":
    main()
