"""The errors a user can act on: every one derives from :class:`MapjaxError`.

The command line catches ``MapjaxError`` (and OS errors on the paths it was given), prints the message on one
line and exits 2; anything else is a bug in mapjax and keeps its traceback. Each domain error also derives from
``ValueError`` so that code written against the built-in type keeps working.
"""

from __future__ import annotations


class MapjaxError(ValueError):
    """Root of every error mapjax raises for bad input or an impossible request; the message says what to fix."""


class InputError(MapjaxError):
    """An argument of a public function is of the wrong kind, shape or range (the message names it)."""


class PoolError(MapjaxError):
    """A reward pool (or its file) that cannot be read or used; the message names the file, row and value."""


class PaletteError(MapjaxError):
    """A palette that cannot be read or resolved; the message names the value and level."""


class SolverError(MapjaxError):
    """A solver setting out of range, or a problem the solver cannot take (e.g. an LP that fails to solve)."""


class EvaluationError(MapjaxError):
    """Result and base pools that cannot be compared, or an evaluation setting out of range."""


class DecodeError(MapjaxError):
    """A λ or candidate pool MAP-D cannot decode with."""


class PlotError(MapjaxError):
    """A plot request that cannot be drawn (unknown value, missing data, an output that exists)."""


class ModelError(MapjaxError):
    """A model, checkpoint or tokenizer that cannot be loaded or used."""


class GenerationError(MapjaxError):
    """Sampling settings or prompts the sampler cannot take."""


class RewardError(MapjaxError):
    """A reward that cannot be built, or scores of the wrong length or NaN."""


class PromptSourceError(MapjaxError):
    """A prompt source that cannot be read."""


class BuildError(MapjaxError):
    """A pool build that cannot start or resume (other settings, an output that exists)."""


class FinetuneError(MapjaxError):
    """Finetuning settings or data that cannot be used."""


class ConfigError(MapjaxError):
    """An experiment config (YAML or ``--set key=value``) with an unknown key or a value of the wrong kind."""


class OutputExistsError(MapjaxError, FileExistsError):
    """An output that exists and would be replaced without ``--overwrite``/``--force``."""


class MeshError(MapjaxError):
    """A device mesh spec that cannot be built (unknown or repeated axis, bad size, wrong device count), or
    arrays that cannot be laid out on the mesh."""
