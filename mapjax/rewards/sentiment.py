"""``sentiment``: VADER's compound polarity, an offline lexicon-and-rules sentiment score in [-1, 1].

A stand-in for the ``positive`` classifier when no model weights are at hand (demos, tests, quick studies):
it needs no download and no accelerator. It needs the ``vaderSentiment`` package. Options: ``text="full"``
(prompt + continuation, default, like ``positive``) or ``"continuation"``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mapjax.rewards.base import RewardError, check_pairs, check_scores, register_reward_factory
from mapjax.rewards.batching import full_texts

TEXT_PARTS = ("full", "continuation")


class SentimentReward:
    """VADER compound score of each text: +1 most positive, -1 most negative, 0 neutral."""

    def __init__(self, *, text: str = "full", name: str = "sentiment"):
        self.name = name
        if text not in TEXT_PARTS:
            raise RewardError(f"reward {name!r}: text must be one of {TEXT_PARTS}, got {text!r}")
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ModuleNotFoundError:
            raise RewardError(f"reward {name!r} needs the vaderSentiment package: pip install vaderSentiment"
                              ) from None
        self.text = text
        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray:
        check_pairs(self.name, prompts, continuations)
        texts = full_texts(prompts, continuations) if self.text == "full" else list(continuations)
        scores = [self.analyzer.polarity_scores(text)["compound"] for text in texts]
        return check_scores(self.name, np.array(scores, dtype=np.float64), len(prompts))


def sentiment_reward(*, text: str = "full", name: str = "sentiment") -> SentimentReward:
    """``sentiment``: VADER compound score (offline)."""
    return SentimentReward(text=text, name=name)


register_reward_factory("sentiment", sentiment_reward)
