"""Reward models as rewards: ``reward_model(folder)`` on decoder and DeBERTa classifiers, chat formatting, and
multi-objective heads giving k named pool columns from one pass.

Tiny random classifiers saved to temporary folders with an offline word-level tokenizer that has a pair
template and a chat template; nothing is downloaded. PyTorch parity tests skip without torch.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from mapjax.build import build_pool
from mapjax.errors import BuildError, RewardError
from mapjax.models import export_pretrained, from_pretrained, model_class
from mapjax.rewards import RewardModel, chat_texts, get_reward, reward_model

VOCAB, PAD, BOS, EOS = 100, 0, 1, 2
SYSTEM, USER, ASSISTANT = 3, 4, 5      # the words w3, w4, w5 mark the turns in the chat template
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}w3 "
                 "{% elif message['role'] == 'user' %}w4 {% else %}w5 {% endif %}{{ message['content'] }} <eos> "
                 "{% endfor %}")
OBJECTIVES = {0: "helpfulness", 1: "correctness", 2: "verbosity"}
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
                eos_token_id=EOS)
_DEBERTA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, pad_token_id=PAD, layer_norm_eps=1e-7, relative_attention=True,
                position_biased_input=False, pos_att_type=["p2c", "c2p"], share_att_key=True,
                norm_rel_ebd="layer_norm", position_buckets=8)
# name -> (architecture, transformers config class, fields)
MODELS = {
    "llama": ("LlamaForSequenceClassification", "LlamaConfig", dict(_DECODER, num_labels=1)),
    "llama3": ("LlamaForSequenceClassification", "LlamaConfig", dict(_DECODER, num_labels=3, id2label=OBJECTIVES)),
    "deberta3": ("DebertaV2ForSequenceClassification", "DebertaV2Config", dict(
        _DEBERTA, num_labels=3, id2label=OBJECTIVES, problem_type="regression")),
}
HEADS = ("score.", "classifier.", "pooler.")   # scaled so scores are of order 1 and the tolerance means something
PROMPTS = ["w10 w11 w12", "w20", "w30 w31 w32 w33 w34 w35 w36", "w40 w41"]
ANSWERS = ["w50", "w60 w61 w62 w63 w64 w65", "w70 w71", "w80 w81 w82 w83"]
TOLERANCE = 1e-4


def word_tokenizer(directory=None, *, chat: bool = True):
    """<pad>=0, <bos>=1 (prepended), <eos>=2, w3..w99; pairs as ``<bos> A <eos> B <eos>``; a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <eos> $B <eos>", special_tokens=[("<bos>", BOS), ("<eos>", EOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def hf_config(name: str):
    import transformers

    _, config_class, fields = MODELS[name]
    return getattr(transformers, config_class)(**fields)


@pytest.fixture(scope="module")
def native_folder(tmp_path_factory):
    """Factory ``native_folder(name, chat=True)``: a tiny classifier built in JAX (no torch) and exported with the
    word tokenizer."""
    folders = {}

    def build(name: str, chat: bool = True):
        if (name, chat) not in folders:
            cls = model_class(MODELS[name][0])
            model = cls.from_config(cls.config_from_hf(hf_config(name)), seed=3)
            for parameter_name, parameter, _ in model.hf_parameters():
                if parameter_name.startswith(HEADS):
                    parameter.set_value(parameter.get_value() * 30.0)
            directory = tmp_path_factory.mktemp(f"native-{name}-{chat}")
            export_pretrained(model, directory)
            word_tokenizer(directory, chat=chat)
            folders[name, chat] = directory
        return folders[name, chat]

    return build


@pytest.fixture(scope="module")
def torch_folder(tmp_path_factory):
    """Factory ``torch_folder(name) -> (transformers model, folder)``; skips without torch."""
    torch = pytest.importorskip("torch")
    import transformers

    built = {}

    def build(name: str):
        if name not in built:
            torch.manual_seed(0)
            model = getattr(transformers, MODELS[name][0])(hf_config(name)).eval()
            with torch.no_grad():
                for parameter_name, parameter in model.named_parameters():
                    if parameter.ndim == 1:
                        parameter.add_(torch.randn_like(parameter) * 0.1)
                    if parameter_name.startswith(HEADS):
                        parameter.mul_(30.0)
            directory = tmp_path_factory.mktemp(f"torch-{name}")
            model.save_pretrained(str(directory))
            word_tokenizer(directory)
            built[name] = (model, directory)
        return built[name]

    return build


def torch_scores(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]).long()).logits.float().numpy()[0]


_LOADED: dict = {}


def jax_scores(folder, ids: list[int]) -> np.ndarray:
    """The mapjax classifier on one unpadded row."""
    if folder not in _LOADED:
        _LOADED[folder] = from_pretrained(folder)
    return np.asarray(_LOADED[folder](jnp.asarray([ids]), jnp.ones((1, len(ids)), jnp.int32)))[0]


# --------------------------------------------------------------------------------------------------------- #
# Formatting
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_chat_format_renders_the_template_with_one_bos(native_folder):
    reward = RewardModel(native_folder("llama"), name="rm")
    assert reward.names == ("rm",)
    assert chat_texts(reward.tokenizer, ["w10 w11"], ["w12"]) == ["<bos>w4 w10 w11 <eos> w5 w12 <eos> "]
    assert reward.token_ids(["w10 w11"], ["w12"]) == [[BOS, USER, 10, 11, EOS, ASSISTANT, 12, EOS]]
    with_system = RewardModel(native_folder("llama"), system_prompt="w7", name="rm")
    assert with_system.token_ids(["w10"], ["w12"]) == [[BOS, SYSTEM, 7, EOS, USER, 10, EOS, ASSISTANT, 12, EOS]]
    # The score is the model's on exactly those tokens.
    np.testing.assert_allclose(reward(["w10 w11"], ["w12"]),
                               jax_scores(native_folder("llama"), [BOS, USER, 10, 11, EOS, ASSISTANT, 12, EOS]),
                               atol=1e-5, rtol=0)


def test_pair_and_full_formats(native_folder):
    pair = RewardModel(native_folder("deberta3"), format="pair")
    assert pair.token_ids(["w10 w11"], ["w12"]) == [[BOS, 10, 11, EOS, 12, EOS]]
    full = RewardModel(native_folder("deberta3"), format="full")
    assert full.token_ids(["w10 w11 "], ["w12"]) == [[BOS, 10, 11, 12]]


# --------------------------------------------------------------------------------------------------------- #
# Parity with transformers
# --------------------------------------------------------------------------------------------------------- #
def test_llama_reward_model_matches_transformers_in_chat_format(torch_folder):
    torch_model, folder = torch_folder("llama")
    reward = reward_model(folder, batch_size=2)     # two rows per batch, so rows of other lengths pad each other
    scores = reward.scores(PROMPTS, ANSWERS)
    assert scores.shape == (len(PROMPTS), 1) and scores.dtype == np.float32
    tokenizer = reward.tokenizer
    for row, text in enumerate(chat_texts(tokenizer, PROMPTS, ANSWERS)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids.count(BOS) == 1
        np.testing.assert_allclose(scores[row], torch_scores(torch_model, ids), atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(reward(PROMPTS, ANSWERS), scores[:, 0])
    assert np.abs(scores).max() > 0.1


@pytest.mark.slow
def test_deberta_regression_reward_matches_transformers_with_named_outputs(torch_folder):
    torch_model, folder = torch_folder("deberta3")
    reward = reward_model(folder, format="pair", name="rm", batch_size=4)
    assert reward.names == ("rm/helpfulness", "rm/correctness", "rm/verbosity")
    scores = reward.scores(PROMPTS, ANSWERS)
    assert scores.shape == (len(PROMPTS), 3) and scores.dtype == np.float32
    for row, (prompt, answer) in enumerate(zip(PROMPTS, ANSWERS)):
        ids = reward.tokenizer(prompt, answer)["input_ids"]
        np.testing.assert_allclose(scores[row], torch_scores(torch_model, ids), atol=TOLERANCE, rtol=0)
    # outputs picks columns by label or index, in the order asked
    picked = reward_model(folder, format="pair", name="rm", outputs=["verbosity", 0])
    assert picked.names == ("rm/verbosity", "rm/helpfulness")
    np.testing.assert_allclose(picked.scores(PROMPTS, ANSWERS), scores[:, [2, 0]], atol=1e-5, rtol=0)
    single = reward_model(folder, format="pair", name="verbose", outputs="verbosity")
    assert single.names == ("verbose",)
    np.testing.assert_allclose(single(PROMPTS, ANSWERS), scores[:, 2], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------- #
# Multi-objective pools
# --------------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_k_output_head_gives_k_pool_columns_from_one_pass_per_chunk(native_folder, tiny_model, tmp_path):
    folder = native_folder("llama3")
    policy, tokenizer = tiny_model("gpt2"), word_tokenizer(chat=False)
    prompts = ["w10 w11", "w20 w21 w22", "w30", "w40 w41 w42 w43", "w50 w51"]
    reward = RewardModel(folder, name="rm", batch_size=4)
    calls = []
    original = reward.scores

    def counted(prompts_, continuations):
        calls.append(len(prompts_))
        return original(prompts_, continuations)

    reward.scores = counted
    options = dict(samples_per_prompt=2, max_new_tokens=4, chunk_size=2, seed=1, progress=False)
    out = tmp_path / "pool.jsonl"
    pool = build_pool(policy, tokenizer, prompts, [reward, "diversity"], out=out, **options)
    names = ["rm/helpfulness", "rm/correctness", "rm/verbosity"]
    assert list(pool.value_names) == names + ["diversity"]
    assert calls == [4, 4, 2]      # one .scores pass per chunk (3 chunks of 2, 2, 1 prompts x 2 samples)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 * len(prompts)
    for record in records:
        ids = reward.token_ids([record["prompt"]], [record["generated"]])[0]
        np.testing.assert_allclose([record[name] for name in names], jax_scores(folder, ids), atol=1e-4, rtol=0)
    assert len({record["rm/helpfulness"] for record in records}) > 1
    # The manifest recognises the same reward: the finished pool is returned, nothing is scored again.
    again = build_pool(policy, tokenizer, prompts, [reward, "diversity"], out=out, **options)
    assert calls == [4, 4, 2] and list(again.value_names) == names + ["diversity"]
    # Other columns (a different output selection) are another build: resume refused.
    other = RewardModel(folder, name="rm", outputs=[0, 1])
    with pytest.raises(BuildError, match="refusing to resume"):
        build_pool(policy, tokenizer, prompts, [other, "diversity"], out=out, **options)


@pytest.mark.slow
def test_registry_reward_model_expands_into_columns(native_folder, tiny_model):
    folder = native_folder("deberta3")
    reward = get_reward("reward_model", path=str(folder), format="full", name="nemo")
    assert reward.names == ("nemo/helpfulness", "nemo/correctness", "nemo/verbosity")
    pool = build_pool(tiny_model("gpt2"), word_tokenizer(chat=False), ["w10 w11", "w20"], "reward_model",
                      reward_options={"reward_model": dict(path=str(folder), format="full", name="nemo")},
                      max_new_tokens=3, progress=False)
    assert list(pool.value_names) == list(reward.names)
    records = pool.records()
    direct = reward.scores([record["prompt"] for record in records], [record["generated"] for record in records])
    np.testing.assert_allclose([[record[name] for name in reward.names] for record in records], direct,
                               atol=1e-5, rtol=0)


def test_expanded_names_are_checked_for_duplicates(native_folder, tiny_model):
    folder = native_folder("llama3")
    first, second = RewardModel(folder, name="rm"), RewardModel(folder, name="rm", outputs=["verbosity", 0])
    with pytest.raises(BuildError, match=r"same reward twice: \['rm/helpfulness', 'rm/verbosity'\]"):
        build_pool(tiny_model("gpt2"), word_tokenizer(chat=False), ["w10"], [first, second], progress=False)


# --------------------------------------------------------------------------------------------------------- #
# Names and errors
# --------------------------------------------------------------------------------------------------------- #
def test_names_from_a_list_a_text_file_or_a_json_file(native_folder, tmp_path):
    folder = native_folder("llama3")
    (tmp_path / "names.txt").write_text("helpful\n\nsafe\nbrief\n")
    (tmp_path / "names.json").write_text(json.dumps(["a", "b", "c"]))
    assert RewardModel(folder, name="rm", names=["x", "y", "z"]).names == ("rm/x", "rm/y", "rm/z")
    assert RewardModel(folder, name="rm", names=tmp_path / "names.txt").names == ("rm/helpful", "rm/safe",
                                                                                  "rm/brief")
    reward = RewardModel(folder, name="rm", names=str(tmp_path / "names.json"), outputs=["c"])
    assert reward.names == ("rm",) and reward.outputs == (2,)


def test_bad_inputs_give_clear_reward_errors(native_folder, tmp_path):
    folder = native_folder("llama3")
    (tmp_path / "two.txt").write_text("helpful\nsafe\n")
    (tmp_path / "bad.json").write_text("[\"a\", ")
    (tmp_path / "object.json").write_text(json.dumps({"0": "a"}))
    (tmp_path / "repeat.txt").write_text("a\na\nb\n")
    with pytest.raises(RewardError, match="2 names given for a model with 3 outputs"):
        RewardModel(folder, names=tmp_path / "two.txt")
    with pytest.raises(RewardError, match="not valid JSON"):
        RewardModel(folder, names=tmp_path / "bad.json")
    with pytest.raises(RewardError, match="JSON list of strings, not a dict"):
        RewardModel(folder, names=tmp_path / "object.json")
    with pytest.raises(RewardError, match=r"repeats \['a'\]"):
        RewardModel(folder, names=tmp_path / "repeat.txt")
    with pytest.raises(RewardError, match="does not exist"):
        RewardModel(folder, names=tmp_path / "missing.txt")
    with pytest.raises(RewardError, match="no output 'safety'; outputs: \\['helpfulness'"):
        RewardModel(folder, outputs=["safety"])
    with pytest.raises(RewardError, match="format must be one of"):
        RewardModel(folder, format="dialogue")
    with pytest.raises(RewardError, match="system_prompt applies to format='chat' only"):
        RewardModel(folder, format="pair", system_prompt="w3")
    reward = RewardModel(folder, name="rm")
    with pytest.raises(RewardError, match=r"has 3 outputs .*call \.scores"):
        reward(["w10"], ["w11"])
    plain = native_folder("llama", chat=False)
    with pytest.raises(RewardError, match=r"has no chat template; score with format='pair'.*format='full'"):
        RewardModel(plain)
    assert RewardModel(plain, format="full")(["w10"], ["w11"]).shape == (1,)
    with pytest.raises(RewardError, match="cannot find model"):
        RewardModel(tmp_path / "no-such-model")
