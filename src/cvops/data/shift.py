"""Drift scenarios: shifted copies of a demo test split, at graded severities.

Why: drift monitoring and retraining triggers need inputs whose shift is known in kind and
degree, so one can check that a detector fires for "high" and stays calm for "none".

Layout written: ``<out>/<scenario>/<severity>/<class>/<file>.jpg`` plus ``<out>/none/none/...``
(a byte-identical copy of the test split, the baseline) and ``<out>/manifest.csv`` with columns
:data:`MANIFEST_COLUMNS`. Pixel-level severities are defined at the model's input resolution
(:data:`REFERENCE_SIZE` = 50 px) so that their effect after resizing does not depend on the size
of the stored image.

Scenarios ("param" is what ``param_value`` in the manifest holds):

- brightness: pixel values multiplied by a factor (1.2 / 1.4 / 1.7), clipped.
- contrast: blended towards the image mean (kept contrast 0.7 / 0.45 / 0.25).
- blur: gaussian blur, sigma 0.6 / 1.2 / 2.0 px at 50x50 (scaled per axis to the image size).
- gaussian_noise: sigma 0.03 / 0.08 / 0.15 (in [0, 1] units) drawn on a 50x50 grid and
  upsampled (nearest), i.e. i.i.d. noise of that sigma at the model's input.
- background: the same objects re-rendered on a background style never used in training
  (:data:`cvops.data.demo.SHIFT_BACKGROUNDS`) for 30 / 60 / 100 % of the images (nested sets);
  the other images are unchanged copies.
- class_prior: unchanged images resampled (same set size) from the class distribution
  ``(1 - w) * uniform + w * dominant`` with w = 0.3 / 0.6 / 0.9, where ``dominant`` puts 2/3 on
  one class and 1/3 on another (all on one class when there are <= 2 classes).
- unseen_class: 10 / 30 / 60 % of the set replaced by shapes from
  :data:`cvops.data.demo.UNSEEN_CLASSES` (class folder = that shape's name); same set size.

Manifest: ``path`` is relative to ``out_dir``; ``source`` is the original image relative to the
annotations' folder (the dataset root), or to ``test_dir`` without annotations, and empty for
generated unseen shapes; ``shifted`` is 1 when the pixels differ from the source; ``detail``
holds per-image facts (applied blur sigma in px, background style, dominant classes, shape).

"background" needs ``annotations`` (the demo CSV, with its ``.meta.json`` sidecar) to rebuild
each image's spec; without them that scenario is skipped with a warning. Everything else works
on any ``<test_dir>/<class>/*.jpg`` folder. Output is deterministic under ``seed``.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cvops.data import demo

log = logging.getLogger(__name__)

SCENARIOS: tuple[str, ...] = (
    "brightness",
    "blur",
    "gaussian_noise",
    "background",
    "class_prior",
    "unseen_class",
    "contrast",
)
SEVERITIES: tuple[str, ...] = ("low", "medium", "high")
BASELINE = "none"
REFERENCE_SIZE = 50  # model input side the pixel-level severities are calibrated for

SHIFT_PARAMS: dict[str, tuple[str, dict[str, float]]] = {
    "brightness": ("factor", {"low": 1.2, "medium": 1.4, "high": 1.7}),
    "contrast": ("kept_contrast", {"low": 0.7, "medium": 0.45, "high": 0.25}),
    "blur": ("sigma_at_50px", {"low": 0.6, "medium": 1.2, "high": 2.0}),
    "gaussian_noise": ("sigma", {"low": 0.03, "medium": 0.08, "high": 0.15}),
    "background": ("share_rerendered", {"low": 0.3, "medium": 0.6, "high": 1.0}),
    "class_prior": ("skew_weight", {"low": 0.3, "medium": 0.6, "high": 0.9}),
    "unseen_class": ("unseen_share", {"low": 0.1, "medium": 0.3, "high": 0.6}),
}
MANIFEST_COLUMNS: tuple[str, ...] = (
    "scenario",
    "severity",
    "path",
    "class",
    "source",
    "param_name",
    "param_value",
    "shifted",
    "detail",
)
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_NAME_RE = re.compile(r"^(?P<cls>.+)_(?P<split>train|test)_(?P<idx>\d+)$")
_STREAM_TAG = 0x5817  # keeps shift RNG streams apart from the dataset's


@dataclass(frozen=True)
class _Source:
    class_name: str
    path: Path

    @property
    def key(self) -> tuple[str, str]:
        return (self.class_name, self.path.name)


def _rng(seed: int, scenario: str, *extra: int) -> np.random.Generator:
    code = SCENARIOS.index(scenario)
    return np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TAG, code, *extra]))


def _list_sources(test_dir: Path) -> list[_Source]:
    sources = [
        _Source(class_dir.name, p)
        for class_dir in sorted(d for d in test_dir.iterdir() if d.is_dir())
        for p in sorted(class_dir.iterdir())
        if p.suffix.lower() in _IMAGE_SUFFIXES
    ]
    if not sources:
        raise ValueError(f"{test_dir}: no images found (expected <test_dir>/<class>/*.jpg)")
    return sources


# --------------------------------------------------------------------------- pixel shifts


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Multiply pixel values (uint8 RGB) by ``factor``, clipped."""
    return np.clip(image.astype(np.float32) * factor + 0.5, 0, 255).astype(np.uint8)


def adjust_contrast(image: np.ndarray, kept: float) -> np.ndarray:
    """Blend towards the image's mean grey; ``kept`` = 1 leaves the image unchanged."""
    img = image.astype(np.float32)
    mean = float(img.mean())
    return np.clip(mean + (img - mean) * kept + 0.5, 0, 255).astype(np.uint8)


def blur(image: np.ndarray, sigma_at_ref: float) -> tuple[np.ndarray, tuple[float, float]]:
    """Gaussian blur whose sigma is given at REFERENCE_SIZE and scaled per axis to the image."""
    h, w = image.shape[:2]
    sx, sy = sigma_at_ref * w / REFERENCE_SIZE, sigma_at_ref * h / REFERENCE_SIZE
    out = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigmaX=sx, sigmaY=sy)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8), (sx, sy)


def add_noise(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of ``sigma`` ([0, 1] units) on a REFERENCE_SIZE grid, upsampled (nearest).

    Why the grid: i.i.d. per-pixel noise on a 160 px image would be mostly averaged away by the
    resize to the model input; this way the model sees the stated sigma whatever the image size.
    """
    h, w = image.shape[:2]
    grid = rng.normal(0.0, sigma * 255.0, size=(REFERENCE_SIZE, REFERENCE_SIZE, 3))
    noise = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
    return np.clip(image.astype(np.float32) + noise + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- re-rendering


def _load_specs(
    annotations: Path | None, sources: list[_Source]
) -> tuple[dict[tuple[str, str], demo.ImageSpec], dict[str, int] | None]:
    """Specs of the test images that can be re-rendered exactly, and the dataset's size range."""
    if annotations is None:
        return {}, None
    meta_file = demo.meta_path(annotations)
    if not meta_file.is_file():
        log.warning("%s: no %s sidecar; images cannot be re-rendered", annotations, meta_file.name)
        return {}, None
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    sizes = {"min_size": int(meta["min_size"]), "max_size": int(meta["max_size"])}
    rows: dict[tuple[str, str], dict[str, str]] = {}
    with annotations.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            rows[(row["class"], Path(row["path"]).name)] = row
    specs: dict[tuple[str, str], demo.ImageSpec] = {}
    for src in sources:
        row = rows.get(src.key)
        match = _NAME_RE.match(src.path.stem)
        if row is None or match is None or match["cls"] not in demo.CLASSES:
            continue
        spec = demo.spec_for(
            int(meta["seed"]), match["split"], match["cls"], int(match["idx"]), **sizes
        )
        if (spec.width, spec.height) != (int(row["width"]), int(row["height"])):
            log.warning("%s: does not match its re-rendered spec; left out", src.path)
            continue
        specs[src.key] = spec
    missing = len(sources) - len(specs)
    if missing:
        log.warning("%d of %d test images cannot be re-rendered", missing, len(sources))
    return specs, sizes


# --------------------------------------------------------------------------- scenarios


class _Writer:
    """Writes images under out_dir and collects manifest rows."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.rows: list[tuple[object, ...]] = []

    def _target(self, scenario: str, severity: str, class_name: str, name: str) -> Path:
        path = self.out_dir / scenario / severity / class_name / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add(
        self,
        scenario: str,
        severity: str,
        class_name: str,
        name: str,
        *,
        source: Path | None,
        image: np.ndarray | None,
        source_rel: str,
        shifted: bool,
        detail: str = "",
    ) -> None:
        """Save ``image`` (JPEG) or, when None, copy ``source`` byte for byte."""
        target = self._target(scenario, severity, class_name, name)
        if image is None:
            assert source is not None
            shutil.copyfile(source, target)
        else:
            demo.save_jpeg(image, target)
        name_, values = SHIFT_PARAMS.get(scenario, ("", {}))
        value = values.get(severity, "")
        self.rows.append(
            (
                scenario,
                severity,
                target.relative_to(self.out_dir).as_posix(),
                class_name,
                source_rel,
                name_,
                value,
                int(shifted),
                detail,
            )
        )


def _stem_jpg(src: _Source) -> str:
    return src.path.stem + ".jpg"


def _add_source(
    writer: _Writer,
    scenario: str,
    severity: str,
    src: _Source,
    rel: str,
    image: np.ndarray | None = None,
    detail: str = "",
) -> None:
    """A test image in a scenario: re-encoded as JPEG when shifted, else copied byte for byte."""
    writer.add(
        scenario,
        severity,
        src.class_name,
        _stem_jpg(src) if image is not None else src.path.name,
        source=src.path,
        image=image,
        source_rel=rel,
        shifted=image is not None,
        detail=detail,
    )


def _pixel_scenario(
    writer: _Writer,
    scenario: str,
    severity: str,
    sources: list[_Source],
    rels: list[str],
    seed: int,
) -> None:
    value = SHIFT_PARAMS[scenario][1][severity]
    sev = SEVERITIES.index(severity)
    for i, (src, rel) in enumerate(zip(sources, rels, strict=True)):
        image = demo.load_rgb(src.path)
        detail = ""
        if scenario == "brightness":
            out = adjust_brightness(image, value)
        elif scenario == "contrast":
            out = adjust_contrast(image, value)
        elif scenario == "blur":
            out, (sx, sy) = blur(image, value)
            detail = f"sigma_px={sx:.3f}x{sy:.3f}"
        else:  # gaussian_noise
            out = add_noise(image, value, _rng(seed, scenario, sev, i))
        _add_source(writer, scenario, severity, src, rel, out, detail)


def _background_scenario(
    writer: _Writer,
    severity: str,
    sources: list[_Source],
    rels: list[str],
    seed: int,
    specs: dict[tuple[str, str], demo.ImageSpec],
) -> None:
    share = SHIFT_PARAMS["background"][1][severity]
    rng = _rng(seed, "background")  # one order for all severities: shifted sets are nested
    order = rng.permutation(len(sources))
    styles = rng.integers(0, len(demo.SHIFT_BACKGROUNDS), size=len(sources))
    eligible = [int(i) for i in order if sources[i].key in specs]
    chosen = set(eligible[: int(round(share * len(sources)))])
    for i, (src, rel) in enumerate(zip(sources, rels, strict=True)):
        if i in chosen:
            style = demo.SHIFT_BACKGROUNDS[int(styles[i])]
            image, _ = demo.render(specs[src.key], background=style)
            _add_source(writer, "background", severity, src, rel, image, f"background={style}")
        else:
            _add_source(writer, "background", severity, src, rel)


def _prior_counts(n: int, classes: list[str], dominant: list[str], skew: float) -> list[int]:
    """Per-class counts summing to n, from ``(1 - skew) * uniform + skew * dominant`` (2:1)."""
    dom_weights = [2.0, 1.0][: len(dominant)]
    weights = np.full(len(classes), (1.0 - skew) / len(classes))
    for c, dw in zip(dominant, dom_weights, strict=True):
        weights[classes.index(c)] += skew * dw / sum(dom_weights)
    raw = weights * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts), kind="stable")[: n - int(counts.sum())]:
        counts[j] += 1
    return counts.tolist()


def _class_prior_scenario(
    writer: _Writer, severity: str, sources: list[_Source], rels: list[str], seed: int
) -> str:
    skew = SHIFT_PARAMS["class_prior"][1][severity]
    classes = sorted({s.class_name for s in sources})
    rng = _rng(seed, "class_prior")
    n_dom = 1 if len(classes) <= 2 else 2
    dominant = [classes[int(j)] for j in rng.permutation(len(classes))[:n_dom]]
    counts = _prior_counts(len(sources), classes, dominant, skew)
    by_class = {c: [i for i, s in enumerate(sources) if s.class_name == c] for c in classes}
    for c, count in zip(classes, counts, strict=True):
        pool = [by_class[c][int(j)] for j in rng.permutation(len(by_class[c]))]
        for k in range(count):
            i = pool[k % len(pool)]
            src, rep = sources[i], k // len(pool)
            name = src.path.name if rep == 0 else f"{src.path.stem}_dup{rep}{src.path.suffix}"
            writer.add(
                "class_prior",
                severity,
                c,
                name,
                source=src.path,
                image=None,
                source_rel=rels[i],
                shifted=False,
                detail=f"dominant={'+'.join(dominant)}",
            )
    return "+".join(dominant)


def _unseen_scenario(
    writer: _Writer,
    severity: str,
    sources: list[_Source],
    rels: list[str],
    seed: int,
    sizes: dict[str, int],
) -> None:
    share = SHIFT_PARAMS["unseen_class"][1][severity]
    n = len(sources)
    n_unseen = int(round(share * n))
    # One order for all severities: the kept known images and the unseen ones are nested.
    order = _rng(seed, "unseen_class").permutation(n)
    for i in sorted(int(j) for j in order[: n - n_unseen]):
        src = sources[i]
        _add_source(writer, "unseen_class", severity, src, rels[i])
    for k in range(n_unseen):
        shape = demo.UNSEEN_CLASSES[k % len(demo.UNSEEN_CLASSES)]
        spec = demo.sample_spec(_rng(seed, "unseen_class", 1, k), shape, **sizes)
        image, _ = demo.render(spec)
        writer.add(
            "unseen_class",
            severity,
            shape,
            f"{shape}_unseen_{k:05d}.jpg",
            source=None,
            image=image,
            source_rel="",
            shifted=True,
            detail=f"unseen={shape}",
        )


def generate_shift_scenarios(
    test_dir: Path,
    out_dir: Path,
    *,
    scenarios: Sequence[str] = SCENARIOS,
    severities: Sequence[str] = SEVERITIES,
    seed: int = 0,
    annotations: Path | None = None,
) -> Path:
    """Write the shifted sets (and the unshifted baseline) and return the manifest CSV path.

    Each ``<scenario>/<severity>`` folder is rebuilt from scratch. ``annotations`` (the demo CSV)
    is needed for "background"; without it that scenario is skipped with a warning.
    """
    test_dir, out_dir = Path(test_dir), Path(out_dir)
    unknown = [s for s in scenarios if s not in SCENARIOS]
    unknown += [s for s in severities if s not in SEVERITIES]
    if unknown:
        raise ValueError(f"unknown scenarios/severities {unknown}; known {SCENARIOS} {SEVERITIES}")
    if out_dir.resolve().is_relative_to(test_dir.resolve()):
        raise ValueError(f"out_dir {out_dir} must not be inside test_dir {test_dir}")
    sources = _list_sources(test_dir)
    rel_base = annotations.parent if annotations is not None else test_dir
    rels = [
        src.path.resolve().relative_to(rel_base.resolve()).as_posix()
        if src.path.resolve().is_relative_to(rel_base.resolve())
        else src.path.as_posix()
        for src in sources
    ]
    specs, sizes = _load_specs(Path(annotations) if annotations else None, sources)
    if sizes is None:  # fall back to the range of the images at hand
        dims = [demo.load_rgb(s.path).shape[:2] for s in sources]
        sizes = {
            "min_size": max(8, min(min(d) for d in dims)),
            "max_size": max(max(d) for d in dims),
        }

    writer = _Writer(out_dir)
    shutil.rmtree(out_dir / BASELINE / BASELINE, ignore_errors=True)
    for src, rel in zip(sources, rels, strict=True):
        _add_source(writer, BASELINE, BASELINE, src, rel)

    for scenario in scenarios:
        if scenario == "background" and not specs:
            log.warning(
                "shift: skipping 'background': needs the demo annotations CSV and its "
                "sidecar to re-render images (pass annotations=...)"
            )
            continue
        for severity in severities:
            shutil.rmtree(out_dir / scenario / severity, ignore_errors=True)
            if scenario in ("brightness", "contrast", "blur", "gaussian_noise"):
                _pixel_scenario(writer, scenario, severity, sources, rels, seed)
            elif scenario == "background":
                _background_scenario(writer, severity, sources, rels, seed, specs)
            elif scenario == "class_prior":
                dominant = _class_prior_scenario(writer, severity, sources, rels, seed)
                log.debug("shift: class_prior %s dominated by %s", severity, dominant)
            else:
                _unseen_scenario(writer, severity, sources, rels, seed, sizes)
            log.info("shift: wrote %s/%s", scenario, severity)

    manifest = out_dir / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        csv_writer = csv.writer(fh, lineterminator="\n")
        csv_writer.writerow(MANIFEST_COLUMNS)
        csv_writer.writerows(writer.rows)
    log.info("shift: %d images, manifest at %s", len(writer.rows), manifest)
    return manifest
