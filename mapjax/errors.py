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


class OutputAliasError(MapjaxError):
    """An output that is, holds, or sits inside one of the command's inputs (paths compared after resolving
    symlinks), or that is the current folder or one of its parents: writing it would destroy what it reads."""


class OutputNotOursError(MapjaxError):
    """An output that ``--overwrite``/``--force`` may not replace because mapjax did not write it (a folder
    without mapjax's run marker, a file that is not a mapjax pool or result)."""


class LimitError(InputError):
    """A count, size or number of points larger than this machine can hold (the message gives the estimate)."""


class DivergenceError(FinetuneError):
    """A finetuning run whose loss or parameters became non-finite; it stopped at once, kept its last finite
    checkpoint and exported nothing (the command exits 1)."""
