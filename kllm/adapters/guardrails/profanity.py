"""alt-profanity-check (a linear SVM over character n-grams) as a moderation classifier."""

from __future__ import annotations

from collections.abc import Sequence


class ProfanityClassifier:
    name = "profanity"

    def __init__(self) -> None:
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def score(self, texts: Sequence[str]) -> list[float]:
        return [float(p) for p in self._predict_prob(list(texts))]
