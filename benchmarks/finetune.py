"""MAP-F training speed: mapjax's jitted reward-weighted train step against the same loss in plain PyTorch.

Both sides train the very same random weights (a GPT-2-small sized model, 124M parameters, or SmolLM2-135M from
the packaged GGUF with ``--model smollm2``) on the same batch: ``--batch`` sequences of ``--seq`` tokens, the first
quarter of each a prompt masked out of the loss, per-sequence weights softmax(λᵀr)-like (random, summing to 1
per group of 4). The loss is the weighted token-level NLL, ``Σ w_i Σ_t m_it nll_it / Σ w_i Σ_t m_it``; the
optimizer AdamW (lr 1e-5) after global-norm clipping at 1. Each framework runs in its own subprocess (so its
peak memory is its own); the first step (mapjax: tracing + compilation) is timed apart, the rate is over the
next ``--steps`` steps. Peak memory: the process's peak RSS on CPU, the allocator's peak on GPU.

    python benchmarks/finetune.py [--device auto|cpu|gpu] [--model gpt2-small|smollm2] [--batch 4] [--seq 64]
                                  [--steps 5] [--dtype float32|bfloat16] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq)).astype(np.int32)
    attention = np.ones((batch, seq), np.int32)
    loss_mask = np.zeros((batch, seq), np.float32)
    loss_mask[:, seq // 4:] = 1.0
    scores = rng.normal(size=batch) * 2
    weights = np.exp(scores - scores.max())
    groups = np.arange(batch) // 4
    for group in np.unique(groups):
        weights[groups == group] /= weights[groups == group].sum()
    return ids, attention, loss_mask, weights.astype(np.float32)


def write_model(kind: str, folder: Path) -> int:
    """Write the benchmark model as an HF folder; returns its vocabulary size."""
    if kind == "smollm2":
        from mapjax.generate import load_policy
        from mapjax.models import export_pretrained
        from mapjax.models.packaged import smollm2_gguf_path

        model, _ = load_policy(str(smollm2_gguf_path()))
        export_pretrained(model, folder)
        return int(model.config.vocab_size)
    from mapjax.models import GPT2Config, GPT2LMHeadModel, export_pretrained

    # GPT-2 small with random weights, built in JAX (no torch needed for the mapjax side).
    config = GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12, vocab_size=50257)
    export_pretrained(GPT2LMHeadModel.from_config(config), folder)
    # mapjax has no dropout; switch transformers' (0.1 by default) off so both sides do the same work.
    config_file = folder / "config.json"
    hf_config = json.loads(config_file.read_text())
    hf_config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config_file.write_text(json.dumps(hf_config, indent=2))
    return config.vocab_size


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_jax(args, folder: Path, vocab: int) -> dict:
    import jax

    from mapjax.finetune.train import FinetuneConfig, Stepper
    from mapjax.models import from_pretrained

    if args.device == "cpu":
        jax.config.update("jax_platforms", "cpu")
    if args.device == "gpu" and jax.default_backend() != "gpu":
        raise SystemExit("--device gpu: JAX sees no GPU")
    model = from_pretrained(folder)
    ids, attention, loss_mask, weights = make_batch(args.batch, args.seq, vocab)
    batch = {"ids": ids[None], "attention": attention[None], "loss_mask": loss_mask[None], "weight": weights[None]}
    config = FinetuneConfig(batch_size=args.batch, learning_rate=1e-5, clip_norm=1.0, dtype=args.dtype)
    stepper = Stepper(model, "weighted", config, args.steps + 1)
    del model
    start = time.perf_counter()
    first = stepper.step(None, batch)
    first_time = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        metrics = stepper.step(None, batch)
    jax.block_until_ready(stepper.params)
    elapsed = time.perf_counter() - start
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    peak = stats["peak_bytes_in_use"] / 2**20 if stats else peak_memory_mb()
    return {"first_step_s": first_time, "steps_per_s": args.steps / elapsed, "peak_mb": peak,
            "loss_first": first["loss"], "loss_last": metrics["loss"], "device": f"{device.platform} "
            f"({device.device_kind})"}


def run_torch(args, folder: Path, vocab: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cpu" if args.device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "gpu" and device != "cuda":
        raise SystemExit("--device gpu: PyTorch sees no CUDA device")
    model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32).to(device)
    model.train()
    ids, attention, loss_mask, weights = (torch.as_tensor(a).to(device) for a in make_batch(args.batch, args.seq,
                                                                                             vocab))
    ids = ids.long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, eps=1e-8)
    autocast = args.dtype == "bfloat16"

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, attention_mask=attention).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
        mask = loss_mask[:, 1:]
        weighted = weights[:, None] * mask
        loss = -(weighted * picked).sum() / weighted.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(loss)

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    first = step()
    first_time = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_memory_mb()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"first_step_s": first_time, "steps_per_s": args.steps / elapsed, "peak_mb": peak, "loss_first": first,
            "loss_last": last, "device": name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--model", choices=("gpt2-small", "smollm2"), default="gpt2-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        run = run_jax if args.worker == "jax" else run_torch
        print("RESULT " + json.dumps(run(args, Path(args.folder), args.vocab)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        vocab = write_model(args.model, folder)
        results = {}
        for worker in ("jax", "torch"):
            command = [sys.executable, __file__, "--worker", worker, "--folder", str(folder), "--vocab", str(vocab),
                       "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
                       "--steps", str(args.steps), "--dtype", args.dtype]
            if args.torch_threads:
                command += ["--torch-threads", str(args.torch_threads)]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                raise SystemExit(f"{worker} worker failed:\n{done.stderr[-4000:]}")
            results[worker] = json.loads(lines[-1][len("RESULT "):])
    jax_r, torch_r = results["jax"], results["torch"]
    print(f"\nMAP-F weighted train step, {args.model} ({args.dtype}), batch {args.batch} x {args.seq} tokens, "
          f"{args.steps} timed steps; JAX {jax_r['device']}, PyTorch {torch_r['device']}\n")
    print("| | mapjax (JAX) | PyTorch | mapjax / PyTorch |")
    print("|---|---:|---:|---:|")
    print(f"| steps/s | {jax_r['steps_per_s']:.3f} | {torch_r['steps_per_s']:.3f} | "
          f"{jax_r['steps_per_s'] / torch_r['steps_per_s']:.2f}x |")
    print(f"| tokens/s | {jax_r['steps_per_s'] * args.batch * args.seq:,.0f} | "
          f"{torch_r['steps_per_s'] * args.batch * args.seq:,.0f} | |")
    print(f"| first step (s; JAX: compile) | {jax_r['first_step_s']:.2f} | {torch_r['first_step_s']:.2f} | |")
    print(f"| peak memory (MB) | {jax_r['peak_mb']:,.0f} | {torch_r['peak_mb']:,.0f} | "
          f"{jax_r['peak_mb'] / torch_r['peak_mb']:.2f}x |")
    print(f"| loss at step 1 / last | {jax_r['loss_first']:.5f} / {jax_r['loss_last']:.5f} | "
          f"{torch_r['loss_first']:.5f} / {torch_r['loss_last']:.5f} | |")


if __name__ == "__main__":
    main()
