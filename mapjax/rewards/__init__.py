"""Rewards by name: ``get_reward("humor")(prompts, continuations) -> float32 scores``.

Built in: ``diversity``, ``sentiment`` (offline lexicon), ``humor``, ``positive``, ``classifier`` (any sequence
classifier), ``reward_model`` (any reward model, chat-formatted, one or k named scores), ``gpt2-helpful``, ``gpt2-harmless``, ``coherence`` (offline MiniLM) and ``coherence-simcse``
(the paper's encoder). ``perplexity`` (``mapjax.rewards.perplexity``) takes the policy as its ``model`` option. Register your
own with :func:`register_reward` (a plain function) or :func:`register_reward_factory` (built with options).
"""

from mapjax.rewards.base import (
    FunctionReward,
    Reward,
    RewardError,
    available_rewards,
    check_pairs,
    check_scores,
    get_reward,
    register_reward,
    register_reward_factory,
    unregister_reward,
)

# Imported for their side effect: each module registers its rewards.
from mapjax.rewards import text, sentiment, classifier, reward_models, coherence, perplexity  # noqa: E402,F401  isort: skip

from mapjax.rewards.classifier import ClassifierReward, classifier_reward
from mapjax.rewards.coherence import CoherenceReward
from mapjax.rewards.reward_models import PairRewardModel, RewardModel, chat_texts, dialogue_question, reward_model
from mapjax.rewards.sentiment import SentimentReward
from mapjax.rewards.text import diversity, word_tokens

__all__ = [
    "ClassifierReward", "CoherenceReward", "FunctionReward", "PairRewardModel", "Reward", "RewardError",
    "RewardModel", "SentimentReward", "available_rewards", "check_pairs", "check_scores", "chat_texts",
    "classifier_reward", "dialogue_question", "diversity", "get_reward", "register_reward", "register_reward_factory",
    "reward_model", "unregister_reward", "word_tokens",
]
