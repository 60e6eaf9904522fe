"""Train/test checks and gates: per-file findings, duplicates and leakage, balance, drift.

Why our own code: Deepchecks' vision suite pulls a 6.4 GB CUDA PyTorch and old pins, and
cleanvision crashes on a corrupt file and has no train-vs-test notion. What we need is small:
stream every file through :func:`~cvops.data.validation.features.analyse_image` (2 worker
processes), keep ~1 KB per image, then compare the splits with numpy/scipy.

Near-duplicates are found without O(n^2) Python loops: 64-bit perceptual hashes are compared
in numpy blocks (XOR + popcount, bounded memory), and each candidate pair within the Hamming
threshold is confirmed by :func:`similarity` (colour layout + texture of small thumbnails),
which removes the look-alike-but-different images (same shape, other colour or texture) that a
hash alone confuses.
"""

from __future__ import annotations

import base64
import io
import logging
import multiprocessing
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from cvops.config import ValidationGateConfig
from cvops.data.images import SPLITS, DatasetLayoutError, images_root, index_split
from cvops.data.validation.features import (
    COLOUR_SIZE,
    GREY_SIDE,
    PROPERTIES,
    SIGNATURE_SIZE,
    ImageRecord,
    analyse_image,
    init_worker,
    thumbnail,
)

log = logging.getLogger(__name__)

GateLevel = Literal["fail", "warn", "off"]
Status = Literal["fail", "warn", "pass", "off"]
# Below this many files the worker pool's start-up (~1-2 s) costs more than it saves.
MIN_FILES_FOR_POOL = 200
# Pair block of the Hamming search: rows x n uint64 stays under ~32 MB.
_HAMMING_BLOCK_ELEMENTS = 4_000_000
# Gate name -> the issue kinds it governs (report order).
GATE_KINDS: dict[str, tuple[str, ...]] = {
    "corrupt": ("corrupt",),
    "leakage": ("leakage_exact", "leakage_near"),
    "missing_class": ("missing_class",),
    "imbalance": ("imbalance",),
    "duplicates": ("exact_duplicate", "near_duplicate"),
    "label_shift": ("label_shift",),
    "property_drift": ("property_drift",),
    "odd_mode": ("odd_mode",),
    "tiny_image": ("tiny_image",),
}
ISSUE_KINDS: tuple[str, ...] = tuple(k for kinds in GATE_KINDS.values() for k in kinds) + (
    "extra_class",
)
PROPERTY_LABELS: dict[str, str] = {
    "width": "Width (px)",
    "height": "Height (px)",
    "aspect": "Aspect ratio (w/h)",
    "brightness": "Brightness (mean grey)",
    "contrast": "Contrast (grey std)",
    "sharpness": "Sharpness (Laplacian variance, log10)",
    "saturation": "Saturation (mean HSV S)",
    "mean_r": "Mean red",
    "mean_g": "Mean green",
    "mean_b": "Mean blue",
}
_MODE_NOTES = {
    "L": "greyscale",
    "LA": "greyscale + alpha, alpha dropped",
    "RGBA": "alpha dropped",
    "P": "palette",
    "PA": "palette + alpha, alpha dropped",
    "CMYK": "print colours",
    "1": "1-bit",
    "I;16": "16-bit greyscale",
    "I": "32-bit integer",
    "F": "32-bit float",
}


class DataValidationError(RuntimeError):
    """A validation gate failed; the message lists the failing gates and the offending files."""

    @classmethod
    def from_result(
        cls, result: ValidationResult, report: Path | None = None, max_files: int = 20
    ) -> DataValidationError:
        return cls(failure_message(result, report, max_files))


@dataclass
class Issue:
    """One finding. File-level ones name the file (relative to the images root)."""

    kind: str
    message: str
    split: str | None = None
    path: str | None = None
    label: str | None = None
    other: str | None = None  # the image this one duplicates (duplicates and leakage)
    other_label: str | None = None
    severity: Status = "warn"

    @property
    def line(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


@dataclass
class GateResult:
    """The outcome of one gate: its configured level and what the data made of it."""

    name: str
    level: GateLevel
    status: Status
    message: str
    lines: list[str] = field(default_factory=list)  # one per offending file (or finding)


@dataclass
class PropertyStats:
    """One image property compared between the splits (values of readable images only)."""

    name: str
    label: str
    summary: dict[str, dict[str, float]]  # split -> n, mean, median, p5, p95
    ks: float
    p_value: float
    p_adjusted: float  # Bonferroni-corrected over the properties; drift is judged on this
    drifted: bool
    edges: list[float]  # histogram bin edges, on the display scale (log10 for sharpness)
    hist: dict[str, list[float]]  # split -> fraction of that split's images per bin


@dataclass
class ValidationResult:
    """Everything the report and the gates need; small (records are ~100 B per image)."""

    dataset: Path
    root: Path
    classes: list[str]
    config: ValidationGateConfig
    records: pd.DataFrame
    class_counts: dict[str, dict[str, int]]
    label_shift: dict[str, float]
    properties: list[PropertyStats]
    issues: list[Issue]
    gates: list[GateResult]
    thumbnails: dict[str, str]
    examples: dict[str, list[str]]  # issue key -> example paths for the report
    extra_classes: dict[str, list[str]]
    elapsed_s: float
    created: str

    @property
    def gate_failures(self) -> list[GateResult]:
        return [g for g in self.gates if g.status == "fail"]

    @property
    def warnings(self) -> list[GateResult]:
        return [g for g in self.gates if g.status == "warn"]

    @property
    def passed(self) -> bool:
        return not self.gate_failures

    @property
    def status(self) -> str:
        if self.gate_failures:
            return "failed"
        return "passed_with_warnings" if self.warnings else "passed"

    def issues_of(self, *kinds: str) -> list[Issue]:
        return [i for i in self.issues if i.kind in kinds]

    @property
    def leakage_fraction(self) -> float:
        n_test = int(((self.records["split"] == "test") & self.records["ok"]).sum())
        leaked = {i.path for i in self.issues_of("leakage_exact", "leakage_near")}
        return len(leaked) / n_test if n_test else 0.0

    @property
    def summary(self) -> dict[str, Any]:
        """Flat figures for logs, MLflow tags and metrics (issue counts per kind)."""
        rec = self.records
        out: dict[str, Any] = {"status": self.status}
        for split in SPLITS:
            in_split = rec["split"] == split
            out[f"n_{split}"] = int(in_split.sum())
            out[f"n_{split}_readable"] = int((in_split & rec["ok"]).sum())
        out.update({f"issues.{k}": len(self.issues_of(k)) for k in ISSUE_KINDS})
        out["leakage_fraction"] = round(self.leakage_fraction, 6)
        for split, counts in self.class_counts.items():
            out[f"imbalance_ratio.{split}"] = _imbalance_ratio(counts)
        out["label_tv"] = self.label_shift.get("tv", float("nan"))
        out["label_chi2_p"] = self.label_shift.get("chi2_p", float("nan"))
        out["drifted_properties"] = sum(p.drifted for p in self.properties)
        out["gate_failures"] = len(self.gate_failures)
        out["warnings"] = len(self.warnings)
        out["elapsed_s"] = round(self.elapsed_s, 2)
        return out


def failure_message(
    result: ValidationResult, report: Path | None = None, max_files: int = 20
) -> str:
    """Failing gates with their first ``max_files`` offending files each, and how to relax."""
    failures = result.gate_failures
    parts = [
        f"Data validation failed for {result.dataset}: {len(failures)} gate(s) "
        f"({', '.join(g.name for g in failures)})"
    ]
    for gate in failures:
        parts.append(f"  - {gate.name}: {gate.message}")
        parts.extend(f"      {line}" for line in gate.lines[:max_files])
        if len(gate.lines) > max_files:
            parts.append(f"      ... and {len(gate.lines) - max_files} more")
    names = ", ".join(g.name for g in failures)
    parts.append(
        f"Fix the data, or set train.validation.<gate>: warn (or off) for: {names}. "
        f"Paths are relative to {result.root}."
    )
    if report is not None:
        parts.append(f"Full report: {report}")
    return "\n".join(parts)


# --------------------------------------------------------------------------- entry point


def validate_dataset(
    dataset_dir: Path,
    *,
    classes: list[str] | None = None,
    gates: ValidationGateConfig | None = None,
    workers: int = 2,
) -> ValidationResult:
    """Check the train and test splits of an image-folder dataset (either layout).

    ``classes``: the configured classes (others' folders are ignored with a warning, as the
    training step does); None takes every class folder found. Never raises on a bad file; raises
    DatasetLayoutError only when there is no train split at all.
    """
    started = time.perf_counter()
    cfg = gates or ValidationGateConfig()
    dataset_dir = Path(dataset_dir)
    root = images_root(dataset_dir).resolve()
    frames = []
    for split in SPLITS:
        try:
            frame = index_split(dataset_dir, split)
        except DatasetLayoutError as err:
            log.warning("%s", err)
            frame = pd.DataFrame(columns=["path", "label"])
        frames.append(frame.assign(split=split))
    index = pd.concat(frames, ignore_index=True)
    found = sorted(set(index["label"]))
    class_list = list(classes) if classes is not None else found
    extra = {
        split: sorted(set(index.loc[index["split"] == split, "label"]) - set(class_list))
        for split in SPLITS
    }
    index = index[index["label"].isin(class_list)].reset_index(drop=True)
    log.info(
        "Validating %s: %d train + %d test files, %d classes",
        dataset_dir,
        int((index["split"] == "train").sum()),
        int((index["split"] == "test").sum()),
        len(class_list),
    )

    records, phash, signatures = _analyse(index, root, workers)
    ok = records["ok"].to_numpy()
    issues: list[Issue] = []
    issues += _file_issues(records, cfg)
    class_counts = {
        split: {
            c: int(((records["split"] == split) & (records["label"] == c) & ok).sum())
            for c in class_list
        }
        for split in SPLITS
    }
    issues += _class_issues(class_counts, cfg)
    label_shift = _label_shift(class_counts)
    if label_shift["tv"] > cfg.max_label_tv and label_shift["chi2_p"] < cfg.drift_p_value:
        issues.append(
            Issue(
                "label_shift",
                f"class shares differ between train and test: total variation "
                f"{label_shift['tv']:.3f} > {cfg.max_label_tv}, chi-square p="
                f"{label_shift['chi2_p']:.2g}",
            )
        )
    properties = _property_stats(records, cfg)
    issues += [
        Issue(
            "property_drift",
            f"{p.label}: KS {p.ks:.3f} (corrected p={p.p_adjusted:.2g}); median train "
            f"{p.summary['train']['median']:.3g} vs test {p.summary['test']['median']:.3g}",
        )
        for p in properties
        if p.drifted
    ]
    issues += _duplicate_issues(records, phash, signatures, cfg)
    for split, names in extra.items():
        issues += [
            Issue(
                "extra_class",
                f"class folder {n!r} is not in the configured classes, ignored",
                split=split,
                path=f"{split}/{n}",
            )
            for n in names
        ]
    context = {"label_shift": label_shift, "properties": properties}
    gate_results = _evaluate_gates(records, class_counts, issues, cfg, context)
    issues = [i for i in issues if i.severity != "off"]
    examples = _pick_examples(records, issues, properties, class_counts, cfg)
    thumbs = _thumbnails(root, {p for paths in examples.values() for p in paths})
    result = ValidationResult(
        dataset=dataset_dir,
        root=root,
        classes=class_list,
        config=cfg,
        records=records,
        class_counts=class_counts,
        label_shift=label_shift,
        properties=properties,
        issues=issues,
        gates=gate_results,
        thumbnails=thumbs,
        examples=examples,
        extra_classes={s: n for s, n in extra.items() if n},
        elapsed_s=time.perf_counter() - started,
        created=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    )
    log.info(
        "Data validation %s in %.1f s: %d gate failure(s), %d warning(s)",
        result.status,
        result.elapsed_s,
        len(result.gate_failures),
        len(result.warnings),
    )
    return result


# --------------------------------------------------------------------------- per-image pass


def _iter_records(paths: list[str], workers: int) -> Iterator[ImageRecord]:
    """Records in path order: from ``workers`` processes, or in this process for small jobs."""
    if workers <= 1 or len(paths) < MIN_FILES_FOR_POOL:
        init_worker()
        yield from map(analyse_image, paths)
        return
    # spawn, not fork: the flow process runs TensorFlow/Prefect threads that fork would copy.
    # The children import only features.py (numpy, Pillow, OpenCV, imagehash): ~1 s to start.
    ctx = multiprocessing.get_context("spawn")
    chunk = max(8, min(64, len(paths) // (workers * 8)))
    done = 0
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker) as pool:
            for rec in pool.map(analyse_image, paths, chunksize=chunk):
                done += 1
                yield rec
    except BrokenProcessPool as err:
        # e.g. a script without `if __name__ == "__main__":` that spawn cannot re-import
        log.warning(
            "Data validation: worker processes failed (%s); analysing the remaining %d files "
            "in this process",
            err,
            len(paths) - done,
        )
        init_worker()
        yield from map(analyse_image, paths[done:])


def _analyse(
    index: pd.DataFrame, root: Path, workers: int
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Stream every file through the workers; keep records, hashes and 768-byte signatures."""
    n = len(index)
    rows: list[dict[str, Any]] = []
    phash = np.zeros(n, dtype=np.uint64)
    signatures = np.zeros((n, SIGNATURE_SIZE), dtype=np.uint8)
    paths = index["path"].tolist()
    for i, rec in enumerate(_iter_records(paths, workers)):
        row = {
            "ok": rec.ok,
            "error": rec.error,
            "file_bytes": rec.file_bytes,
            "file_hash": rec.file_hash,
            "pixel_hash": rec.pixel_hash,
            "mode": rec.mode,
            "format": rec.format,
        }
        row.update({p: getattr(rec, p) for p in PROPERTIES})
        rows.append(row)
        if rec.ok:
            phash[i] = np.uint64(rec.phash)
            signatures[i] = np.frombuffer(rec.signature, dtype=np.uint8)
        if (i + 1) % 5000 == 0:
            log.info("Data validation: analysed %d / %d files", i + 1, n)
    columns = ["ok", "error", "file_bytes", "file_hash", "pixel_hash", "mode", "format"]
    records = pd.DataFrame(rows, index=index.index, columns=[*columns, *PROPERTIES])
    records["ok"] = records["ok"].astype(bool)
    records.insert(0, "path", [_relative(p, root) for p in paths])
    records.insert(1, "split", index["split"].to_numpy())
    records.insert(2, "label", index["label"].to_numpy())
    return records, phash, signatures


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return path


# --------------------------------------------------------------------------- findings


def _file_issues(records: pd.DataFrame, cfg: ValidationGateConfig) -> list[Issue]:
    issues = []
    for row in records.itertuples(index=False):
        where = {"split": row.split, "path": row.path, "label": row.label}
        if not row.ok:
            issues.append(Issue("corrupt", f"corrupt or unreadable: {row.error}", **where))
            continue
        if row.mode != "RGB":
            note = _MODE_NOTES.get(row.mode, "unusual mode")
            issues.append(Issue("odd_mode", f"mode {row.mode} converted to RGB ({note})", **where))
        if min(row.width, row.height) < cfg.min_image_side:
            issues.append(
                Issue(
                    "tiny_image",
                    f"tiny image {row.width}x{row.height} (a side < {cfg.min_image_side} px)",
                    **where,
                )
            )
    return issues


def _imbalance_ratio(counts: dict[str, int]) -> float:
    present = [c for c in counts.values() if c > 0]
    return max(present) / min(present) if len(present) >= 2 else float("nan")


def _class_issues(
    class_counts: dict[str, dict[str, int]], cfg: ValidationGateConfig
) -> list[Issue]:
    issues = []
    for split, counts in class_counts.items():
        issues += [
            Issue(
                "missing_class",
                f"class {c!r} has no readable images in {split}",
                split=split,
                label=c,
            )
            for c, n in counts.items()
            if n == 0
        ]
        ratio = _imbalance_ratio(counts)
        if ratio > cfg.max_imbalance_ratio:
            present = {c: n for c, n in counts.items() if n > 0}
            big, small = max(present, key=present.get), min(present, key=present.get)  # type: ignore[arg-type]
            issues.append(
                Issue(
                    "imbalance",
                    f"{split}: largest/smallest class ratio {ratio:.1f} > "
                    f"{cfg.max_imbalance_ratio:g} ({big!r} {present[big]} vs {small!r} "
                    f"{present[small]})",
                    split=split,
                    label=small,
                )
            )
    return issues


def _label_shift(class_counts: dict[str, dict[str, int]]) -> dict[str, float]:
    """Total variation between the class shares of the splits, and a chi-square p-value."""
    table = np.array([list(class_counts[s].values()) for s in SPLITS], dtype=float)
    table = table[:, table.sum(axis=0) > 0]
    totals = table.sum(axis=1)
    if table.shape[1] < 2 or (totals == 0).any():
        return {"tv": float("nan"), "chi2_p": float("nan")}
    shares = table / totals[:, None]
    tv = 0.5 * float(np.abs(shares[0] - shares[1]).sum())
    try:
        p = float(stats.chi2_contingency(table).pvalue)
    except ValueError:
        p = float("nan")
    return {"tv": tv, "chi2_p": p}


def _display_values(name: str, values: np.ndarray) -> np.ndarray:
    return np.log10(1.0 + values) if name == "sharpness" else values


def _property_stats(records: pd.DataFrame, cfg: ValidationGateConfig) -> list[PropertyStats]:
    """Per property: summary per split, two-sample KS test, and a shared-bin histogram."""
    ok = records[records["ok"]] if len(records) else records
    out = []
    for name in PROPERTIES:
        values = {s: ok.loc[ok["split"] == s, name].to_numpy(dtype=float) for s in SPLITS}
        values = {s: v[np.isfinite(v)] for s, v in values.items()}
        summary = {
            s: {
                "n": float(len(v)),
                "mean": float(v.mean()) if len(v) else float("nan"),
                "median": float(np.median(v)) if len(v) else float("nan"),
                "p5": float(np.percentile(v, 5)) if len(v) else float("nan"),
                "p95": float(np.percentile(v, 95)) if len(v) else float("nan"),
            }
            for s, v in values.items()
        }
        a, b = values["train"], values["test"]
        ks, p = float("nan"), float("nan")
        if len(a) >= 2 and len(b) >= 2:
            res = stats.ks_2samp(a, b)
            ks, p = float(res.statistic), float(res.pvalue)
        # Bonferroni over the properties: ten tests at 1% would cry wolf on one dataset in ten.
        p_adjusted = min(1.0, p * len(PROPERTIES)) if np.isfinite(p) else p
        drifted = bool(ks >= cfg.drift_ks_threshold and p_adjusted < cfg.drift_p_value)
        shown = {s: _display_values(name, v) for s, v in values.items()}
        pooled = np.concatenate(list(shown.values()))
        if len(pooled):
            lo, hi = np.percentile(pooled, [0.5, 99.5])
            if hi <= lo:
                lo, hi = lo - 0.5, hi + 0.5
        else:
            lo, hi = 0.0, 1.0
        edges = np.linspace(lo, hi, 25)
        hist = {}
        for s, v in shown.items():
            counts, _ = np.histogram(np.clip(v, lo, hi), bins=edges)
            hist[s] = (counts / max(len(v), 1)).round(5).tolist()
        out.append(
            PropertyStats(
                name=name,
                label=PROPERTY_LABELS[name],
                summary=summary,
                ks=ks,
                p_value=p,
                p_adjusted=p_adjusted,
                drifted=drifted,
                edges=edges.round(5).tolist(),
                hist=hist,
            )
        )
    return out


# --------------------------------------------------------------------------- duplicates


def hamming_pairs(
    rows: np.ndarray, hashes: np.ndarray, max_distance: int
) -> Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (row_idx, col_idx, distance) blocks of all pairs within ``max_distance`` bits.

    Vectorised XOR + popcount of packed 64-bit hashes, ``rows`` against every hash, in blocks
    that keep memory bounded (~32 MB) whatever the dataset size.
    """
    n = len(hashes)
    block = max(1, _HAMMING_BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, len(rows), block):
        r = rows[start : start + block]
        dist = np.bitwise_count(hashes[r][:, None] ^ hashes[None, :])
        ri, ci = np.nonzero(dist <= max_distance)
        yield r[ri], ci, dist[ri, ci]


def _correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two (pairs, values) float arrays; 0 for flat rows."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    return np.where(norm > 0, (x * y).sum(axis=1) / np.maximum(norm, 1e-9), 0.0)


def _gradient_magnitude(grey: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a batch of (n, h, w) images, flattened to (n, h*w)."""
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="reflect")
    gx = (p[:, :-2, 2:] + 2 * p[:, 1:-1, 2:] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, 1:-1, :-2] + p[:, 2:, :-2]
    )
    gy = (p[:, 2:, :-2] + 2 * p[:, 2:, 1:-1] + p[:, 2:, 2:]) - (
        p[:, :-2, :-2] + 2 * p[:, :-2, 1:-1] + p[:, :-2, 2:]
    )
    return np.sqrt(gx * gx + gy * gy).reshape(len(grey), -1)


def similarity(signatures: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How alike image pairs (a[k], b[k]) are, in [-1, 1]: the lower of two correlations.

    Colour thumbnails (16x16) catch a different layout or colour; gradient magnitudes of 32x32
    grey thumbnails catch a different texture (stripes vs dots vs plain). Both are invariant to
    brightness/contrast changes and survive resizing and recompression: copies score > 0.95,
    look-alike but distinct demo images < 0.93.
    """
    out = np.empty(len(a), dtype=np.float32)
    side = GREY_SIDE
    for s in range(0, len(a), 4096):
        x = signatures[a[s : s + 4096]].astype(np.float32)
        y = signatures[b[s : s + 4096]].astype(np.float32)
        colour = _correlation(x[:, :COLOUR_SIZE], y[:, :COLOUR_SIZE])
        gx = _gradient_magnitude(x[:, COLOUR_SIZE:].reshape(-1, side, side))
        gy = _gradient_magnitude(y[:, COLOUR_SIZE:].reshape(-1, side, side))
        out[s : s + 4096] = np.minimum(colour, _correlation(gx, gy))
    return out


def _duplicate_issues(
    records: pd.DataFrame, phash: np.ndarray, signatures: np.ndarray, cfg: ValidationGateConfig
) -> list[Issue]:
    """Exact (same pixels) and near duplicates within each split and test-vs-train leakage.

    Each image gets at most one finding: a test image that duplicates a train image is
    leakage; otherwise an image that duplicates an earlier one of its split is a duplicate.
    """
    ok_idx = np.flatnonzero(records["ok"].to_numpy())
    if len(ok_idx) < 2:
        return []
    paths = records["path"].to_numpy()
    labels = records["label"].to_numpy()
    split = records["split"].to_numpy()
    is_test = split == "test"
    pixel_id = np.full(len(records), -1, dtype=np.int64)
    pixel_id[ok_idx] = pd.factorize(records["pixel_hash"].to_numpy()[ok_idx])[0]
    file_hash = records["file_hash"].to_numpy()

    # best partner per image: (kind, partner, score); leakage first, then within-split
    leak: dict[int, tuple[str, int, float]] = {}
    dup: dict[int, tuple[str, int, float]] = {}

    groups = pd.Series(ok_idx).groupby(pixel_id[ok_idx])
    for _, members in groups:
        if len(members) < 2:
            continue
        m = members.to_numpy()
        train_m, test_m = m[~is_test[m]], m[is_test[m]]
        for part in (train_m, test_m):
            for j in part[1:]:
                dup[int(j)] = ("exact", int(part[0]), 1.0)
        if len(train_m):
            for j in test_m:
                leak[int(j)] = ("exact", int(train_m[0]), 1.0)

    h = phash[ok_idx]
    n_candidates = 0
    for rows, cols, dist in hamming_pairs(np.arange(len(ok_idx)), h, cfg.near_dup_max_hamming):
        i, j = ok_idx[rows], ok_idx[cols]
        same_split = split[i] == split[j]
        wanted = ((same_split & (j < i)) | (is_test[i] & ~is_test[j])) & (
            pixel_id[i] != pixel_id[j]
        )
        i, j, dist = i[wanted], j[wanted], dist[wanted]
        if not len(i):
            continue
        n_candidates += len(i)
        sim = similarity(signatures, i, j)
        keep = sim >= cfg.near_dup_min_similarity
        for a, b, s in zip(i[keep], j[keep], sim[keep], strict=True):
            target = leak if is_test[a] and not is_test[b] else dup
            best = target.get(int(a))
            if best is None or (best[0] != "exact" and s > best[2]):
                target[int(a)] = ("near", int(b), float(s))
    log.debug("near-duplicate candidates checked: %d", n_candidates)

    def describe(kind: str, a: int, b: int, score: float) -> str:
        if kind == "exact":
            how = "identical file" if file_hash[a] == file_hash[b] else "identical pixels"
        else:
            d = int(np.bitwise_count(phash[a] ^ phash[b]))
            how = f"near-duplicate (hash distance {d}, similarity {score:.3f})"
        text = f"{how} of {paths[b]}"
        if labels[a] != labels[b]:
            text += f" - labels differ: {labels[a]!r} vs {labels[b]!r}"
        return text

    issues = []
    for target, prefix in ((leak, "leakage"), (dup, "")):
        for a in sorted(target):
            if target is dup and a in leak:
                continue
            kind, b, score = target[a]
            name = f"leakage_{kind}" if prefix else f"{kind}_duplicate"
            issues.append(
                Issue(
                    name,
                    describe(kind, a, b, score),
                    split=str(split[a]),
                    path=str(paths[a]),
                    label=str(labels[a]),
                    other=str(paths[b]),
                    other_label=str(labels[b]),
                )
            )
    return issues


# --------------------------------------------------------------------------- gates


def _evaluate_gates(
    records: pd.DataFrame,
    class_counts: dict[str, dict[str, int]],
    issues: list[Issue],
    cfg: ValidationGateConfig,
    context: dict[str, Any] | None = None,
) -> list[GateResult]:
    """Turn findings into gate outcomes and set each finding's severity from its gate."""
    by_kind: dict[str, list[Issue]] = {}
    for issue in issues:
        by_kind.setdefault(issue.kind, []).append(issue)
    n_test = int(((records["split"] == "test") & records["ok"]).sum()) if len(records) else 0
    results = []
    for gate, kinds in GATE_KINDS.items():
        level: GateLevel = getattr(cfg, gate)
        found = [i for k in kinds for i in by_kind.get(k, [])]
        triggered = bool(found)
        if gate == "leakage":
            fraction = len({i.path for i in found}) / n_test if n_test else 0.0
            over = fraction > cfg.max_leakage_fraction
            status: Status = "off" if level == "off" else (level if over else "warn")
            if not found:
                status = "off" if level == "off" else "pass"
            message = (
                f"{len(found)} of {n_test} test images ({fraction:.1%}) duplicate a train image "
                f"(limit {cfg.max_leakage_fraction:.1%})"
                if found
                else "no test image duplicates a train image"
            )
        else:
            status = "off" if level == "off" else (level if triggered else "pass")
            message = _gate_message(gate, found, class_counts, cfg, context or {})
        for issue in found:
            issue.severity = status
        results.append(GateResult(gate, level, status, message, [i.line for i in found if i.path]))
    extra = by_kind.get("extra_class", [])
    if extra:
        results.append(
            GateResult(
                "extra_class",
                "warn",
                "warn",
                f"{len(extra)} class folder(s) not in the configured classes were ignored",
                [i.line for i in extra],
            )
        )
    return results


def _gate_message(
    gate: str,
    found: list[Issue],
    class_counts: dict[str, dict[str, int]],
    cfg: ValidationGateConfig,
    context: dict[str, Any],
) -> str:
    n = len(found)
    if gate == "corrupt":
        return f"{n} corrupt or unreadable file(s)" if n else "no corrupt files"
    if gate == "missing_class":
        if not n:
            return f"all {len(next(iter(class_counts.values())))} classes present in both splits"
        return "; ".join(i.message for i in found)
    if gate == "imbalance":
        if n:
            return "; ".join(i.message for i in found)
        ratios = ", ".join(f"{s} {_imbalance_ratio(c):.2f}" for s, c in class_counts.items())
        return f"largest/smallest class ratio {ratios} (limit {cfg.max_imbalance_ratio:g})"
    if gate == "duplicates":
        if not n:
            return "no duplicates within a split"
        exact = sum(i.kind == "exact_duplicate" for i in found)
        per_split = ", ".join(
            f"{s} {sum(i.split == s for i in found)}"
            for s in SPLITS
            if any(i.split == s for i in found)
        )
        return (
            f"{n} image(s) duplicate another of their split "
            f"({exact} exact, {n - exact} near; {per_split})"
        )
    if gate == "label_shift":
        if n:
            return found[0].message
        shift = context.get("label_shift", {})
        return (
            f"class shares agree: total variation {shift.get('tv', float('nan')):.3f} "
            f"(limit {cfg.max_label_tv:g}), chi-square p={shift.get('chi2_p', float('nan')):.2g}"
        )
    if gate == "property_drift":
        if not n:
            props = [p for p in context.get("properties", []) if np.isfinite(p.ks)]
            if not props:
                return "not enough readable images to compare the splits"
            top = max(props, key=lambda p: p.ks)
            return (
                f"no drift in {len(props)} properties (largest KS {top.ks:.3f}, {top.name}; "
                f"limit {cfg.drift_ks_threshold:g})"
            )
        return f"{n} propert{'y' if n == 1 else 'ies'} drift: " + "; ".join(
            i.message for i in found
        )
    if gate == "odd_mode":
        if not n:
            return "all images are RGB"
        modes = pd.Series([i.message.split()[1] for i in found]).value_counts()
        return f"{n} image(s) not RGB, converted: " + ", ".join(
            f"{m} {c}" for m, c in modes.items()
        )
    if gate == "tiny_image":
        return (
            f"{n} image(s) with a side < {cfg.min_image_side} px"
            if n
            else f"no image smaller than {cfg.min_image_side} px"
        )
    return f"{n} finding(s)"


# --------------------------------------------------------------------------- examples


def _pick_examples(
    records: pd.DataFrame,
    issues: list[Issue],
    properties: list[PropertyStats],
    class_counts: dict[str, dict[str, int]],
    cfg: ValidationGateConfig,
) -> dict[str, list[str]]:
    """Which images the report shows (bounded: max_examples per issue kind or property)."""
    k = cfg.max_examples
    out: dict[str, list[str]] = {}
    for kind in ISSUE_KINDS:
        chosen = [i for i in issues if i.kind == kind and i.path][:k]
        paths = [i.path for i in chosen if i.path] + [i.other for i in chosen if i.other]
        if paths:
            out[kind] = paths
    ok = records[records["ok"]] if len(records) else records
    for issue in issues:
        if issue.kind in ("missing_class", "imbalance") and issue.label:
            rows = ok[ok["label"] == issue.label]["path"].head(max(2, k // 3)).tolist()
            out.setdefault(f"class:{issue.label}", rows)
    for prop in properties:
        if not prop.drifted:
            continue
        for split in SPLITS:
            sub = ok[ok["split"] == split]
            order = (sub[prop.name] - prop.summary[split]["median"]).abs().sort_values()
            out[f"drift:{prop.name}:{split}"] = sub.loc[
                order.index[: max(3, k // 2)], "path"
            ].tolist()
    return out


def _thumbnails(root: Path, paths: set[str], side: int = 96) -> dict[str, str]:
    """Base64 JPEG data URIs of the example images (decodable ones; others get a placeholder)."""
    out = {}
    for rel in sorted(paths):
        im = thumbnail(str(root / rel), side)
        if im is None:
            continue
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=80)
        out[rel] = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return out
