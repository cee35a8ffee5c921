"""guardify (prompt-guardrail): TF-IDF + logistic regression prompt-injection scores.

``guardify.detect`` returns the predicted label and the probability *of that label*,
so a safe prompt scores 0.99 too. The classifier's ``predict_proba`` column for the
injection class is the probability this project needs; the model files ship inside
the package, so nothing is fetched.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from kllm.core.errors import ConfigError
from processors.guardrails import GuardrailError

INJECTION_LABEL = 1  # guardify's training label for "injection" (0 is "safe")


class GuardifyScorer:
    def __init__(self) -> None:
        self._vectorizer, self._clf = _load()
        classes = [int(c) for c in self._clf.classes_]
        if INJECTION_LABEL not in classes:
            raise ConfigError(f"guardify classifier has classes {classes}, no injection class")
        self._column = classes.index(INJECTION_LABEL)

    def score(self, text: str) -> float:
        return self.score_batch([text])[0]

    def score_batch(self, texts: Sequence[str]) -> list[float]:
        """One sparse matrix for all texts: the vectorizer and the model are vectorised."""
        if not texts:
            return []
        try:
            proba = self._clf.predict_proba(self._vectorizer.transform(list(texts)))
        except Exception as exc:
            raise GuardrailError(f"injection scoring failed: {exc}") from exc
        return [float(p) for p in proba[:, self._column]]


def _load() -> tuple[Any, Any]:
    try:
        from guardify.guardrails.logistic_regression import LogisticRegressionGuardrail
        from sklearn.exceptions import InconsistentVersionWarning
    except ImportError as exc:
        raise ConfigError("prompt-guardrail (guardify) is not installed") from exc
    # The pickles were written by scikit-learn 1.7; a TF-IDF vectorizer and a logistic
    # regression load unchanged in later versions, and the e2e tests check the scores.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InconsistentVersionWarning)
        try:
            guardrail = LogisticRegressionGuardrail()
        except Exception as exc:  # unpickling fails in many ways; all mean "unusable"
            raise ConfigError(f"guardify's model files could not be loaded: {exc}") from exc
    return guardrail._vectorizer, guardrail._clf
