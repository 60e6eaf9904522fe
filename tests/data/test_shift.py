"""Drift scenarios: every scenario x severity written, manifest, and graded effects."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from cvops.data import demo, shift

CLASSES = ["square", "heart", "crescent"]
N_TEST = 8
N = N_TEST * len(CLASSES)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "ds"
    return demo.generate_demo_dataset(
        root,
        n_train_per_class=0,
        n_test_per_class=N_TEST,
        seed=5,
        min_size=48,
        max_size=120,
        classes=CLASSES,
    )


@pytest.fixture(scope="module")
def shifted(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shift") / "out"
    return shift.generate_shift_scenarios(dataset.parent / "test", out, seed=1, annotations=dataset)


@pytest.fixture(scope="module")
def manifest(shifted: Path) -> pd.DataFrame:
    return pd.read_csv(shifted, keep_default_na=False)


def _images(root: Path, frame: pd.DataFrame) -> list[np.ndarray]:
    return [demo.load_rgb(root / p).astype(np.float32) for p in frame["path"]]


def _set(manifest: pd.DataFrame, scenario: str, severity: str) -> pd.DataFrame:
    return manifest[(manifest["scenario"] == scenario) & (manifest["severity"] == severity)]


def _levels(scenario: str) -> list[tuple[str, str]]:
    return [(shift.BASELINE, shift.BASELINE)] + [(scenario, s) for s in shift.SEVERITIES]


def test_every_scenario_and_severity_written(shifted: Path, manifest: pd.DataFrame) -> None:
    assert list(manifest.columns) == list(shift.MANIFEST_COLUMNS)
    root = shifted.parent
    for scenario in shift.SCENARIOS:
        for severity in shift.SEVERITIES:
            part = _set(manifest, scenario, severity)
            assert len(part) == N, (scenario, severity)
            assert (part["param_name"] == shift.SHIFT_PARAMS[scenario][0]).all()
            assert (
                pd.to_numeric(part["param_value"]) == shift.SHIFT_PARAMS[scenario][1][severity]
            ).all()
    for row in manifest.itertuples():
        path = root / row.path
        assert path.is_file()
        assert row.path.startswith(f"{row.scenario}/{row.severity}/{row._4}/")
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    assert on_disk == set(manifest["path"])


def test_baseline_is_a_byte_copy(dataset: Path, shifted: Path, manifest: pd.DataFrame) -> None:
    base = _set(manifest, "none", "none")
    assert len(base) == N
    for row in base.itertuples():
        assert (shifted.parent / row.path).read_bytes() == (
            dataset.parent / row.source
        ).read_bytes()


def test_brightness_increases_monotonically(shifted: Path, manifest: pd.DataFrame) -> None:
    means = [
        np.mean([im.mean() for im in _images(shifted.parent, _set(manifest, sc, sev))])
        for sc, sev in _levels("brightness")
    ]
    assert means == sorted(means) and len(set(means)) == len(means)


def _sharpness(image: np.ndarray) -> float:
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    return float(
        cv2.Laplacian(cv2.resize(grey, (50, 50), interpolation=cv2.INTER_AREA), cv2.CV_32F).var()
    )


def test_blur_reduces_sharpness_monotonically(shifted: Path, manifest: pd.DataFrame) -> None:
    sharp = [
        np.mean([_sharpness(im) for im in _images(shifted.parent, _set(manifest, sc, sev))])
        for sc, sev in _levels("blur")
    ]
    assert sharp == sorted(sharp, reverse=True) and len(set(sharp)) == len(sharp)


def _high_freq_energy(image: np.ndarray) -> float:
    small = cv2.resize(image, (50, 50), interpolation=cv2.INTER_AREA)
    return float(np.mean((small - cv2.GaussianBlur(small, (0, 0), 1.0)) ** 2))


def test_noise_increases_high_frequency_energy(shifted: Path, manifest: pd.DataFrame) -> None:
    energy = [
        np.mean([_high_freq_energy(im) for im in _images(shifted.parent, _set(manifest, sc, sev))])
        for sc, sev in _levels("gaussian_noise")
    ]
    assert energy == sorted(energy) and len(set(energy)) == len(energy)


def test_contrast_decreases(shifted: Path, manifest: pd.DataFrame) -> None:
    stds = [
        np.mean([im.std() for im in _images(shifted.parent, _set(manifest, sc, sev))])
        for sc, sev in _levels("contrast")
    ]
    assert stds == sorted(stds, reverse=True)


def test_class_prior_is_skewed(manifest: pd.DataFrame) -> None:
    base = _set(manifest, "none", "none")["class"].value_counts(normalize=True)
    assert base.max() == pytest.approx(1 / len(CLASSES))
    top = []
    for severity in shift.SEVERITIES:
        part = _set(manifest, "class_prior", severity)
        counts = part["class"].value_counts(normalize=True)
        top.append(counts.max())
        assert (part["shifted"] == 0).all()
        # images are unchanged copies of test images (duplicates allowed when needed)
        assert part["source"].str.startswith("test/").all()
    assert top == sorted(top) and top[-1] >= 0.55
    assert top[0] > 1 / len(CLASSES)


def test_unseen_class_share(shifted: Path, manifest: pd.DataFrame) -> None:
    for severity in shift.SEVERITIES:
        part = _set(manifest, "unseen_class", severity)
        unseen = part[part["class"].isin(demo.UNSEEN_CLASSES)]
        share = shift.SHIFT_PARAMS["unseen_class"][1][severity]
        assert len(unseen) == round(share * N)
        assert (unseen["shifted"] == 1).all()
        assert set(part["class"]) - set(demo.UNSEEN_CLASSES) <= set(CLASSES)
        for p in unseen["path"]:
            image = demo.load_rgb(shifted.parent / p)
            assert min(image.shape[:2]) >= 48 and max(image.shape[:2]) <= 120


def test_background_rerendered_share(dataset: Path, shifted: Path, manifest: pd.DataFrame) -> None:
    previous: set[str] = set()
    for severity in shift.SEVERITIES:
        part = _set(manifest, "background", severity)
        changed = part[part["shifted"] == 1]
        share = shift.SHIFT_PARAMS["background"][1][severity]
        assert len(changed) == round(share * N)
        assert previous <= set(changed["source"])  # nested sets across severities
        previous = set(changed["source"])
        for row in part.itertuples():
            new = (shifted.parent / row.path).read_bytes()
            old = (dataset.parent / row.source).read_bytes()
            assert (new != old) == bool(row.shifted)


def test_deterministic(dataset: Path, shifted: Path, tmp_path: Path) -> None:
    again = shift.generate_shift_scenarios(
        dataset.parent / "test", tmp_path / "out", seed=1, annotations=dataset
    )
    assert again.read_bytes() == shifted.read_bytes()
    for rel in pd.read_csv(again)["path"]:
        assert (tmp_path / "out" / rel).read_bytes() == (shifted.parent / rel).read_bytes()


def test_without_annotations_background_is_skipped(
    dataset: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cvops.data.shift"):
        manifest = shift.generate_shift_scenarios(
            dataset.parent / "test",
            tmp_path / "out",
            scenarios=("background", "unseen_class"),
            severities=("high",),
        )
    frame = pd.read_csv(manifest)
    assert set(frame["scenario"]) == {"none", "unseen_class"}
    assert "skipping 'background'" in caplog.text


def test_invalid_arguments(dataset: Path, tmp_path: Path) -> None:
    test_dir = dataset.parent / "test"
    with pytest.raises(ValueError):
        shift.generate_shift_scenarios(test_dir, tmp_path, scenarios=("snow",))
    with pytest.raises(ValueError):
        shift.generate_shift_scenarios(test_dir, tmp_path, severities=("extreme",))
    with pytest.raises(ValueError):
        shift.generate_shift_scenarios(test_dir, test_dir / "shifted")
