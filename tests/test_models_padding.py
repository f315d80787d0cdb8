"""The one place that pads token rows: length buckets, batch sizes, left/right padding and the pad id."""

from __future__ import annotations

import types

import numpy as np
import pytest

from mapjax.errors import InputError
from mapjax.models.padding import MIN_BUCKET, length_bucket, next_power_of_two, pad_rows, pad_token_id, rows_per_batch


def test_buckets_and_batch_sizes_are_powers_of_two():
    assert [next_power_of_two(n) for n in (0, 1, 2, 3, 8, 9)] == [1, 1, 2, 4, 8, 16]
    assert [length_bucket(n) for n in (1, MIN_BUCKET, 9, 33, 100)] == [8, 8, 16, 64, 128]
    assert [length_bucket(n, cap=48) for n in (9, 33, 100)] == [16, 48, 48]
    assert [rows_per_batch(rows, 16) for rows in (1, 3, 5, 16, 40)] == [1, 4, 8, 16, 16]
    assert rows_per_batch(5, 6) == 6   # a batch size that is not a power of two caps the bucket


def test_left_and_right_padding():
    rows = [[5, 6, 7], [8], []]
    ids, mask = pad_rows(rows, 4, pad_id=0, side="left")
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    ids, mask = pad_rows(rows, 4, pad_id=9, side="right")
    np.testing.assert_array_equal(ids, [[5, 6, 7, 9], [8, 9, 9, 9], [9, 9, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    assert ids.dtype == mask.dtype == np.int32
    with pytest.raises(InputError, match="row 0 has 3 tokens, more than the batch width 2"):
        pad_rows(rows, 2, pad_id=0)
    with pytest.raises(InputError, match="side must be 'left' or 'right'"):
        pad_rows(rows, 4, pad_id=0, side="middle")


def test_pad_id_prefers_the_model_then_the_tokenizer():
    model = types.SimpleNamespace(config=types.SimpleNamespace(pad_token_id=1, eos_token_id=[7, 8]))
    tokenizer = types.SimpleNamespace(pad_token_id=3, eos_token_id=4)
    assert pad_token_id(tokenizer, model) == 1          # RoBERTa-style: the model's own pad id
    model.config.pad_token_id = None
    assert pad_token_id(tokenizer, model) == 3
    tokenizer.pad_token_id = None
    assert pad_token_id(tokenizer, model) == 4          # GPT-2: pad with the end-of-text id
    tokenizer.eos_token_id = None
    assert pad_token_id(tokenizer, model) == 7          # the first of the config's EOS ids
    assert pad_token_id(tokenizer) == 0
