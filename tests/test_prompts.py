"""Prompt sources on records the tests write: hh-rlhf first turns, IMDB openings, local JSONL/JSON/text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mapjax.prompts import (
    PromptSourceError,
    cut_at_word_boundary,
    first_human_turn,
    hh_rlhf_prompts,
    imdb_prompts,
    jsonl_prompts,
    load_prompts,
    text_prompts,
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


HH_RECORDS = [
    {"chosen": "\n\nHuman: What is a good prank?\n\nAssistant: Put a whoopee cushion on a chair.",
     "rejected": "\n\nHuman: What is a good prank?\n\nAssistant: None."},
    {"chosen": "\n\nHuman:  How do I bake bread?  \n\nAssistant: Mix flour and water.\n\nHuman: And then?"
               "\n\nAssistant: Bake it.", "rejected": "x"},
    {"chosen": "\n\nHuman: Tell me about Human: nature\n\nAssistant: Sure.", "rejected": "x"},
]


# ----------------------------------------------------------------------------------------------------- #
# hh-rlhf
# ----------------------------------------------------------------------------------------------------- #
def test_first_human_turn_single_and_multi_turn():
    assert first_human_turn(HH_RECORDS[0]["chosen"]) == "What is a good prank?"
    # Multi-turn: only the first human turn, stripped.
    assert first_human_turn(HH_RECORDS[1]["chosen"]) == "How do I bake bread?"
    # Text up to the first "Assistant:", even if "Human: " occurs again inside the turn.
    assert first_human_turn(HH_RECORDS[2]["chosen"]) == "Tell me about Human: nature"


@pytest.mark.parametrize("dialogue, message", [
    ("\n\nAssistant: hello", "row 7: no 'Human: ' turn"),
    ("\n\nHuman: hello there", "row 7: no 'Assistant:' turn"),
    ("Assistant: first\n\nHuman: then", "row 7: 'Assistant:' comes before"),
    ("\n\nHuman:   \n\nAssistant: hi", "row 7: the first human turn is empty"),
    (None, "row 7: the dialogue is NoneType"),
])
def test_first_human_turn_malformed(dialogue, message):
    with pytest.raises(PromptSourceError, match=message):
        first_human_turn(dialogue, row=7)


def test_hh_rlhf_from_local_files(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", HH_RECORDS)
    prompts = hh_rlhf_prompts("test", data_files=path)
    assert prompts == ["What is a good prank?", "How do I bake bread?", "Tell me about Human: nature"]
    assert hh_rlhf_prompts("test", 2, data_files={"test": str(path)}) == prompts[:2]
    shuffled = hh_rlhf_prompts("test", seed=3, data_files=path)
    assert sorted(shuffled) == sorted(prompts) and shuffled == hh_rlhf_prompts("test", seed=3, data_files=path)
    assert load_prompts("hh-rlhf", data_files=path, count=1) == prompts[:1]
    with pytest.raises(PromptSourceError, match="asked for prompts 0..4 but it has 3"):
        hh_rlhf_prompts("test", 5, data_files=path)
    with pytest.raises(PromptSourceError, match="split 'train' is not in data_files"):
        hh_rlhf_prompts("train", data_files={"test": str(path)})
    with pytest.raises(PromptSourceError, match="no field 'dialogue'"):
        hh_rlhf_prompts("test", data_files=path, field="dialogue")


def test_hh_rlhf_malformed_rows_raise_or_are_skipped(tmp_path):
    records = HH_RECORDS + [{"chosen": "\n\nHuman: no answer here", "rejected": "x"}]
    path = write_jsonl(tmp_path / "test.jsonl", records)
    with pytest.raises(PromptSourceError, match="row 3: no 'Assistant:' turn"):
        hh_rlhf_prompts("test", data_files=path)
    assert len(hh_rlhf_prompts("test", data_files=path, skip_malformed=True)) == 3
    with pytest.raises(PromptSourceError, match="does not exist"):
        hh_rlhf_prompts("test", data_files=tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------------------------------- #
# IMDB
# ----------------------------------------------------------------------------------------------------- #
def test_cut_at_word_boundary_by_hand():
    assert cut_at_word_boundary("hello world foo", 12) == "hello world"
    assert cut_at_word_boundary("hello world", 11) == "hello world"      # fits: unchanged
    assert cut_at_word_boundary("abcdefghijklmn op", 5) == "abcde"       # one long word: cut inside it
    assert cut_at_word_boundary("I loved it so much", 7) == "I loved"


def test_imdb_prompts_from_local_files(tmp_path):
    reviews = [f"Review number {i} says this film is {'great' if i % 2 else 'awful'} and worth discussing."
               for i in range(12)]
    records = [{"text": text, "label": i % 2} for i, text in enumerate(reviews)]
    records += [{"text": "Too short to use.", "label": 0}, {"text": "x" * 30, "label": 1}]  # <= 30 chars
    path = write_jsonl(tmp_path / "train.jsonl", records)
    prompts = imdb_prompts("train", 8, seed=0, data_files=path)
    assert len(prompts) == 8 and len(set(prompts)) == 8
    for prompt in prompts:
        source = next(review for review in reviews if review.startswith(prompt))
        assert 1 <= len(prompt) <= 30
        assert source[len(prompt)] == " "        # ends at a word boundary
        assert not prompt.startswith(("Too short", "xxx"))
    assert prompts == imdb_prompts("train", 8, seed=0, data_files=path)      # seeded: same result
    assert prompts != imdb_prompts("train", 8, seed=1, data_files=path)      # another seed: another draw
    assert len(imdb_prompts("train", None, data_files=path)) == 12           # all long-enough reviews
    assert load_prompts("imdb", count=8, data_files=path) == prompts         # default seed 0
    with pytest.raises(PromptSourceError, match="IMDB train .*asked for prompts 0..12 but it has 12"):
        imdb_prompts("train", 13, data_files=path)
    with pytest.raises(PromptSourceError, match="min_chars <= max_chars"):
        imdb_prompts("train", 2, min_chars=30, max_chars=20, data_files=path)


# ----------------------------------------------------------------------------------------------------- #
# Local files
# ----------------------------------------------------------------------------------------------------- #
def test_jsonl_prompts_and_selection(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one", "id": 1}\n\n"two"\n{"prompt": "three"}\n', encoding="utf-8")
    assert jsonl_prompts(path) == ["one", "two", "three"]
    assert jsonl_prompts(path, count=2, start=1) == ["two", "three"]
    assert sorted(jsonl_prompts(path, seed=0)) == ["one", "three", "two"]
    assert load_prompts(path, count=1) == ["one"]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps([{"question": "a?"}, {"question": "b?"}]), encoding="utf-8")
    assert load_prompts(listed, field="question") == ["a?", "b?"]
    with pytest.raises(PromptSourceError, match="asked for prompts 2..5 but it has 3"):
        jsonl_prompts(path, count=4, start=2)
    with pytest.raises(PromptSourceError, match="a local file has no splits"):
        load_prompts(path, split="test")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "ok"}\n{"text": "no prompt"}\n', r"prompts.jsonl line 2: no field 'prompt'; fields: \['text'\]"),
    ('{"prompt": "ok"}\n\n{"prompt": "ok"\n', "prompts.jsonl line 3 is not valid JSON"),
    ('{"prompt": 5}\n', "line 1: field 'prompt' is int, not text"),
    ('{"prompt": "  "}\n', "line 1: field 'prompt' is empty"),
    ('["prompt"]\n', "line 1: expected a JSON object, got list"),
])
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(PromptSourceError, match=message):
        jsonl_prompts(path)


def test_json_list_errors_name_the_record(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"other": 1}]), encoding="utf-8")
    with pytest.raises(PromptSourceError, match="prompts.json record 1: no field 'prompt'"):
        jsonl_prompts(path)
    path.write_text(json.dumps({"prompt": "a"}), encoding="utf-8")
    with pytest.raises(PromptSourceError, match="expected a JSON list of objects"):
        jsonl_prompts(path)


def test_text_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\r\n\nsecond prompt  \nthird\n", encoding="utf-8")
    assert text_prompts(path) == ["first prompt", "second prompt  ", "third"]
    assert load_prompts(path, count=2) == ["first prompt", "second prompt  "]
    with pytest.raises(PromptSourceError, match="does not exist"):
        text_prompts(tmp_path / "missing.txt")
    with pytest.raises(PromptSourceError, match="unknown prompt source 'nowhere'"):
        load_prompts("nowhere")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(PromptSourceError, match="binary.txt is not UTF-8"):
        text_prompts(binary)
