"""Sampling throughput: mapjax's jitted sampler against transformers' PyTorch ``generate``, same weights.

SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantised to float32; exported with ``export_pretrained`` and
loaded by ``transformers.LlamaForCausalLM``, so both sides run the very same float32 weights), the same prompts
(the first human turns of the authors' pilot set, shipped in ``data/``), top-k 50,
temperature 1, 50 new tokens. EOS is ignored on both sides (``min_new_tokens`` for PyTorch, no EOS id for mapjax)
so every row generates exactly ``--new-tokens`` tokens and the work is equal. mapjax's first call (tracing and
compiling its prefill and decode programs) is timed apart as the compile time; the throughput rows are the
best of ``--repeats`` calls after it.

    python benchmarks/generate.py [--device auto|cpu|gpu] [--batches 16,64] [--new-tokens 50] [--repeats 2]
                                  [--torch-threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

PILOT = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"


def benchmark_prompts(count: int) -> list[str]:
    """The pilot set's first ``count`` distinct prompts."""
    from mapjax import RewardPool

    prompts = RewardPool.load(PILOT).prompts
    if count > len(prompts):
        raise SystemExit(f"the pilot set has {len(prompts)} prompts; asked for {count}")
    return list(prompts[:count])


def time_mapjax(model, tokenizer, prompts, new_tokens, repeats):
    from mapjax.generate import generate

    options = dict(max_new_tokens=new_tokens, top_k=50, temperature=1.0, batch_size=len(prompts),
                   eos_token_id=[])
    start = time.perf_counter()
    first = generate(model, tokenizer, prompts, seed=0, **options)
    first_call = time.perf_counter() - start
    best = float("inf")
    for repeat in range(repeats):
        start = time.perf_counter()
        result = generate(model, tokenizer, prompts, seed=repeat + 1, **options)
        best = min(best, time.perf_counter() - start)
    assert int(result.lengths.sum()) == len(prompts) * new_tokens
    return first_call, best, first.texts[0]


def time_torch(torch_model, tokenizer, prompts, new_tokens, repeats, device):
    import torch

    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def run(seed):
        torch.manual_seed(seed)
        with torch.inference_mode():
            out = torch_model.generate(**batch, do_sample=True, top_k=50, temperature=1.0, top_p=1.0,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run(0)   # warm-up (allocator, kernels)
    best = float("inf")
    for repeat in range(repeats):
        start = time.perf_counter()
        out = run(repeat + 1)
        best = min(best, time.perf_counter() - start)
    assert out.shape[1] - batch["input_ids"].shape[1] == new_tokens
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--batches", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: one per CPU core")
    parser.add_argument("--coherence-pairs", type=int, default=256, help="pairs scored in the MiniLM coherence "
                        "benchmark (0 skips it)")
    args = parser.parse_args(argv)

    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import torch

    from benchmarks.models import torch_device
    from mapjax.models import export_pretrained, from_gguf
    from mapjax.models.packaged import smollm2_gguf_path

    device = torch_device(args.device)
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    if device == "cpu":
        torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)

    model, tokenizer = from_gguf(smollm2_gguf_path())
    with tempfile.TemporaryDirectory() as directory:
        export_pretrained(model, directory)
        from transformers import LlamaForCausalLM

        torch_model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval().to(device)

    batches = [int(b) for b in args.batches.split(",")]
    prompts_all = benchmark_prompts(max(batches))
    rows = []
    for batch in batches:
        prompts = prompts_all[:batch]
        compile_and_run, mapjax_time, sample = time_mapjax(model, tokenizer, prompts, args.new_tokens, args.repeats)
        torch_time = time_torch(torch_model, tokenizer, prompts, args.new_tokens, args.repeats, device)
        tokens = batch * args.new_tokens
        rows.append((batch, compile_and_run - mapjax_time, tokens / mapjax_time, tokens / torch_time))
        print(f"batch {batch}: mapjax {mapjax_time:.2f} s (first call {compile_and_run:.2f} s), "
              f"PyTorch {torch_time:.2f} s; sample: {sample[:60]!r}", file=sys.stderr)

    where = (f"JAX {jax.default_backend()} ({jax.devices()[0].device_kind}), PyTorch {device} "
             f"({torch.get_num_threads()} threads), {os.cpu_count()} CPU cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end")
    print(f"\nSmolLM2-135M-Instruct (float32), top-k 50, temperature 1, {args.new_tokens} new tokens; {where}\n")
    print("| batch | mapjax compile (s) | mapjax tokens/s | PyTorch generate tokens/s | mapjax / PyTorch |")
    print("|---:|---:|---:|---:|---:|")
    for batch, compile_time, jax_rate, torch_rate in rows:
        print(f"| {batch} | {compile_time:.1f} | {jax_rate:.0f} | {torch_rate:.0f} | {jax_rate / torch_rate:.2f}x |")
    if args.coherence_pairs:
        coherence_benchmark(args.coherence_pairs, args.repeats, device)
    return 0


def coherence_benchmark(pairs: int, repeats: int, device: str) -> None:
    """Scoring speed of the `coherence` reward (MiniLM, mean pooling, cosine of prompt and continuation)
    against the same computation in PyTorch, batch 64, both warmed up."""
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
    jax_time = min(_timed(lambda: reward(prompts, continuations)) for _ in range(repeats))

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

    def torch_scores():
        with torch.inference_mode():
            return torch.nn.functional.cosine_similarity(embed(prompts), embed(continuations)).cpu().numpy()

    theirs = torch_scores()
    torch_time = min(_timed(torch_scores) for _ in range(repeats))
    print(f"\ncoherence reward (all-MiniLM-L6-v2, batch 64, {pairs} pairs; max |difference| "
          f"{float(abs(ours - theirs).max()):.1e}; mapjax first call {first:.1f} s)\n")
    print("| mapjax pairs/s | PyTorch pairs/s | mapjax / PyTorch |")
    print("|---:|---:|---:|")
    print(f"| {pairs / jax_time:.0f} | {pairs / torch_time:.0f} | {torch_time / jax_time:.2f}x |")


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


if __name__ == "__main__":
    sys.exit(main())
