"""Compatibility module: sampling lives in :mod:`mapjax.sampling`, ``load_policy`` in :mod:`mapjax.models.policy`.

Every name importers used from here is re-exported, so ``from mapjax.generate import generate`` keeps working.
Code that replaces ``load_policy`` for a test patches it here: the CLI and the pipelines import it from this
module at call time.
"""

from mapjax.models.policy import load_policy
from mapjax.sampling.api import Generation, generate, last_run_stats
from mapjax.sampling.filters import SamplingSettings, choose_tokens
from mapjax.sampling.inputs import (
    bos_token_id,
    continuation_text,
    row_keys,
    tokenize_prompts,
)
from mapjax.sampling.prefill import PREFILL_GROUP_ROWS, prefill_cache
from mapjax.sampling.scoring import sequence_logprobs, token_logprobs
from mapjax.sampling.tracing import trace_counts

__all__ = [
    "Generation", "PREFILL_GROUP_ROWS", "SamplingSettings", "bos_token_id", "choose_tokens", "continuation_text",
    "generate", "last_run_stats", "load_policy", "prefill_cache", "row_keys", "sequence_logprobs",
    "token_logprobs", "tokenize_prompts", "trace_counts",
]
