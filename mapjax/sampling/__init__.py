"""Sampling from a causal LM: the public API, the engines, the typed loop state, token filters and scoring.

Layout: ``api`` (``generate``, ``Generation``), ``engine`` (static batches and continuous batching), ``loop``
(the jitted token loops), ``state`` (``LoopState``, the loop's typed pytree), ``prefill`` (prompts into the KV
cache), ``filters`` (temperature, top-k, top-p), ``scoring`` (``token_logprobs``, ``sequence_logprobs``),
``inputs`` (checks, tokenization, per-row keys), ``tracing`` (compilation counts). See docs/sampling.md.

>>> from mapjax.sampling import generate
>>> result = generate(model, tokenizer, prompts, num_samples=8, engine="continuous")
"""

from mapjax.sampling.api import DEFAULT_ENGINE, ENGINES, Generation, generate, last_run_stats
from mapjax.sampling.engine import DEFAULT_CHUNK_STEPS, EngineStats
from mapjax.sampling.filters import SamplingSettings, choose_tokens
from mapjax.sampling.inputs import bos_token_id, continuation_text, row_keys, tokenize_prompts
from mapjax.sampling.prefill import PREFILL_GROUP_ROWS, prefill_cache
from mapjax.sampling.scoring import sequence_logprobs, token_logprobs
from mapjax.sampling.state import LoopState
from mapjax.sampling.tracing import trace_counts

__all__ = [
    "DEFAULT_CHUNK_STEPS", "DEFAULT_ENGINE", "ENGINES", "EngineStats", "Generation", "LoopState",
    "PREFILL_GROUP_ROWS", "SamplingSettings", "bos_token_id", "choose_tokens", "continuation_text", "generate",
    "last_run_stats", "prefill_cache", "row_keys", "sequence_logprobs", "token_logprobs", "tokenize_prompts",
    "trace_counts",
]
