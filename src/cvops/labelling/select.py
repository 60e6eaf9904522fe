"""Which logged predictions are worth a label: selection strategies as plain array functions.

Every selection keeps a **random control share**: that many picks are drawn uniformly from the
whole pool *before* the strategy chooses from the rest, so the labels of the random arm are an
unbiased sample of production traffic and the strategy's value can be measured against it
(many published strategies do no better than random on a given dataset).

Strategies (higher priority = asked first):

- ``least_confidence``: 1 - the top class probability.
- ``margin``: 1 - (top probability - second probability).
- ``entropy``: the predictive entropy, divided by log(number of classes) so it lies in [0, 1].
- ``drift_weighted``: entropy x sigmoid(domain-classifier score): an uncertain image that also
  looks unlike the training data (the monitor's domain classifier,
  :meth:`cvops.monitor.stats.DriftTester.window_scores`, in standard deviations of the
  reference rows) ranks above an equally uncertain one that looks like the reference.
- ``random``: the control alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

Strategy = Literal["least_confidence", "margin", "entropy", "drift_weighted", "random"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
RANDOM_ARM = "random"


def uncertainty(probs: np.ndarray, kind: str = "entropy") -> np.ndarray:
    """Per row of class probabilities, how unsure the model is, in [0, 1] (1 = most unsure)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"expected an (n, classes >= 2) probability array, got shape {p.shape}")
    if kind == "least_confidence":
        return 1.0 - p.max(axis=1)
    if kind == "margin":
        top2 = -np.sort(-p, axis=1)[:, :2]
        return 1.0 - (top2[:, 0] - top2[:, 1])
    if kind == "entropy":
        q = np.clip(p, 1e-12, 1.0)
        return -(q * np.log(q)).sum(axis=1) / np.log(p.shape[1])
    raise ValueError(f"unknown uncertainty {kind!r}; choose least_confidence, margin or entropy")


def domain_weight(scores: np.ndarray) -> np.ndarray:
    """Domain-classifier scores (standard deviations from the reference rows) as weights in
    (0, 1): reference-like rows ~0.5 and below, clearly shifted rows near 1."""
    return 1.0 / (1.0 + np.exp(-np.asarray(scores, dtype=np.float64)))


def priority(
    probs: np.ndarray, strategy: str, domain_scores: np.ndarray | None = None
) -> np.ndarray:
    """The strategy's score per row (higher = label first); ``random`` gives zeros."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    if strategy == RANDOM_ARM:
        return np.zeros(len(probs))
    if strategy == "drift_weighted":
        if domain_scores is None:
            raise ValueError("drift_weighted needs domain-classifier scores")
        if len(domain_scores) != len(probs):
            raise ValueError("one domain score per row expected")
        return uncertainty(probs, "entropy") * domain_weight(domain_scores)
    return uncertainty(probs, strategy)


@dataclass
class Selection:
    """Picked row indices (into the pool), the arm each came from and its priority."""

    indices: np.ndarray
    arms: list[str]
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def random_count(n: int, random_share: float) -> int:
    """Picks of the random arm: round(n x share), at least one when the share is positive."""
    if not 0.0 <= random_share <= 1.0:
        raise ValueError(f"random_share must be in [0, 1], got {random_share}")
    if n <= 0 or random_share == 0.0:
        return 0
    return min(n, max(1, round(n * random_share)))


def select(
    probs: np.ndarray,
    n: int,
    strategy: str,
    *,
    random_share: float = 0.1,
    domain_scores: np.ndarray | None = None,
    seed: int = 0,
) -> Selection:
    """Up to ``n`` rows of the pool: the random control first (uniform over the pool), then
    the strategy's top rows among the rest (ties broken by the random draw, not pool order)."""
    total = len(probs)
    n = min(max(n, 0), total)
    rng = np.random.default_rng(seed)
    order = rng.permutation(total)  # a uniform draw; its prefix is the random arm
    controls = n if strategy == RANDOM_ARM else random_count(n, random_share)
    picked = list(order[:controls])
    arms = [RANDOM_ARM] * controls
    scores = priority(probs, strategy, domain_scores)
    rest = order[controls:]
    if n > controls:
        ranked = rest[np.argsort(-scores[rest], kind="stable")]
        picked += list(ranked[: n - controls])
        arms += [strategy] * (n - controls)
    indices = np.asarray(picked, dtype=np.int64)
    return Selection(indices, arms, scores[indices] if len(indices) else np.zeros(0))
