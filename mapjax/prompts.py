"""Prompt sources: the paper's two prompt sets, and local JSONL / JSON / text files.

- :func:`hh_rlhf_prompts`: Anthropic hh-rlhf (``harmless-base`` by default), the first human turn of each
  dialogue: the text between the first ``"Human: "`` and the first ``"Assistant:"``, stripped. The paper used
  all 2312 rows of the test split, in order.
- :func:`imdb_prompts`: IMDB reviews longer than 30 characters, shuffled with a seed, each cut at a word
  boundary within a target length drawn from 20..30 characters (the authors took the first 1000 unshuffled,
  which are all negative reviews).
- :func:`jsonl_prompts` (one JSON object a line, or a JSON list of objects) and :func:`text_prompts` (one
  prompt a line).
- :func:`load_prompts` picks one of these from a source name or a file path.

The hub loaders go through ``datasets.load_dataset``; pass ``data_files=`` (a path, list or ``{split: path}``)
to read the same records from local files instead (offline machines, tests).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from mapjax.errors import PromptSourceError
from mapjax.jsonio import loads

HH_RLHF_DATASET = "Anthropic/hh-rlhf"
IMDB_DATASET = "stanfordnlp/imdb"


# --------------------------------------------------------------------------------------------------------- #
# Hub datasets (or the same records in local files)
# --------------------------------------------------------------------------------------------------------- #
def _builder_for(path: str) -> str:
    """The ``datasets`` builder for a local data file, from its extension."""
    name = path.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    if name.endswith((".json", ".jsonl")):
        return "json"
    for builder in ("parquet", "csv", "arrow"):
        if name.endswith("." + builder):
            return builder
    raise PromptSourceError(f"cannot tell the format of {path}; use .jsonl, .json, .parquet, .csv or .arrow")


def load_records(dataset: str, split: str, *, data_dir: str | None = None,
                 data_files: str | os.PathLike | Sequence[str | os.PathLike] | dict[str, Any] | None = None
                 ) -> Any:
    """A ``datasets.Dataset`` split from the hub (or its cache), or from local ``data_files``."""
    from datasets import load_dataset

    if data_files is None:
        return load_dataset(dataset, data_dir=data_dir, split=split)
    if isinstance(data_files, dict):
        files = {key: [str(path) for path in (value if isinstance(value, (list, tuple)) else [value])]
                 for key, value in data_files.items()}
        if split not in files:
            raise PromptSourceError(f"split {split!r} is not in data_files; it has {sorted(files)}")
    else:
        paths = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        files = {split: [str(path) for path in paths]}
    for path in files[split]:
        if not Path(path).is_file():
            raise PromptSourceError(f"data file {path} does not exist")
    return load_dataset(_builder_for(files[split][0]), data_files=files, split=split)


def first_human_turn(dialogue: str, row: int | None = None) -> str:
    """The text between the first ``"Human: "`` and the first ``"Assistant:"``, stripped.

    Raises PromptSourceError (naming the row) when either marker is missing, the assistant marker comes
    first, or the turn is empty.
    """
    where = f"row {row}: " if row is not None else ""
    if not isinstance(dialogue, str):
        raise PromptSourceError(f"{where}the dialogue is {type(dialogue).__name__}, not text")
    human = dialogue.find("Human: ")
    assistant = dialogue.find("Assistant:")
    if human < 0:
        raise PromptSourceError(f"{where}no 'Human: ' turn in dialogue {dialogue[:80]!r}")
    if assistant < 0:
        raise PromptSourceError(f"{where}no 'Assistant:' turn in dialogue {dialogue[:80]!r}")
    start = human + len("Human: ")
    if assistant < start:
        raise PromptSourceError(f"{where}'Assistant:' comes before the first 'Human: ' in {dialogue[:80]!r}")
    turn = dialogue[start:assistant].strip()
    if not turn:
        raise PromptSourceError(f"{where}the first human turn is empty in {dialogue[:80]!r}")
    return turn


def hh_rlhf_prompts(split: str = "test", count: int | None = None, *, data_dir: str = "harmless-base",
                    dataset: str = HH_RLHF_DATASET, field: str = "chosen", skip_malformed: bool = False,
                    seed: int | None = None,
                    data_files: str | os.PathLike | Sequence[str | os.PathLike] | dict[str, Any] | None = None
                    ) -> list[str]:
    """First human turns of hh-rlhf dialogues (the paper: ``harmless-base``, ``test``, all 2312 rows).

    Args:
      split: dataset split. count: how many prompts (default all); more than there are is an error.
      data_dir: hh-rlhf subset (``harmless-base``, ``helpful-base``, ...); ignored with ``data_files``.
      field: the record field that holds the dialogue (``chosen``; ``rejected`` has the same first turn).
      skip_malformed: drop dialogues without a well-formed first turn instead of raising.
      seed: shuffle the rows with this seed before taking ``count`` (default: file order, as the paper).
      data_files: read these local files (the hh-rlhf JSONL records) instead of the hub.
    """
    records = load_records(dataset, split, data_dir=data_dir, data_files=data_files)
    if field not in records.column_names:
        raise PromptSourceError(f"hh-rlhf records have no field {field!r}; fields: {records.column_names}")
    prompts = []
    for row, dialogue in enumerate(records[field]):
        try:
            prompts.append(first_human_turn(dialogue, row))
        except PromptSourceError:
            if not skip_malformed:
                raise
    return _select(prompts, count, seed, f"hh-rlhf {split}")


def cut_at_word_boundary(text: str, length: int) -> str:
    """``text`` cut to at most ``length`` characters, at the last space within them (whole text if short).

    A first word longer than ``length`` is cut inside the word. A word that ends exactly at ``length`` is
    kept (the authors' rule dropped it).
    """
    if len(text) <= length:
        return text
    if text[length] == " ":
        return text[:length].rstrip(" ") or text[:length]
    end = text[:length].rfind(" ")
    return text[:length] if end <= 0 else text[:end]


def imdb_prompts(split: str = "train", count: int | None = 1000, seed: int = 0, *, min_chars: int = 20,
                 max_chars: int = 30, min_review_chars: int = 30, dataset: str = IMDB_DATASET,
                 field: str = "text",
                 data_files: str | os.PathLike | Sequence[str | os.PathLike] | dict[str, Any] | None = None
                 ) -> list[str]:
    """IMDB review openings as prompts.

    Reviews longer than ``min_review_chars`` characters are shuffled with ``seed``; the first ``count`` are
    each cut at a word boundary within a target length drawn uniformly from ``min_chars..max_chars`` (same
    seed), so a prompt may end a few characters short of its target.
    """
    if not 0 < min_chars <= max_chars:
        raise PromptSourceError(f"need 0 < min_chars <= max_chars; got {min_chars} and {max_chars}")
    records = load_records(dataset, split, data_files=data_files)
    if field not in records.column_names:
        raise PromptSourceError(f"IMDB records have no field {field!r}; fields: {records.column_names}")
    reviews = [text for text in records[field] if isinstance(text, str) and len(text) > min_review_chars]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(reviews))
    chosen = _take(order, count, len(reviews), f"IMDB {split} (reviews over {min_review_chars} characters)")
    lengths = rng.integers(min_chars, max_chars + 1, size=len(chosen))
    return [cut_at_word_boundary(reviews[index], int(length)) for index, length in zip(chosen, lengths)]


# --------------------------------------------------------------------------------------------------------- #
# Local files
# --------------------------------------------------------------------------------------------------------- #
def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PromptSourceError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise PromptSourceError(f"{path} is not UTF-8 text: {error}") from None


def _prompt_from_record(record: Any, field: str, where: str) -> str:
    if isinstance(record, str):  # a bare JSON string is the prompt itself
        record = {field: record}
    if not isinstance(record, dict):
        raise PromptSourceError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise PromptSourceError(f"{where}: no field {field!r}; fields: {sorted(record)}")
    value = record[field]
    if not isinstance(value, str):
        raise PromptSourceError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    if not value.strip():
        raise PromptSourceError(f"{where}: field {field!r} is empty")
    return value


def jsonl_prompts(path: str | os.PathLike, field: str = "prompt", count: int | None = None, *, start: int = 0,
                  seed: int | None = None) -> list[str]:
    """The ``field`` of each record of a JSONL file (one object a line; blank lines skipped).

    A line holding a bare JSON string is taken as the prompt; a ``.json`` file holding a list works too. Errors name the file, line (or record) and field.
    ``start``/``count`` choose a slice of the records; ``seed`` shuffles them first.
    """
    path = Path(path)
    if path.suffix == ".json":
        records = loads("\n".join(_read_lines(path)), str(path), PromptSourceError)
        if not isinstance(records, list):
            raise PromptSourceError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
        prompts = [_prompt_from_record(record, field, f"{path} record {index}")
                   for index, record in enumerate(records)]
    else:
        prompts = []
        for number, line in enumerate(_read_lines(path), start=1):
            if not line.strip():
                continue
            record = loads(line, f"{path} line {number}", PromptSourceError)
            prompts.append(_prompt_from_record(record, field, f"{path} line {number}"))
    return _select(prompts, count, seed, str(path), start)


def text_prompts(path: str | os.PathLike, count: int | None = None, *, start: int = 0, seed: int | None = None
                 ) -> list[str]:
    """One prompt per line of a UTF-8 text file; blank lines are skipped, line ends removed."""
    path = Path(path)
    prompts = [line for line in _read_lines(path) if line.strip()]
    return _select(prompts, count, seed, str(path), start)


def load_prompts(source: str | os.PathLike, *, split: str | None = None, count: int | None = None,
                 seed: int | None = None, field: str | None = None, **options: Any) -> list[str]:
    """Prompts from a named source or a file.

    ``source`` is ``"hh-rlhf"`` (alias ``"anthropic-harmless"``; split default ``test``), ``"imdb"`` (split
    default ``train``, seed default 0), or a path: ``.jsonl``/``.json`` (``field`` names the prompt field) or
    any other file read as text, one prompt a line. ``field`` defaults to ``prompt`` for JSON files and to
    the dataset's own field otherwise. Other keyword options go to the loader.
    """
    name = str(source)
    if field is not None:
        options["field"] = field
    if name in ("hh-rlhf", "anthropic-harmless"):
        return hh_rlhf_prompts(split or "test", count, seed=seed, **options)
    if name == "imdb":
        return imdb_prompts(split or "train", count if count is not None else 1000,
                            seed if seed is not None else 0, **options)
    if split is not None:
        raise PromptSourceError(f"{name}: a local file has no splits; use start= and count= to take a part")
    path = Path(name)
    if path.suffix in (".jsonl", ".json"):
        return jsonl_prompts(path, count=count, seed=seed, **options)
    if not path.exists():
        raise PromptSourceError(f"unknown prompt source {name!r}: not 'hh-rlhf', 'imdb' or an existing file")
    if field is not None:
        raise PromptSourceError(f"{name}: a text file has no fields; field= is for JSON files")
    return text_prompts(path, count, seed=seed, **options)


# --------------------------------------------------------------------------------------------------------- #
# Selection
# --------------------------------------------------------------------------------------------------------- #
def _take(order: Iterable[int], count: int | None, available: int, source: str, start: int = 0) -> list[int]:
    order = list(order)
    if start < 0:
        raise PromptSourceError(f"{source}: start must be >= 0, got {start}")
    if count is not None and count < 0:
        raise PromptSourceError(f"{source}: count must be >= 0, got {count}")
    stop = available if count is None else start + count
    if stop > available or start > available:
        raise PromptSourceError(f"{source}: asked for prompts {start}..{stop - 1} but it has {available}")
    return order[start:stop]


def _select(prompts: list[str], count: int | None, seed: int | None, source: str, start: int = 0
            ) -> list[str]:
    """``count`` prompts from ``start``, after a seeded shuffle when ``seed`` is given."""
    order = np.random.default_rng(seed).permutation(len(prompts)) if seed is not None else range(len(prompts))
    return [prompts[index] for index in _take(order, count, len(prompts), source, start)]


def chat_formatter(tokenizer: Any) -> Any:
    """``format_prompt`` for ``build_pool``: a request wrapped in the tokenizer's chat template (an instruct model
    answers it); ``None`` (prompts fed raw) when the tokenizer has no template."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def format_prompt(prompt: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return format_prompt
