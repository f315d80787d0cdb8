"""Sharded JAX against one-device JAX: sampling, reward scoring and the λ solver on a device mesh.

No PyTorch side: both columns are mapjax (on a mesh and on one device).

    PYTHONPATH=. python benchmarks/scaling.py                       # CPU: 1, 2, 4, 8 host devices
    PYTHONPATH=. python benchmarks/scaling.py --tiny                # toy sizes, seconds per device count
    PYTHONPATH=. python benchmarks/scaling.py --devices 1,8 --axis fsdp --out DIR
    PYTHONPATH=. python benchmarks/scaling.py --platform gpu --devices 1  # one accelerator: the mesh path compiles

Each device count runs in its own Python (XLA fixes the number of CPU devices when it starts:
``--xla_force_host_platform_device_count``). There, every case runs twice on the same inputs: on one device
(``mesh=None``) and on a mesh of all the devices (``data=N`` by default), and the table gives, per case, the
first call (compile included) and the median steady call of each, their ratio, and the check that matters:
identical tokens for sampling (log-probs within 1e-5), the largest absolute difference for scores and for λ.

Cases: ``generate`` (GPT-2 small, seeded random weights, the word tokenizer of the suite; rows = prompts x
samples split over the mesh), ``perplexity`` (the perplexity reward, i.e. ``token_logprobs`` under the same
model, on the sampled texts), ``solve`` (``solve_many`` on random palettes over the authors' OPT-1.3B pilot
pool, samples split over the mesh, float64).

On a CPU the host devices are slices of the same cores (two on the CI machine), so a mesh cannot be faster than
one device: the ratio measures the sharding's overhead (collectives, padding rows to a multiple of the mesh,
smaller per-device kernels), and correctness is the result. Speed-ups need devices with their own compute
(GPUs/TPUs); the README's capacity plan says how to size those runs.

Writes ``DIR/results.json`` and ``DIR/results.md`` with ``--out``; prints the table either way. Exit status 0
when every check holds (tokens identical, differences within 1e-5), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))

TOLERANCE = 1e-5
SIZES = {   # rows = prompts x samples; everything a multiple of 8 so every mesh holds whole rows
    "full": dict(model="gpt2", prompts=16, samples=2, prompt_tokens=16, new_tokens=16, palettes=16, repeats=3),
    "tiny": dict(model="gpt2", prompts=8, samples=2, prompt_tokens=8, new_tokens=8, palettes=4, repeats=2),
}
NOTE = ("CPU host devices share the same cores, so no speed-up is expected: 'overhead' is sharded time / "
        "one-device time (the cost of the mesh), and the checks are what count.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts (default 1,2,4,8)")
    parser.add_argument("--axis", choices=("data", "fsdp"), default="data",
                        help="the mesh axis all devices go on (default data: rows split, parameters replicated)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a tiny GPT-2, 16 rows, 4 palettes)")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: N host devices per run; gpu: the machine's accelerators (N of them)")
    parser.add_argument("--out", type=Path, help="folder for results.json and results.md (created)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per device count (default 900)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)   # internal: one device count, JSON here
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------- in the worker
def _timed(function: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(first call s, median steady s, last result) of ``function``, results blocked on."""
    import jax
    import numpy as np

    def call() -> tuple[float, Any]:
        start = time.perf_counter()
        result = jax.block_until_ready(function())
        return time.perf_counter() - start, result

    first, result = call()
    steady = []
    for _ in range(repeats):
        seconds, result = call()
        steady.append(seconds)
    return first, float(np.median(steady)), result


def _row(case: str, mesh_spec: str, single: tuple[float, float, Any], sharded: tuple[float, float, Any],
         check: str, value: Any, ok: bool, work: str) -> dict[str, Any]:
    return {"case": case, "mesh": mesh_spec, "work": work, "first_1dev_s": single[0], "first_mesh_s": sharded[0],
            "steady_1dev_s": single[1], "steady_mesh_s": sharded[1], "overhead": sharded[1] / single[1],
            "check": check, "value": value, "ok": bool(ok)}


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Every case on one device and on the mesh of all this process's devices."""
    import jax
    import numpy as np

    from benchmarks.solver import random_palettes
    from benchmarks.suite_models import build_mapjax_model, model_spec, word_prompts, word_tokenizer
    from mapjax import RewardPool, solve_many
    from mapjax.generate import generate
    from mapjax.rewards import get_reward
    from mapjax.sharding import as_mesh, mesh_spec

    sizes = SIZES["tiny" if args.tiny else "full"]
    count = jax.device_count()
    mesh = as_mesh({args.axis: count})
    spec = mesh_spec(mesh)
    rows = sizes["prompts"] * sizes["samples"]
    model_info = model_spec(sizes["model"], args.tiny)
    model = build_mapjax_model(model_info, "float32")
    tokenizer = word_tokenizer(model_info.vocab_size)
    prompts = word_prompts(sizes["prompts"], sizes["prompt_tokens"], model_info.vocab_size, seed=0)
    results = []

    def sample(on: Any) -> Any:
        return generate(model, tokenizer, prompts, num_samples=sizes["samples"], max_new_tokens=sizes["new_tokens"],
                        batch_size=rows, seed=0, mesh=on)

    single, sharded = _timed(lambda: sample(None), sizes["repeats"]), _timed(lambda: sample(mesh), sizes["repeats"])
    same = bool(np.array_equal(single[2].tokens, sharded[2].tokens) and single[2].texts == sharded[2].texts)
    logprob_gap = float(np.max(np.abs(single[2].logprobs - sharded[2].logprobs)))
    results.append(_row("generate", spec, single, sharded, "identical tokens", same,
                        same and logprob_gap <= TOLERANCE, f"{rows} rows x {sizes['new_tokens']} tokens"))

    texts = single[2].texts
    row_prompts = [prompts[i] for i in single[2].prompt_index]
    scorers = {None: get_reward("perplexity", model=model, tokenizer=tokenizer, batch_size=rows),
               "mesh": get_reward("perplexity", model=model, tokenizer=tokenizer, batch_size=rows, mesh=mesh)}
    single = _timed(lambda: np.asarray(scorers[None](row_prompts, texts)), sizes["repeats"])
    sharded = _timed(lambda: np.asarray(scorers["mesh"](row_prompts, texts)), sizes["repeats"])
    gap = float(np.max(np.abs(single[2] - sharded[2])))
    results.append(_row("perplexity", spec, single, sharded, "max abs Δ score", gap, gap <= TOLERANCE,
                        f"{rows} texts"))

    pilot = REPO_ROOT / "data" / "opt1.3b-anthropic-harmless.json.gz"
    if pilot.is_file():
        pool = RewardPool.load(pilot)
        source = "pilot"
    else:   # a checkout without data/: a synthetic pool of the pilot's size
        rng = np.random.default_rng(0)
        pool = RewardPool.from_array(rng.normal(size=(12_500, 6)) @ (np.eye(6) + rng.normal(size=(6, 6)) / 6))
        source = "synthetic"
    values = pool.value_names[:3]
    palettes = random_palettes(pool, values, sizes["palettes"], seed=0)
    single = _timed(lambda: solve_many(pool, palettes, values=values).lam, sizes["repeats"])
    sharded = _timed(lambda: solve_many(pool, palettes, values=values, mesh=mesh).lam, sizes["repeats"])
    finite = np.isfinite(single[2]) & np.isfinite(sharded[2])
    same_verdicts = bool(np.array_equal(np.isfinite(single[2]), np.isfinite(sharded[2])))
    gap = float(np.max(np.abs(single[2][finite] - sharded[2][finite]), initial=0.0))
    results.append(_row("solve", spec, single, sharded, "max abs Δ λ", gap, same_verdicts and gap <= TOLERANCE,
                        f"{sizes['palettes']} palettes, {pool.flat().shape[0]} samples ({source})"))
    return {"devices": count, "platform": jax.devices()[0].platform, "rows": results}


# ------------------------------------------------------------------------------------------------- the driver
def run_count(count: int, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One device count in a fresh Python; its results, or its error."""
    out = folder / f"devices-{count}.json"
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                              os.environ.get("PYTHONPATH")]))}
    if args.platform == "cpu":
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip()
        environment.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    else:
        environment["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(count)))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(out), "--axis", args.axis,
               *(["--tiny"] if args.tiny else [])]
    done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                          timeout=args.timeout)
    if done.returncode != 0 or not out.is_file():
        return {"devices": count, "error": done.stderr.strip()[-2000:] or f"exit status {done.returncode}"}
    return json.loads(out.read_text())


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Sharded vs one-device JAX ({report['machine']})", "", NOTE if report["platform"] == "cpu" else "",
             "", "| devices | case | mesh | work | 1 device: first / steady s | mesh: first / steady s | overhead "
                 "| check | value | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['devices']} | error: {' '.join(run['error'].split())[:300]} |||||||||")
            continue
        for row in run["rows"]:
            lines.append(f"| {run['devices']} | {row['case']} | {row['mesh']} | {row['work']} | "
                         f"{row['first_1dev_s']:.2f} / {row['steady_1dev_s']:.3f} | "
                         f"{row['first_mesh_s']:.2f} / {row['steady_mesh_s']:.3f} | {row['overhead']:.2f}x | "
                         f"{row['check']} | {_format(row['value'])} | {_format(row['ok'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        args.worker.write_text(json.dumps(run_worker(args), indent=1))
        return 0
    try:
        counts = sorted({int(part) for part in args.devices.split(",") if part.strip()})
    except ValueError:
        print(f"--devices must be comma-separated whole numbers, got {args.devices!r}", file=sys.stderr)
        return 2
    if not counts or counts[0] < 1:
        print(f"--devices must name counts >= 1, got {args.devices!r}", file=sys.stderr)
        return 2
    from benchmarks.machine import cpu_name

    folder = args.out or Path(os.environ.get("TMPDIR", "/tmp")) / f"mapjax-scaling-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} cores" if args.platform == "cpu" else args.platform,
              "platform": args.platform, "axis": args.axis, "tiny": args.tiny, "runs": []}
    for count in counts:
        started = time.perf_counter()
        run = run_count(count, args, folder)
        run["wall_s"] = time.perf_counter() - started
        report["runs"].append(run)
        print(f"{count} device(s): {'error' if 'error' in run else 'done'} in {run['wall_s']:.0f} s", flush=True)
        if args.out:
            (args.out / "results.json").write_text(json.dumps(report, indent=1))
            (args.out / "results.md").write_text(markdown(report))
    print()
    print(markdown(report))
    ok = all("error" not in run and all(row["ok"] for row in run["rows"]) for run in report["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
