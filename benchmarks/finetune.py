"""MAP-F training speed: mapjax's jitted reward-weighted train step against the same loss in plain PyTorch.

Both sides train the very same random weights (a GPT-2-small sized model, 124M parameters, or SmolLM2-135M from
the packaged GGUF with ``--model smollm2``) on the same batch: ``--batch`` sequences of ``--seq`` tokens, the first
quarter of each a prompt masked out of the loss, per-sequence weights softmax(λᵀr)-like (random, summing to 1
per group of 4). The loss is the weighted token-level NLL, ``Σ w_i Σ_t m_it nll_it / Σ w_i Σ_t m_it``; the
optimizer AdamW (lr 1e-5) after global-norm clipping at 1; master weights float32 on both sides (``--dtype
bfloat16``: mapjax casts its parameters for the step, PyTorch autocasts).

Each framework runs in its own worker process (so its peak memory is its own), and both stay alive: after each
worker's first step (mapjax: tracing + compilation, reported apart as the compile time) the timed steps are
**interleaved**: ``--rounds`` rounds, each running ``--steps`` steps in one framework and then in the other (the
order alternates between rounds). On a machine shared with other work the load changes over minutes, and the
two frameworks then see the same load in each round; the ratio is the median of the per-round ratios, with
their range. ``--breakdown`` also times the phases of a step the same way (forward, forward + backward,
optimizer update) to show where the time goes. ``--threads N`` pins both workers to N cores (and sets
PyTorch's thread count to N).

    python benchmarks/finetune.py [--device auto|cpu|gpu] [--model gpt2-small|smollm2] [--batch 4] [--seq 64]
                                  [--rounds 5] [--steps 2] [--dtype float32|bfloat16] [--threads N]
                                  [--breakdown] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

PHASES = ("forward", "forward_backward", "optimizer")


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


def pin_threads(threads: int | None) -> None:
    """Keep this process (and the threads it starts) on the first ``threads`` cores."""
    if threads:
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:threads]))


# --------------------------------------------------------------------------------------------------- workers
class JaxWorker:
    """mapjax's train step (``mapjax.finetune.engine.Engine``), plus its phases compiled apart."""

    def __init__(self, args, folder: Path, vocab: int):
        import jax

        from mapjax.finetune import FinetuneConfig
        from mapjax.finetune.engine import Engine
        from mapjax.finetune.offline import objective_for
        from mapjax.models import from_pretrained

        if args.device == "cpu":
            jax.config.update("jax_platforms", "cpu")
        if args.device == "gpu" and jax.default_backend() != "gpu":
            raise SystemExit("--device gpu: JAX sees no GPU")
        self.jax = jax
        model = from_pretrained(folder)
        ids, attention, loss_mask, weights = make_batch(args.batch, args.seq, vocab)
        self.batch = {"ids": ids[None], "attention": attention[None], "loss_mask": loss_mask[None],
                      "weight": weights[None]}
        self.config = FinetuneConfig(batch_size=args.batch, learning_rate=1e-5, clip_norm=1.0, dtype=args.dtype)
        self.engine = Engine(model, self.config, total_updates=10_000, needs_reference=False)
        self.objective = objective_for("weighted", self.config)
        self.updates = 0
        del model
        device = jax.devices()[0]
        self.device = f"{device.platform} ({device.device_kind})"
        self._phases: dict[str, Callable[[], Any]] | None = None

    def step(self) -> float:
        self.updates += 1
        return self.engine.update(self.batch, self.objective, self.updates - 1)["loss"]   # float(): waits

    def phase_functions(self) -> dict[str, Callable[[], Any]]:
        """Forward (the loss), forward + backward (loss and gradients) and the optimizer update alone, each
        compiled on its own, on copies of the current parameters; the update donates and replaces them, as the
        step does its own."""
        if self._phases is None:
            import jax.numpy as jnp
            import optax

            from mapjax.finetune.engine import accumulated_gradients, optimizer
            from mapjax.finetune.weighted import batch_loss

            engine, jax = self.engine, self.jax
            state = {"params": jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), engine.state.trainable),
                     "opt": jax.tree.map(lambda leaf: jnp.array(leaf, copy=True), engine.state.opt_state)}
            batch = {key: jnp.asarray(value) for key, value in self.batch.items()}
            apply = engine.policy.apply(engine.state.frozen)

            def loss_and_grad(params):
                return accumulated_gradients(params, engine.state.frozen, engine.reference, batch, None,
                                             engine.run_key, policy=engine.policy, objective=self.objective)

            tx = optimizer(engine.settings)

            def update(params, opt_state, grads):
                updates, opt_state = tx.update(grads, opt_state, params)
                updates = jax.tree.map(lambda update: 1e-5 * update, updates)
                return optax.apply_updates(params, updates), opt_state

            forward = jax.jit(lambda params: batch_loss(apply, params, None, batch))
            backward = jax.jit(loss_and_grad)
            update_jit = jax.jit(update, donate_argnums=(0, 1))
            state["grads"] = backward(state["params"])[0]

            def run_update():
                state["params"], state["opt"] = update_jit(state["params"], state["opt"], state["grads"])
                return state["params"]

            self._phases = {"forward": lambda: forward(state["params"]),
                            "forward_backward": lambda: backward(state["params"]), "optimizer": run_update}
            for run in self._phases.values():   # compile each outside the timings
                jax.block_until_ready(run())
        return self._phases

    def phases(self) -> dict[str, float]:
        times = {}
        for name, run in self.phase_functions().items():
            start = time.perf_counter()
            self.jax.block_until_ready(run())
            times[name] = time.perf_counter() - start
        return times


class TorchWorker:
    """The same loss and optimizer in plain PyTorch (eager)."""

    def __init__(self, args, folder: Path, vocab: int):
        import torch
        from transformers import AutoModelForCausalLM

        if args.threads:
            torch.set_num_threads(args.threads)
        self.torch = torch
        device = "cpu" if args.device == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "gpu" and device != "cuda":
            raise SystemExit("--device gpu: PyTorch sees no CUDA device")
        self.device_name = device
        self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).train()
        ids, attention, loss_mask, weights = (torch.as_tensor(a).to(device)
                                              for a in make_batch(args.batch, args.seq, vocab))
        self.ids, self.attention, self.loss_mask, self.weights = ids.long(), attention, loss_mask, weights
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0, eps=1e-8)
        self.autocast = args.dtype == "bfloat16"
        self.device = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()

    def _sync(self) -> None:
        if self.device_name == "cuda":
            self.torch.cuda.synchronize()

    def _loss(self):
        torch = self.torch
        with torch.autocast(device_type=self.device_name, dtype=torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=self.ids, attention_mask=self.attention).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, self.ids[:, 1:, None])[..., 0]
        weighted = self.weights[:, None] * self.loss_mask[:, 1:]
        return -(weighted * picked).sum() / weighted.sum()

    def step(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss()
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return float(loss)   # waits for the step

    def phases(self) -> dict[str, float]:
        """Forward (with autograd recording, as in a step), backward, clipping + AdamW: one step's phases.
        (It takes an optimizer step, as the timed steps do.)"""
        self.optimizer.zero_grad(set_to_none=True)
        self._sync()
        start = time.perf_counter()
        loss = self._loss()
        self._sync()
        forward = time.perf_counter()
        loss.backward()
        self._sync()
        backward = time.perf_counter()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self._sync()
        end = time.perf_counter()
        # forward_backward as mapjax's phase: the loss and its gradients
        return {"forward": forward - start, "forward_backward": backward - start, "optimizer": end - backward}

    def peak_mb(self) -> float:
        if self.device_name == "cuda":
            return self.torch.cuda.max_memory_allocated() / 2**20
        return peak_memory_mb()


def serve(args) -> None:
    """A worker: build, take the first step, then answer ``RUN n`` / ``PHASES`` / ``QUIT`` lines on stdin."""
    pin_threads(args.threads)
    worker = (JaxWorker if args.worker == "jax" else TorchWorker)(args, Path(args.folder), args.vocab)
    start = time.perf_counter()
    loss = worker.step()
    reply("READY", {"first_step_s": time.perf_counter() - start, "loss_first": loss, "device": worker.device})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "RUN":
            start = time.perf_counter()
            for _ in range(int(rest[0])):
                loss = worker.step()
            reply("DONE", {"seconds": time.perf_counter() - start, "loss": loss})
        elif command == "PHASES":
            reply("DONE", worker.phases())
        elif command == "PEAK":   # asked after the timed steps, before the phases add their own buffers
            reply("DONE", {"peak_mb": worker.peak_mb() if isinstance(worker, TorchWorker) else _jax_peak_mb(worker)})
        elif command == "QUIT":
            return


def _jax_peak_mb(worker: JaxWorker) -> float:
    device = worker.jax.devices()[0]
    stats = device.memory_stats() if device.platform == "gpu" else None
    return stats["peak_bytes_in_use"] / 2**20 if stats else peak_memory_mb()


def reply(kind: str, payload: dict) -> None:
    print(f"{kind} {json.dumps(payload)}", flush=True)


def worker_command(name: str, args, folder: Path, vocab: int) -> list[str]:
    """The command line of this script's worker ``name`` (``jax`` or ``torch``)."""
    command = [sys.executable, __file__, "--worker", name, "--folder", str(folder), "--vocab", str(vocab),
               "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype]
    if args.threads:
        command += ["--threads", str(args.threads)]
    return command


class Worker:
    """The parent's handle on a worker process speaking the READY / DONE / QUIT line protocol (``reply``); also
    the handle of ``benchmarks/finetune_lora.py``'s workers."""

    def __init__(self, name: str, command: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=dict(os.environ) if env is None else env)
        self.ready = self._read("READY")

    def _read(self, kind: str) -> dict:
        for line in self.process.stdout:
            if line.startswith(kind + " "):
                return json.loads(line[len(kind) + 1:])
        self.stderr.seek(0)
        raise SystemExit(f"{self.name} worker failed:\n{self.stderr.read()[-4000:]}")

    def ask(self, line: str) -> dict:
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self._read("DONE")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("QUIT\n")
            self.process.stdin.flush()
            self.process.wait(timeout=120)


def interleave(workers: dict[str, Worker], rounds: int, line: str, measure: Callable[[dict], dict[str, float]]
               ) -> dict[str, list[dict[str, float]]]:
    """Send ``line`` to each worker in turn for ``rounds`` rounds (alternating who goes first)."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
    names = list(workers)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            results[name].append(measure(workers[name].ask(line)))
    return results


def median_and_range(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto")
    parser.add_argument("--model", choices=("gpt2-small", "smollm2"), default="gpt2-small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--steps", type=int, default=2, help="steps per framework per round (default 2)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="pin both workers to this many cores")
    parser.add_argument("--breakdown", action="store_true", help="also time forward / backward / optimizer")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args)
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        vocab = write_model(args.model, folder)
        workers: dict[str, Worker] = {}
        try:
            for name in ("jax", "torch"):
                workers[name] = Worker(name, worker_command(name, args, folder, vocab))
            steps = interleave(workers, args.rounds, f"RUN {args.steps}",
                               lambda done: {"steps_per_s": args.steps / done["seconds"], "loss": done["loss"]})
            finals = {name: worker.ask("PEAK") for name, worker in workers.items()}
            phases = interleave(workers, args.rounds, "PHASES", lambda done: done) if args.breakdown else None
        finally:
            for worker in workers.values():
                worker.close()
    report(args, workers, steps, phases, finals, (load_before, os.getloadavg()[0]))


def report(args, workers, steps, phases, finals, load) -> None:
    jax_ready, torch_ready = workers["jax"].ready, workers["torch"].ready
    jax_rates = [entry["steps_per_s"] for entry in steps["jax"]]
    torch_rates = [entry["steps_per_s"] for entry in steps["torch"]]
    ratios = [j / t for j, t in zip(jax_rates, torch_rates)]
    ratio, low, high = median_and_range(ratios)
    print(f"\nMAP-F weighted train step, {args.model} ({args.dtype}), batch {args.batch} x {args.seq} tokens; "
          f"{args.rounds} interleaved rounds x {args.steps} steps per framework; JAX {jax_ready['device']}, "
          f"PyTorch {torch_ready['device']}; load average {load[0]:.1f} -> {load[1]:.1f}"
          + (f"; {args.threads} thread(s)" if args.threads else "") + "\n")
    print("| | mapjax (JAX) | PyTorch | mapjax / PyTorch |")
    print("|---|---:|---:|---:|")
    print(f"| steps/s (median of rounds) | {statistics.median(jax_rates):.3f} | {statistics.median(torch_rates):.3f} | "
          f"{ratio:.2f}x (rounds: {low:.2f}-{high:.2f}x) |")
    print(f"| tokens/s | {statistics.median(jax_rates) * args.batch * args.seq:,.0f} | "
          f"{statistics.median(torch_rates) * args.batch * args.seq:,.0f} | |")
    print(f"| first step, s (JAX: trace + compile) | {jax_ready['first_step_s']:.2f} | "
          f"{torch_ready['first_step_s']:.2f} | |")
    print(f"| peak memory (MB) | {finals['jax']['peak_mb']:,.0f} | {finals['torch']['peak_mb']:,.0f} | "
          f"{finals['jax']['peak_mb'] / finals['torch']['peak_mb']:.2f}x |")
    print(f"| loss, first / last step | {jax_ready['loss_first']:.5f} / {steps['jax'][-1]['loss']:.5f} | "
          f"{torch_ready['loss_first']:.5f} / {steps['torch'][-1]['loss']:.5f} | |")
    breakdown = None
    if phases is not None:
        breakdown = {name: {phase: statistics.median(entry[phase] for entry in phases[name]) for phase in PHASES}
                     for name in phases}
        print("\nphases (median of rounds, ms; the optimizer update includes the clipping):\n")
        print("| phase | mapjax | PyTorch | mapjax / PyTorch time |")
        print("|---|---:|---:|---:|")
        for phase in PHASES:
            jax_ms, torch_ms = breakdown["jax"][phase] * 1e3, breakdown["torch"][phase] * 1e3
            print(f"| {phase.replace('_', ' + ')} | {jax_ms:,.0f} | {torch_ms:,.0f} | {jax_ms / torch_ms:.2f} |")
        jax_backward = breakdown["jax"]["forward_backward"] - breakdown["jax"]["forward"]
        torch_backward = breakdown["torch"]["forward_backward"] - breakdown["torch"]["forward"]
        print(f"| backward alone (difference) | {jax_backward * 1e3:,.0f} | {torch_backward * 1e3:,.0f} | "
              f"{jax_backward / torch_backward:.2f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "settings": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()
                         if key not in ("worker", "folder", "vocab")},
            "load_average": load, "ready": {name: worker.ready for name, worker in workers.items()},
            "rounds": steps, "ratio_median": ratio, "ratio_range": [low, high], "final": finals,
            "phases": phases, "phase_medians": breakdown}, indent=1))


if __name__ == "__main__":
    main()
