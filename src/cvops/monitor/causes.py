"""Why did it drift? Ranked causes of a window's difference from the reference.

Plain functions on arrays (no database, no server), so the monitor and a benchmark call the same
code: :func:`explain_drift` takes the image properties, predicted classes and class
probabilities of a window and of the reference, and returns a :class:`CauseReport`:

- property drift: per image property (`cvops.data.properties`) a two-sample KS test, Bonferroni
  over every test of the report (the properties and the prediction shift), with the effect as
  the relative change of the median ("brightness -38%"). The reference is re-weighted to the
  window's mix of predicted classes first: when the classes differ in their images (each demo
  class has its own hue), a class-prior shift moves the properties' marginals although no image
  changed; after re-weighting, only changes within classes remain.
- prediction shift: chi-square test of the window's predicted-class counts against the
  reference's (the model's own predictions on the reference images; their labels where the
  package has no class probabilities), the classes that moved most, mean confidence and
  entropy against the reference.
- ranking: significant properties by KS distance, where a property that moves with a broader
  one in the same direction and no further (mean red with brightness, sharpness with contrast)
  ranks right after it; then the prediction shift, which image changes usually drag along. The
  prediction shift ranks first when no property moved, or when it moved a larger share of the
  window than the leading property: its total variation distance (share of predictions that
  changed class) against that property's KS distance (largest share of images on the other
  side of a threshold), both "what share moved". A class-mix shift or new kinds of objects
  move many predictions and, as side effects, a property a little (new thin shapes add edges);
  an image change strong enough to drag the predictions moves its property more
  (benchmarks/results/drift_cause.md).
- one sentence naming the likely cause, or "no single cause".

The window images that show it (top-k by the domain classifier's out-of-fold score) are picked
by :func:`top_examples`; the monitor fetches their thumbnails.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from cvops.data.properties import IMAGE_PROPERTIES
from cvops.monitor.stats import DriftTester, looks_like_probabilities, predictive_entropy

MIN_ROWS = 10  # fewer window rows with properties (or predictions): that part is skipped
# Family-wise level for naming a cause (MonitorConfig.cause_alpha). Stricter than the verdict's
# alpha: one reference sample is shared by every window, and its false-cause rate scatters
# around the level (benchmarks/results/drift_cause.md, reference spread), so a level at the
# target's 5% leaves some references below 95% "no single cause".
CAUSE_ALPHA = 0.01
EXPLAIN_MARGIN = 0.1  # KS distance a property may exceed its broader one by and still follow it
# Broader property -> the ones it moves in the same direction (scaling the pixel values up gives
# higher mean R, G and B and a larger grey spread; lower contrast means weaker edges, less
# saturation and less measured noise).
EXPLAINS: dict[str, tuple[str, ...]] = {
    "brightness": ("mean_r", "mean_g", "mean_b", "contrast"),
    "contrast": ("saturation", "sharpness", "noise"),
}
# (property, direction) -> (cause, phrase completing "images are ... than the reference")
CAUSES: dict[tuple[str, int], tuple[str, str]] = {
    ("brightness", 1): ("brightness", "brighter"),
    ("brightness", -1): ("brightness", "darker"),
    ("contrast", 1): ("contrast", "higher in contrast"),
    ("contrast", -1): ("contrast", "lower in contrast"),
    ("sharpness", 1): ("sharpness", "sharper or more textured"),
    ("sharpness", -1): ("blur", "blurrier"),
    ("noise", 1): ("noise", "noisier"),
    ("noise", -1): ("blur", "blurrier (less fine detail)"),
    ("saturation", 1): ("saturation", "more saturated"),
    ("saturation", -1): ("saturation", "less saturated"),
    ("mean_r", 1): ("colour", "redder"),
    ("mean_r", -1): ("colour", "less red"),
    ("mean_g", 1): ("colour", "greener"),
    ("mean_g", -1): ("colour", "less green"),
    ("mean_b", 1): ("colour", "bluer"),
    ("mean_b", -1): ("colour", "less blue"),
    ("width", 1): ("size", "wider in pixels"),
    ("width", -1): ("size", "narrower in pixels"),
    ("height", 1): ("size", "taller in pixels"),
    ("height", -1): ("size", "shorter in pixels"),
    ("aspect", 1): ("aspect", "more landscape"),
    ("aspect", -1): ("aspect", "more portrait"),
}
PREDICTION_CAUSE = "prediction_shift"
NO_SINGLE_CAUSE = "no single cause"


@dataclass
class PropertyShift:
    """One property's test. `statistic`: KS distance (0 same, 1 disjoint) against the class-
    re-weighted reference; `change`: window median / reference median - 1."""

    name: str
    statistic: float
    p_value: float
    p_adjusted: float
    significant: bool
    reference_median: float
    window_median: float
    change: float
    direction: int
    window_rows: int
    explained_by: str | None = None
    threshold: float = math.nan  # KS distance above which it is significant

    @property
    def cause(self) -> str:
        return CAUSES.get((self.name, self.direction), (self.name, ""))[0]

    @property
    def phrase(self) -> str:
        return CAUSES.get((self.name, self.direction), ("", f"different in {self.name}"))[1]

    @property
    def effect(self) -> str:
        """'brightness -38%' (or the absolute change where the reference median is 0)."""
        if math.isfinite(self.change):
            return f"{self.name} {self.change:+.0%}".replace("-", "\u2212")
        delta = self.window_median - self.reference_median
        return f"{self.name} {delta:+.3g}".replace("-", "\u2212")


@dataclass
class ClassShare:
    name: str
    reference: float
    window: float

    @property
    def change(self) -> float:
        return self.window - self.reference


@dataclass
class PredictionShift:
    """Predicted-class shares of the window against the reference's (`basis`: 'predictions'
    or 'labels'), chi-square homogeneity test; confidence = top class probability."""

    statistic: float
    p_value: float
    p_adjusted: float
    significant: bool
    total_variation: float
    window_rows: int
    basis: str
    classes: list[ClassShare] = field(default_factory=list)  # most moved first
    reference_confidence: float | None = None
    window_confidence: float | None = None
    confidence_p: float | None = None
    reference_entropy: float | None = None
    window_entropy: float | None = None
    entropy_p: float | None = None

    def towards(self, k: int = 2) -> list[ClassShare]:
        """Up to k classes whose share grew most (by at least 5 points)."""
        grown = sorted(self.classes, key=lambda c: -c.change)
        return [c for c in grown[:k] if c.change >= 0.05]


@dataclass
class Example:
    """A window image that shows the drift: its domain-classifier score and what the model
    said; the monitor adds thumbnails (data URIs) when the image is stored."""

    prediction_id: str
    score: float
    predicted_class: str | None = None
    image: str | None = None
    overlay: str | None = None


@dataclass
class CauseReport:
    sentence: str
    top_cause: str | None
    alpha: float
    tests: int
    properties: list[PropertyShift] = field(default_factory=list)  # ranked
    prediction: PredictionShift | None = None
    examples: list[Example] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ranked_causes(self) -> list[str]:
        """Causes in rank order, each once (e.g. ['brightness', 'prediction_shift'])."""
        order: list[str] = []
        for p in self.properties:
            if p.significant and p.explained_by is None and p.cause not in order:
                order.append(p.cause)
        if self.prediction is not None and self.prediction.significant:
            at = 0 if prediction_leads(self.properties, self.prediction) else len(order)
            order.insert(at, PREDICTION_CAUSE)
        return order

    def as_dict(self, images: bool = False) -> dict[str, Any]:
        """JSON-ready; thumbnails only with `images` (the database row keeps ids only)."""
        data = asdict(self)
        if not images:
            for example in data["examples"]:
                example["image"] = example["overlay"] = None
        data["ranked_causes"] = self.ranked_causes
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CauseReport:
        prediction = data.get("prediction")
        if prediction is not None:
            shares = [ClassShare(**c) for c in prediction.get("classes", [])]
            prediction = PredictionShift(**{**prediction, "classes": shares})
        return cls(
            sentence=data["sentence"],
            top_cause=data.get("top_cause"),
            alpha=data["alpha"],
            tests=data["tests"],
            properties=[PropertyShift(**p) for p in data.get("properties", [])],
            prediction=prediction,
            examples=[Example(**e) for e in data.get("examples", [])],
            notes=list(data.get("notes", [])),
        )


# --------------------------------------------------------------------------- tests


def weighted_ks(
    reference: np.ndarray, weights: np.ndarray, window: np.ndarray
) -> tuple[float, float]:
    """Two-sample KS distance between a weighted reference and a window, and its asymptotic
    p-value at the effective sizes (Kish: (sum w)^2 / sum w^2 reference rows). Equal weights
    give the ordinary two-sample KS test (scipy's asymptotic `kstwo`, as in `stats`)."""
    order = np.argsort(reference, kind="stable")
    ref_sorted, cum = reference[order], np.cumsum(weights[order])
    cum /= cum[-1]
    cur = np.sort(window)
    grid = np.concatenate([ref_sorted, cur])
    idx = np.searchsorted(ref_sorted, grid, side="right")
    f_ref = np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0.0)
    f_cur = np.searchsorted(cur, grid, side="right") / len(cur)
    distance = float(np.abs(f_ref - f_cur).max())
    m_eff = weights.sum() ** 2 / (weights**2).sum()
    en = max(1, round(m_eff * len(cur) / (m_eff + len(cur))))
    return distance, float(np.clip(stats.kstwo.sf(distance, en), 0.0, 1.0))


def class_weights(reference_groups: np.ndarray, window_groups: np.ndarray) -> np.ndarray:
    """Per reference row: window share / reference share of its class, so the re-weighted
    reference has the window's class mix (rows of classes the window lacks get weight 0)."""
    ref_names, ref_counts = np.unique(reference_groups, return_counts=True)
    win = pd.Series(window_groups).value_counts(normalize=True)
    ratio = {
        name: win.get(name, 0.0) / (count / len(reference_groups))
        for name, count in zip(ref_names, ref_counts, strict=True)
    }
    weights = np.array([ratio[g] for g in reference_groups], dtype=np.float64)
    return weights if weights.sum() > 0 else np.ones(len(reference_groups))


def property_shifts(
    reference: pd.DataFrame,
    window: pd.DataFrame,
    level: float,
    tests: int,
    *,
    reference_groups: np.ndarray | None = None,
    window_groups: np.ndarray | None = None,
) -> list[PropertyShift]:
    """One KS test per property both frames have (columns named as IMAGE_PROPERTIES), at
    `level` / `tests` (Bonferroni); ranked. With groups (predicted classes) the reference is
    re-weighted to the window's class mix first."""
    names = [p for p in IMAGE_PROPERTIES if p in reference.columns and p in window.columns]
    grouped = reference_groups is not None and window_groups is not None
    shifts = []
    for name in names:
        ref_values = reference[name].to_numpy(dtype=np.float64)
        win_values = window[name].to_numpy(dtype=np.float64)
        ref_ok, win_ok = np.isfinite(ref_values), np.isfinite(win_values)
        if ref_ok.sum() < MIN_ROWS or win_ok.sum() < MIN_ROWS:
            continue
        ref_v, win_v = ref_values[ref_ok], win_values[win_ok]
        weights = (
            class_weights(reference_groups[ref_ok], window_groups[win_ok])  # type: ignore[index]
            if grouped
            else np.ones(len(ref_v))
        )
        distance, p_value = weighted_ks(ref_v, weights, win_v)
        m_eff = weights.sum() ** 2 / (weights**2).sum()
        en = max(1, round(m_eff * len(win_v) / (m_eff + len(win_v))))
        ref_median, win_median = _weighted_median(ref_v, weights), float(np.median(win_v))
        change = win_median / ref_median - 1.0 if ref_median != 0 else math.nan
        p_adjusted = min(1.0, p_value * tests)
        shifts.append(
            PropertyShift(
                name=name,
                statistic=distance,
                p_value=p_value,
                p_adjusted=p_adjusted,
                significant=p_adjusted < level,
                reference_median=ref_median,
                window_median=win_median,
                change=change,
                direction=1 if win_median >= ref_median else -1,
                window_rows=int(win_ok.sum()),
                threshold=float(stats.kstwo.isf(level / tests, en)),
            )
        )
    return rank_properties(shifts)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def rank_properties(shifts: list[PropertyShift]) -> list[PropertyShift]:
    """Significant first, by KS distance; a property following a broader one (EXPLAINS: same
    direction, distance at most EXPLAIN_MARGIN above it) ranks right after that one."""
    significant = {s.name: s for s in shifts if s.significant}
    for parent, children in EXPLAINS.items():
        top = significant.get(parent)
        if top is None:
            continue
        for child in children:
            s = significant.get(child)
            if (
                s is not None
                and s.direction == top.direction
                and s.statistic <= top.statistic + EXPLAIN_MARGIN
            ):
                s.explained_by = parent
    ranked: list[PropertyShift] = []

    def place(parent: str | None) -> None:
        group = [s for s in significant.values() if s.explained_by == parent]
        for s in sorted(group, key=lambda s: -s.statistic):
            ranked.append(s)
            place(s.name)

    place(None)
    rest = sorted((s for s in shifts if not s.significant), key=lambda s: -s.statistic)
    return ranked + rest


def prediction_shift(
    reference_classes: Sequence[str],
    window_classes: Sequence[str],
    level: float,
    tests: int,
    *,
    basis: str = "predictions",
    reference_probs: np.ndarray | None = None,
    window_probs: np.ndarray | None = None,
) -> PredictionShift:
    """Chi-square homogeneity test of the class counts (2 x classes), at `level` / `tests`;
    mean confidence and entropy (with KS p-values) when both sides have probabilities."""
    ref = pd.Series(list(reference_classes)).value_counts()
    win = pd.Series(list(window_classes)).value_counts()
    names = sorted(set(ref.index) | set(win.index))
    table = np.array([[ref.get(c, 0) for c in names], [win.get(c, 0) for c in names]], float)
    if len(names) > 1:
        statistic, p_value, _, _ = stats.chi2_contingency(table)
    else:
        statistic, p_value = 0.0, 1.0
    ref_share, win_share = table[0] / table[0].sum(), table[1] / table[1].sum()
    shares = [
        ClassShare(c, float(r), float(w))
        for c, r, w in zip(names, ref_share, win_share, strict=True)
    ]
    shares.sort(key=lambda s: -abs(s.change))
    p_adjusted = min(1.0, float(p_value) * tests)
    shift = PredictionShift(
        statistic=float(statistic),
        p_value=float(p_value),
        p_adjusted=p_adjusted,
        significant=p_adjusted < level,
        total_variation=float(0.5 * np.abs(ref_share - win_share).sum()),
        window_rows=len(window_classes),
        basis=basis,
        classes=shares,
    )
    if reference_probs is not None and window_probs is not None:
        ref_conf, win_conf = reference_probs.max(1), window_probs.max(1)
        ref_ent, win_ent = predictive_entropy(reference_probs), predictive_entropy(window_probs)
        shift.reference_confidence, shift.window_confidence = (
            float(ref_conf.mean()),
            float(win_conf.mean()),
        )
        shift.confidence_p = float(stats.ks_2samp(ref_conf, win_conf).pvalue)
        shift.reference_entropy, shift.window_entropy = float(ref_ent.mean()), float(win_ent.mean())
        shift.entropy_p = float(stats.ks_2samp(ref_ent, win_ent).pvalue)
    return shift


# --------------------------------------------------------------------------- the report


def _quote(names: Sequence[str]) -> str:
    quoted = [f"'{n}'" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def prediction_leads(
    properties: Sequence[PropertyShift], prediction: PredictionShift | None
) -> bool:
    """Whether a significant prediction shift ranks before every property: no property moved,
    or the share of predictions that changed class (total variation) exceeds the leading
    property's KS distance."""
    if prediction is None or not prediction.significant:
        return False
    leading = [p for p in properties if p.significant and p.explained_by is None]
    return not leading or prediction.total_variation > leading[0].statistic


def cause_sentence(
    properties: Sequence[PropertyShift],
    prediction: PredictionShift | None,
    level: float = 0.05,
    tests: int = 1,
) -> tuple[str, str | None]:
    """(sentence, top cause): up to two leading property changes of different causes, then
    the prediction shift (first when it leads, `prediction_leads`), and a confidence drop (at
    `level` / `tests`) when there is a cause; NO_SINGLE_CAUSE when nothing is significant."""
    leaders: list[PropertyShift] = []
    for p in properties:
        if p.significant and p.explained_by is None and p.cause not in {q.cause for q in leaders}:
            leaders.append(p)
    predicted = prediction is not None and prediction.significant
    parts = []
    if leaders:
        shown = leaders[:2]
        phrases = " and ".join(p.phrase for p in shown)
        effects = ", ".join(p.effect for p in shown)
        parts.append(f"images are {phrases} than the reference ({effects})")
    if predicted:
        assert prediction is not None
        towards = prediction.towards()
        if towards:
            moves = ", ".join(f"{c.reference:.0%} \u2192 {c.window:.0%}" for c in towards)
            text = f"predictions shifted towards {_quote([c.name for c in towards])} ({moves})"
        else:
            text = "the mix of predicted classes changed"
        if not leaders:
            text += " while the images' properties did not (a class-mix shift or new kinds of"
            text += " images)"
        parts.append(text)
    if not parts:
        return NO_SINGLE_CAUSE, None
    if (
        prediction is not None
        and prediction.confidence_p is not None
        and prediction.confidence_p * tests < level
        and prediction.window_confidence is not None
        and prediction.reference_confidence is not None
        and prediction.window_confidence < prediction.reference_confidence - 0.05
    ):
        parts.append(
            f"the model is less confident (mean {prediction.reference_confidence:.2f} \u2192 "
            f"{prediction.window_confidence:.2f})"
        )
    leads = prediction_leads(properties, prediction)
    if leads and leaders:
        parts[0], parts[1] = parts[1], parts[0]
    sentence = "; ".join(parts)
    top = PREDICTION_CAUSE if leads else leaders[0].cause
    return sentence[0].upper() + sentence[1:], top


def classes_of(probs: np.ndarray | None, classes: Sequence[str]) -> np.ndarray | None:
    """Predicted class names from class probabilities (None when they are not probabilities
    over `classes`)."""
    if probs is None or not len(probs) or probs.shape[1] != len(classes):
        return None
    if not looks_like_probabilities(probs):
        return None
    return np.asarray(classes, dtype=object)[probs.argmax(1)]


def explain_drift(
    *,
    classes: Sequence[str],
    reference_properties: pd.DataFrame | None,
    window_properties: pd.DataFrame | None,
    reference_labels: Sequence[str] | None = None,
    reference_probs: np.ndarray | None = None,
    window_predicted: Sequence[str | None] | None = None,
    window_probs: np.ndarray | None = None,
    alpha: float = CAUSE_ALPHA,
) -> CauseReport:
    """Ranked causes of a window's difference from the reference.

    Properties: frames with one column per property (IMAGE_PROPERTIES names; NaN where a row
    has none), None where a side has none. Predictions: the window's predicted class per row
    (aligned with `window_properties` when both are given) and class probabilities; the
    reference's probabilities give its predicted classes (else `reference_labels` are used).
    Every test runs at alpha / (number of tests): "no single cause" on an un-shifted window
    at a rate >= 1 - alpha.
    """
    notes: list[str] = []
    ref_pred = classes_of(reference_probs, classes)
    basis = "predictions"
    if ref_pred is None and reference_labels is not None and len(reference_labels):
        ref_pred, basis = np.asarray(reference_labels, dtype=object), "labels"
    win_pred = None
    if window_predicted is not None:
        win_pred = np.asarray([c if c is not None else "" for c in window_predicted], object)
    if win_pred is None or (win_pred == "").all():
        win_pred = classes_of(window_probs, classes)
    has_props = (
        reference_properties is not None
        and window_properties is not None
        and len(reference_properties)
    )
    if reference_properties is None or not len(reference_properties):
        notes.append(
            "the reference data have no image properties (a package from before they were "
            "recorded): no property causes; the verdict rests on the embedding tests"
        )
    elif window_properties is None or window_properties.notna().any(axis=1).sum() < MIN_ROWS:
        has_props = False
        notes.append(
            "too few window predictions carry image properties (rows written before they were "
            "recorded): no property causes"
        )
    predictions_usable = (
        ref_pred is not None and win_pred is not None and (win_pred != "").sum() >= MIN_ROWS
    )
    if not predictions_usable:
        notes.append("no predicted classes on both sides: no prediction-shift test")
    n_props = (
        len([p for p in IMAGE_PROPERTIES if p in reference_properties.columns])  # type: ignore[union-attr]
        if has_props
        else 0
    )
    tests = max(1, n_props + int(predictions_usable))
    prediction = None
    if predictions_usable:
        assert ref_pred is not None and win_pred is not None
        known = win_pred != ""
        probs_ok = window_probs is not None and len(window_probs) == len(win_pred)
        prediction = prediction_shift(
            list(ref_pred),
            list(win_pred[known]),
            alpha,
            tests,
            basis=basis,
            reference_probs=reference_probs if basis == "predictions" else None,
            window_probs=window_probs[known] if probs_ok else None,  # type: ignore[index]
        )
    properties: list[PropertyShift] = []
    if has_props:
        assert reference_properties is not None and window_properties is not None
        grouped = (
            ref_pred is not None
            and win_pred is not None
            and len(ref_pred) == len(reference_properties)
            and len(win_pred) == len(window_properties)
            and (win_pred != "").all()
        )
        properties = property_shifts(
            reference_properties,
            window_properties,
            alpha,
            tests,
            reference_groups=ref_pred if grouped else None,
            window_groups=win_pred if grouped else None,
        )
    sentence, top = cause_sentence(properties, prediction, alpha, tests)
    return CauseReport(sentence, top, alpha, tests, properties, prediction, notes=notes)


def top_examples(
    reference: np.ndarray,
    window: np.ndarray,
    ids: Sequence[str],
    *,
    predicted: Sequence[str | None] | None = None,
    k: int = 8,
    seed: int = 0,
) -> list[Example]:
    """The k window rows the domain classifier (`stats.DriftTester`, the `classifier` test's
    features and folds) finds least like the reference, by out-of-fold score."""
    if len(window) < 2 or len(reference) < 2:
        return []
    tester = DriftTester(reference, ("classifier",), seed=seed)
    scores = tester.window_scores(window)
    order = np.argsort(-scores, kind="stable")[:k]
    return [
        Example(
            prediction_id=str(ids[i]),
            score=float(scores[i]),
            predicted_class=predicted[i] if predicted is not None else None,
        )
        for i in order
    ]
