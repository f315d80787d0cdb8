"""A/B test of XLA:CPU flag sets on mapjax's model workloads (jaxlib 0.10.2, float32).

No PyTorch side: every column is mapjax under one XLA flag set, against mapjax under the default flags.

XLA reads ``XLA_FLAGS`` once, when the backend starts, so every flag set runs in its own
subprocess.  The subprocesses are interleaved round by round (A B C ... A B C ...); each times
every workload a few times and keeps the median wall-clock and process CPU time per call.  The
table reports, per workload, the median over rounds and the speed-up over the default paired by
round (the default ran minutes earlier, under similar load), in CPU time (steadier on a shared
machine) and in wall time.  ``default_again`` is an A/A control: its spread is the noise.
Compile time (trace, lower, XLA compile; ``jit(...).lower(...).compile()``) is reported apart.

Each flag set's outputs are compared with the default's (``max |a - b| / max |b|``), and its
compiled programs too: the optimised HLO (fusions) and the LLVM IR XLA emits for its own
kernels (first round, ``--xla_dump_to``).  A flag set that compiles to the very programs of the
default (a no-op) or of an earlier flag set (a duplicate) is timed in the first round only.
The subprocesses run copies of this script and of ``mapjax`` taken when the run starts, so
edits made during a long run do not mix versions.

    python benchmarks/xla_flags.py [--rounds 3] [--repeats 3] [--flag-sets default,ynn_eltwise,...]
                                   [--workloads smollm2,gpt2,minilm,decode] [--tiny] [--json out.json]

Workloads (random weights at the real configs, float32, no padding):

* ``smollm2``: Llama forward with logits, SmolLM2-135M config (hidden 576, 30 layers, 9 heads,
  3 KV heads, intermediate 1536, vocab 49152), batch 16 x 128 tokens;
* ``gpt2``: GPT-2 small forward with logits, batch 16 x 128;
* ``minilm``: BERT encoder forward (all-MiniLM-L6 config: hidden 384, 6 layers, 12 heads,
  intermediate 1536), batch 64 x 128;
* ``decode``: one decode step of the SmolLM2 config at batch 64 against a KV cache of 96
  slots holding a 32-token prompt (what every sampling step does).

Weights come from numpy (normal, std 0.02; norms 1, biases 0) rather than ``jax.random``, so
that no flag can change the weights themselves.  ``--tiny`` shrinks every model to seconds
(for checking the script).

mapjax sets no XLA flag itself: no flag set measured here beat the default (results in
``benchmarks/RESULTS.md``).  This script is the way to re-test that on a later jaxlib; a user who
wants a flag sets ``XLA_FLAGS`` before starting Python.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

# Each flag set is one XLA_FLAGS string.  Flag names and values were read off jaxlib 0.10.2's
# flag help (``strings libjax_common.so``); an unknown flag or value makes XLA abort at start-up.
FLAG_SETS: dict[str, str] = {
    "default": "",
    # The default again: an A/A control, so the table shows the noise level of the machine.
    "default_again": "",
    # YNNPACK fusions also take elementwise ops (default: dots and reductions only).
    "ynn_eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    # No YNNPACK at all: dots go to XLA's own (Eigen) dot thunks, reductions to loop fusions.
    "ynn_off": "--xla_cpu_experimental_ynn_fusion_type=",
    # YNNPACK for dots fused with their neighbours, not for lone dots.
    "ynn_no_individual_dot": "--xla_cpu_experimental_ynn_fusion_type=-individual_dot",
    # XNNPACK graph fusion (with YNN off, or YNN claims the dots first and the flag is a no-op).
    "xnn_greedy_ynn_off": ("--xla_cpu_experimental_ynn_fusion_type= "
                           "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY"),
    "onednn": "--xla_cpu_use_onednn=true",
    "vector_512": "--xla_cpu_prefer_vector_width=512",
    # Fast math only where results stay within 1e-5 (checked per workload in the table).
    "fast_math": "--xla_cpu_enable_fast_math=true",
    # Compile-time presets and LLVM effort: the matrix products run in precompiled YNNPACK kernels, so less
    # LLVM optimisation of XLA's own (elementwise) kernels might cost little at run time.
    "fast_compile_preset": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE",
    "fast_runtime_preset": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "llvm_cheap_passes": "--xla_llvm_disable_expensive_passes=true",
    "backend_opt_level_1": "--xla_backend_optimization_level=1",
}


# --------------------------------------------------------------------------- #
# Worker side: build, compile, time and record one flag set's workloads.
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class Workload:
    """A jitted function and its arguments; ``output`` picks the array to wait for from its result, ``sample``
    reduces that array to what is compared between flag sets."""

    name: str
    function: Any
    arguments: tuple[Any, ...]
    output: Callable[[Any], Any] = lambda result: result
    repeats_factor: int = 1
    sample: Callable[[Any], dict[str, np.ndarray]] = lambda out: {"out": np.asarray(out)}


def numpy_weights(model: Any, seed: int) -> Any:
    """``(graphdef, state)`` of ``model`` with every parameter redrawn by numpy (norm scales and biases kept)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(seed)

    def redraw(leaf: Any) -> Any:
        value = np.asarray(leaf)
        if value.ndim < 2:  # norm scales (ones) and biases (zeros) keep their init
            return jax.numpy.asarray(value)
        return jax.numpy.asarray((rng.standard_normal(value.shape) * 0.02).astype(value.dtype))

    return graphdef, jax.tree.map(redraw, state)


def smollm2_config(tiny: bool) -> Any:
    from mapjax.models.layers import RopeSpec
    from mapjax.models.llama import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           rope=RopeSpec(rotary_dim=16), tie_word_embeddings=True)
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope=RopeSpec(rotary_dim=64, theta=100000.0, max_position_embeddings=8192),
                       tie_word_embeddings=True)


def gpt2_config(tiny: bool) -> Any:
    from mapjax.models.gpt2 import GPT2Config

    return GPT2Config(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4) if tiny else GPT2Config()


def minilm_config(tiny: bool) -> Any:
    from mapjax.models.encoder_layers import EncoderConfig

    sizes = (dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128) if tiny else
             dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536))
    return EncoderConfig(model_type="bert", max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                         hidden_act="gelu", pad_token_id=0, **sizes)


def _token_ids(batch: int, seq: int, vocab: int, seed: int) -> Any:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(min(1000, vocab // 2), vocab, size=(batch, seq)), jnp.int32)


def _logits_sample(out: Any) -> dict[str, np.ndarray]:
    # The full logits are 16 x 128 x 49152 floats; the last position and the first row say enough.
    logits = np.asarray(out)
    return {"last_position": logits[:, -1, :], "first_row": logits[0]}


def causal_forward(name: str, model_class: Any, config: Any, batch: int, seq: int) -> Workload:
    import jax
    from flax import nnx

    graphdef, state = numpy_weights(model_class(config, rngs=nnx.Rngs(0)), seed=1)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    return Workload(name, forward, (state, _token_ids(batch, seq, config.vocab_size, seed=2)), sample=_logits_sample)


def encoder_forward(config: Any, batch: int, seq: int) -> Workload:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mapjax.models.bert import BertModel

    graphdef, state = numpy_weights(BertModel(config, add_pooling_layer=False, rngs=nnx.Rngs(0)), seed=1)
    forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask).last_hidden_state)
    ids = _token_ids(batch, seq, config.vocab_size, seed=2)
    return Workload("minilm", forward, (state, ids, jnp.ones_like(ids)))


def decode_step(config: Any, batch: int, prompt: int, slots: int) -> Workload:
    import jax
    from flax import nnx

    from mapjax.models.llama import LlamaForCausalLM

    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    graphdef, state = numpy_weights(model, seed=1)
    model = nnx.merge(graphdef, state)
    call = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    prefill = call(state, _token_ids(batch, prompt, config.vocab_size, seed=2), model.init_cache(batch, slots))
    # Timed: one more token against the filled cache (its own compiled shape).
    return Workload("decode", call, (state, _token_ids(batch, 1, config.vocab_size, seed=3), prefill.cache),
                    output=lambda result: result.logits, repeats_factor=10,
                    sample=lambda out: {"logits": np.asarray(out)[:, -1, :]})


def build_workload(name: str, tiny: bool) -> Workload:
    from mapjax.models.gpt2 import GPT2LMHeadModel
    from mapjax.models.llama import LlamaForCausalLM

    batch, seq = (2, 16) if tiny else (16, 128)
    if name == "smollm2":
        return causal_forward(name, LlamaForCausalLM, smollm2_config(tiny), batch, seq)
    if name == "gpt2":
        return causal_forward(name, GPT2LMHeadModel, gpt2_config(tiny), batch, seq)
    if name == "minilm":
        return encoder_forward(minilm_config(tiny), *((4, 16) if tiny else (64, 128)))
    if name == "decode":
        return decode_step(smollm2_config(tiny), *((4, 8, 16) if tiny else (64, 32, 96)))
    raise SystemExit(f"unknown workload {name!r}; known: smollm2, gpt2, minilm, decode")


def program_digest(hlo_text: str) -> tuple[str, dict[str, int]]:
    """Digest of the optimised HLO (instructions only, metadata stripped) and a count of its fusions by kind."""
    instructions = [line for line in hlo_text.splitlines()
                    if line.startswith(("HloModule", "ENTRY", "%", "  ", "}"))]
    stripped = re.sub(r", metadata=\{[^}]*\}", "", "\n".join(instructions))
    kinds = Counter(re.findall(r'"kind":"(\w+)"', stripped))
    kinds["kLoop"] = len(re.findall(r"kind=kLoop", stripped))
    kinds["dot"] = len(re.findall(r"= \S+ dot\(", stripped))  # inside YNN fusions or XLA's own dot thunks
    return hashlib.sha256(stripped.encode()).hexdigest()[:12], dict(kinds)


def llvm_ir_digest(dump_dir: Path) -> str:
    """Digest of every optimised LLVM IR file XLA dumped (the kernels it generated itself)."""
    digest = hashlib.sha256()
    for path in sorted(dump_dir.glob("*jit__lambda*.ir-with-opt.ll")):
        digest.update(re.sub(r"module_\d+", "module", path.name).encode())
        # LLVM numbers its metadata nodes differently from run to run: drop them.
        text = re.sub(r"^!.*$", "", path.read_text(), flags=re.MULTILINE)
        digest.update(re.sub(r"!\S+ !\d+", "", text).encode())
    return digest.hexdigest()[:12]


def run_worker(args: argparse.Namespace) -> None:
    """One flag set (already in XLA_FLAGS): time every workload; write a JSON result."""
    result: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "workloads": {}}
    outputs: dict[str, np.ndarray] = {}
    for name in args.workloads.split(","):
        workload = build_workload(name, args.tiny)
        start, start_cpu = time.perf_counter(), time.process_time()
        compiled = workload.function.lower(*workload.arguments).compile()  # trace, lower, XLA compile
        compile_s, compile_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu

        def call(compiled: Any = compiled, workload: Workload = workload) -> Any:
            return workload.output(compiled(*workload.arguments)).block_until_ready()

        for key, value in workload.sample(call()).items():
            outputs[f"{name}/{key}"] = value
        walls, cpus = [], []
        for _ in range(args.repeats * workload.repeats_factor):
            wall, cpu = time.perf_counter(), time.process_time()
            call()
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        entry = {"compile_s": compile_s, "compile_cpu_s": compile_cpu_s,
                 "wall_s": statistics.median(walls), "wall_min_s": min(walls),
                 "cpu_s": statistics.median(cpus)}
        result["workloads"][name] = entry
    if args.dump_dir:
        dump = Path(args.dump_dir)
        result["llvm_ir_digest"] = llvm_ir_digest(dump)
        hlo_texts = sorted(dump.glob("*.cpu_after_optimizations.txt"))
        combined = "\n".join(path.read_text() for path in hlo_texts if "jit__lambda" in path.name)
        result["hlo_digest"], result["fusions"] = program_digest(combined)
    if args.outputs:
        np.savez(args.outputs, **outputs)
    Path(args.result).write_text(json.dumps(result))


# --------------------------------------------------------------------------- #
# Driver: interleave the flag sets' subprocesses, compare, print the table.
# --------------------------------------------------------------------------- #
def run_flag_set(name: str, flags: str, args: argparse.Namespace, work: Path, round_index: int) -> dict[str, Any]:
    result_path = work / f"{name}.{round_index}.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    command = [sys.executable, str(work / "snapshot" / "xla_flags.py"), "--worker", "--workloads", args.workloads, "--repeats", str(args.repeats),
               "--result", str(result_path), "--snapshot", str(work / "snapshot")]
    if args.tiny:
        command.append("--tiny")
    if round_index == 0:  # the first round also dumps the programs and keeps the outputs
        dump = work / f"dump-{name}"
        flags = f"{flags} --xla_dump_to={dump}".strip()
        command += ["--dump-dir", str(dump), "--outputs", str(work / f"{name}.npz")]
    env["XLA_FLAGS"] = flags
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        print(f"flag set {name!r} failed:\n{completed.stderr[-3000:]}", file=sys.stderr)
        return {}
    return json.loads(result_path.read_text())


def output_difference(work: Path, name: str) -> dict[str, float]:
    """Per workload, ``max |a - b| / max |b|`` of this flag set's outputs against the default's."""
    reference, candidate = np.load(work / "default.npz"), np.load(work / f"{name}.npz")
    worst: dict[str, float] = {}
    for key in reference.files:
        workload = key.split("/")[0]
        scale = float(np.max(np.abs(reference[key]))) or 1.0
        difference = float(np.max(np.abs(candidate[key].astype(np.float64) - reference[key]))) / scale
        worst[workload] = max(worst.get(workload, 0.0), difference)
    return worst


def same_program(result: dict[str, Any], default: dict[str, Any]) -> bool:
    """Whether a first-round result compiled to the default's HLO and LLVM IR."""
    return bool(result) and all(result.get(key) == default.get(key) for key in ("hlo_digest", "llvm_ir_digest"))


def _values(results: list[dict[str, Any]], workload: str, key: str) -> list[float]:
    return [result["workloads"][workload][key] for result in results if result]


def summarise(rounds: dict[str, list[dict[str, Any]]], work: Path, workloads: list[str]) -> dict[str, Any]:
    """Per flag set and workload: median times, the paired ratio to the default, output difference."""
    summary: dict[str, Any] = {}
    default_rounds = rounds["default"]
    for name, results in rounds.items():
        if not any(results):
            continue
        first = results[0]
        entry: dict[str, Any] = {
            "flags": re.sub(r"\s*--xla_dump_to=\S+", "", first["xla_flags"]).strip(),
            "rounds": sum(1 for result in results if result),
            "hlo_same_as_default": first.get("hlo_digest") == default_rounds[0].get("hlo_digest"),
            "llvm_ir_same_as_default": first.get("llvm_ir_digest") == default_rounds[0].get("llvm_ir_digest"),
            "fusions": first.get("fusions"),
            "workloads": {},
        }
        entry["same_program_as"] = next((other for other, other_results in rounds.items() if other != name
                                         and other_results[0] and same_program(first, other_results[0])), None)
        differences = output_difference(work, name) if (work / f"{name}.npz").exists() else {}
        for workload in workloads:
            # Paired by round: the default and this flag set ran minutes apart, under similar load.
            pairs = [(default["workloads"][workload], result["workloads"][workload])
                     for default, result in zip(default_rounds, results) if default and result]
            entry["workloads"][workload] = {
                "wall_s": statistics.median(_values(results, workload, "wall_s")),
                "wall_min_s": min(_values(results, workload, "wall_min_s")),
                "cpu_s": statistics.median(_values(results, workload, "cpu_s")),
                "compile_s": statistics.median(_values(results, workload, "compile_s")),
                "compile_cpu_s": statistics.median(_values(results, workload, "compile_cpu_s")),
                "speedup": statistics.median(base["wall_s"] / run["wall_s"] for base, run in pairs),
                "cpu_speedup": statistics.median(base["cpu_s"] / run["cpu_s"] for base, run in pairs),
                "relative_difference": differences.get(workload, float("nan")),
                "per_round_wall_s": _values(results, workload, "wall_s"),
            }
        summary[name] = entry
    return summary


def print_table(summary: dict[str, Any], workloads: list[str]) -> None:
    """Markdown: CPU time and speed-ups per workload, output agreement, program identity; then compile times."""
    header = " | ".join(f"{workload}: CPU s (speed-up CPU; wall)" for workload in workloads)
    print(f"| flag set | rounds | {header} | max rel. diff vs default | HLO / LLVM IR vs default |")
    print("|---|---|" + "---|" * len(workloads) + "---|---|")
    for name, entry in summary.items():
        cells = []
        for workload in workloads:
            values = entry["workloads"][workload]
            cells.append(f"{values['cpu_s']:.3f} ({values['cpu_speedup']:.2f}x; {values['speedup']:.2f}x)")
        differences = [entry["workloads"][workload]["relative_difference"] for workload in workloads]
        worst = max((difference for difference in differences if difference == difference), default=float("nan"))
        verdict = "within 1e-5" if worst <= 1e-5 else "**beyond 1e-5**"
        program = ("same" if entry["hlo_same_as_default"] else "differs") + " / " + (
            "same" if entry["llvm_ir_same_as_default"] else "differs")
        if entry["same_program_as"] and entry["same_program_as"] not in ("default", "default_again"):
            program += f" (same as {entry['same_program_as']})"
        print(f"| {name} | {entry['rounds']} | {' | '.join(cells)} | {worst:.1e} ({verdict}) | {program} |")
    print()
    print("| flag set | " + " | ".join(f"{workload}: compile CPU s (wall s)" for workload in workloads)
          + " | XLA_FLAGS |")
    print("|---|" + "---|" * len(workloads) + "---|")
    for name, entry in summary.items():
        cells = [f"{entry['workloads'][workload]['compile_cpu_s']:.1f} ({entry['workloads'][workload]['compile_s']:.1f})"
                 for workload in workloads]
        print(f"| {name} | {' | '.join(cells)} | `{entry['flags'] or '(none)'}` |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per workload per subprocess")
    parser.add_argument("--flag-sets", default=",".join(FLAG_SETS))
    parser.add_argument("--workloads", default="smollm2,gpt2,minilm,decode")
    parser.add_argument("--tiny", action="store_true", help="tiny models: check the script in seconds")
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--work-dir", help="keep results, outputs and dumps here (default: a temporary folder)")
    # Worker mode (internal).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--dump-dir", help=argparse.SUPPRESS)
    parser.add_argument("--outputs", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, args.snapshot)  # the source as it was when the driver started
        run_worker(args)
        return

    known = FLAG_SETS
    names = args.flag_sets.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown flag sets {unknown}; known: {sorted(known)}")
    if "default" not in names:
        names.insert(0, "default")
    workloads = args.workloads.split(",")
    with tempfile.TemporaryDirectory(prefix="xla_flags_") as temporary:
        work = Path(args.work_dir or temporary)
        work.mkdir(parents=True, exist_ok=True)
        # Every subprocess runs and imports these copies, so edits to the source during a long run change no round.
        shutil.rmtree(work / "snapshot", ignore_errors=True)
        shutil.copytree(REPO_ROOT / "mapjax", work / "snapshot" / "mapjax",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(__file__, work / "snapshot" / "xla_flags.py")
        rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_index in range(args.rounds):
            if round_index == 1:
                # A flag set that compiled to the very programs of the default (a no-op) or of an earlier flag
                # set (a duplicate) is not timed again.
                kept: list[str] = []
                for name in names:
                    if name in ("default", "default_again") or not any(
                            same_program(rounds[name][0], rounds[earlier][0]) for earlier in kept):
                        kept.append(name)
                names = kept
            for name in names:
                started = time.perf_counter()
                rounds[name].append(run_flag_set(name, known[name], args, work, round_index))
                print(f"round {round_index + 1}/{args.rounds} {name}: {time.perf_counter() - started:.0f} s "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
        summary = summarise(rounds, work, workloads)
    import platform

    import jax

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
          f"load at end {os.getloadavg()[0]:.1f}; {args.rounds} rounds x {args.repeats} calls; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print_table(summary, workloads)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
