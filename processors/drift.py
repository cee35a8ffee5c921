"""Drift detection on the pipeline's own signals, one event at a time (river's style).

Every (tenant, model, signal) is its own stream with its own detector: a shift in one
tenant's latency says nothing about another's. A stream's first ``warmup`` values only
build its reference (mean and spread, the alert's "before"); then its detector runs.
When it fires, the alert carries the reference, the recent values (the "after") and a few
recent request ids to look at; the stream then rebuilds its reference from the new regime
and stays quiet for ``cooldown`` events, so one shift is one alert, not a storm.

Detectors per signal (``DETECTORS``):

* ADWIN for bounded values and rates (``blocked``, ``feedback_score``, ``retrieval_top_score``,
  ``prompt_distance``, ``feedback_model_error``, and ``groundedness`` from the evaluation
  stage): they live in [0, 1], where ADWIN's bound
  needs no assumption on the distribution and its adaptive window finds both sudden and
  gradual changes of the mean without a chosen window length. (KSWIN tests every event at
  a fixed level: with its defaults, 12 false alarms in 10,000 stationary prompt distances.)
* Page-Hinkley for unbounded, skewed values (``latency_ms``, ``ttft_ms``, ``prompt_length``):
  on a log scale they are near normal and a "x2" is a shift of the mean; standardised
  against the warm-up reference (and clipped, so one outlier cannot fire it alone) the test's
  ``delta`` and ``threshold`` are in units of the stream's own spread, the same for all.

``feedback_model_error`` is the 0/1 error of an online logistic regression per (tenant,
model) that predicts negative feedback from request features before it learns the label
(prequential): when the relation between features and complaints changes, its error rises.
Only a rise is alerted; a falling error (the model still learning) re-baselines silently.
For ``groundedness`` only a fall is alerted.

The whole monitor is plain picklable state: ``pickle.dumps(monitor)`` is its checkpoint, and
a restored monitor continues exactly where the original was.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import drift, linear_model, optim, preprocessing, stats

from kllm.core.errors import ConfigError

SIGNALS = (
    "prompt_distance",
    "prompt_length",
    "retrieval_top_score",
    "latency_ms",
    "ttft_ms",
    "blocked",
    "feedback_score",
    "feedback_model_error",
    "groundedness",
)

ADWIN = "adwin"
PAGE_HINKLEY = "page_hinkley"

# signal -> detector; the PH signals are compared on log(1 + value).
DETECTORS: dict[str, str] = {
    "prompt_distance": ADWIN,
    "prompt_length": PAGE_HINKLEY,
    "retrieval_top_score": ADWIN,
    "latency_ms": PAGE_HINKLEY,
    "ttft_ms": PAGE_HINKLEY,
    "blocked": ADWIN,
    "feedback_score": ADWIN,
    "feedback_model_error": ADWIN,
    "groundedness": ADWIN,
}
# Signals where only a rise is a problem; a fall re-baselines without an alert.
RISE_ONLY = frozenset({"feedback_model_error"})
# Signals where only a fall is a problem (answers better grounded are no alert).
FALL_ONLY = frozenset({"groundedness"})


def rating_score(rating: int) -> float:
    """A 1..5 feedback rating as the ``feedback_score`` signal in [0, 1]."""
    return (min(max(rating, 1), 5) - 1) / 4


@dataclass(frozen=True)
class Observation:
    tenant: str
    model: str
    signal: str
    value: float
    request_id: str
    at: float


@dataclass(frozen=True)
class Alert:
    tenant: str
    model: str
    signal: str
    detector: str
    before: dict[str, float]  # {"mean", "std", "n"} of the reference values (before the change)
    after: dict[str, float]  # the same for the recent values since the estimated change
    sample_request_ids: tuple[str, ...]  # a few recent request ids of the stream
    at: float
    events_seen: int  # events of this stream seen when it fired


MIN_AFTER = 5  # the fewest recent values an alert's "after" is computed from


def _summary(mean: float, std: float, n: int) -> dict[str, float]:
    return {"mean": mean, "std": std, "n": float(n)}


def _change_start(values: Sequence[float], baseline: float) -> tuple[int, float]:
    """Where a shift of the mean away from ``baseline`` most likely began in ``values``.

    The likelihood-ratio estimate for a mean shift of unknown size: the start ``j`` that
    maximises (sum of values[j:] - baseline)^2 / len(values[j:]), over the last
    MIN_AFTER or more values. Returns (j, +1.0 for a rise or -1.0 for a fall).
    """
    best, start, total = -1.0, 0, 0.0
    for j in range(len(values) - 1, -1, -1):
        total += values[j] - baseline
        length = len(values) - j
        if length >= min(MIN_AFTER, len(values)) and total * total / length > best:
            best, start = total * total / length, j
    rest = sum(values[start:]) - baseline * (len(values) - start)
    return start, 1.0 if rest > 0 else -1.0


@dataclass
class _Stream:
    """One (tenant, model, signal): reference, detector, recent values."""

    recent: deque[tuple[float, float, str]]  # (value, detector-scale value, request id)
    seen: int = 0
    raw: Any = field(default_factory=stats.Var)  # reference, raw values
    ref: Any = field(default_factory=stats.Var)  # reference, detector scale
    detector: Any = None  # None while the reference is being built
    fed: Any = field(default_factory=stats.Mean)  # mean of what the detector has seen
    last_alert: int | None = None  # ``seen`` at the last alert


class DriftMonitor:
    """Per (tenant, model, signal) drift detection; ``update`` one observation at a time.

    Parameters
    ----------
    warmup
        Values that build a stream's reference (again after each alert); no alerts meanwhile.
    cooldown
        Events after an alert during which the stream cannot alert again.
    recent
        Size of the ring buffer of recent values; an alert's "after" is the part of it since
        the change, estimated from it (the split that best explains a shift of the mean).
    samples
        Request ids an alert carries (the most recent of the stream).
    adwin_delta, adwin_clock, adwin_min_window
        ADWIN's confidence, how often (in events) it checks, and its smallest sub-window.
    ph_delta, ph_threshold
        Page-Hinkley's tolerated drift and its alarm threshold, both in reference standard
        deviations (the test runs on standardised values).
    ph_clip
        Standardised values are clipped to +-ph_clip before the test.
    feedback_lr
        Learning rate of the feedback model (SGD on standardised features).
    """

    def __init__(
        self,
        *,
        warmup: int = 500,
        cooldown: int = 1000,
        recent: int = 200,
        samples: int = 5,
        adwin_delta: float = 0.002,
        adwin_clock: int = 8,
        adwin_min_window: int = 16,
        ph_delta: float = 0.5,
        ph_threshold: float = 15.0,
        ph_clip: float = 4.0,
        feedback_lr: float = 0.01,
    ) -> None:
        if warmup < 2:
            raise ConfigError(f"drift warmup must be at least 2, got {warmup}")
        if cooldown < 0:
            raise ConfigError(f"drift cooldown must not be negative, got {cooldown}")
        if recent < MIN_AFTER or samples < 1:
            raise ConfigError(f"drift recent must be >= {MIN_AFTER}, samples >= 1: {recent}")
        if not 0 < adwin_delta < 1:
            raise ConfigError(f"adwin_delta must be in (0, 1), got {adwin_delta}")
        if adwin_clock < 1 or adwin_min_window < 1:
            raise ConfigError("adwin_clock and adwin_min_window must be at least 1")
        if ph_delta < 0 or ph_threshold <= 0 or ph_clip <= 0:
            raise ConfigError("ph_delta must be >= 0, ph_threshold and ph_clip > 0")
        if feedback_lr <= 0:
            raise ConfigError(f"feedback_lr must be positive, got {feedback_lr}")
        self.warmup = warmup
        self.cooldown = cooldown
        self.recent = recent
        self.samples = samples
        self.adwin_delta = adwin_delta
        self.adwin_clock = adwin_clock
        self.adwin_min_window = adwin_min_window
        self.ph_delta = ph_delta
        self.ph_threshold = ph_threshold
        self.ph_clip = ph_clip
        self.feedback_lr = feedback_lr
        self._streams: dict[tuple[str, str, str], _Stream] = {}
        self._models: dict[tuple[str, str], Any] = {}

    # -- public -----------------------------------------------------------------------

    def update(self, obs: Observation) -> list[Alert]:
        """Feed one observation; returns the alert it triggers, if any (at most one).

        Raises ConfigError for a signal not in SIGNALS. A non-finite value is ignored.
        """
        kind = DETECTORS.get(obs.signal)
        if kind is None:
            raise ConfigError(f"unknown drift signal {obs.signal!r} (known: {', '.join(SIGNALS)})")
        if not math.isfinite(obs.value):
            return []
        key = (obs.tenant, obs.model, obs.signal)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(recent=deque(maxlen=self.recent))
        stream.seen += 1
        scaled = self._scale(kind, obs.value)
        stream.recent.append((obs.value, scaled, obs.request_id))

        if stream.detector is None:  # building the reference
            stream.raw.update(obs.value)
            stream.ref.update(scaled)
            if stream.raw.n >= self.warmup:
                stream.detector = self._new_detector(kind)
                stream.fed = stats.Mean()
            return []

        x = scaled
        if kind == PAGE_HINKLEY:
            std = math.sqrt(max(stream.ref.get(), 0.0)) or 1e-9
            z = (scaled - stream.ref.mean.get()) / std
            x = min(max(z, -self.ph_clip), self.ph_clip)
        stream.detector.update(x)
        stream.fed.update(x)
        if not stream.detector.drift_detected:
            return []
        baseline = float(stream.fed.get())
        stream.fed = stats.Mean()  # river's detectors restart after a detection
        if obs.signal in RISE_ONLY or obs.signal in FALL_ONLY:
            scaled_recent = [s for _, s, _ in stream.recent]
            rise = _change_start(scaled_recent, baseline)[1] > 0
            if rise != (obs.signal in RISE_ONLY):
                return []  # the harmless way: the detector restarts on the new level
        if stream.last_alert is not None and stream.seen - stream.last_alert <= self.cooldown:
            return []
        alert = self._alert(obs, kind, stream)
        stream.last_alert = stream.seen
        stream.raw = stats.Var()  # rebuild the reference from the new regime
        stream.ref = stats.Var()
        stream.detector = None
        return [alert]

    def learn_feedback(
        self,
        tenant: str,
        model: str,
        features: Mapping[str, float],
        negative: bool,
        request_id: str,
        at: float,
    ) -> list[Alert]:
        """Predict negative feedback from ``features``, then learn the label (prequential).

        The prediction's 0/1 error is the ``feedback_model_error`` signal of (tenant, model).
        """
        learner = self._models.get((tenant, model))
        if learner is None:
            learner = self._models[(tenant, model)] = preprocessing.StandardScaler() | (
                linear_model.LogisticRegression(optimizer=optim.SGD(self.feedback_lr))
            )
        x = {name: float(value) for name, value in features.items()}
        p_negative = float(learner.predict_proba_one(x).get(True, 0.0))
        error = float((p_negative > 0.5) != negative)
        learner.learn_one(x, negative)
        return self.update(
            Observation(tenant, model, "feedback_model_error", error, request_id, at)
        )

    def predict_negative(self, tenant: str, model: str, features: Mapping[str, float]) -> float:
        """The feedback model's probability of negative feedback (0.5 before any label)."""
        learner = self._models.get((tenant, model))
        if learner is None:
            return 0.5
        x = {name: float(value) for name, value in features.items()}
        return float(learner.predict_proba_one(x).get(True, 0.0))

    def streams(self) -> list[tuple[str, str, str]]:
        """The (tenant, model, signal) streams seen so far."""
        return list(self._streams)

    # -- internals --------------------------------------------------------------------

    @staticmethod
    def _scale(kind: str, value: float) -> float:
        if kind == PAGE_HINKLEY:
            return math.log1p(max(value, 0.0))  # latencies and lengths: multiplicative noise
        return min(max(value, 0.0), 1.0)  # ADWIN's bound is for values in [0, 1]

    def _new_detector(self, kind: str) -> Any:
        if kind == PAGE_HINKLEY:
            # alpha=1 (no forgetting): with river's default 1 - 1e-4 the cumulative sums decay
            # toward -delta / (1 - alpha), which erodes the effective delta as the stream ages
            # (measured: false alarms clustering after ~8,000 events); without it the test is
            # a plain two-sided CUSUM with a constant false-alarm rate.
            return drift.PageHinkley(
                min_instances=30,
                delta=self.ph_delta,
                threshold=self.ph_threshold,
                alpha=1.0,
                mode="both",
            )
        return drift.ADWIN(  # type: ignore[no-untyped-call]
            delta=self.adwin_delta,
            clock=self.adwin_clock,
            min_window_length=self.adwin_min_window,
            grace_period=2 * self.adwin_min_window,
        )

    def _alert(self, obs: Observation, kind: str, stream: _Stream) -> Alert:
        recent = list(stream.recent)
        start, _ = _change_start([s for _, s, _ in recent], float(stream.ref.mean.get()))
        values = [value for value, _, _ in recent[start:]]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
        before = _summary(
            float(stream.raw.mean.get()),
            math.sqrt(max(float(stream.raw.get()), 0.0)),
            int(stream.raw.n),
        )
        ids = tuple(request_id for _, _, request_id in recent[-self.samples :])
        return Alert(
            tenant=obs.tenant,
            model=obs.model,
            signal=obs.signal,
            detector=kind,
            before=before,
            after=_summary(mean, math.sqrt(var), len(values)),
            sample_request_ids=ids,
            at=obs.at,
            events_seen=stream.seen,
        )


@dataclass
class _Reference:
    total: np.ndarray[Any, np.dtype[np.float64]]
    n: int = 0
    unit: np.ndarray[Any, np.dtype[np.float64]] | None = None


class PromptReference:
    """Reference embedding per (tenant, model): the normalised mean of the first ``size``
    (normalised) prompt vectors; ``distance(vector) = 1 - cosine(vector, reference)``.

    Until the reference is complete, ``distance`` learns the vector and returns None
    (nothing to compare with yet). A zero vector is ignored (None).
    """

    def __init__(self, size: int = 200) -> None:
        if size < 1:
            raise ConfigError(f"prompt reference size must be at least 1, got {size}")
        self.size = size
        self._refs: dict[tuple[str, str], _Reference] = {}

    def ready(self, tenant: str, model: str) -> bool:
        ref = self._refs.get((tenant, model))
        return ref is not None and ref.unit is not None

    def distance(self, tenant: str, model: str, vector: Sequence[float]) -> float | None:
        v = np.asarray(vector, dtype=np.float64).ravel()
        norm = float(np.linalg.norm(v))
        if not math.isfinite(norm) or norm == 0.0:
            return None
        v = v / norm
        ref = self._refs.get((tenant, model))
        if ref is None:
            ref = self._refs[(tenant, model)] = _Reference(total=np.zeros_like(v))
        if ref.total.shape != v.shape:
            raise ConfigError(
                f"prompt vector of dimension {v.shape[0]} for {tenant}/{model}, "
                f"the reference has {ref.total.shape[0]} (embedder changed?)"
            )
        if ref.unit is None:
            ref.total += v
            ref.n += 1
            if ref.n >= self.size:
                total_norm = float(np.linalg.norm(ref.total))
                ref.unit = ref.total / (total_norm or 1.0)
            return None
        return 1.0 - float(np.dot(v, ref.unit))
