"""Calibrated drift tests: false-alarm rate, power, determinism and edge cases on synthetic data."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from scipy import stats
from threadpoolctl import threadpool_limits

from cvops.monitor.stats import (
    DEFAULT_METHODS,
    METHODS,
    REPORTED_METHODS,
    DriftResult,
    DriftTester,
    looks_like_probabilities,
    predictive_entropy,
    run_drift_tests,
)

ALPHA = 0.05
NULL_WINDOWS = 100
# Largest false-alarm count over 100 windows still consistent with a level-0.05 test: the
# one-sided binomial 99% bound (P[Bin(100, 0.05) > 11] < 1%).
MAX_FALSE_ALARMS = int(stats.binom.ppf(0.99, NULL_WINDOWS, ALPHA))


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Small matmuls run several times faster single-threaded on shared CI cores."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(1000, 16))


@pytest.fixture(scope="module")
def tester(reference: np.ndarray) -> DriftTester:
    return DriftTester(reference, METHODS, alpha=ALPHA, seed=0)


@pytest.mark.parametrize("n", [50, 500])
def test_false_alarm_rate_is_at_most_alpha(tester: DriftTester, n: int) -> None:
    rng = np.random.default_rng(n)
    alarms = dict.fromkeys(METHODS, 0)
    for w in range(NULL_WINDOWS):
        for res in tester.test(rng.normal(size=(n, 16)), seed=w):
            alarms[res.method] += res.drifted
    assert MAX_FALSE_ALARMS <= 11
    assert all(count <= MAX_FALSE_ALARMS for count in alarms.values()), alarms


def test_power_on_clear_mean_shift(tester: DriftTester) -> None:
    rng = np.random.default_rng(1)
    hits = dict.fromkeys(METHODS, 0)
    for w in range(20):
        for res in tester.test(rng.normal(size=(100, 16)) + 0.5, seed=w):
            hits[res.method] += res.drifted
    assert all(count == 20 for count in hits.values()), hits


def test_variance_change_is_seen_by_mmd_ks_and_classifier(tester: DriftTester) -> None:
    """A pure scale change keeps the mean: the distance test cannot see it, the others must."""
    cur = np.random.default_rng(2).normal(size=(300, 16)) * 1.5
    drifted = {r.method: r.drifted for r in tester.test(cur)}
    assert drifted["mmd"] and drifted["ks"] and drifted["classifier"]


def test_results_are_deterministic_under_seed(reference: np.ndarray) -> None:
    cur = np.random.default_rng(3).normal(size=(60, 16)) + 0.1
    first = run_drift_tests(reference, cur, seed=7)
    second = run_drift_tests(reference, cur, seed=7)
    assert first == second
    assert [r.method for r in first] == list(METHODS)


def test_result_fields_are_consistent(tester: DriftTester) -> None:
    cur = np.random.default_rng(4).normal(size=(200, 16)) + 0.15
    for res in tester.test(cur):
        assert isinstance(res, DriftResult)
        assert 0.0 < res.p_value <= 1.0
        assert res.drifted == (res.p_value < ALPHA)
        assert res.drifted == (res.score > res.threshold)
        assert res.sample_size == 200
        assert res.reference_size in (200, 1000)
        assert set(res.as_dict()) >= {"method", "score", "threshold", "p_value", "drifted"}


def test_threshold_shrinks_with_window_size(tester: DriftTester) -> None:
    """Why per-call calibration: a fixed score threshold cannot be right for every n."""
    rng = np.random.default_rng(5)
    small = {r.method: r.threshold for r in tester.test(rng.normal(size=(20, 16)))}
    large = {r.method: r.threshold for r in tester.test(rng.normal(size=(800, 16)))}
    assert large["distance"] < small["distance"]
    assert large["mmd"] < small["mmd"]


def test_tiny_window(tester: DriftTester) -> None:
    results = tester.test(np.random.default_rng(6).normal(size=(10, 16)))
    assert all(math.isfinite(r.score) and 0.0 < r.p_value <= 1.0 for r in results)
    far = tester.test(np.random.default_rng(6).normal(size=(10, 16)) + 3.0)
    assert all(r.drifted for r in far), far


def test_constant_component_and_one_dimension() -> None:
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(300, 3))
    ref[:, 0] = 1.0
    cur = rng.normal(size=(50, 3))
    cur[:, 0] = 1.0
    for res in run_drift_tests(ref, cur):
        assert math.isfinite(res.score) and not math.isnan(res.p_value)
    one_d = run_drift_tests(rng.normal(size=300), rng.normal(size=40) + 1.0)
    assert all(r.drifted for r in one_d), one_d
    constant = run_drift_tests(np.zeros((100, 2)), np.zeros((20, 2)))
    assert not any(r.drifted for r in constant), constant
    moved = {r.method: r.drifted for r in run_drift_tests(np.zeros((100, 2)), np.ones((20, 2)))}
    assert moved["ks"] and moved["distance"] and moved["mmd"]


def _rows(pattern: list[float], n: int, rng: np.random.Generator) -> np.ndarray:
    return np.stack([rng.permutation(pattern) for _ in range(n)])


def test_ks_entropy_sees_a_shift_the_component_marginals_hide() -> None:
    """Rows (1/2, 1/4, 1/4, 0) vs a 50/50 mix of (1/2, 1/2, 0, 0) and (1/4, 1/4, 1/4, 1/4), each
    in random class order: every component has the same marginal in both (P(1/2) = 1/4,
    P(1/4) = 1/2, P(0) = 1/4), only how the mass spreads within a row, i.e. the entropy, moves.
    Blur on the demo model is a milder case of this (benchmarks/results/drift_power.md)."""
    rng = np.random.default_rng(11)
    reference = _rows([0.5, 0.25, 0.25, 0.0], 2000, rng)
    assert looks_like_probabilities(reference)
    plain = DriftTester(reference, ("ks",), alpha=ALPHA)
    with_entropy = DriftTester(reference, ("ks",), alpha=ALPHA, ks_entropy=True)
    current = np.vstack(
        [_rows([0.5, 0.5, 0.0, 0.0], 100, rng), _rows([0.25, 0.25, 0.25, 0.25], 100, rng)]
    )
    (hidden,) = plain.test(current)
    (seen,) = with_entropy.test(current)
    assert not hidden.drifted and hidden.info["min_p"] > 0.05
    assert seen.drifted and seen.info["entropy_p"] < 1e-10
    assert seen.info["component_level"] == pytest.approx(ALPHA / 5)  # 4 classes + entropy
    # un-shifted windows: the extra component is inside the Bonferroni correction
    logits = rng.normal(0, 2, (2000 + 50 * NULL_WINDOWS, 6))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    null_tester = DriftTester(probs[:2000], ("ks",), alpha=ALPHA, ks_entropy=True)
    windows = probs[2000:].reshape(NULL_WINDOWS, 50, 6)  # disjoint un-shifted windows
    alarms = sum(null_tester.test(window)[0].drifted for window in windows)
    assert alarms <= MAX_FALSE_ALARMS


def test_probability_rows_are_recognised() -> None:
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(50, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert looks_like_probabilities(probs.astype(np.float32))
    assert not looks_like_probabilities(logits)
    assert not looks_like_probabilities(np.abs(logits))
    assert not looks_like_probabilities(np.ones((10, 1)))
    assert predictive_entropy(np.array([[1.0, 0.0], [0.5, 0.5]])) == pytest.approx(
        [0.0, math.log(2)], abs=1e-9
    )


def test_invalid_inputs_are_rejected(reference: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unknown drift method"):
        run_drift_tests(reference, reference[:10], methods=["psi"])
    with pytest.raises(ValueError, match="dimension mismatch"):
        run_drift_tests(reference, np.zeros((10, 3)))
    with pytest.raises(ValueError, match="at least"):
        run_drift_tests(reference, reference[:1])
    with pytest.raises(ValueError, match="NaN"):
        run_drift_tests(reference, np.full((10, 16), np.nan))
    with pytest.raises(ValueError, match="alpha"):
        run_drift_tests(reference, reference[:10], alpha=1.5)


def test_default_methods_are_known() -> None:
    assert set(DEFAULT_METHODS) == {"uae", "bbsd", "hidden"}
    for embedding, methods in DEFAULT_METHODS.items():
        assert methods and set(methods) <= set(REPORTED_METHODS[embedding]) <= set(METHODS)
