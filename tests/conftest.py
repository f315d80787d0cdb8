"""Shared fixtures: the authors' OPT-1.3B pilot set (shipped in data/), synthetic pools, tiny models, and child
processes that see several host devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mapjax import RewardPool

PILOT_NAME = "opt1.3b-anthropic-harmless.json.gz"
TESTS_DIR = Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
# The paper's value order (MAP.md section 7); the pilot file stores them in another order.
PAPER_VALUES = ("humor", "gpt2-helpful", "gpt2-harmless", "diversity", "coherence", "perplexity")


def pilot_path() -> Path:
    path = REPO_ROOT / "data" / PILOT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"the authors' pilot set ships with the repository at {path}; is the checkout whole?")
    return path


@pytest.fixture(scope="session")
def pilot_file() -> Path:
    return pilot_path()


@pytest.fixture(scope="session")
def pilot() -> RewardPool:
    return RewardPool.load(pilot_path())


def make_ragged_pool(seed: int = 0, prompts: int = 60, max_samples: int = 4, values: int = 3) -> RewardPool:
    """Correlated rewards, 1..max_samples samples per prompt, with per-prompt offsets."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(values, values)) / np.sqrt(values) + np.eye(values)
    offsets = rng.normal(scale=0.7, size=(prompts, 1, values))
    rewards = rng.normal(size=(prompts, max_samples, values)) @ mixing + offsets
    counts = rng.integers(1, max_samples + 1, size=prompts)
    mask = np.arange(max_samples)[None, :] < counts[:, None]
    return RewardPool(rewards, mask, tuple(f"v{i}" for i in range(values)))


@pytest.fixture
def ragged_pool() -> RewardPool:
    return make_ragged_pool()


@pytest.fixture
def ragged_pool_factory():
    """:func:`make_ragged_pool` for tests that need pools of other seeds or sizes."""
    return make_ragged_pool


@pytest.fixture(scope="session")
def paper_values() -> tuple[str, ...]:
    """The paper's value order (MAP.md section 7): humor, helpful, harmless, diversity, coherence, perplexity."""
    return PAPER_VALUES


@pytest.fixture(scope="session")
def paper_hhh() -> dict[str, dict]:
    """The paper's HHH palettes on the pilot (MAP.md section 7), by name: ``levels`` over ``paper_values``
    (humor, helpful, harmless at their quantile; diversity, coherence, perplexity held at their pilot means),
    ``paper`` the λ the paper prints (None for HHH-80, which their solver calls infeasible) and ``exact`` the
    exact λ of humor, helpful, harmless."""
    maintained = (0.876, 0.434, -3.337)
    table = {
        "HHH-50": ((2.460, -1.471, 0.354), (2.53, 0.23, 0.28, 0.02, 0.05, 0.05), (2.543, 0.240, 0.284)),
        "HHH-60": ((2.492, -1.278, 0.675), (6.30, 0.83, 0.93, 0.01, 0.03, 0.03), (6.301, 0.838, 0.933)),
        "HHH-70": ((2.513, -0.967, 0.937), (12.77, 1.53, 1.69, 0.01, 0.02, 0.02), (12.759, 1.530, 1.692)),
        "HHH-80": ((2.534, -0.613, 1.268), None, (29.70, 2.586, 3.055)),
    }
    return {
        name: {"levels": np.array(levels + maintained), "paper": paper, "exact": exact}
        for name, (levels, paper, exact) in table.items()
    }


# --------------------------------------------------------------------------------------------------------- #
# Tiny models. Built natively in JAX with random weights for every test but the PyTorch parity tests; the
# parity tests build transformers' PyTorch model from the same table (their fixtures skip without torch).
# --------------------------------------------------------------------------------------------------------- #
TINY_VOCAB = 100
TINY_PAD, TINY_BOS, TINY_EOS = 0, 1, 2   # real tokens of the word tokenizer are w3..w99


def _tiny_gpt2(**overrides):
    return ("GPT2LMHeadModel", "GPT2Config", dict(vocab_size=TINY_VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                                   n_head=4, pad_token_id=TINY_PAD, bos_token_id=TINY_BOS,
                                                   eos_token_id=TINY_EOS, **overrides))


def _tiny_opt(**overrides):
    values = dict(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                  max_position_embeddings=64, pad_token_id=TINY_PAD, bos_token_id=TINY_BOS, eos_token_id=TINY_EOS,
                  word_embed_proj_dim=32)
    return ("OPTForCausalLM", "OPTConfig", {**values, **overrides})


def _tiny_llama(**overrides):
    values = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, pad_token_id=TINY_PAD,
                  bos_token_id=TINY_BOS, eos_token_id=TINY_EOS, tie_word_embeddings=False)
    return ("LlamaForCausalLM", "LlamaConfig", {**values, **overrides})


# name -> (HF architecture, transformers config class, config fields)
TINY_DECODERS = {
    "gpt2": _tiny_gpt2(),
    "gpt2_untied_scaled": _tiny_gpt2(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True),
    "gpt2_classifier": ("GPT2ForSequenceClassification", "GPT2Config", {**_tiny_gpt2()[2], "num_labels": 3}),
    "opt_pre_ln": _tiny_opt(),
    "opt_post_ln": _tiny_opt(do_layer_norm_before=False),
    "opt_project_in_out": _tiny_opt(word_embed_proj_dim=16),
    "llama": _tiny_llama(),
    "llama_gqa_tied": _tiny_llama(num_key_value_heads=2, tie_word_embeddings=True),
    "llama_llama3_rope": _tiny_llama(num_key_value_heads=1, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16)),
    "llama_linear_rope_bias": _tiny_llama(attention_bias=True, mlp_bias=True, rope_parameters=dict(
        rope_type="linear", rope_theta=500.0, factor=2.0)),
}


def tiny_hf_config(name: str):
    """The transformers config of tiny model ``name`` (configs need no torch)."""
    import transformers

    _, config_class, fields = TINY_DECODERS[name]
    return getattr(transformers, config_class)(**fields)


def build_tiny_model(name: str = "gpt2", seed: int = 0, dtype=None):
    """Tiny model ``name`` in mapjax with random weights; biases and norm scales are perturbed too (fresh ones
    are 0 and 1), so a mis-mapped one changes the outputs."""
    import jax.numpy as jnp

    from mapjax.models import model_class

    cls = model_class(TINY_DECODERS[name][0])
    model = cls.from_config(cls.config_from_hf(tiny_hf_config(name)), seed=seed, dtype=dtype or jnp.float32)
    rng = np.random.default_rng(seed)
    for _, parameter, _ in model.hf_parameters():
        value = np.asarray(parameter.get_value(), np.float32)
        if value.ndim == 1:
            parameter.set_value(jnp.asarray(value + 0.1 * rng.standard_normal(value.shape), parameter.get_value().dtype))
    return model


def make_word_tokenizer(directory: Path | None = None):
    """A word-level tokenizer over the tiny models' ids: <pad>=0, <bos>=1 (prepended), <eos>=2, w3..w99.

    Built from the ``tokenizers`` library, so it needs no download and no torch; saved to ``directory`` if given.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": TINY_PAD, "<bos>": TINY_BOS, "<eos>": TINY_EOS, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", TINY_BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                        eos_token="<eos>")
    if directory is not None:
        tokenizer.save_pretrained(str(directory))
    return tokenizer


def padded_token_batch(lengths: list[int], seq: int, side: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 with random real tokens (1..99) in rows of ``lengths``, padded with
    ``TINY_PAD`` on ``side`` to ``seq``."""
    rng = np.random.RandomState(seed)
    ids = np.full((len(lengths), seq), TINY_PAD, np.int32)
    mask = np.zeros((len(lengths), seq), np.int32)
    for row, length in enumerate(lengths):
        span = slice(seq - length, seq) if side == "left" else slice(0, length)
        ids[row, span] = rng.randint(1, TINY_VOCAB, size=length)
        mask[row, span] = 1
    return ids, mask


@pytest.fixture(scope="session")
def tiny_model():
    """Factory ``tiny_model(name="gpt2", seed=0, dtype=None)``: a tiny mapjax model with random weights
    (names: ``TINY_DECODERS``)."""
    return build_tiny_model


@pytest.fixture(scope="session")
def word_tokenizer():
    """Factory ``word_tokenizer(directory=None)``: the tiny models' word-level tokenizer (offline, no torch)."""
    return make_word_tokenizer


@pytest.fixture(scope="session")
def tiny_policy_folder(tmp_path_factory):
    """Factory ``tiny_policy_folder(name="gpt2")``: a folder with the tiny model written by ``export_pretrained``
    and the word tokenizer, as ``from_pretrained`` / ``--policy`` read it (one per name and session; copy it
    before changing it)."""
    from mapjax.models import export_pretrained

    folders: dict[str, Path] = {}

    def folder(name: str = "gpt2") -> Path:
        if name not in folders:
            directory = tmp_path_factory.mktemp(f"tiny-{name}")
            export_pretrained(build_tiny_model(name), directory)
            make_word_tokenizer(directory)
            folders[name] = directory
        return folders[name]

    return folder


@pytest.fixture(scope="session")
def padded_batch():
    """:func:`padded_token_batch`: ``padded_batch(lengths, seq, side, seed=0) -> (input_ids, attention_mask)``."""
    return padded_token_batch


@pytest.fixture(scope="session")
def torch_tiny_model():
    """Factory ``torch_tiny_model(name, seed=0)``: transformers' PyTorch model for tiny model ``name``, seeded
    random weights with perturbed biases and norms, in eval mode. For parity tests: skips without torch."""
    torch = pytest.importorskip("torch")
    import transformers

    def build(name: str, seed: int = 0):
        torch.manual_seed(seed)
        model = getattr(transformers, TINY_DECODERS[name][0])(tiny_hf_config(name)).eval()
        with torch.no_grad():
            for parameter_name, parameter in model.named_parameters():
                if parameter.dtype.is_floating_point and any(part in parameter_name for part in ("bias", "norm", "ln")):
                    parameter.add_(torch.randn_like(parameter) * 0.1)
        return model

    return build


# --------------------------------------------------------------------------------------------------------- #
# Several host devices. JAX fixes its device count when its backend starts and this process has one CPU device,
# so multi-device checks run in child processes started with --xla_force_host_platform_device_count.
# --------------------------------------------------------------------------------------------------------- #
_RESULT_MARKER = "@@MAPJAX-HOST-DEVICES-RESULT@@"


class HostDevices:
    """Fresh Python processes that see ``devices`` host (CPU) devices, run from the repository root with the
    repository and ``tests/`` importable (``from conftest import build_tiny_model`` works in them).

    Each launch pays a JAX import and its own compilations (seconds on two cores): put everything one test module
    needs into one child, keep the models tiny, and mark the tests that use it ``slow``.
    """

    def environment(self, devices: int = 1, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with ``devices`` host devices forced (any count it set is replaced),
        JAX on CPU, and the repository and ``tests/`` first on ``PYTHONPATH``."""
        env = dict(os.environ if base is None else base)
        flags = [flag for flag in env.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
        if devices > 1:
            flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), str(TESTS_DIR)] + [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part])
        return env

    def run(self, arguments: list[str], *, devices: int, timeout: float = 600.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``python *arguments`` (e.g. ``["-c", code, ...]`` or ``["-m", "mapjax.cli", ...]``) to completion,
        output captured."""
        return subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, env=self.environment(devices, env),
                              capture_output=True, text=True, timeout=timeout)

    def start(self, arguments: list[str], *, devices: int, stderr: Path) -> subprocess.Popen:
        """``python *arguments`` started in the background; its stderr goes to the file ``stderr`` (a pipe that
        nobody reads while this process works could fill and stall the child), its stdout nowhere."""
        with open(stderr, "w") as errors:
            return subprocess.Popen([sys.executable, *arguments], cwd=REPO_ROOT, env=self.environment(devices),
                                    stdout=subprocess.DEVNULL, stderr=errors)

    def result(self, code: str, *, devices: int = 8, timeout: float = 600.0) -> Any:
        """Run ``code`` (dedented), which assigns a JSON-serialisable ``RESULT``, and return that ``RESULT``.

        Raises ``AssertionError`` with the child's output when it exits non-zero or sets no result.
        """
        program = textwrap.dedent(code) + (
            f"\nimport json as _json\nprint({_RESULT_MARKER!r} + _json.dumps(RESULT), flush=True)\n")
        completed = self.run(["-c", program], devices=devices, timeout=timeout)
        lines = [line for line in completed.stdout.splitlines() if line.startswith(_RESULT_MARKER)]
        if completed.returncode != 0 or not lines:
            raise AssertionError(f"the {devices}-device subprocess failed (exit {completed.returncode})\n"
                                 f"--- stdout ---\n{completed.stdout[-4000:]}\n--- stderr ---\n{completed.stderr[-8000:]}")
        return json.loads(lines[-1][len(_RESULT_MARKER):])


@pytest.fixture(scope="session")
def host_devices() -> HostDevices:
    """:class:`HostDevices`: run Python children that see several host devices (``environment``, ``run``,
    ``start``, ``result``)."""
    return HostDevices()


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a command gets as far as loading a policy: arguments, limits and outputs are checked first."""
    import mapjax.generate
    import mapjax.models
    import mapjax.models.policy

    def refuse(*args, **kwargs):
        pytest.fail("a model was loaded before every argument, limit and output was checked")

    monkeypatch.setattr(mapjax.generate, "load_policy", refuse)
    monkeypatch.setattr(mapjax.models.policy, "load_policy", refuse)
    monkeypatch.setattr(mapjax.models, "from_gguf", refuse)
    monkeypatch.setattr(mapjax.models, "from_pretrained", refuse)
