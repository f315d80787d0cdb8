"""The paper's experiments, one module each, run from the repository root as ``python -m experiments.<name>``.

Every experiment reads a YAML config (``configs/``) into a typed dataclass, takes ``--set key=value``
overrides, and writes into an output folder under one rule; see :mod:`experiments.common`.
"""
