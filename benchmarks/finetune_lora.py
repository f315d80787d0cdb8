"""MAP-F finetuning memory and step time: full finetuning, LoRA and QLoRA (int8 base) in mapjax, against
transformers (+ PEFT for LoRA) in PyTorch.

SmolLM2-135M (from the packaged GGUF, exported once to an HF folder that both sides load: the same weights) on the
CPU, float32, the MAP-F weighted train step of ``benchmarks/finetune.py`` (token-level weighted NLL, global-norm
clipping at 1, AdamW lr 1e-5 without weight decay) on the same batch of ``--batch`` x ``--seq`` tokens. Modes:

- ``full``: every weight trained;
- ``lora``: rank ``--rank`` adapters (alpha ``--alpha``) on q, k, v, o, gate, up, down of every layer, base frozen;
  PyTorch: ``peft`` LoRA with the same rank, alpha and target modules;
- ``qlora``: the same adapters over an int8 base (channel-wise absmax, through qwix). PyTorch's QLoRA needs
  bitsandbytes on CUDA, so it has no counterpart here ("n/a").

Each mode of each framework runs in its own worker process, so its peak host memory (``ru_maxrss``) is its own;
the mode's two workers stay alive together and their timed steps are interleaved (``--rounds`` rounds, one step
each, the order alternating), so both see the same load. PyTorch runs each round at 1 thread and at every core
(as ``benchmarks/models.py`` picks threads: the faster is reported, both are in ``--json``). Besides ``ru_maxrss``
each worker reports its training state's bytes: the trainable float32 parameters, Adam's two moments, and the
frozen rest (the base under LoRA, int8 values + scales under QLoRA); mapjax's full mode also keeps a copy of the
initial weights as the KL reference, counted apart.

Agreement before timing: both sides load the same weights and batch, and mapjax's LoRA adapters are written in
PEFT's format (``export_pretrained``'s folder + ``export_peft``) before its first step and loaded by PEFT, so the
two start from identical adapters (A random, B = 0: the adapted model equals the base at step 0). The first
step's loss (computed before any update) must agree within 1e-4 relative, else the run stops; the losses of
later steps (same number of updates on both sides) are reported as a further check. QLoRA's first loss is
compared with the unquantized base's (the int8 rounding error, reported, not checked).

    python benchmarks/finetune_lora.py [--batch 4] [--seq 128] [--rank 16] [--alpha 32] [--rounds 3]
                                       [--modes full,lora,qlora] [--torch-threads 1,2] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.finetune import Worker, make_batch, peak_memory_mb, reply, write_model  # noqa: E402

MODES = ("full", "lora", "qlora")
TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# transformers' Llama module names of the targets (what PEFT's target_modules matches)
HF_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FIRST_LOSS_TOLERANCE = 1e-4
MIB = 2**20


def _tree_bytes(tree: Any) -> int:
    import jax

    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes")))


# --------------------------------------------------------------------------------------------------- workers
class JaxWorker:
    """mapjax's Engine in one mode; under LoRA it writes its initial adapters in PEFT's format first."""

    def __init__(self, args, folder: Path, vocab: int):
        import jax

        jax.config.update("jax_platforms", "cpu")
        from mapjax.finetune import FinetuneConfig
        from mapjax.finetune.engine import Engine
        from mapjax.finetune.offline import objective_for
        from mapjax.models import from_pretrained

        model = from_pretrained(folder)
        ids, attention, loss_mask, weights = make_batch(args.batch, args.seq, vocab)
        self.batch = {"ids": ids[None], "attention": attention[None], "loss_mask": loss_mask[None],
                      "weight": weights[None]}
        adapters = {} if args.mode == "full" else dict(
            lora_rank=args.rank, lora_alpha=args.alpha, lora_targets=TARGETS,
            quantize_base="int8" if args.mode == "qlora" else "none")
        self.config = FinetuneConfig(batch_size=args.batch, learning_rate=1e-5, clip_norm=1.0, weight_decay=0.0,
                                     dtype="float32", **adapters)
        self.engine = Engine(model, self.config, total_updates=10_000, needs_reference=False)
        self.objective = objective_for("weighted", self.config)
        del model   # under LoRA the frozen base holds what it needs; full mode copied every weight
        if args.mode == "lora":
            from mapjax.finetune.lora import export_peft

            export_peft(self.engine.model(), folder / "adapters", self.config.adapters)
        self.updates = 0

    def step(self) -> float:
        self.updates += 1
        return self.engine.update(self.batch, self.objective, self.updates - 1)["loss"]   # float(): waits

    def state_bytes(self) -> dict[str, int]:
        state = self.engine.state
        moments = _tree_bytes(state.opt_state)
        return {"trainable": _tree_bytes(state.trainable), "adam_moments": moments, "frozen": _tree_bytes(state.frozen),
                "reference": _tree_bytes(self.engine.reference)}

    def trainable_count(self) -> int:
        return self.engine.trainable_count()


class TorchWorker:
    """transformers' model in float32; PEFT LoRA over it in ``lora`` mode (adapters read from mapjax's export)."""

    def __init__(self, args, folder: Path, vocab: int):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        if args.mode == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder / "adapters"), is_trainable=True)
            self._check_peft_config(model, args)
        self.model = model.train()
        ids, attention, loss_mask, weights = (torch.as_tensor(a) for a in make_batch(args.batch, args.seq, vocab))
        self.ids, self.attention, self.loss_mask, self.weights = ids.long(), attention, loss_mask, weights
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-5, weight_decay=0.0, eps=1e-8)

    @staticmethod
    def _check_peft_config(model, args) -> None:
        config = model.peft_config["default"]
        modules = {name.rsplit(".", 1)[-1] for name in config.target_modules}
        if config.r != args.rank or float(config.lora_alpha) != float(args.alpha) or modules != set(HF_TARGET_MODULES):
            raise SystemExit(f"PEFT read r={config.r}, alpha={config.lora_alpha}, modules {sorted(modules)}; expected "
                             f"r={args.rank}, alpha={args.alpha}, {sorted(HF_TARGET_MODULES)}")

    def step(self) -> float:
        torch = self.torch
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(input_ids=self.ids, attention_mask=self.attention).logits
        log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        picked = log_probs.gather(-1, self.ids[:, 1:, None])[..., 0]
        weighted = self.weights[:, None] * self.loss_mask[:, 1:]
        loss = -(weighted * picked).sum() / weighted.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        return float(loss)

    def state_bytes(self) -> dict[str, int]:
        trainable = sum(p.numel() * p.element_size() for p in self.trainable)
        frozen = sum(p.numel() * p.element_size() for p in self.model.parameters() if not p.requires_grad)
        moments = sum(value.numel() * value.element_size() for state in self.optimizer.state.values()
                      for value in state.values() if self.torch.is_tensor(value))
        return {"trainable": trainable, "adam_moments": moments, "frozen": frozen, "reference": 0}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable)


def serve(args) -> None:
    """A worker: build, take the first step, then answer ``RUN threads`` / ``FINAL`` / ``QUIT`` lines on stdin."""
    if args.worker == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    worker = (JaxWorker if args.worker == "jax" else TorchWorker)(args, Path(args.folder), args.vocab)
    start = time.perf_counter()
    loss = worker.step()
    reply("READY", {"first_step_s": time.perf_counter() - start, "loss": loss})
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "RUN":
            if args.worker == "torch":
                worker.torch.set_num_threads(int(rest[0]))
            start = time.perf_counter()
            loss = worker.step()
            reply("DONE", {"seconds": time.perf_counter() - start, "loss": loss})
        elif command == "FINAL":
            reply("DONE", {"peak_rss_mib": peak_memory_mb(), "state_bytes": worker.state_bytes(),
                           "trainable_parameters": worker.trainable_count()})
        elif command == "QUIT":
            return


def worker_command(framework: str, mode: str, args, folder: Path, vocab: int) -> list[str]:
    """The command line of this script's ``framework`` worker for ``mode``."""
    return [sys.executable, __file__, "--worker", framework, "--mode", mode, "--folder", str(folder),
            "--vocab", str(vocab), "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
            "--alpha", str(args.alpha)]


def start_worker(framework: str, mode: str, args, folder: Path, vocab: int) -> Worker:
    return Worker(f"{framework} {mode}", worker_command(framework, mode, args, folder, vocab),
                  env={**os.environ, "JAX_PLATFORMS": "cpu"})


# --------------------------------------------------------------------------------------------------- the run
def relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def run_mode(mode: str, args, folder: Path, vocab: int, base_loss: float | None) -> dict[str, Any]:
    """One mode: its workers, the agreement check on the first loss, the interleaved timed steps."""
    workers: dict[str, Worker] = {}
    result: dict[str, Any] = {"mode": mode}
    try:
        workers["jax"] = start_worker("jax", mode, args, folder, vocab)   # first: it writes the adapters PEFT reads
        if mode != "qlora":
            workers["torch"] = start_worker("torch", mode, args, folder, vocab)
        losses = {name: [worker.ready["loss"]] for name, worker in workers.items()}
        if "torch" in workers:
            gap = relative(losses["jax"][0], losses["torch"][0])
            result["first_loss_relative_difference"] = gap
            if gap > FIRST_LOSS_TOLERANCE:
                raise SystemExit(f"{mode}: first-step losses differ: mapjax {losses['jax'][0]:.7f}, PyTorch "
                                 f"{losses['torch'][0]:.7f} (relative {gap:.2e} > {FIRST_LOSS_TOLERANCE:g})")
        elif base_loss is not None:   # QLoRA: the int8 base's loss against the float32 base's
            result["first_loss_relative_difference_to_float_base"] = relative(losses["jax"][0], base_loss)
        # Timed steps: one mapjax step and one PyTorch step at each thread count per round, the order alternating.
        contestants = [("jax", None)] + [("torch", threads) for threads in args.torch_threads if "torch" in workers]
        seconds: dict[str, list[float]] = {_label(name, threads): [] for name, threads in contestants}
        for round_index in range(args.rounds):
            for name, threads in (contestants if round_index % 2 == 0 else contestants[::-1]):
                done = workers[name].ask(f"RUN {threads or 0}")
                seconds[_label(name, threads)].append(done["seconds"])
                losses[name].append(done["loss"])
        finals = {name: worker.ask("FINAL") for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    result["jax"] = {**finals["jax"], "first_step_s": workers["jax"].ready["first_step_s"],
                     "step_s": statistics.median(seconds["jax"]), "step_s_all": seconds["jax"],
                     "losses": losses["jax"]}
    result["jax"]["compile_s"] = max(result["jax"]["first_step_s"] - result["jax"]["step_s"], 0.0)
    if "torch" in workers:
        by_threads = {threads: statistics.median(seconds[_label("torch", threads)]) for threads in args.torch_threads}
        best = min(by_threads, key=by_threads.get)
        result["torch"] = {**finals["torch"], "first_step_s": workers["torch"].ready["first_step_s"],
                           "step_s": by_threads[best], "threads": best, "step_s_by_threads": by_threads,
                           "step_s_all": {threads: seconds[_label("torch", threads)] for threads in args.torch_threads},
                           "losses": losses["torch"]}
        common = min(len(losses["jax"]), len(losses["torch"]))
        result["later_loss_max_relative_difference"] = max(
            relative(losses["jax"][index], losses["torch"][index]) for index in range(common))
        result["later_loss_steps_compared"] = common
    return result


def _label(name: str, threads: int | None) -> str:
    return name if threads is None else f"{name}@{threads}"


def mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def report(args, results: list[dict[str, Any]], load: tuple[float, float], wall: float) -> None:
    print(f"\nMAP-F weighted train step, SmolLM2-135M float32 on the CPU, batch {args.batch} x {args.seq} tokens, "
          f"LoRA rank {args.rank} alpha {args.alpha:g} on {','.join(TARGETS)}; {args.rounds} interleaved rounds; "
          f"PyTorch at the faster of {args.torch_threads} thread(s); load average {load[0]:.1f} -> {load[1]:.1f}; "
          f"wall {wall:.0f} s\n")
    print("| mode | trainable parameters | state MiB: trainable + Adam + frozen (+ reference) | peak RSS MiB | "
          "compile s | step s (median) | mapjax / PyTorch step time | peak RSS mapjax / PyTorch |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for result in results:
        for name, side in (("mapjax", result["jax"]), ("PyTorch", result.get("torch"))):
            if side is None:
                print(f"| {result['mode']} (PyTorch) | n/a | n/a: QLoRA needs bitsandbytes on CUDA | n/a | | n/a | | |")
                continue
            state = side["state_bytes"]
            parts = f"{mib(state['trainable'])} + {mib(state['adam_moments'])} + {mib(state['frozen'])}"
            if state["reference"]:
                parts += f" (+ {mib(state['reference'])})"
            total = sum(state.values())
            compile_s = f"{side['compile_s']:.1f}" if name == "mapjax" else ""
            threads = f" ({side['threads']} thr)" if name == "PyTorch" else ""
            ratios = ("", "")
            if name == "mapjax" and "torch" in result:
                ratios = (f"{side['step_s'] / result['torch']['step_s']:.2f}x",
                          f"{side['peak_rss_mib'] / result['torch']['peak_rss_mib']:.2f}x")
            print(f"| {result['mode']} ({name}) | {side['trainable_parameters']:,} | {parts} = {mib(total)} | "
                  f"{side['peak_rss_mib']:,.0f} | {compile_s} | {side['step_s']:.2f}{threads} | {ratios[0]} | "
                  f"{ratios[1]} |")
    print()
    for result in results:
        if "torch" in result:
            print(f"- {result['mode']}: first-step loss mapjax {result['jax']['losses'][0]:.6f}, PyTorch "
                  f"{result['torch']['losses'][0]:.6f} (relative {result['first_loss_relative_difference']:.1e}); "
                  f"max relative difference over the first {result['later_loss_steps_compared']} steps "
                  f"{result['later_loss_max_relative_difference']:.1e}; PyTorch step s by threads "
                  + ", ".join(f"{threads}: {value:.2f}" for threads, value in result['torch']['step_s_by_threads'].items()))
        elif "first_loss_relative_difference_to_float_base" in result:
            print(f"- {result['mode']}: first-step loss {result['jax']['losses'][0]:.6f}, relative to the float32 "
                  f"base's {result['first_loss_relative_difference_to_float_base']:.1e} (int8 rounding)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--torch-threads", default=None,
                        help="comma-separated PyTorch thread counts to time (default: 1 and every core)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        serve(args)
        return
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    args.torch_threads = ([int(part) for part in args.torch_threads.split(",")] if args.torch_threads
                          else sorted({1, os.cpu_count() or 1}))
    started, load_before = time.monotonic(), os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        vocab = write_model("smollm2", folder)
        base_loss = None
        for mode in modes:
            print(f"[{time.monotonic() - started:6.0f} s] {mode}", file=sys.stderr, flush=True)
            results.append(run_mode(mode, args, folder, vocab, base_loss))
            if mode != "qlora":
                base_loss = results[-1]["jax"]["losses"][0]   # every non-quantized mode starts at the base's loss
    wall = time.monotonic() - started
    load = (load_before, os.getloadavg()[0])
    report(args, results, load, wall)
    if args.json is not None:
        settings = {key: value for key, value in vars(args).items() if key not in ("worker", "mode", "folder", "vocab")}
        settings["json"] = str(args.json)
        args.json.write_text(json.dumps({"settings": settings, "date": datetime.date.today().isoformat(),
                                         "load_average": load, "wall_s": wall, "results": results}, indent=1))


if __name__ == "__main__":
    main()
