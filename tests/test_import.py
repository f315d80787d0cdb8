"""Importing mapjax leaves the process's XLA settings alone.

XLA reads ``XLA_FLAGS`` once, when JAX's backend starts, so a library that rewrote it at import would change
how every later JAX program in the process compiles. Each case runs a fresh Python (the test process has long
imported mapjax) and reports ``XLA_FLAGS`` before and after the imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# The package, its command line and its model code: every module a user's program starts from.
_IMPORT_AND_REPORT = """
import json, os
before = os.environ.get("XLA_FLAGS")
import mapjax, mapjax.cli, mapjax.models
print(json.dumps({"before": before, "after": os.environ.get("XLA_FLAGS")}))
"""


def _xla_flags_around_import(user_flags: str | None) -> dict:
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    environment.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO_ROOT))
    if user_flags is not None:
        environment["XLA_FLAGS"] = user_flags
    completed = subprocess.run([sys.executable, "-c", _IMPORT_AND_REPORT], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


# Each case starts a Python that imports JAX and transformers (seconds): the user's own flags run in the slow tier.
@pytest.mark.parametrize("user_flags", [None, pytest.param("--xla_cpu_enable_fast_math=false", marks=pytest.mark.slow)])
def test_importing_mapjax_leaves_xla_flags_as_they_were(user_flags):
    assert _xla_flags_around_import(user_flags) == {"before": user_flags, "after": user_flags}
