"""MAP-F: finetune a policy towards p_λ ∝ p0 exp(λᵀr) in pure JAX.

- ``finetune(model, tokenizer, pool, λ, method="weighted" | "dpo", config=FinetuneConfig(...), out=DIR)``
- ``finetune_online(model, tokenizer, prompts, values, λ, method="grpo" | "ppo", config=OnlineConfig(...))``:
  the online routes, sampling from the current policy (the paper's PPO)
- losses: ``weighted.weighted_loss`` (reward-weighted token NLL, optional KL to p0), ``dpo.dpo_loss``
- examples: ``examples.weighted_examples`` / ``examples.dpo_pairs`` from a RewardPool, batches in length buckets
- ``soup(models, weights)``: linear interpolation of finetuned models' parameters (DPO-Soup, Rewarded Soups)
- ``against_base.evaluate_finetuned`` / ``against_base.pool_prompt_format``: levels of a finetuned policy against
  its base, sampled with the prompt formatting its pool was sampled with
"""

from mapjax.finetune.against_base import evaluate_finetuned, pool_prompt_format
from mapjax.finetune.dpo import dpo_loss
from mapjax.finetune.examples import Examples, FinetuneError, Pairs, dpo_pairs, weighted_examples
from mapjax.finetune.online import OnlineConfig, finetune_online
from mapjax.finetune.soup import save_soup, soup, soup_from_folders
from mapjax.finetune.train import FinetuneConfig, FinetuneResult, finetune
from mapjax.finetune.weighted import weighted_loss

__all__ = ["Examples", "FinetuneConfig", "FinetuneError", "FinetuneResult", "OnlineConfig", "Pairs", "dpo_loss",
           "dpo_pairs", "evaluate_finetuned", "finetune", "finetune_online", "pool_prompt_format", "save_soup",
           "soup", "soup_from_folders", "weighted_examples", "weighted_loss"]
