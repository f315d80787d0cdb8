"""Rewards: the registry, diversity and sentiment by hand, the model-based rewards on tiny models built in JAX
(against the model called on each text alone), and every model-based reward against the same computation in
transformers' PyTorch models (tiny random weights, saved with a tokenizer; those tests skip without torch)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mapjax.models import export_pretrained
from mapjax.models.padding import length_bucket
from mapjax.rewards import (
    RewardError,
    available_rewards,
    dialogue_question,
    diversity,
    get_reward,
    register_reward,
    register_reward_factory,
    unregister_reward,
    word_tokens,
)
from mapjax.rewards.batching import padded_batches

TOLERANCE = 1e-4


def minilm_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 (skips the test when the package is not installed)."""
    from mapjax.models.packaged import minilm_path

    try:
        return minilm_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))

PROMPTS = ["What a wonderful movie", "Human: how are you?", "The quick brown fox",
           "This film was", "I laughed"]
CONTINUATIONS = [", I laughed a lot.", " I am fine, thanks!", " jumps over the lazy dog.",
                 " terrible and boring. " + "The quick brown fox jumps over the lazy dog. " * 8, " a lot"]
BPE_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Human: how are you? Assistant: I am fine, thanks!",
              "What a wonderful, funny movie. I laughed a lot.", "This film was terrible and boring."] * 3


# ----------------------------------------------------------------------------------------------------- #
# Tiny models saved with a tokenizer
# ----------------------------------------------------------------------------------------------------- #
def save_bpe_tokenizer(kind: str, folder: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences: GPT-2 style, or RoBERTa style (<s> ... </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if kind == "gpt2" else ["<s>", "<pad>", "</s>", "<unk>"]
    tokenizer.train_from_iterator(BPE_CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "gpt2":
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            pad_token="<|endoftext|>", model_max_length=1024)
    else:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", tokenizer.token_to_id("</s>")),
                                                                ("<s>", tokenizer.token_to_id("<s>")))
        fast = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
            model_max_length=512)
    fast.save_pretrained(str(folder))


def save_minilm_tokenizer(folder: Path) -> None:
    transformers.AutoTokenizer.from_pretrained(str(minilm_folder())).save_pretrained(str(folder))


def randomized(model):
    """Fresh models have zero biases and unit norms; perturb them so a mis-mapped one shows."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "bias" in name or "LayerNorm" in name or "layer_norm" in name or ".ln" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model.eval()


_COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
# kind -> (transformers class, its config, tokenizer)
TINY_REWARD_MODELS = {
    "roberta": ("RobertaForSequenceClassification", lambda: transformers.RobertaConfig(
        vocab_size=300, max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        type_vocab_size=1, **_COMMON), "bpe-roberta"),
    "distilbert": ("DistilBertForSequenceClassification", lambda: transformers.DistilBertConfig(
        vocab_size=30522, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64), "minilm"),
    "gpt2": ("GPT2ForSequenceClassification", lambda: transformers.GPT2Config(
        vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=0,
        bos_token_id=0, eos_token_id=0), "bpe-gpt2"),
    "bert": ("BertModel", lambda: transformers.BertConfig(vocab_size=30522, max_position_embeddings=64, **_COMMON),
             "minilm"),
}


def save_tokenizer(kind: str, folder: Path) -> None:
    tokenizer = TINY_REWARD_MODELS[kind][2]
    if tokenizer == "minilm":
        save_minilm_tokenizer(folder)
    else:
        save_bpe_tokenizer(tokenizer.removeprefix("bpe-"), folder)


def tiny_folder(root: Path, kind: str):
    """Save a tiny random PyTorch model of ``kind`` with its tokenizer; return (folder, torch model)."""
    import torch

    torch.manual_seed(0)
    folder = root / kind
    class_name, make_config, _ = TINY_REWARD_MODELS[kind]
    model = randomized(getattr(transformers, class_name)(make_config()))
    save_tokenizer(kind, folder)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder, model


def native_folder(root: Path, kind: str):
    """The same tiny model built in JAX (biases and norms perturbed), written with ``export_pretrained`` beside
    its tokenizer; return (folder, mapjax model)."""
    from mapjax.models import model_class

    class_name, make_config, _ = TINY_REWARD_MODELS[kind]
    cls = model_class(class_name)
    model = cls.from_config(cls.config_from_hf(make_config()))
    rng = np.random.default_rng(0)
    for _, parameter, _ in model.hf_parameters():
        value = np.asarray(parameter.get_value())
        if value.ndim == 1:
            parameter.set_value(jnp.asarray(value + 0.1 * rng.standard_normal(value.shape), jnp.float32))
    folder = root / kind
    save_tokenizer(kind, folder)
    export_pretrained(model, folder)
    return folder, model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("tiny_reward_models")
    return {kind: tiny_folder(root, kind) for kind in ("roberta", "distilbert", "gpt2", "bert")}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    root = tmp_path_factory.mktemp("native_reward_models")
    return {kind: native_folder(root, kind) for kind in ("roberta", "gpt2")}


def torch_classifier_scores(folder: Path, model, texts, max_length: int) -> np.ndarray:
    """The authors' recipe: tokenizer(texts, padding=True, truncation=True) -> logits."""
    import torch

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    inputs = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits.double().numpy()


# ----------------------------------------------------------------------------------------------------- #
# Without torch: rewards from folders written by export_pretrained, against the model on each text alone
# ----------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_classifier_reward_on_a_native_model_scores_each_text_as_alone(native):
    folder, model = native["roberta"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    full = [p + c for p, c in zip(PROMPTS, CONTINUATIONS)]
    expected = []
    for text in full:
        ids = np.asarray([tokenizer(text, truncation=True, max_length=64)["input_ids"]], np.int32)
        expected.append(np.asarray(model(ids, np.ones_like(ids)))[0])
    expected = np.asarray(expected, np.float64)
    reward = get_reward("humor", model=str(folder), batch_size=2)   # batched, right-padded, bucketed
    np.testing.assert_allclose(reward(PROMPTS, CONTINUATIONS), expected[:, 1], atol=TOLERANCE)
    log_probs = expected - np.logaddexp.reduce(expected, axis=1, keepdims=True)
    positive = get_reward("positive", model=str(folder))
    np.testing.assert_allclose(positive(PROMPTS, CONTINUATIONS), log_probs[:, 1], atol=TOLERANCE)


@pytest.mark.slow
def test_pair_reward_on_a_native_model_scores_each_pair_as_alone(native):
    folder, model = native["gpt2"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = []
    for prompt, continuation in zip(PROMPTS, CONTINUATIONS):
        ids = tokenizer(dialogue_question(prompt), continuation.strip(), truncation=True, max_length=64)["input_ids"]
        ids = np.asarray([ids], np.int32)
        expected.append(float(np.asarray(model(ids, np.ones_like(ids)))[0, 0]))
    reward = get_reward("gpt2-helpful", model=str(folder), batch_size=2)
    np.testing.assert_allclose(reward(PROMPTS, CONTINUATIONS), expected, atol=TOLERANCE)
    with pytest.raises(RewardError, match="gpt2-helpful.*one output"):
        get_reward("gpt2-helpful", model=str(native["roberta"][0]))


# ----------------------------------------------------------------------------------------------------- #
# Classifier rewards
# ----------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_classifier_reward_matches_pytorch(tiny, kind):
    folder, torch_model = tiny[kind]
    full = [p + c for p, c in zip(PROMPTS, CONTINUATIONS)]
    logits = torch_classifier_scores(folder, torch_model, full, max_length=64)
    log_probs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)

    as_logit = get_reward("classifier", model_id_or_path=str(folder), batch_size=2)
    np.testing.assert_allclose(as_logit(PROMPTS, CONTINUATIONS), logits[:, 1], atol=TOLERANCE)
    # `humor` and `positive` are this reward with the paper's settings; pointed at the tiny model here.
    humor = get_reward("humor", model=str(folder), batch_size=4)
    assert humor.name == "humor" and humor.scale == "logit"
    np.testing.assert_allclose(humor(PROMPTS, CONTINUATIONS), logits[:, 1], atol=TOLERANCE)
    # Length buckets and batch sizes repeat: a second call compiles nothing new.
    compiled = humor._forward._compiled
    if hasattr(compiled, "_cache_size"):
        programs = compiled._cache_size()
        humor(PROMPTS[::-1], CONTINUATIONS[::-1])
        assert compiled._cache_size() == programs
    positive = get_reward("positive", model=str(folder))
    scores = positive(PROMPTS, CONTINUATIONS)
    assert scores.dtype == np.float32 and scores.shape == (5,)
    np.testing.assert_allclose(scores, log_probs[:, 1], atol=TOLERANCE)


@pytest.mark.slow
def test_classifier_scales_labels_and_continuation_text(tiny):
    folder, torch_model = tiny["roberta"]
    logits = torch_classifier_scores(folder, torch_model, CONTINUATIONS, max_length=64)
    probabilities = np.exp(logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))
    reward = get_reward("classifier", model_id_or_path=str(folder), label=0, scale="prob", text="continuation")
    np.testing.assert_allclose(reward(PROMPTS, CONTINUATIONS), probabilities[:, 0], atol=TOLERANCE)
    by_name = get_reward("classifier", model_id_or_path=str(folder), label="LABEL_0", scale="prob",
                         text="continuation")
    np.testing.assert_allclose(by_name(PROMPTS, CONTINUATIONS), probabilities[:, 0], atol=TOLERANCE)
    with pytest.raises(RewardError, match="label 5 is out of range"):
        get_reward("classifier", model_id_or_path=str(folder), label=5)
    with pytest.raises(RewardError, match="no label 'funny'.*LABEL_0"):
        get_reward("classifier", model_id_or_path=str(folder), label="funny")
    with pytest.raises(RewardError, match="scale must be one of"):
        get_reward("classifier", model_id_or_path=str(folder), scale="odds")
    assert reward([], []).shape == (0,)


def test_classifier_reward_errors_name_the_model(tmp_path, tiny):
    with pytest.raises(RewardError, match="humor.*does not exist|humor.*cannot find"):
        get_reward("humor", model=str(tmp_path / "missing" / "folder" / "x"))
    folder, _ = tiny["bert"]
    with pytest.raises(RewardError, match="not a sequence classifier"):
        get_reward("classifier", model_id_or_path=str(folder))


# ----------------------------------------------------------------------------------------------------- #
# GPT-2 pair reward models
# ----------------------------------------------------------------------------------------------------- #
@pytest.mark.slow
def test_gpt2_pair_reward_matches_authors_one_pair_at_a_time(tiny):
    import torch

    folder, torch_model = tiny["gpt2"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = []
    with torch.inference_mode():
        for prompt, continuation in zip(PROMPTS, CONTINUATIONS):
            # The authors' call: one unpadded pair, truncation at the limit (64 for this tiny model).
            inputs = tokenizer(dialogue_question(prompt), continuation.strip(), truncation=True, max_length=64,
                               return_tensors="pt")
            expected.append(torch_model(**inputs).logits.squeeze().item())
    for name in ("gpt2-helpful", "gpt2-harmless"):
        reward = get_reward(name, model=str(folder), batch_size=2)
        scores = reward(PROMPTS, CONTINUATIONS)
        assert reward.name == name and scores.dtype == np.float32
        np.testing.assert_allclose(scores, expected, atol=TOLERANCE)
    assert dialogue_question("hi") == "\n\nHuman: hi \n\nAssistant:"


def test_pair_reward_refuses_a_multi_class_model(tiny):
    folder, _ = tiny["roberta"]
    with pytest.raises(RewardError, match="gpt2-helpful.*one output"):
        get_reward("gpt2-helpful", model=str(folder))


# ----------------------------------------------------------------------------------------------------- #
# Coherence
# ----------------------------------------------------------------------------------------------------- #
def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.slow
def test_coherence_minilm_matches_sentence_transformers_pooling():
    torch = pytest.importorskip("torch")
    minilm = minilm_folder()
    prompts = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a joke about cats."]
    continuations = ["  Mix flour, water and yeast, let the dough rise, then bake it in a hot oven.",
                     " Paris is the capital city of France.", " The stock market fell sharply on Monday."]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm))
    torch_model = transformers.BertModel.from_pretrained(str(minilm)).eval()

    def embed(texts):
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = torch_model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).double().numpy()

    expected = cosine(embed(prompts), embed([c.strip() for c in continuations]))
    reward = get_reward("coherence", batch_size=4)
    scores = reward(prompts, continuations)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, atol=TOLERANCE)
    # A paraphrase is more coherent with its prompt than an unrelated sentence.
    pair = reward(["The weather is lovely today."] * 2,
                  [" It is a beautiful sunny day.", " Quantum chromodynamics describes quarks."])
    assert pair[0] > pair[1]


@pytest.mark.slow
def test_coherence_pooler_matches_pytorch(tiny):
    import torch

    folder, torch_model = tiny["bert"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))

    def pooled(texts):
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        with torch.inference_mode():
            return torch_model(**inputs).pooler_output.double().numpy()

    expected = cosine(pooled(PROMPTS), pooled([c.strip() for c in CONTINUATIONS]))
    reward = get_reward("coherence-simcse", model=str(folder), batch_size=4)
    np.testing.assert_allclose(reward(PROMPTS, CONTINUATIONS), expected, atol=TOLERANCE)
    with pytest.raises(RewardError, match="pooling must be one of"):
        get_reward("coherence", model=str(folder), pooling="max")


# ----------------------------------------------------------------------------------------------------- #
# Bucketing
# ----------------------------------------------------------------------------------------------------- #
def test_buckets_are_powers_of_two_capped_and_keep_order():
    assert [length_bucket(n, 64) for n in (1, 8, 9, 33, 64, 100)] == [8, 8, 16, 64, 64, 64]
    rows = [[1] * 3, [2] * 20, [3] * 5, [4] * 9, [5]]
    batches = list(padded_batches(rows, batch_size=2, cap=16, pad_id=0))
    seen = np.concatenate([indices for indices, _, _ in batches])
    assert sorted(seen.tolist()) == [0, 1, 2, 3, 4]
    for indices, ids, mask in batches:
        assert ids.shape[0] in (1, 2) and ids.shape[1] in (8, 16)
        for slot, index in enumerate(indices):
            assert mask[slot].sum() == min(len(rows[index]), ids.shape[1])


# ----------------------------------------------------------------------------------------------------- #
# Diversity and sentiment
# ----------------------------------------------------------------------------------------------------- #
def test_diversity_by_hand():
    # "a b a b": bigrams ab, ba, ab -> 2/(3+1); trigrams aba, bab -> 2/(2+1); 4-gram abab -> 1/(1+1).
    assert diversity("a b a b") == pytest.approx(0.5 * (2 / 3) * 0.5)
    # 7 distinct tokens (the final period is one): 6/7 * 5/6 * 4/5.
    assert diversity("the cat sat on the mat.") == pytest.approx(4 / 7)
    assert diversity("hi") == 0.0
    reward = get_reward("diversity")
    scores = reward(["a b", "the cat sat"], [" a b", " on the mat."])  # scored on prompt + continuation
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1 / 6, 4 / 7], rtol=1e-6)


def test_word_tokens_follow_treebank():
    assert word_tokens("Don't stop, I can't.") == ["Do", "n't", "stop", ",", "I", "ca", "n't", "."]
    assert word_tokens('He said "hi" (twice)... ok?') == ["He", "said", "``", "hi", "''", "(", "twice", ")",
                                                         "...", "ok", "?"]


def test_diversity_reproduces_the_authors_pilot(pilot):
    records = pilot.records()
    gaps = np.array([abs(diversity(record["generated"]) - record["diversity"]) for record in records])
    assert np.mean(gaps < 1e-9) > 0.95 and gaps.mean() < 1e-3


def test_sentiment_orders_obvious_examples():
    pytest.importorskip("vaderSentiment")
    reward = get_reward("sentiment")
    scores = reward(["The movie was"] * 3, [" wonderful, I loved it!", " a film.", " awful and boring, I hated it."])
    assert scores[0] > scores[1] > scores[2] and scores.dtype == np.float32
    only_continuation = get_reward("sentiment", text="continuation")
    assert only_continuation(["I hate everything."], [" fine"])[0] > reward(["I hate everything."], [" fine"])[0]


# ----------------------------------------------------------------------------------------------------- #
# Registry
# ----------------------------------------------------------------------------------------------------- #
def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(RewardError, match=r"unknown reward 'humour'.*'diversity'.*'humor'"):
        get_reward("humour")
    assert {"diversity", "sentiment", "humor", "positive", "gpt2-helpful", "gpt2-harmless", "coherence",
            "classifier"} <= set(available_rewards())


def test_custom_function_reward_and_bad_outputs():
    register_reward("test-length", lambda prompts, continuations: [len(c) for c in continuations])
    register_reward("test-nan", lambda prompts, continuations: [1.0, float("nan")])
    register_reward("test-short", lambda prompts, continuations: [1.0])
    try:
        scores = get_reward("test-length")(["a", "b"], ["xyz", ""])
        np.testing.assert_array_equal(scores, [3.0, 0.0])
        assert scores.dtype == np.float32
        with pytest.raises(RewardError, match="'test-nan' gave nan for pair 1"):
            get_reward("test-nan")(["a", "b"], ["x", "y"])
        with pytest.raises(RewardError, match="'test-short' returned 1 scores for 2 pairs"):
            get_reward("test-short")(["a", "b"], ["x", "y"])
        with pytest.raises(RewardError, match="2 prompts but 1 continuations"):
            get_reward("test-length")(["a", "b"], ["x"])
        with pytest.raises(RewardError, match="already registered"):
            register_reward("test-length", len)
    finally:
        for name in ("test-length", "test-nan", "test-short"):
            unregister_reward(name)
    assert "test-length" not in available_rewards()


def test_factory_registered_from_another_module_takes_options():
    """How mapjax.generate registers `perplexity`: a factory whose options carry the policy."""

    class ConstantPerplexity:
        name = "test-perplexity"

        def __init__(self, policy: float):
            self.policy = policy

        def __call__(self, prompts, continuations):
            return np.full(len(prompts), -self.policy, np.float32)

    register_reward_factory("test-perplexity", lambda policy: ConstantPerplexity(policy))
    try:
        np.testing.assert_array_equal(get_reward("test-perplexity", policy=2.0)(["a"], ["b"]), [-2.0])
        with pytest.raises(RewardError, match="'test-perplexity': bad options"):
            get_reward("test-perplexity", model="x")
    finally:
        unregister_reward("test-perplexity")


def test_misspelt_option_names_the_reward():
    with pytest.raises(RewardError, match="reward 'humor': bad options \\['modle'\\]"):
        get_reward("humor", modle="x")
