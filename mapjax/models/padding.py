"""Token rows to padded batches: power-of-two length buckets and batch sizes, left/right padding, the pad id.

Every jitted forward pass in mapjax (sampling, scoring, rewards, finetuning) takes batches whose length is a
power of two (at least ``MIN_BUCKET``, at most the model's limit) and whose row count is a power of two (at most
the batch size), so only a handful of shapes ever occur and each compiles once.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import numpy as np

from mapjax.errors import InputError

# Shortest length bucket: tiny inputs share one program instead of compiling for 1, 2, 4 tokens.
MIN_BUCKET = 8

Side = Literal["left", "right"]


def next_power_of_two(value: int) -> int:
    """The smallest power of two >= ``value`` (1 for values <= 1)."""
    return 1 << max(0, int(value) - 1).bit_length()


def length_bucket(length: int, cap: int | None = None) -> int:
    """The padded length of a batch whose longest row has ``length`` tokens: a power of two >= ``MIN_BUCKET``,
    cut to ``cap`` (the model's or the truncation limit) when given."""
    bucket = max(MIN_BUCKET, next_power_of_two(length))
    return bucket if cap is None else min(bucket, cap)


def rows_per_batch(rows: int, batch_size: int) -> int:
    """Rows of one compiled call: a power of two, at most ``batch_size`` (a small job gets a small batch
    rather than a mostly empty full one)."""
    return min(batch_size, next_power_of_two(rows))


def pad_rows(rows: Sequence[Sequence[int]], width: int, pad_id: int, side: Side = "right"
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, int32 ``[len(rows), width]``, each row padded with ``pad_id`` on ``side``.

    Left padding puts every row's last token in the last column (what a sampler continues from); right
    padding puts every row's first token in the first column.
    """
    if side not in ("left", "right"):
        raise InputError(f"side must be 'left' or 'right', got {side!r}")
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for index, row in enumerate(rows):
        length = len(row)
        if length > width:
            raise InputError(f"row {index} has {length} tokens, more than the batch width {width}")
        if not length:
            continue
        span = slice(width - length, width) if side == "left" else slice(0, length)
        ids[index, span] = row
        mask[index, span] = 1
    return ids, mask


def _first_id(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):   # configs may list several EOS ids; the first is the main one
        value = value[0] if value else None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return None


def pad_token_id(tokenizer: Any, model: Any = None) -> int:
    """The id to pad with: the model config's pad id, else the tokenizer's, else the tokenizer's EOS id, else
    the model config's EOS id, else 0.

    The model's own pad id comes first because some models read it (RoBERTa counts positions over the tokens
    that are not its pad id; GPT-2 classifiers score the last token that is not it). Elsewhere padded slots
    are masked out, so any id works there.
    """
    config = getattr(model, "config", None)
    for value in (getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                  getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        found = _first_id(value)
        if found is not None:
            return found
    return 0
