"""The demo dataset generator: layout, annotations, determinism, superset property, bboxes."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cvops.data import demo

CLASSES = ["circle", "star", "arrow"]
N_TRAIN, N_TEST = 4, 2
MIN_SIZE, MAX_SIZE = 48, 96


def _generate(out: Path, **kwargs) -> Path:
    params = dict(
        n_train_per_class=N_TRAIN,
        n_test_per_class=N_TEST,
        seed=3,
        min_size=MIN_SIZE,
        max_size=MAX_SIZE,
        classes=CLASSES,
    )
    params.update(kwargs)
    return demo.generate_demo_dataset(out, **params)


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate(tmp_path_factory.mktemp("demo") / "ds")


def test_classes_constants() -> None:
    assert len(demo.CLASSES) >= 10
    assert len(set(demo.CLASSES)) == len(demo.CLASSES)
    assert demo.UNSEEN_CLASSES
    assert not set(demo.UNSEEN_CLASSES) & set(demo.CLASSES)


def test_layout_and_columns(dataset: Path) -> None:
    root = dataset.parent
    assert dataset == root / "annotations.csv"
    with dataset.open(newline="") as fh:
        assert next(csv.reader(fh)) == list(demo.ANNOTATION_COLUMNS)
    rows = _read(dataset)
    assert len(rows) == len(CLASSES) * (N_TRAIN + N_TEST)
    for row in rows:
        path = root / row["path"]
        assert path.is_file()
        assert re.fullmatch(
            rf"{row['split']}/{row['class']}/{row['class']}_{row['split']}_\d{{5}}\.jpg",
            row["path"],
        )
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for c in CLASSES:
            assert sum(r["split"] == split and r["class"] == c for r in rows) == n
    jpgs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))
    assert jpgs == sorted(r["path"] for r in rows)


def test_images_subdir_layout(tmp_path: Path) -> None:
    ann = _generate(
        tmp_path,
        n_train_per_class=1,
        n_test_per_class=1,
        classes=["ring"],
        images_subdir="images",
        annotations_name="annotation_df.csv",
    )
    assert ann == tmp_path / "annotation_df.csv"
    rows = _read(ann)
    assert [r["path"] for r in rows] == [
        "images/train/ring/ring_train_00000.jpg",
        "images/test/ring/ring_test_00000.jpg",
    ]
    assert demo.meta_path(ann).is_file()


def test_sizes_and_bboxes_within_bounds(dataset: Path) -> None:
    for row in _read(dataset):
        w, h = int(row["width"]), int(row["height"])
        assert MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE
        image = demo.load_rgb(dataset.parent / row["path"])
        assert image.shape == (h, w, 3)
        x0, y0, x1, y1 = (int(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        # Recognisable at 50x50: the object spans a good part of the image.
        assert max((x1 - x0) / w, (y1 - y0) / h) >= 0.25


def test_bbox_contains_the_object() -> None:
    for i, shape in enumerate(demo.CLASSES + demo.UNSEEN_CLASSES):
        spec = replace(demo.spec_for(1, "train", shape, i), occluders=())
        with_obj, bbox = demo.render(spec)
        without, _ = demo.render(replace(spec, scale=1e-4))  # same image, no object
        diff = np.abs(with_obj.astype(int) - without.astype(int)).sum(axis=2)
        x0, y0, x1, y1 = bbox
        inside = diff[y0:y1, x0:x1].sum()
        assert inside / max(diff.sum(), 1) > 0.9, shape
        mask = demo.object_mask(spec).astype(float)
        assert mask[y0:y1, x0:x1].sum() / mask.sum() > 0.98, shape


def test_saved_images_match_their_spec(dataset: Path, tmp_path: Path) -> None:
    for row in _read(dataset)[:: N_TRAIN + 1]:
        idx = int(Path(row["path"]).stem.rsplit("_", 1)[1])
        spec = demo.spec_for(
            3, row["split"], row["class"], idx, min_size=MIN_SIZE, max_size=MAX_SIZE
        )
        image, bbox = demo.render(spec)
        assert bbox == tuple(int(row[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
        demo.save_jpeg(image, tmp_path / "again.jpg")
        assert (tmp_path / "again.jpg").read_bytes() == (dataset.parent / row["path"]).read_bytes()


def test_deterministic(dataset: Path, tmp_path: Path) -> None:
    again = _generate(tmp_path / "ds")
    assert _tree_bytes(again.parent) == _tree_bytes(dataset.parent)


def test_larger_dataset_is_a_superset(dataset: Path, tmp_path: Path) -> None:
    bigger = _generate(tmp_path / "ds", n_train_per_class=N_TRAIN + 3)
    small_files = _tree_bytes(dataset.parent)
    big_files = _tree_bytes(bigger.parent)
    images = {k: v for k, v in small_files.items() if k.endswith(".jpg")}
    assert all(big_files[k] == v for k, v in images.items())
    assert len([k for k in big_files if k.endswith(".jpg")]) == len(images) + 3 * len(CLASSES)
    old_rows = _read(dataset)
    new_rows = {r["path"]: r for r in _read(bigger)}
    assert all(new_rows[r["path"]] == r for r in old_rows)


def test_class_subset_is_identical_to_full_generation(dataset: Path, tmp_path: Path) -> None:
    only_star = _generate(tmp_path / "ds", classes=["star"])
    for p in (only_star.parent / "train" / "star").iterdir():
        assert p.read_bytes() == (dataset.parent / "train" / "star" / p.name).read_bytes()


def test_train_and_test_streams_differ() -> None:
    a = demo.spec_for(0, "train", "circle", 0)
    b = demo.spec_for(0, "test", "circle", 0)
    assert a != b
    assert demo.spec_for(0, "train", "circle", 0) == a


def test_render_variants() -> None:
    spec = demo.spec_for(0, "test", "hexagon", 5)
    base, bbox = demo.render(spec)
    for style in demo.BACKGROUNDS + demo.SHIFT_BACKGROUNDS:
        image, bbox2 = demo.render(spec, background=style)
        assert image.shape == base.shape and image.dtype == np.uint8
        assert bbox2 == bbox
    assert not np.array_equal(demo.render(spec, background="checker")[0], base)
    for shape in demo.UNSEEN_CLASSES:
        rng = np.random.default_rng(0)
        image, (x0, y0, x1, y1) = demo.render(demo.sample_spec(rng, shape))
        assert x1 > x0 and y1 > y0
    with pytest.raises(ValueError):
        demo.render(spec, background="nope")


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path, classes=["dodecahedron"])
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path, classes=[demo.UNSEEN_CLASSES[0]])
    with pytest.raises(ValueError):
        demo.generate_demo_dataset(tmp_path, min_size=100, max_size=50)
