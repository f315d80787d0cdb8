"""Sampling throughput: mapjax's jitted sampler against transformers' PyTorch ``generate``, same weights.

SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantised to float32; exported with ``export_pretrained`` and
loaded by ``transformers.LlamaForCausalLM``, so both sides run the very same float32 weights), the same prompts
(the first human turns of the authors' pilot set, shipped in ``data/``), top-k 50,
temperature 1, 50 new tokens. EOS is ignored on both sides (``min_new_tokens`` for PyTorch, no EOS id for mapjax)
so every row generates exactly ``--new-tokens`` tokens and the work is equal.

Both sides are timed the same way: untimed calls first (mapjax: tracing and compiling its prefill and decode
programs, reported as the compile time; PyTorch: a warm-up, and one short call of ``PROBE_TOKENS`` new tokens at
1 thread and at all cores to pick the faster, unless ``--torch-threads`` pins a count), then the best of
``--repeats`` calls.

Before the timing, each side's samples are re-scored by a full forward pass (no KV cache) and checked (the
first ``--check-rows`` rows of each batch): mapjax's sampled tokens by PyTorch, whose log-probabilities must
match those mapjax's decode reported; PyTorch's sampled tokens by mapjax (``token_logprobs``) and by PyTorch,
whose log-probabilities must match each other; and every sampled token, of either side, must be among the
top-k of PyTorch's distribution at its position. Tolerance: the suite's (``benchmarks/suite_cases.TOLERANCES``,
float32: 2e-3 nats); a miss stops the run with ``benchmarks.models.Disagreement``.

The coherence reward (MiniLM) is then timed against the same computation in PyTorch, after checking the two
give the same scores (within 1e-4).

    python benchmarks/generate.py [--device auto|cpu|gpu] [--batches 16,64] [--new-tokens 50] [--repeats 2]
                                  [--torch-threads N] [--check-rows 16] [--coherence-pairs 256]

``--case lengths`` runs the realistic-length case instead (real EOS and pilot-length stops; continuous
batching against static batches and transformers; see ``benchmarks/generate_lengths.py``):

    python benchmarks/generate.py --case lengths [--prompts 16] [--samples 8] [--slots 32] [--caps 128,256]
                                  [--pilot-lengths tokens,words] [--check-rows 4] [--rounds 3]
                                  [--save-lengths JSON]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.models import (  # noqa: E402
    Disagreement,
    pick_torch_threads,
    threads_label,
    torch_device,
    torch_thread_counts,
    torch_threads,
)

PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
TOP_K = 50
PROBE_TOKENS = 8  # new tokens in the calls that pick PyTorch's thread count
RESCORE_ROWS_PER_FORWARD = 4  # PyTorch's full logits are rows x length x 49,152 floats: a few rows at a time


def benchmark_prompts(count: int) -> list[str]:
    """The pilot set's first ``count`` distinct prompts."""
    from mapjax import RewardPool

    prompts = RewardPool.load(PILOT).prompts
    if count > len(prompts):
        raise SystemExit(f"the pilot set has {len(prompts)} prompts; asked for {count}")
    return list(prompts[:count])


def logprob_tolerance() -> float:
    from benchmarks.suite_cases import TOLERANCES

    return TOLERANCES["float32"]["logprob"]


def time_mapjax(model, tokenizer, prompts, new_tokens, repeats):
    """(first call's seconds, best of ``repeats`` seconds, the first call's Generation)."""
    from mapjax.generate import generate

    options = dict(max_new_tokens=new_tokens, top_k=TOP_K, temperature=1.0, batch_size=len(prompts),
                   eos_token_id=[])
    start = time.perf_counter()
    first = generate(model, tokenizer, prompts, seed=0, **options)
    first_call = time.perf_counter() - start
    best = float("inf")
    for repeat in range(repeats):
        start = time.perf_counter()
        result = generate(model, tokenizer, prompts, seed=repeat + 1, **options)
        best = min(best, time.perf_counter() - start)
    if int(result.lengths.sum()) != len(prompts) * new_tokens:
        raise Disagreement(f"mapjax made {int(result.lengths.sum())} tokens, not {len(prompts) * new_tokens}")
    return first_call, best, first


class TorchSampler:
    """transformers' ``generate`` on a left-padded batch of prompts, EOS suppressed until ``new_tokens``."""

    def __init__(self, torch_model, tokenizer, prompts, device):
        self.torch_model, self.device = torch_model, device
        tokenizer.padding_side = "left"
        self.batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __call__(self, seed: int, new_tokens: int):
        import torch

        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.torch_model.generate(**self.batch, do_sample=True, top_k=TOP_K, temperature=1.0, top_p=1.0,
                                            max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                            pad_token_id=self.pad)
        if self.device == "cuda":
            torch.cuda.synchronize()
        if out.shape[1] - self.batch["input_ids"].shape[1] != new_tokens:
            raise Disagreement(f"PyTorch made {out.shape[1] - self.batch['input_ids'].shape[1]} tokens per row, "
                               f"not {new_tokens}")
        return out

    def prompt_ids(self) -> list[list[int]]:
        """Each prompt's ids without the left padding."""
        ids, mask = self.batch["input_ids"].cpu().numpy(), self.batch["attention_mask"].cpu().numpy()
        return [row[keep == 1].tolist() for row, keep in zip(ids, mask)]

    def new_tokens(self, out) -> np.ndarray:
        return out[:, self.batch["input_ids"].shape[1]:].cpu().numpy()


def time_torch(sampler: TorchSampler, new_tokens: int, repeats: int, thread_counts: list[int | None]):
    """(best of ``repeats`` seconds, the thread count used, {count: probe seconds}, the warm-up call's output)."""
    threads, probe_seconds = pick_torch_threads(lambda: sampler(0, PROBE_TOKENS), thread_counts)
    best = float("inf")
    with torch_threads(threads):
        warm = sampler(0, new_tokens)  # untimed full call (allocator, kernels); its samples are the ones checked
        for repeat in range(repeats):
            start = time.perf_counter()
            sampler(repeat + 1, new_tokens)
            best = min(best, time.perf_counter() - start)
    return best, threads, probe_seconds, warm


def torch_rescore(torch_model, prompt_ids: list[list[int]], new_tokens: np.ndarray, k: int, device: str):
    """PyTorch's full forward (right-padded, no cache) over prompt + new tokens: for each new token its
    log-probability and the k-th largest log-probability at its position, both [rows, new]."""
    import torch

    picked = np.zeros(new_tokens.shape, np.float64)
    kth = np.zeros(new_tokens.shape, np.float64)
    for first in range(0, len(prompt_ids), RESCORE_ROWS_PER_FORWARD):
        rows = range(first, min(first + RESCORE_ROWS_PER_FORWARD, len(prompt_ids)))
        sequences = [list(prompt_ids[row]) + new_tokens[row].tolist() for row in rows]
        width = max(len(sequence) for sequence in sequences)
        ids = np.zeros((len(sequences), width), np.int64)
        mask = np.zeros((len(sequences), width), np.int64)
        for slot, sequence in enumerate(sequences):  # right padding: the real tokens keep positions 0..len-1
            ids[slot, :len(sequence)], mask[slot, :len(sequence)] = sequence, 1
        with torch.inference_mode():
            logits = torch_model(input_ids=torch.tensor(ids, device=device),
                                 attention_mask=torch.tensor(mask, device=device)).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for slot, row in enumerate(rows):
                start = len(prompt_ids[row]) - 1  # the position that predicts the first new token
                here = log_probs[slot, start:start + new_tokens.shape[1]]
                tokens = torch.tensor(new_tokens[row], dtype=torch.long, device=here.device)
                picked[row] = here.gather(-1, tokens[:, None])[:, 0].cpu().numpy()
                kth[row] = torch.topk(here, k, dim=-1).values[:, -1].cpu().numpy()
    return picked, kth


def check_samples(label: str, tokens: np.ndarray, picked: np.ndarray, kth: np.ndarray, claimed: np.ndarray,
                  tolerance: float) -> dict[str, float]:
    """``claimed`` (the sampler's or the other framework's log-probabilities of ``tokens``) must match PyTorch's
    re-scoring ``picked`` within ``tolerance``, and every token must be within the top-k (``kth``, with the same
    tolerance for ties at the boundary). Raises :class:`Disagreement` naming the row and position otherwise."""
    difference = np.abs(picked - claimed)
    row, position = np.unravel_index(int(np.argmax(difference)), difference.shape)
    if difference[row, position] > tolerance:
        raise Disagreement(f"{label}: row {row}, new token {position} (id {int(tokens[row, position])}): "
                           f"log-probability {claimed[row, position]:.5f} against PyTorch's re-scoring "
                           f"{picked[row, position]:.5f} (|Δ| {difference[row, position]:.1e} > {tolerance:.0e})")
    outside = picked < kth - tolerance
    if outside.any():
        row, position = np.argwhere(outside)[0]
        raise Disagreement(f"{label}: row {row}, new token {position} (id {int(tokens[row, position])}) is outside "
                           f"PyTorch's top-{TOP_K} ({int(outside.sum())} tokens are): log-probability "
                           f"{picked[row, position]:.4f} < the k-th {kth[row, position]:.4f}")
    return {"max_abs_logprob_difference": float(difference.max()), "tokens_checked": int(tokens.size)}


def check_both_samplers(model, torch_model, device, mapjax_sample, sampler: TorchSampler, torch_out, rows: int,
                        tolerance: float) -> dict[str, float]:
    """Re-score both sides' samples (see the module docstring) and check them; returns the largest differences."""
    from mapjax.generate import token_logprobs

    rows = min(rows, len(mapjax_sample.tokens))
    # mapjax's samples, re-scored by PyTorch.
    prompts = [mapjax_sample.prompt_tokens[index] for index in mapjax_sample.prompt_index[:rows]]
    tokens = np.asarray(mapjax_sample.tokens[:rows], np.int64)
    picked, kth = torch_rescore(torch_model, prompts, tokens, TOP_K, device)
    ours = check_samples("mapjax's samples", tokens, picked, kth,
                         np.asarray(mapjax_sample.logprobs[:rows], np.float64), tolerance)
    # PyTorch's samples, re-scored by mapjax and by PyTorch. EOS is suppressed while PyTorch samples
    # (min_new_tokens), so its top-k may reach one token further than the unsuppressed distribution's.
    prompts = sampler.prompt_ids()[:rows]
    tokens = sampler.new_tokens(torch_out)[:rows].astype(np.int64)
    picked, kth = torch_rescore(torch_model, prompts, tokens, TOP_K + 1, device)
    sequences = [list(prompt) + row.tolist() for prompt, row in zip(prompts, tokens)]
    by_mapjax = np.stack([values[-tokens.shape[1]:] for values in token_logprobs(model, sequences)])
    theirs = check_samples("PyTorch's samples", tokens, picked, kth, by_mapjax.astype(np.float64), tolerance)
    return {"mapjax_samples_max_abs_logprob_difference": ours["max_abs_logprob_difference"],
            "torch_samples_max_abs_logprob_difference": theirs["max_abs_logprob_difference"],
            "tokens_checked": ours["tokens_checked"] + theirs["tokens_checked"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="PyTorch's CPU threads (default: the faster of 1 and all cores on a short call)")
    parser.add_argument("--check-rows", type=int, default=16, help="rows per batch whose samples are re-scored")
    parser.add_argument("--coherence-pairs", type=int, default=256, help="pairs scored in the MiniLM coherence "
                        "benchmark (0 skips it)")
    parser.add_argument("--case", choices=("fixed", "lengths"), default="fixed",
                        help="fixed: every row makes --new-tokens tokens (EOS ignored); lengths: real EOS and "
                        "pilot-length stops")
    parser.add_argument("--prompts", type=int, default=16, help="lengths: demo chat prompts")
    parser.add_argument("--samples", type=int, default=8, help="lengths: samples per prompt (k)")
    parser.add_argument("--slots", type=int, default=32, help="lengths: rows at a time, every engine")
    parser.add_argument("--caps", default="128,256", help="lengths: max_new_tokens values (real EOS)")
    parser.add_argument("--pilot-lengths", default="tokens,words",
                        help="lengths: pilot stop-length distributions (tokens: continuation tokens; words: "
                        "prompt + continuation words); the smallest cap applies")
    parser.add_argument("--rounds", type=int, default=3, help="lengths: alternating rounds of the two mapjax "
                        "engines (the first compiles); the faster call of each counts")
    parser.add_argument("--save-lengths", default=None, metavar="JSON",
                        help="lengths: write the largest cap's real-EOS lengths there (the GPU suite's "
                        "benchmarks/sampling_lengths.json)")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import torch

    from mapjax.models import export_pretrained, from_gguf
    from mapjax.models.packaged import smollm2_gguf_path

    device = torch_device(args.device)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    thread_counts = torch_thread_counts(device, args.torch_threads)
    tolerance = logprob_tolerance()
    print(f"load average {os.getloadavg()[0]:.1f} at the start; {time.strftime('%Y-%m-%d %H:%M')}", file=sys.stderr)

    model, tokenizer = from_gguf(smollm2_gguf_path())
    with tempfile.TemporaryDirectory() as directory:
        export_pretrained(model, directory)
        from transformers import LlamaForCausalLM

        torch_model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval().to(device)

    if args.case == "lengths":
        from benchmarks.generate_lengths import lengths_case

        lengths_case(args, model, tokenizer, torch_model, device, thread_counts, tolerance)
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = benchmark_prompts(max(batches))
    rows = []
    for batch in batches:
        prompts = prompts_all[:batch]
        compile_and_run, mapjax_time, sample = time_mapjax(model, tokenizer, prompts, args.new_tokens, args.repeats)
        sampler = TorchSampler(torch_model, tokenizer, prompts, device)
        torch_time, threads, probe, torch_out = time_torch(sampler, args.new_tokens, args.repeats, thread_counts)
        checks = check_both_samplers(model, torch_model, device, sample, sampler, torch_out, args.check_rows,
                                     tolerance)
        tokens = batch * args.new_tokens
        rows.append((batch, compile_and_run - mapjax_time, tokens / mapjax_time, tokens / torch_time, threads, checks))
        print(f"batch {batch}: mapjax {mapjax_time:.2f} s (first call {compile_and_run:.2f} s), PyTorch "
              f"{torch_time:.2f} s ({threads_label(threads)}; probe "
              + ", ".join(f"{threads_label(count)} {seconds:.2f} s" for count, seconds in probe.items())
              + f"); samples re-scored: {checks}; sample: {sample.texts[0][:60]!r}", file=sys.stderr, flush=True)

    where = (f"JAX {jax.default_backend()} ({jax.devices()[0].device_kind}), PyTorch {device}, "
             f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"\nSmolLM2-135M-Instruct (float32), top-k {TOP_K}, temperature 1, {args.new_tokens} new tokens, best of "
          f"{args.repeats} calls per side; samples of both re-scored and checked (log-probabilities within "
          f"{tolerance:.0e} nats, tokens within the top-k); {where}\n")
    print("| batch | mapjax compile (s) | mapjax tokens/s | PyTorch generate tokens/s (threads) | mapjax / PyTorch "
          "| max \\|Δ log p\\|, mapjax's samples | max \\|Δ log p\\|, PyTorch's samples |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for batch, compile_time, jax_rate, torch_rate, threads, checks in rows:
        print(f"| {batch} | {compile_time:.1f} | {jax_rate:.0f} | {torch_rate:.0f} ({threads_label(threads)}) "
              f"| {jax_rate / torch_rate:.2f}x | {checks['mapjax_samples_max_abs_logprob_difference']:.1e} "
              f"| {checks['torch_samples_max_abs_logprob_difference']:.1e} |")
    if args.coherence_pairs:
        coherence_benchmark(args.coherence_pairs, args.repeats, device, thread_counts)
    return 0


COHERENCE_TOLERANCE = 1e-4  # absolute, on cosine similarities (the suite's float32 tolerance)


def coherence_benchmark(pairs: int, repeats: int, device: str, thread_counts: list[int | None]) -> None:
    """Scoring speed of the `coherence` reward (MiniLM, mean pooling, cosine of prompt and continuation)
    against the same computation in PyTorch, batch 64, both warmed up, after checking they agree."""
    import torch
    from transformers import AutoTokenizer, BertModel

    from mapjax.models.packaged import minilm_path
    from mapjax.rewards import get_reward

    prompts = benchmark_prompts(pairs)
    continuations = [f"{prompt} Here is a longer answer that goes on for a while about it." * 2 for prompt in prompts]
    reward = get_reward("coherence", batch_size=64)
    first = time.perf_counter()
    ours = reward(prompts, continuations)
    first = time.perf_counter() - first

    folder = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder).eval().to(device)

    def embed(texts):
        out = []
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=256,
                              return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
        return torch.cat(out)

    def torch_scores(count=pairs):
        with torch.inference_mode():
            return torch.nn.functional.cosine_similarity(embed(prompts[:count]),
                                                         embed(continuations[:count])).cpu().numpy()

    theirs = torch_scores()  # PyTorch's untimed first call
    difference = float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)))
    if difference > COHERENCE_TOLERANCE:
        raise Disagreement(f"coherence: max |mapjax - PyTorch| = {difference:.1e} > {COHERENCE_TOLERANCE:.0e}")
    jax_time = min(_timed(lambda: reward(prompts, continuations)) for _ in range(repeats))
    threads, probe = pick_torch_threads(lambda: torch_scores(min(64, pairs)), thread_counts)
    with torch_threads(threads):
        torch_time = min(_timed(torch_scores) for _ in range(repeats))
    print(f"\ncoherence reward (all-MiniLM-L6-v2, batch 64, {pairs} pairs; scores checked first: max |difference| "
          f"{difference:.1e}; mapjax first call {first:.1f} s; best of {repeats} calls per side; PyTorch probe "
          + ", ".join(f"{threads_label(count)} {seconds:.2f} s" for count, seconds in probe.items())
          + f"; load average {os.getloadavg()[0]:.1f})\n")
    print("| mapjax pairs/s | PyTorch pairs/s (threads) | mapjax / PyTorch |")
    print("|---:|---:|---:|")
    print(f"| {pairs / jax_time:.0f} | {pairs / torch_time:.0f} ({threads_label(threads)}) "
          f"| {torch_time / jax_time:.2f}x |")


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
