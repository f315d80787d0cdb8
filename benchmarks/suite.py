"""Every mapjax-vs-PyTorch benchmark in one run: sampling, forward, training, coherence scoring, the λ solver.

    PYTHONPATH=. python benchmarks/suite.py --device gpu --out DIR      # one H100/H200: about 8 minutes at most
    PYTHONPATH=. python benchmarks/suite.py --device cpu --out DIR      # same cases on the CPU (slow: minutes)
    PYTHONPATH=. python benchmarks/suite.py --device cpu --tiny --out DIR   # toy sizes, seconds per case
    ... --only generate-smollm2,solver-palettes    # a subset (names: --list)

Writes ``DIR/results.json`` (machine, settings, every case with its rows, errors and timings) and
``DIR/results.md`` (one table, mapjax / PyTorch ratios), rewritten after every case so an interrupted run keeps
what it measured. Models are the real configs (SmolLM2-135M, a Llama-3.2-1B-size Llama, GPT-2 small, MiniLM-L6)
with seeded random weights, handed from mapjax to transformers in memory: nothing is downloaded or read from
disk but the pilot reward pool shipped in ``data/``. On a GPU both frameworks run bfloat16 weights and KV cache
(``--dtype float32`` to change); on a CPU float32. Needs jax, flax, optax, orbax, chex, torch and transformers;
not gguf, datasets, pyarrow, vaderSentiment or matplotlib, and not an installed mapjax (run from a checkout).

Each case is guarded: an error is recorded in its entry and the next case runs. ``--budget`` (default 460 s on
a GPU, unlimited otherwise) bounds the whole run: a case whose estimated time no longer fits is skipped and
marked so. Exit status: 0 when every selected case ran and agreed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.suite_cases import CASE_NAMES, CASES, CPU_SIZES, GPU_SIZES, TINY_SIZES, Context

DEFAULT_GPU_BUDGET_S = 460.0
SCHEMA_VERSION = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where both frameworks run (auto: a GPU when JAX and PyTorch both see one)")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md (created)")
    parser.add_argument("--tiny", action="store_true", help="toy configs and sizes: every case in seconds")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="weights, KV cache and compute (default bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--only", default="", help="comma-separated case names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for the whole run (default {DEFAULT_GPU_BUDGET_S:.0f} on a GPU, none on a CPU)")
    parser.add_argument("--tf32", action="store_true",
                        help="float32 matmuls in TF32 on both sides (default: full float32 on both)")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="JAX's persistent compilation cache folder (a second run then compiles less)")
    parser.add_argument("--torch-threads", type=int, default=None, help="PyTorch CPU threads (default: all cores)")
    args = parser.parse_args(argv)
    if not args.list and args.out is None:
        parser.error("--out DIR is required")
    args.cases = [name for name in args.only.split(",") if name] or list(CASE_NAMES)
    unknown = sorted(set(args.cases) - set(CASE_NAMES))
    if unknown:
        parser.error(f"--only: unknown cases {unknown}; known: {', '.join(CASE_NAMES)}")
    return args


def prepare_environment(args: argparse.Namespace) -> None:
    """Settings that must precede the first jax import (a user's own environment wins)."""
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    # Two frameworks share one GPU: JAX must not grab 75% of its memory up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_devices(args: argparse.Namespace) -> tuple[str, str]:
    """(JAX platform 'gpu'|'cpu', PyTorch device 'cuda'|'cpu'); a GPU asked for and not seen is an error."""
    import jax

    jax_gpu = jax.default_backend() == "gpu"
    import torch  # after JAX has set up its CUDA libraries

    torch_gpu = torch.cuda.is_available()
    if args.device == "gpu" and not (jax_gpu and torch_gpu):
        raise SystemExit(f"--device gpu: JAX sees {jax.default_backend()}, PyTorch "
                         f"{'sees CUDA' if torch_gpu else 'sees no CUDA device'}; both need the GPU")
    if args.device == "auto" and jax_gpu != torch_gpu:
        raise SystemExit(f"--device auto: JAX sees {jax.default_backend()} but PyTorch "
                         f"{'sees CUDA' if torch_gpu else 'sees no CUDA device'}; pass --device cpu or fix the install")
    return ("gpu", "cuda") if jax_gpu else ("cpu", "cpu")


def machine_description(device: str, torch_device: str) -> dict[str, Any]:
    import jax
    import torch
    import transformers

    cpu = cpu_name()
    jax_device = jax.devices()[0]
    return {
        "cpu": cpu, "cpu_cores": os.cpu_count(), "python": platform.python_version(),
        "jax": jax.__version__, "jax_device": f"{jax_device.platform} ({jax_device.device_kind})",
        "torch": torch.__version__, "torch_device": (torch.cuda.get_device_name() if torch_device == "cuda"
                                                     else f"cpu ({torch.get_num_threads()} threads)"),
        "transformers": transformers.__version__, "flax": _version("flax"), "optax": _version("optax"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": device,
    }


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def write_results(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(finite(report), indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))


def markdown(report: dict[str, Any]) -> str:
    machine, settings = report["machine"], report["settings"]
    lines = [f"# mapjax benchmark suite ({'tiny' if settings['tiny'] else 'full'} sizes, {settings['dtype']}, "
             f"{machine.get('device', '?')})", "",
             f"JAX {machine.get('jax')} on {machine.get('jax_device')}; PyTorch {machine.get('torch')} on "
             f"{machine.get('torch_device')}; transformers {machine.get('transformers')}; {machine.get('cpu')}, "
             f"{machine.get('cpu_cores')} cores; Python {machine.get('python')}. Started {report['started']}, "
             f"wall time {report.get('wall_s', 0):.0f} s.", "",
             "Ratio: mapjax throughput / PyTorch throughput (above 1: mapjax faster). Compile: mapjax's first call "
             "minus a steady call. Check: the outputs compared (see results.json).", "",
             "| case | row | mapjax | PyTorch | mapjax / PyTorch | mapjax compile (s) | PyTorch first call (s) "
             "| check |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for case in report["cases"]:
        if case["status"] != "ok" and not case["rows"]:
            reason = (case.get("error", "").strip().splitlines() or [""])[-1][:150]
            label = reason if case["status"] == "skipped" else f"{case['status']}: {reason}"
            lines.append(f"| {case['case']} | {label} | | | | | | |")
        for row in case["rows"]:
            agree = {True: "agrees", False: "**differs**", None: "-"}[row["agree"]]
            lines.append(f"| {case['case']} | {row['name']} | {row['mapjax']:,.1f} {row['unit']} "
                         f"| {row['pytorch']:,.1f} {row['unit']} | {row['ratio']:.2f}x "
                         f"| {row['mapjax_compile_s']:.1f} | {row['pytorch_first_call_s']:.2f} | {agree} |")
        if case["status"] in ("error", "interrupted", "running") and case["rows"]:
            lines.append(f"| {case['case']} | {case['status']} after {len(case['rows'])} row(s) | | | | | | |")
    compile_total = sum(row["mapjax_compile_s"] for case in report["cases"] for row in case["rows"])
    lines += ["", f"mapjax compile time over all rows: {compile_total:.0f} s. Case wall times (s), model building "
                  "and compilation included: " + ", ".join(f"{case['case']} {case.get('wall_s', 0):.0f}"
                                                           for case in report["cases"]), ""]
    return "\n".join(lines)


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    prepare_environment(args)
    import jax

    try:
        device, torch_device = resolve_devices(args)
    except SystemExit as error:   # leave a results.json that says why nothing ran
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"schema": SCHEMA_VERSION, "error": str(error),
                                                           "cases": []}, indent=2) + "\n")
        raise
    import torch

    if torch_device == "cpu":
        torch.set_num_threads(args.torch_threads or os.cpu_count() or 1)
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    # Same arithmetic on both sides: JAX's default float32 dot on a GPU is TF32, PyTorch's is full float32.
    # (bfloat16 runs keep JAX's default, so its float32 solver rows time what a user gets.)
    if dtype == "float32" or args.tf32:
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 else "highest")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    if args.compile_cache is not None:
        jax.config.update("jax_compilation_cache_dir", str(args.compile_cache))
    sizes = TINY_SIZES if args.tiny else (GPU_SIZES if device == "gpu" else CPU_SIZES)
    budget = args.budget if args.budget is not None else (DEFAULT_GPU_BUDGET_S if device == "gpu" else math.inf)
    context = Context(device=device, torch_device=torch_device, dtype=dtype, tiny=args.tiny, sizes=sizes)
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(device, torch_device),
        "settings": {"device": device, "dtype": dtype, "tiny": args.tiny, "budget_s": budget, "tf32": args.tf32,
                     "cases": args.cases, "sizes": dataclasses.asdict(sizes)},
        "cases": [],
    }
    selected = [case for case in CASES if case.name in args.cases]
    # A kill by `timeout` (SIGTERM) ends the run like Ctrl-C: the results measured so far are written first.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    for index, case in enumerate(selected):
        entry: dict[str, Any] = {"case": case.name, "description": case.description, "status": "running",
                                 "rows": [], "gpu_estimate_s": case.gpu_estimate_s}
        report["cases"].append(entry)
        elapsed = time.monotonic() - started
        if device == "gpu" and not args.tiny and elapsed + case.gpu_estimate_s > budget:
            entry.update(status="skipped", error=f"skipped: {elapsed:.0f} s spent, the case's estimate "
                         f"{case.gpu_estimate_s:.0f} s would pass the {budget:.0f} s budget; run it with --only")
        elif elapsed > budget:
            entry.update(status="skipped", error=f"skipped: the {budget:.0f} s budget is spent")
        else:
            print(f"[{elapsed:6.1f} s] {case.name}: {case.description}", file=sys.stderr, flush=True)
            case_start = time.monotonic()
            try:
                for row in case.run(context):
                    entry["rows"].append(row.to_json())
                    entry["wall_s"] = time.monotonic() - case_start
                    report["wall_s"] = time.monotonic() - started
                    write_results(args.out, report)
                    _print_row(entry["rows"][-1])
                entry["status"] = "ok"
            except Exception:   # one failing case must not stop the others
                entry.update(status="error", error=traceback.format_exc())
                print(entry["error"], file=sys.stderr, flush=True)
            except KeyboardInterrupt:
                entry.update(status="interrupted", error="interrupted (Ctrl-C or SIGTERM)",
                             wall_s=time.monotonic() - case_start)
                report["wall_s"] = time.monotonic() - started
                write_results(args.out, report)
                raise
            entry["wall_s"] = time.monotonic() - case_start
        still_needed = {model for later in selected[index + 1:] for model in later.models}
        context.keep_only(still_needed)
        report["wall_s"] = time.monotonic() - started
        write_results(args.out, report)
    return report


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_row(row: dict[str, Any]) -> None:
    print(f"    {row['name']}: mapjax {row['mapjax']:,.1f} / PyTorch {row['pytorch']:,.1f} {row['unit']} "
          f"= {row['ratio']:.2f}x (compile {row['mapjax_compile_s']:.1f} s, agree {row['agree']})",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for case in CASES:
            print(f"{case.name:18s} {case.description}")
        return 0
    report = run_suite(args)
    print(markdown(report))
    every_row = [row for case in report["cases"] for row in case["rows"]]
    healthy = all(case["status"] == "ok" for case in report["cases"]) and all(
        row["agree"] is not False for row in every_row)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
