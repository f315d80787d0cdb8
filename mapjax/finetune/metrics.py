"""The metrics trail of a finetuning run: ``RUN/metrics.jsonl``, plus optional TensorBoard and Weights & Biases.

File format: one strict-JSON object per line, one line per optimizer (or rollout) step, written in step order::

    {"step": 1, "loss": 0.693, "learning_rate": 1e-05, "grad_norm": 1.25, "tokens_per_s": 5120.0, "step_time": 0.41}
    {"step": 2, "loss": 0.652, ..., "reward": 0.31, "kl": 0.002, "kl_coef": 0.05,
     "levels": {"sentiment": 0.42, "toxicity": 0.03}, "clipfrac": 0.11, "ess": 0.87}

``step`` is the number of optimizer steps completed when the line is written (1 after the first step), the same
number the checkpoint of that state is saved under. The other fields are whatever the trainer passes: every route
writes ``loss``, ``learning_rate``, ``grad_norm``, ``tokens_per_s`` and ``step_time``; the online routes add
``reward``, ``kl``, ``kl_coef``, ``levels`` (the mean of each value's reward, nested), ``clipfrac`` and ``ess``
(effective sample size of the λ refresh). This module writes what it is given and checks nothing about the names.

Values are made JSON-safe: numpy and JAX scalars become Python numbers (arrays become lists), booleans stay
booleans, nested dicts stay nested and lists stay lists. A non-finite number (NaN, +inf, -inf) is written as
``null``, so every line is valid strict JSON; TensorBoard and W&B still receive the non-finite value itself.

Resuming: ``MetricsLog(run, resume_step=s)`` means the run restarted from its checkpoint at step ``s``. Lines of
steps after ``s`` (written after that checkpoint, before the kill) and a last line cut off mid-write are dropped
when the log opens, so the file of a killed-and-resumed run equals an uninterrupted run's line for line, except
for the wall-clock fields in :data:`WALL_CLOCK_FIELDS`. For this to hold the trainer must log step ``s`` *before*
it saves the checkpoint of step ``s``. ``resume_step=0`` starts afresh: an existing file is emptied.

TensorBoard (``tensorboard=True``, needs ``pip install "mapjax[tensorboard]"``) writes event files under
``RUN/tensorboard``: every numeric scalar, nested keys joined with ``/`` (``levels/sentiment``); text and lists
are skipped. Weights & Biases (``wandb_project=...``, needs ``pip install "mapjax[wandb]"``) logs the same
scalars; the W&B run id is kept in ``RUN/wandb-id.txt`` so that a resumed run continues the same W&B run. Set
``WANDB_MODE=offline`` in the environment to log without a network (``wandb sync`` uploads later).

>>> with MetricsLog("runs/map-f", resume_step=0, tensorboard=True) as metrics:
...     metrics.log(1, {"loss": 0.69, "levels": {"sentiment": 0.4}})
>>> read_metrics("runs/map-f")
[{'step': 1, 'loss': 0.69, 'levels': {'sentiment': 0.4}}]
"""

from __future__ import annotations

import json
import numbers
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mapjax.errors import FinetuneError
from mapjax.jsonio import jsonable, loads

WALL_CLOCK_FIELDS: tuple[str, ...] = ("step_time", "tokens_per_s")
"""Fields that differ between two runs of the same settings (they time the machine, not the training)."""

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_FOLDER = "tensorboard"
WANDB_ID_FILE = "wandb-id.txt"


class MetricsLog:
    """One JSON line per optimizer/rollout step in RUN/metrics.jsonl, plus optional TensorBoard and W&B.

    ``run_folder``: the run's folder (created if missing); None writes no file (TensorBoard then is refused, W&B
    uses its default folder and a fresh run id). ``resume_step``: the checkpoint step the run restarted from (0: a
    fresh run; see the module docstring). ``tensorboard``: also write TensorBoard events under
    ``RUN/tensorboard``. ``wandb_project``: also log to this W&B project, as run ``run_name`` with ``config``.

    Missing packages and bad settings raise :class:`~mapjax.errors.FinetuneError` here, before any training.
    Use it as a context manager, or call :meth:`close` at the end.
    """

    def __init__(
        self,
        run_folder: str | os.PathLike | None,
        *,
        resume_step: int = 0,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str = "mapjax",
        config: Mapping[str, Any] | None = None,
    ):
        if isinstance(resume_step, bool) or not isinstance(resume_step, numbers.Integral) or resume_step < 0:
            raise FinetuneError(f"resume_step must be a whole number >= 0 (the checkpoint step), got {resume_step!r}")
        resume_step = int(resume_step)
        if tensorboard and run_folder is None:
            raise FinetuneError(
                "tensorboard=True needs a run folder: TensorBoard events are written under RUN/tensorboard"
            )
        if wandb_project is not None and (not isinstance(wandb_project, str) or not wandb_project.strip()):
            raise FinetuneError(f"wandb_project must be a non-empty project name or None, got {wandb_project!r}")
        # import the optional packages first, so that a missing one fails before the metrics file is touched
        summary_writer_class = _import_tensorboardx() if tensorboard else None
        wandb = _import_wandb() if wandb_project is not None else None

        self.run_folder: Path | None = Path(run_folder) if run_folder is not None else None
        self.resume_step = resume_step
        self._file = None
        self._tensorboard = None
        self._wandb_run = None
        self._closed = False
        self._last_step = resume_step if resume_step else -1   # the next step logged must exceed this
        try:
            if self.run_folder is not None:
                self.run_folder.mkdir(parents=True, exist_ok=True)
                path = self.run_folder / METRICS_FILE
                if resume_step:
                    _drop_steps_after(path, resume_step)
                self._file = open(path, "a" if resume_step else "w", encoding="utf-8")
            if summary_writer_class is not None:
                # tensorboardX names event files by the second and opens them with "wb": a unique suffix keeps a
                # run resumed within the same second from erasing the file of the run before it
                self._tensorboard = summary_writer_class(
                    str(self.run_folder / TENSORBOARD_FOLDER),
                    purge_step=resume_step + 1 if resume_step else None,
                    filename_suffix=f".resume{resume_step:010d}.{uuid.uuid4().hex[:8]}",
                )
            if wandb is not None:
                self._wandb_run = _start_wandb(wandb, self.run_folder, resume_step, wandb_project, run_name, config)
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path | None:
        """The metrics file, ``RUN/metrics.jsonl`` (None without a run folder)."""
        return self.run_folder / METRICS_FILE if self.run_folder is not None else None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Write one line ``{"step": step, **metrics}`` (flushed at once) and send the numeric scalars to
        TensorBoard and W&B. Steps must increase from line to line, and exceed ``resume_step``."""
        if self._closed:
            raise FinetuneError("MetricsLog.log was called after close()")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise FinetuneError(f"the step of a metrics line must be a whole number, got {step!r}")
        step = int(step)
        if step <= self._last_step:
            raise FinetuneError(
                f"metrics step {step} does not come after the last step logged or resumed from ({self._last_step}); "
                "each step is logged once, in order"
            )
        if not isinstance(metrics, Mapping):
            raise FinetuneError(f"metrics must be a mapping of name to value, got {type(metrics).__name__}")
        if "step" in metrics:
            raise FinetuneError("metrics must not hold a 'step' field: the step is the first argument of log()")
        record = {"step": step, **{str(name): value for name, value in metrics.items()}}
        line = _json_line(record)   # before anything is written, so a bad value leaves every sink untouched
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        self._last_step = step
        if self._tensorboard is not None or self._wandb_run is not None:
            scalars = dict(_numeric_scalars(metrics))
            if self._tensorboard is not None:
                for tag, value in scalars.items():
                    self._tensorboard.add_scalar(tag, value, step)
                self._tensorboard.flush()
            if self._wandb_run is not None:
                self._wandb_run.log(scalars, step=step)

    def close(self, *, failed: bool = False) -> None:
        """Close the file and the TensorBoard writer and finish the W&B run (marked failed when ``failed``).
        Closing twice does nothing."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._file is not None:
                self._file.close()
            if self._tensorboard is not None:
                self._tensorboard.close()
        finally:
            if self._wandb_run is not None:
                if failed:
                    self._wandb_run.finish(exit_code=1)
                else:
                    self._wandb_run.finish()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> None:
        self.close(failed=exc_type is not None)


def read_metrics(run_folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The lines of ``RUN/metrics.jsonl`` (or of the ``.jsonl`` file given), each a dict with an int ``step``.

    A last line cut off mid-write (a run killed while logging) is skipped; any other line that is not a JSON
    object with an integer ``step`` raises :class:`~mapjax.errors.FinetuneError` naming the file and line.
    """
    path = Path(run_folder)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FinetuneError(f"no metrics file at {path} (a run folder holds {METRICS_FILE} once a step is logged)")
    return [record for _, _, record in _parse_lines(path)]


def _parse_lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(line number, line text with its newline, parsed record) of each complete line of a metrics file."""
    with open(path, "rb") as file:
        data = file.read()
    pieces = data.split(b"\n")   # the last piece is b"" when the file ends with a newline
    for number, raw in enumerate(pieces, start=1):
        unterminated = number == len(pieces)
        if not raw.strip():   # a blank line, or the empty piece after the final newline
            continue
        where = f"{path}, line {number}"
        try:
            record = loads(raw, where, FinetuneError)
        except FinetuneError:
            if unterminated:   # the write in progress when the run was killed: the step is logged again on resume
                return
            raise
        if not isinstance(record, dict):
            raise FinetuneError(f"{where} is not a JSON object (got {type(record).__name__})")
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise FinetuneError(f"{where} has no whole-number 'step' field (got {step!r})")
        yield number, raw.decode("utf-8") + "\n", record


def _drop_steps_after(path: Path, resume_step: int) -> None:
    """Drop lines of steps after ``resume_step`` and a partial last line from ``path``, atomically and only if
    something must change."""
    if not path.exists():
        return
    with open(path, "rb") as file:
        original = file.read()
    kept = "".join(text for _, text, record in _parse_lines(path) if record["step"] <= resume_step).encode("utf-8")
    if kept != original:
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temporary, "wb") as file:
                file.write(kept)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    """``value`` with JAX arrays (and anything else exposing ``__array__``) turned into numpy, recursively."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, (str, bytes, np.ndarray, np.generic, numbers.Number)) or value is None:
        return value
    if hasattr(value, "__array__"):
        return np.asarray(value)
    return value


def _json_line(record: Mapping[str, Any]) -> str:
    """One line of strict JSON for ``record``; a value JSON cannot hold is a FinetuneError naming its field."""
    safe = jsonable(_plain(dict(record)))
    try:
        return json.dumps(safe, allow_nan=False, ensure_ascii=False, separators=(", ", ": "))
    except (TypeError, ValueError):
        for name, value in safe.items():
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise FinetuneError(
                    f"metric {name!r} cannot be written as JSON ({error}); pass numbers, text, lists or dicts"
                ) from None
        raise


def _numeric_scalars(metrics: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """(tag, value) of every numeric scalar in ``metrics``, nested keys joined with "/"; the rest is skipped."""
    for name, value in metrics.items():
        tag = f"{prefix}{name}"
        if isinstance(value, Mapping):
            yield from _numeric_scalars(value, prefix=f"{tag}/")
            continue
        value = _plain(value)
        if isinstance(value, np.ndarray):
            if value.ndim != 0:
                continue
            value = value[()]
        if isinstance(value, (bool, np.bool_)):
            yield tag, float(value)
        elif isinstance(value, (numbers.Real, np.integer, np.floating)):
            yield tag, float(value)


def _import_tensorboardx() -> Any:
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise FinetuneError(
            'tensorboard=True needs tensorboardX: pip install "mapjax[tensorboard]" (or pip install tensorboardX)'
        ) from None
    return SummaryWriter


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError:
        raise FinetuneError(
            'wandb_project needs Weights & Biases: pip install "mapjax[wandb]" (or pip install wandb)'
        ) from None
    return wandb


def _start_wandb(
    wandb: Any,
    run_folder: Path | None,
    resume_step: int,
    project: str,
    run_name: str,
    config: Mapping[str, Any] | None,
) -> Any:
    """``wandb.init`` with a run id kept in ``RUN/wandb-id.txt``: reused on resume, new for a fresh run."""
    run_id = None
    if run_folder is not None:
        id_file = run_folder / WANDB_ID_FILE
        if resume_step and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        if run_id is None:
            run_id = uuid.uuid4().hex[:16]
            id_file.write_text(run_id + "\n", encoding="utf-8")
    try:
        return wandb.init(
            project=project,
            name=run_name,
            config=jsonable(_plain(dict(config or {}))),
            dir=str(run_folder) if run_folder is not None else None,
            id=run_id,
            resume="allow",
        )
    except Exception as error:   # wandb's own errors (not logged in, no network) are the user's to fix
        raise FinetuneError(
            f"wandb.init for project {project!r} failed: {error} (run `wandb login`, or set WANDB_MODE=offline)"
        ) from error
