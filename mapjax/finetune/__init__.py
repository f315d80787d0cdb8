"""MAP-F: finetune a policy towards p_λ ∝ p0 exp(λᵀr) in pure JAX.

- ``finetune(model, tokenizer, pool, λ, method="weighted" | "dpo", config=FinetuneConfig(...), out=DIR)``
- losses: ``weighted.weighted_loss`` (reward-weighted token NLL, optional KL to p0), ``dpo.dpo_loss``
- data: ``data.weighted_examples`` / ``data.dpo_pairs`` from a RewardPool, batches in length buckets
"""

from mapjax.finetune.data import Examples, FinetuneError, Pairs, dpo_pairs, weighted_examples
from mapjax.finetune.dpo import dpo_loss
from mapjax.finetune.train import FinetuneConfig, FinetuneResult, finetune
from mapjax.finetune.weighted import weighted_loss

__all__ = ["Examples", "FinetuneConfig", "FinetuneError", "FinetuneResult", "Pairs", "dpo_loss", "dpo_pairs",
           "finetune", "weighted_examples", "weighted_loss"]
