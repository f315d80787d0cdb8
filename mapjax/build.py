"""Build a reward pool: sample continuations from a policy, score them with each value, write the pool.

``build_pool`` works through the prompts in chunks. Each finished chunk is appended to ``<out>.partial.jsonl`` (JSON
Lines, one record per sample) and recorded in ``<out>.manifest.json`` (the settings, a hash of the prompts and
of the policy, and how many prompts and bytes are done). Run again with the same arguments after an
interruption and it resumes after the last finished chunk: bytes past the recorded size (a chunk cut off
mid-write) are dropped, so no row is lost or written twice. Because each row's random key depends only on
(seed, prompt index, sample index), a resumed build gives exactly the pool an uninterrupted one gives. A
resume with different settings is refused, a different ``dtype`` (of the policy or of the reward models)
included. When every chunk is done the pool is written to ``out`` (``.jsonl``,
``.json`` or ``.parquet``) and the manifest is kept, marked complete, so a rerun returns the finished pool.
``overwrite=True`` starts afresh, but an existing pool stays in ``out`` until the new one is complete: the new build
is made beside it, in ``<out>.replacing<suffix>`` with its own partial file and manifest, and takes ``out``'s place
(pool, then manifest) by rename only once complete. An interrupted rebuild leaves the old pool *and its manifest*
as they were, so a rerun of the old settings still returns the old pool; the same ``overwrite=True`` call again
resumes the rebuild. ``overwrite`` replaces only a mapjax pool (:func:`mapjax.outputs.check_file_output`).

Several processes under ``jax.distributed`` (one per host, :mod:`mapjax.distributed`) build one pool together:
the chunks are cut into one contiguous part per process, each process writes its part to
``<out>.part-<i>-of-<n>.jsonl.partial.jsonl`` with a manifest of its own (resumed like the single-process files),
and once every part is done process 0 joins them in prompt order into ``out`` and ``<out>.manifest.json``: the
same bytes a single process writes, since every chunk holds the same prompts and rows keep their keys.

Resolving values, scoring a chunk, the fingerprints and reading a manifest live in :mod:`mapjax.scoring`, shared with
finetuning; this module keeps the resumable pipeline around them.

Records follow the authors' schema plus a grouping key: ``{prompt_id, prompt, generated, <value>: number}``
where ``generated`` is the continuation only (the text of the new tokens); ``RewardPool.load`` reads it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from mapjax import scoring
from mapjax.distributed import contiguous_share
from mapjax.dtypes import DEFAULT_DTYPE, DTYPES, dtype_name, model_dtype_name
from mapjax.errors import BuildError  # re-exported: mapjax.build.BuildError keeps working
from mapjax.generate import generate
from mapjax.limits import check_sampled_rows
from mapjax.outputs import staging_file
from mapjax.pool import RewardPool
from mapjax.scoring import (  # also re-exported for code written against mapjax.build
    RewardColumn,  # noqa: F401
    ScoredValue,
    model_fingerprint,
    prompts_hash,
    resolve_values,
)

MANIFEST_VERSION = 1


POOL_SUFFIXES = (".jsonl", ".json", ".parquet")


def check_output(out: str | os.PathLike, *, overwrite: bool, inputs: Mapping[str, Any] | None = None,
                 flag: str = "out") -> Path:
    """The pool file a build writes, checked before any work: a known format, not a folder, not the current
    folder nor any of ``inputs`` ({flag: path}, see :func:`mapjax.outputs.check_not_input`), and not a file of
    its own (one no build manifest records) unless ``overwrite``, which replaces only a mapjax pool. A build's
    own output is resumed or returned."""
    from mapjax.outputs import check_file_output

    path = Path(out).expanduser()
    if path.suffix.lower() not in POOL_SUFFIXES:
        raise BuildError(f"{path}: unknown pool format {path.suffix!r}; use {', '.join(POOL_SUFFIXES)}")
    if path.is_dir():
        raise BuildError(f"{path} is a folder; give a pool file")
    if path.exists() and not overwrite and not scoring.manifest_path(path).exists():
        raise BuildError(f"{path} exists and was not written by an unfinished build; pass overwrite=True "
                         "(--overwrite) to replace it")
    return check_file_output(path, overwrite=overwrite, flag=flag, inputs=inputs, exists_ok=not overwrite)


def recorded_dtype(pool_file: str | os.PathLike) -> str | None:
    """The reward models' dtype the build of ``pool_file`` recorded in its manifest; None when there is no
    manifest (a pool from elsewhere) or it predates the setting. Lets later scoring (e.g. finetuning's
    evaluation) use the models the pool was scored with."""
    manifest = scoring.manifest_path(Path(pool_file).expanduser())
    if not manifest.is_file():
        return None
    value = scoring.read_manifest(manifest).get("settings", {}).get("dtype")
    return value if value in DTYPES else None


def _partial_path(out: Path) -> Path:
    """The file an unfinished build of ``out`` appends its chunks to (its manifest is
    :func:`mapjax.scoring.manifest_path`)."""
    # It ends in .jsonl so that RewardPool.load reads it as it is.
    return out.with_name(out.name + ".partial.jsonl")


def _records_for_chunk(first_prompt: int, prompts: Sequence[str], generation: Any, scores: dict[str, np.ndarray]
                       ) -> list[dict[str, Any]]:
    records = []
    for row in range(len(generation.texts)):
        prompt_id = first_prompt + int(generation.prompt_index[row])
        record: dict[str, Any] = {"prompt_id": prompt_id, "prompt": prompts[prompt_id],
                                  "generated": generation.texts[row]}
        for name, values in scores.items():
            record[name] = float(values[row])
        records.append(record)
    return records


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(manifest, indent=1, allow_nan=False), encoding="utf-8")
    os.replace(partial, path)   # atomic: a crash leaves the old manifest or the new one, never half of one


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{key}: {old.get(key)!r} then, {new.get(key)!r} now" for key in keys if old.get(key) != new.get(key)]


def _comparable(recorded: Mapping[str, Any], settings: Mapping[str, Any]
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """A manifest's settings and this call's, made comparable across mapjax versions: builds from before the
    dtype was recorded scored with float32 reward models, and their policy's dtype is in its fingerprint."""
    recorded, settings = dict(recorded), dict(settings)
    recorded.setdefault("dtype", DEFAULT_DTYPE)
    if "policy_dtype" not in recorded:
        settings.pop("policy_dtype", None)
    return recorded, settings


def build_pool(policy: Any, tokenizer: Any, prompts: Sequence[str], values: Sequence[Any] | str, *,
               samples_per_prompt: int = 1, out: str | os.PathLike | None = None, chunk_size: int = 64,
               seed: int = 0, max_new_tokens: int = 50, top_k: int | None = 50, top_p: float = 1.0,
               temperature: float = 1.0, batch_size: int = 16, eos_token_id: int | Sequence[int] | None = None,
               reward_options: Mapping[str, Mapping[str, Any]] | None = None, progress: bool = True,
               overwrite: bool = False, format_prompt: Callable[[str], str] | None = None,
               dtype: Any = None, mesh: Any = None) -> RewardPool:
    """Sample ``samples_per_prompt`` continuations per prompt, score each value, and return (and write) the pool.

    Args:
        policy, tokenizer: the mapjax causal LM that generates, and its tokenizer.
        prompts: prompt texts (fed raw).
        values: reward names (``mapjax.rewards.get_reward``; ``"perplexity"`` is scored under ``policy``) or
            Reward instances (callables ``(prompts, continuations) -> scores`` with a ``.name``), or a
            comma-separated string of names. The pool's columns follow this order. A multi-objective reward (one
            whose ``.names`` lists k > 1 outputs, e.g. ``mapjax.rewards.reward_model``) gives k columns named by
            ``.names``, all filled from one ``.scores`` call per chunk.
        samples_per_prompt: continuations per prompt (k for MAP-D).
        out: pool file (``.jsonl``, ``.json`` or ``.parquet``); ``None`` keeps everything in memory (no resume).
        chunk_size: prompts per chunk; a chunk is the unit of progress saved to disk.
        seed, max_new_tokens, top_k, top_p, temperature, batch_size, eos_token_id: passed to ``generate``.
        reward_options: keyword options per reward name, e.g. ``{"coherence": {"batch_size": 64}}``.
        progress: show a tqdm bar over prompts.
        overwrite: start afresh even if ``out`` or an unfinished build of it exists (``out`` is replaced only
            once the new pool is complete).
        format_prompt: how the policy sees a prompt (e.g. wrapped in its chat template); the pool and the
            rewards keep the prompt as given.
        dtype: parameter dtype of the reward models built by name, ``"float32"`` or ``"bfloat16"`` (or a JAX
            dtype); None: the policy's dtype (load the policy with ``load_policy(path, dtype)``). Scores are
            float32 either way. The manifest records it and the policy's dtype: a resume with another is refused.
        mesh: devices to shard the sampling and the reward models' batches over (a ``jax.sharding.Mesh``, a
            spec like ``"data=8"`` or ``{"data": 8}``; see :func:`mapjax.sharding.as_mesh`); None: one device.
            The pool does not depend on it, so a build may resume on another mesh. In a multi-process run a
            spec covers this process's own devices (``jax.local_devices()``).

    Under ``jax.distributed`` with several processes (:mod:`mapjax.distributed`) every process calls this with
    the same arguments and ``out`` on a filesystem they all share. The chunks are split into one contiguous part
    per process; each writes ``<out>.part-<i>-of-<n>.jsonl.partial.jsonl`` with its own manifest, then process 0
    merges the parts in prompt order into ``out`` and its manifest, and every process returns the pool. Parts are
    cut on chunk boundaries, so each chunk holds the same prompts as in a single-process build and the pool is
    byte for byte the one a single process writes. An interrupted build resumes part by part, with any number of
    processes (the parts keep the count they were started with).

    Raises:
        BuildError: ``out`` holds a build with other settings (resume refused), or bad arguments.
    """
    from mapjax.sampling.inputs import check_positive_int, check_prompts

    prompts = check_prompts(prompts)
    samples_per_prompt = check_positive_int("samples_per_prompt", samples_per_prompt)
    chunk_size = check_positive_int("chunk_size", chunk_size)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("batch_size", batch_size)
    if top_k is not None:
        check_positive_int("top_k", top_k)
    values = values if isinstance(values, str) else list(values)
    # Before any file is written: a request this machine cannot hold is refused now, not after an hour.
    check_sampled_rows(len(prompts), samples_per_prompt, max_new_tokens=max_new_tokens,
                       values=len(values.split(",")) if isinstance(values, str) else len(values),
                       flag="samples_per_prompt", batch_size=batch_size, chunk_size=chunk_size,
                       prompt_chars=sum(map(len, prompts)) / max(1, len(prompts)))
    policy_dtype = model_dtype_name(policy)
    if dtype is None:
        dtype = policy_dtype if policy_dtype in DTYPES else DEFAULT_DTYPE
    dtype = dtype_name(dtype, error=BuildError)   # before any reward model is loaded
    out_path = check_output(out, overwrite=overwrite) if out is not None else None
    processes = _process_count()
    if out_path is None and processes > 1:
        raise BuildError(f"a build on {processes} processes writes each process's part to files: give out= (a pool "
                         "file on a filesystem every process shares)")
    mesh = _local_mesh(mesh)
    resolved = resolve_values(values, policy, tokenizer, reward_options, dtype=dtype, mesh=mesh)
    generation_options = dict(max_new_tokens=int(max_new_tokens), top_k=top_k, top_p=float(top_p),
                              temperature=float(temperature), batch_size=int(batch_size), seed=int(seed),
                              eos_token_id=eos_token_id if eos_token_id is None or isinstance(eos_token_id, int)
                              else list(eos_token_id))
    settings = dict(generation_options, samples_per_prompt=samples_per_prompt, chunk_size=chunk_size,
                    values=[value.identity for value in resolved], prompts_sha256=prompts_hash(prompts),
                    formatted_prompts_sha256=None if format_prompt is None else prompts_hash(
                        [format_prompt(prompt) for prompt in prompts]),
                    prompt_count=len(prompts), policy=model_fingerprint(policy),
                    tokenizer=scoring.tokenizer_fingerprint(tokenizer), dtype=dtype, policy_dtype=policy_dtype)
    names = [value.name for value in resolved]
    work = _Work(policy, tokenizer, prompts, resolved, samples_per_prompt, chunk_size, generation_options,
                 format_prompt, mesh)

    if out_path is None:
        records: list[dict[str, Any]] = []
        done = 0
        with _progress_bar(progress, len(prompts), 0, "pool") as bar:
            for now_done, chunk_records in work.chunks(0, len(prompts)):
                records.extend(chunk_records)
                bar.update(now_done - done)
                done = now_done
        return RewardPool.from_records(records, value_names=names, source="build_pool")

    if processes > 1:
        _check_same_settings(settings, out_path)
    if _is_primary():
        _finish_interrupted_replacement(out_path)
    _barrier(f"mapjax.build: {out_path} checked")
    # Under overwrite an existing pool stays untouched, its manifest included: the new build is made beside it
    # (its own partial file, manifest and parts) and renamed into place once complete.
    target = staging_file(out_path) if overwrite and out_path.exists() else out_path
    partial_path, manifest_path = _partial_path(target), scoring.manifest_path(target)
    if overwrite:
        staged = scoring.read_manifest(manifest_path) if target != out_path and manifest_path.exists() else None
        resumes = staged is not None and not _differences(*_comparable(staged.get("settings", {}), settings))
        if _is_primary() and not resumes:   # start afresh (an interrupted rebuild of these settings resumes)
            for path in (partial_path, manifest_path, *_part_files(target)):
                path.unlink(missing_ok=True)
            if target != out_path:
                target.unlink(missing_ok=True)
        _barrier(f"mapjax.build: {target} cleared")
    manifest = scoring.read_manifest(manifest_path) if manifest_path.exists() else None
    if manifest is not None:
        _refuse_other_settings(out_path, manifest, settings)
        if manifest.get("complete") and target.exists():
            if target != out_path and _is_primary():
                _put_in_place(target, out_path)
            return RewardPool.load(out_path, value_names=names)

    parts = _layout(target, manifest, len(prompts), chunk_size, processes)
    mine = parts[contiguous_share(len(parts), _process_index(), processes)]
    total = sum(part.end - part.first for part in mine)
    label = "pool" if processes == 1 else f"pool (process {_process_index()} of {processes})"
    failure: BaseException | None = None
    try:
        states = [_open_part(part, settings) for part in mine]
        with _progress_bar(progress, total, sum(state["prompts_done"] for state in states), label) as bar:
            for part, state in zip(mine, states):
                _build_part(part, state, work, bar)
    except BaseException as error:   # an interrupt included: the other processes must not wait for this one
        failure = error
    _agree(failure is None, "building its part")
    if failure is not None:
        raise failure

    pool = None
    if _is_primary():
        try:
            pool = _finish(target, parts, settings, names)
            if target != out_path:
                _put_in_place(target, out_path)
        except BaseException as error:
            failure = error
    _agree(failure is None, "merging the parts into the pool")
    if failure is not None:
        raise failure
    return pool if pool is not None else RewardPool.load(out_path, value_names=names)


def _put_in_place(staged: Path, out_path: Path) -> None:
    """Move a complete rebuild (``staged`` and its manifest) into ``out_path``'s place: the pool, then its
    manifest, each in one rename. A kill between the two is finished by the next build of ``out_path``
    (:func:`_finish_interrupted_replacement`)."""
    os.replace(staged, out_path)
    os.replace(scoring.manifest_path(staged), scoring.manifest_path(out_path))


def _finish_interrupted_replacement(out_path: Path) -> None:
    """A rebuild killed between moving its pool into place and moving its manifest: the staged manifest is
    complete and its pool already is ``out_path``, so the manifest follows it."""
    staged = staging_file(out_path)
    staged_manifest = scoring.manifest_path(staged)
    if staged.exists() or not staged_manifest.is_file() or not out_path.exists():
        return
    if scoring.read_manifest(staged_manifest).get("complete"):
        os.replace(staged_manifest, scoring.manifest_path(out_path))


@dataclasses.dataclass(frozen=True)
class _Part:
    """A contiguous run of whole chunks, built by one process into its own files: the whole prompt list in a
    single-process build (``<out>.partial.jsonl`` and ``<out>.manifest.json``), else part ``index`` of ``count``
    (``<out>.part-<index>-of-<count>.jsonl`` + ``.partial.jsonl`` / ``.manifest.json``)."""

    index: int
    count: int
    first: int   # its first prompt's index in the whole list (a multiple of chunk_size)
    end: int     # one past its last prompt
    base: Path   # the pool file for a single part, else the part's own name

    @property
    def partial(self) -> Path:
        return _partial_path(self.base)

    @property
    def manifest(self) -> Path:
        return scoring.manifest_path(self.base)


def _part_base(out_path: Path, index: int, count: int) -> Path:
    return out_path.with_name(f"{out_path.name}.part-{index}-of-{count}.jsonl")


def _part_files(out_path: Path) -> list[Path]:
    """Every part file of ``out_path``'s multi-process builds, whatever their process count."""
    prefix = out_path.name + ".part-"
    if not out_path.parent.is_dir():
        return []
    return sorted(path for path in out_path.parent.iterdir() if path.name.startswith(prefix))


def _layout(out_path: Path, manifest: dict[str, Any] | None, prompt_count: int, chunk_size: int,
            processes: int) -> list[_Part]:
    """The parts this build consists of: those an unfinished build started with (resumed with any number of
    processes), else one per process (the single-process files when there is one process)."""
    pattern = re.compile(re.escape(out_path.name) + r"\.part-(\d+)-of-(\d+)\.jsonl\.manifest\.json")
    counts = {int(match.group(2)) for path in _part_files(out_path) if (match := pattern.fullmatch(path.name))}
    if len(counts) > 1:
        raise BuildError(f"{out_path}: unfinished builds on {sorted(counts)} processes left parts beside it; pass "
                         "overwrite=True (--overwrite) to start over")
    merging = manifest is not None and int(manifest.get("parts", 1)) > 1
    if manifest is not None and not merging:   # an unfinished single-process build
        if counts:
            raise BuildError(f"{out_path}: both a single-process build and parts of a {counts.pop()}-process build "
                             "are unfinished beside it; pass overwrite=True (--overwrite) to start over")
        count = 1
    elif merging:
        count = int(manifest["parts"])
    else:
        count = counts.pop() if counts else processes
    if count == 1:
        return [_Part(0, 1, 0, prompt_count, out_path)]
    chunks = -(-prompt_count // chunk_size)
    shares = [contiguous_share(chunks, index, count) for index in range(count)]
    return [_Part(index, count, min(share.start * chunk_size, prompt_count), min(share.stop * chunk_size, prompt_count),
                  _part_base(out_path, index, count)) for index, share in enumerate(shares)]


def _part_record(part: _Part) -> dict[str, int] | None:
    return None if part.count == 1 else {"index": part.index, "count": part.count, "first_prompt": part.first,
                                         "end_prompt": part.end}


def _open_part(part: _Part, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The part's manifest, created with an empty partial file when new; a resumed one is checked against this
    call's settings and its partial file cut back to the bytes it records (dropping a chunk cut off mid-write)."""
    if part.manifest.exists():
        manifest = scoring.read_manifest(part.manifest)
        _refuse_other_settings(part.base, manifest, settings)
        if manifest.get("part") != _part_record(part):
            raise BuildError(f"{part.manifest} records part {manifest.get('part')!r}, not {_part_record(part)!r}; "
                             "pass overwrite=True (--overwrite) to start over")
    else:
        manifest = {"version": MANIFEST_VERSION, "settings": dict(settings), "prompts_done": 0, "bytes_done": 0,
                    "complete": False}
        if part.count > 1:
            manifest["part"] = _part_record(part)
        part.manifest.parent.mkdir(parents=True, exist_ok=True)
        part.partial.write_bytes(b"")
        _write_manifest(part.manifest, manifest)
    if not part.partial.exists():
        raise BuildError(f"{part.partial} is missing but {part.manifest} says {manifest['prompts_done']} prompts "
                         "are done; pass overwrite=True to start over")
    with part.partial.open("r+b") as handle:   # drop a chunk that was cut off mid-write
        handle.truncate(int(manifest["bytes_done"]))
    return manifest


def _build_part(part: _Part, manifest: dict[str, Any], work: "_Work", bar: Any) -> None:
    """Generate, score and append the part's unfinished chunks, recording each in its manifest once on disk."""
    start = part.first + int(manifest["prompts_done"])
    for done, chunk_records in work.chunks(start, part.end):
        payload = "".join(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n" for record in chunk_records)
        with part.partial.open("ab") as handle:
            handle.write(payload.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        manifest.update(prompts_done=done - part.first, bytes_done=size)
        _write_manifest(part.manifest, manifest)
        bar.update(done - start)
        start = done
    if part.count > 1 and not manifest.get("complete"):
        manifest.update(complete=True)
        _write_manifest(part.manifest, manifest)


def _finish(out_path: Path, parts: Sequence[_Part], settings: Mapping[str, Any], names: list[str]) -> RewardPool:
    """Write the finished pool to ``out_path`` and mark its manifest complete; parts are first joined, in prompt
    order, into the single-process partial file (so the pool is byte for byte a single process's)."""
    partial_path, manifest_path = _partial_path(out_path), scoring.manifest_path(out_path)
    if len(parts) > 1:
        for part in parts:
            manifest = scoring.read_manifest(part.manifest) if part.manifest.exists() else None
            if manifest is None or not manifest.get("complete") or not part.partial.exists() \
                    or part.partial.stat().st_size != int(manifest["bytes_done"]):
                raise BuildError(f"{part.manifest}: part {part.index} of {part.count} is not finished where process 0 "
                                 "can see it; every process must write out= on a filesystem they all share")
        with partial_path.open("wb") as merged:
            for part in parts:
                with part.partial.open("rb") as handle:
                    while block := handle.read(1 << 20):
                        merged.write(block)
            merged.flush()
            os.fsync(merged.fileno())
            size = merged.tell()
        manifest = {"version": MANIFEST_VERSION, "settings": dict(settings), "prompts_done": parts[-1].end,
                    "bytes_done": size, "complete": False, "parts": len(parts)}
        _write_manifest(manifest_path, manifest)   # an interrupted merge is redone from the parts
    else:
        manifest = scoring.read_manifest(manifest_path)
    pool = RewardPool.load(partial_path, value_names=names)
    # Both ways replace an older pool in one rename: until then ``out`` holds the old pool whole.
    if out_path.suffix.lower() == ".jsonl":
        os.replace(partial_path, out_path)   # the partial file already is the pool, byte for byte
    else:
        pool.save(out_path, overwrite=True)   # written beside out_path, then renamed over it
        partial_path.unlink()
    manifest.update(complete=True)
    _write_manifest(manifest_path, manifest)
    for part in parts if len(parts) > 1 else ():
        part.partial.unlink(missing_ok=True)
        part.manifest.unlink(missing_ok=True)
    return pool


def _refuse_other_settings(path: Path, manifest: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    differences = _differences(*_comparable(manifest.get("settings", {}), settings))
    if differences:
        raise BuildError(f"{path}: refusing to resume a build made with other settings (" + "; ".join(differences)
                         + "); pass overwrite=True (--overwrite) to start over, or choose another output file")


@dataclasses.dataclass(frozen=True)
class _Work:
    """What every chunk is made with: the policy, the prompts, the rewards and the sampling options."""

    policy: Any
    tokenizer: Any
    prompts: list[str]
    resolved: Sequence[ScoredValue]
    samples: int
    chunk_size: int
    options: Mapping[str, Any]
    format_prompt: Callable[[str], str] | None
    mesh: Any

    def chunks(self, first: int, end: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """``(prompts done, records)`` for each chunk of ``prompts[first:end]`` (``first`` on a chunk boundary)."""
        for start in range(first, end, self.chunk_size):
            chunk = self.prompts[start:min(start + self.chunk_size, end)]
            shown = chunk if self.format_prompt is None else [self.format_prompt(prompt) for prompt in chunk]
            generation = _generate_chunk(self.policy, self.tokenizer, shown, start, self.samples, self.options,
                                         self.mesh)
            chunk_prompts = [chunk[i] for i in generation.prompt_index]
            scores = scoring.score_chunk(self.resolved, chunk_prompts, generation.texts)
            yield start + len(chunk), _records_for_chunk(start, self.prompts, generation, scores)


class _NoBar:
    def update(self, count: int) -> None:
        pass


@contextlib.contextmanager
def _progress_bar(show: bool, total: int, initial: int, label: str) -> Iterator[Any]:
    if not show:
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=label, unit="prompt")
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------------------------------- processes and devices
def _process_count() -> int:
    import jax

    return jax.process_count()


def _process_index() -> int:
    import jax

    return jax.process_index()


def _is_primary() -> bool:
    return _process_index() == 0


def _barrier(name: str) -> None:
    from mapjax.distributed import barrier

    barrier(name)


def _agree(ok: bool, doing: str) -> None:
    """Every process learns whether all of them succeeded (a barrier that does not hang on a failed process);
    the ones that did raise :class:`BuildError` naming the processes that did not."""
    if _process_count() == 1:
        return
    from mapjax.distributed import gather

    flags = gather(np.int32(ok))
    failed = [index for index, flag in enumerate(np.asarray(flags).reshape(-1)) if not flag]
    if failed and ok:
        raise BuildError(f"process(es) {failed} of {_process_count()} stopped while {doing} (see their error); "
                         "run the same command again to resume")


def _check_same_settings(settings: Mapping[str, Any], out_path: Path) -> None:
    """Every process of a multi-process build must build the same pool (same prompts, policy and options)."""
    from mapjax.distributed import gather

    digest = hashlib.sha256(json.dumps([str(out_path.name), dict(settings)], sort_keys=True).encode()).digest()
    digests = np.asarray(gather(np.frombuffer(digest, dtype=np.uint8)))
    differ = [index for index in range(digests.shape[0]) if not np.array_equal(digests[index], digests[0])]
    if differ:
        raise BuildError(f"processes {differ} of {digests.shape[0]} were given other prompts, values, policy or "
                         f"options than process 0 for {out_path.name}; every process must run the same command")


def _local_mesh(mesh: Any) -> Any:
    """``mesh`` as a Mesh (None stays None): over all devices in a single process, over this process's own
    devices when each of several processes builds its own part."""
    if mesh is None:
        return None
    import jax

    from mapjax.sharding import as_mesh

    if jax.process_count() == 1:
        return as_mesh(mesh)
    if isinstance(mesh, jax.sharding.Mesh):
        foreign = sorted({device.process_index for device in mesh.devices.flat} - {jax.process_index()})
        if foreign:
            raise BuildError(f"the mesh holds devices of processes {foreign}; in a multi-process build each process "
                             "samples its own prompts on its own devices: give a mesh over jax.local_devices() "
                             "or a spec such as 'data=8'")
        return mesh
    return as_mesh(mesh, jax.local_devices())


def _generate_chunk(policy: Any, tokenizer: Any, chunk: list[str], start: int, samples: int,
                    options: Mapping[str, Any], mesh: Any = None) -> Any:
    """``generate`` on one chunk, each row keyed by its index in the whole prompt list (chunking-invariant)."""
    return generate(policy, tokenizer, chunk, num_samples=samples, prompt_index_offset=start, mesh=mesh, **options)
