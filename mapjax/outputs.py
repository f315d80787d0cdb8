"""The one guard every command and API that writes goes through: never destroy what the user gave.

Three rules, checked before any work (see ``docs/outputs.md``):

1. **An output is never an input.** It may not be, hold, or sit inside any file or folder the command reads
   (compared as real paths, so symlinks and ``..`` cannot hide it), and it is never the current folder or one
   of its parents. Breaking this is an :class:`~mapjax.errors.OutputAliasError`, ``--overwrite`` or not.
2. **``--overwrite`` replaces only what mapjax wrote.** A file only if it is a mapjax pool or result (a build
   manifest beside it, or it reads as a reward pool); a folder only if it carries mapjax's run marker
   (:data:`RUN_MARKER`, written when a run starts) or the files an older mapjax run left. Anything else is an
   :class:`~mapjax.errors.OutputNotOursError`.
3. **Replacement is atomic.** The new output is made beside the old one (:func:`staging_file`,
   :func:`staging_folder`) and renamed into place only once complete, so an interrupted ``--overwrite``
   leaves the old output, and its manifest, as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

from mapjax.errors import InputError, OutputAliasError, OutputExistsError, OutputNotOursError

# Written into every folder a mapjax run makes (finetuning runs, the demo, experiments): what --overwrite and
# --force look for before they replace a folder.
RUN_MARKER = ".mapjax-run.json"
# The infix of an output being rebuilt beside the one it will replace.
STAGING_INFIX = ".replacing"

PathLike = str | os.PathLike


def real_path(path: PathLike) -> Path:
    """``path`` with ``~`` expanded, made absolute, and every symlink and ``..`` resolved (it need not exist)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def check_not_working_folder(output: PathLike, flag: str = "--out") -> None:
    """Refuse an output that is the current folder or one of its parents (writing there replaces the very
    folder the user works in)."""
    here = real_path(Path.cwd())
    target = real_path(output)
    if target == here:
        raise OutputAliasError(f"{flag} {output} is the current folder; give a new folder for the output")
    if target in here.parents:
        raise OutputAliasError(f"{flag} {output} holds the current folder ({here}); give a new folder for the "
                               "output")


def check_not_input(output: PathLike, inputs: Mapping[str, Any], flag: str = "--out") -> None:
    """Refuse an output that is, holds, or sits inside any of ``inputs`` ({flag or name: path}; entries that are
    None, or names that are no path on disk, such as a hub id or ``hh-rlhf``, are skipped)."""
    target = real_path(output)
    for name, value in inputs.items():
        if value is None or not isinstance(value, (str, os.PathLike)) or str(value) == "":
            continue
        if not Path(value).expanduser().exists():
            continue
        source = real_path(value)
        if target == source:
            raise OutputAliasError(f"{flag} {output} is the input {name} {value}; writing it would destroy what "
                                   f"the command reads: choose another {flag}")
        if source in target.parents:
            raise OutputAliasError(f"{flag} {output} lies inside the input {name} {value}; writing there would "
                                   f"change what the command reads: choose a {flag} outside it")
        if target in source.parents:
            raise OutputAliasError(f"{flag} {output} holds the input {name} {value}; replacing it would destroy "
                                   f"what the command reads: choose another {flag}")


# ------------------------------------------------------------------------------------------------------ files
def build_manifest_path(pool_file: PathLike) -> Path:
    """Where a pool build records its settings and progress: ``<pool>.manifest.json`` beside the pool."""
    path = Path(pool_file).expanduser()
    return path.with_name(path.name + ".manifest.json")


def is_mapjax_pool(path: PathLike) -> bool:
    """Whether ``path`` is a pool or result mapjax wrote: a build manifest beside it, or it reads as a reward
    pool (what ``RewardPool.save`` writes)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    if build_manifest_path(path).is_file():
        return True
    from mapjax.errors import MapjaxError
    from mapjax.pool import RewardPool

    try:
        RewardPool.load(path)
    except (MapjaxError, OSError, ValueError, TypeError, KeyError, RecursionError):
        return False
    return True


def check_file_output(path: PathLike, *, overwrite: bool, flag: str = "--out", inputs: Mapping[str, Any] | None
                      = None, exists_ok: bool = False, replaceable: Callable[[Path], bool] = is_mapjax_pool,
                      what: str = "a mapjax pool or result") -> Path:
    """The file ``path`` a command is about to write, checked before any work.

    Refused: a folder (or the current folder), a path that is, holds or sits inside an input (``inputs``), an
    existing file without ``overwrite`` (unless ``exists_ok``: the caller resumes it), and with ``overwrite`` an
    existing file that ``replaceable`` does not recognise as ``what`` mapjax wrote.
    """
    path = Path(path).expanduser()
    check_not_working_folder(path, flag)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; give a file")
    check_not_input(path, inputs or {}, flag)
    if path.exists() and not exists_ok:
        if not overwrite:
            raise OutputExistsError(f"{flag} {path} exists; pass --overwrite or choose another {flag}")
        if not replaceable(path):
            raise OutputNotOursError(f"{flag} {path} exists and is not {what}; --overwrite replaces only what "
                                     f"mapjax wrote: move it away or choose another {flag}")
    return path


def staging_file(out: PathLike) -> Path:
    """Where a replacement of the file ``out`` is made before it takes ``out``'s place (same folder, so the
    final rename is atomic; same suffix, so its format is ``out``'s)."""
    out = Path(out)
    return out.with_name(out.name + STAGING_INFIX + out.suffix)


# ---------------------------------------------------------------------------------------------------- folders
def write_run_marker(folder: PathLike, kind: str, **details: Any) -> Path:
    """Mark ``folder`` as a mapjax run of ``kind`` (``finetune``, ``demo``, ``experiment``), so a later
    ``--overwrite`` or ``--force`` may replace it; returns the marker's path."""
    from mapjax import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / RUN_MARKER
    if not marker.is_file():
        partial = marker.with_name(marker.name + ".tmp")
        partial.write_text(json.dumps({"kind": kind, "mapjax": __version__, **details}, indent=1), encoding="utf-8")
        os.replace(partial, marker)
    return marker


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _older_run(folder: Path) -> bool:
    """A folder an older mapjax (before the run marker) left: a finetuning run (its ``losses.json``, or Orbax
    step folders under ``checkpoints/``) or a demo (``summary.json`` with ``report.md``)."""
    losses = _json_object(folder / "losses.json") if (folder / "losses.json").is_file() else None
    if losses is not None and {"method", "losses"} <= set(losses):
        return True
    checkpoints = folder / "checkpoints"
    if checkpoints.is_dir():
        steps = [entry for entry in checkpoints.iterdir() if not entry.name.startswith(".")]
        if steps and all(entry.is_dir() and entry.name.isdigit() for entry in steps):
            return True
    summary = _json_object(folder / "summary.json") if (folder / "summary.json").is_file() else None
    return summary is not None and "palette_met" in summary and (folder / "report.md").is_file()


def is_mapjax_folder(folder: PathLike) -> bool:
    """Whether ``folder`` is a run mapjax made (its run marker, or what an older mapjax run left)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        return False
    return (folder / RUN_MARKER).is_file() or _older_run(folder)


def check_output_folder(path: PathLike, *, overwrite: bool = False, flag: str = "--out",
                        inputs: Mapping[str, Any] | None = None, overwrite_flag: str = "--overwrite") -> Path:
    """The folder ``path`` a run is about to write, checked before any work.

    Refused: the current folder or one of its parents, a path that is, holds or sits inside an input, a file,
    and a folder holding anything mapjax did not write (with ``overwrite`` or without: a run never writes into
    or replaces a folder of the user's). An empty folder, a new one, or a mapjax run is accepted; what happens
    to a run already there (resume, refusal, replacement) is the caller's to decide.
    """
    path = Path(path).expanduser()
    check_not_working_folder(path, flag)
    check_not_input(path, inputs or {}, flag)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file; give a folder")
    if path.is_dir() and any(path.iterdir()) and not is_mapjax_folder(path):
        action = f"{overwrite_flag} replaces" if overwrite else "mapjax writes into"
        raise OutputNotOursError(f"{flag} {path} holds files mapjax did not write ({action} only its own runs, "
                                 f"marked by {RUN_MARKER}): choose a new or empty {flag}")
    return path


def staging_folder(out: PathLike, overwrite: bool) -> Path:
    """Where a run is made: ``out`` itself, or under ``overwrite`` a staging folder beside an ``out`` that holds
    anything (it takes ``out``'s place only once the run is complete, see :func:`replace_folder`)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the run")
    if overwrite and out.is_dir() and any(out.iterdir()):
        return out.with_name(out.name + STAGING_INFIX)
    return out


def replace_folder(new: PathLike, out: PathLike) -> None:
    """Put the complete run ``new`` in the place of ``out``: two renames, then the old run is deleted."""
    new, out = Path(new), Path(out)
    retired = out.with_name(out.name + ".replaced")
    if retired.exists():
        shutil.rmtree(retired)
    os.replace(out, retired)
    os.replace(new, out)
    shutil.rmtree(retired)
