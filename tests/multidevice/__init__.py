"""Run a Python snippet in a subprocess that sees several host (CPU) devices, and get its result back as JSON.

JAX fixes its device count when the backend starts, and the test process has one CPU device, so multi-device
checks run in a child process started with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``. The snippet
assigns its (JSON-serialisable) result to ``RESULT``; :func:`run_snippet` returns it, or fails with the child's
output when it raised. The child imports ``tests/`` modules (``from conftest import build_tiny_model``) and the
helpers of this package.

Each launch pays a JAX import and its own compilations (seconds on two cores): put everything one test module
needs into one snippet, and keep the models tiny.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = TESTS_DIR.parent
_MARKER = "@@MAPJAX-MULTIDEVICE-RESULT@@"

__all__ = ["REPO_ROOT", "TESTS_DIR", "device_environment", "run_snippet"]


def device_environment(devices: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``devices`` host CPU devices forced, JAX on CPU, and the repository
    and ``tests/`` importable."""
    env = dict(os.environ if base is None else base)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    paths = [str(REPO_ROOT), str(TESTS_DIR)] + [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_snippet(code: str, *, devices: int = 8, timeout: float = 600.0, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` (dedented) in a fresh interpreter with ``devices`` host devices; return its ``RESULT``.

    Raises ``AssertionError`` carrying the child's stdout and stderr when it exits non-zero or sets no result.
    """
    program = textwrap.dedent(code) + (
        f"\nimport json as _json\nprint({_MARKER!r} + _json.dumps(RESULT), flush=True)\n")
    completed = subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, env=device_environment(devices, env),
                               capture_output=True, text=True, timeout=timeout)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(_MARKER)]
    if completed.returncode != 0 or not lines:
        raise AssertionError(f"the {devices}-device subprocess failed (exit {completed.returncode})\n"
                             f"--- stdout ---\n{completed.stdout[-4000:]}\n--- stderr ---\n{completed.stderr[-8000:]}")
    return json.loads(lines[-1][len(_MARKER):])
