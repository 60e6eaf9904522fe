"""Image-folder datasets: both the plain layout and the reference's DVC repo layout.

Plain:      <root>/{train,test}/<class>/<file>
Reference:  <root>/images/{train,test}/<class>/<file>  (+ annotation_df.csv at <root>)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
SPLITS = ("train", "test")


class DatasetLayoutError(ValueError):
    """The folder is not an image-folder dataset we can read."""


def images_root(dataset_dir: Path) -> Path:
    """The folder that holds the split folders, whichever layout the dataset uses."""
    for candidate in (dataset_dir / "images", dataset_dir):
        if (candidate / "train").is_dir():
            return candidate
    raise DatasetLayoutError(
        f"{dataset_dir}: no train/ split found (expected {dataset_dir}/train/<class>/<image> "
        f"or {dataset_dir}/images/train/<class>/<image>)"
    )


def index_split(dataset_dir: Path, split: str) -> pd.DataFrame:
    """One row per image of a split: path (absolute), label (class folder name)."""
    split_dir = images_root(dataset_dir) / split
    if not split_dir.is_dir():
        raise DatasetLayoutError(f"{dataset_dir}: split folder {split_dir} does not exist")
    rows = [
        (str(p.resolve()), class_dir.name)
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir())
        for p in sorted(class_dir.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    return pd.DataFrame(rows, columns=["path", "label"])


def check_classes(frame: pd.DataFrame, classes: list[str], where: str) -> None:
    """The config's classes must all be present; unknown folders are ignored with a warning."""
    present = set(frame["label"])
    missing = [c for c in classes if c not in present]
    if missing:
        raise DatasetLayoutError(f"{where}: no images for classes {missing} named in the config")
    extra = sorted(present - set(classes))
    if extra:
        log.warning("%s: ignoring class folders not in the config: %s", where, extra)


def select_classes(frame: pd.DataFrame, classes: list[str]) -> pd.DataFrame:
    """Rows of the configured classes, with an integer `target` in config order."""
    index = {c: i for i, c in enumerate(classes)}
    out = frame[frame["label"].isin(index)].copy()
    out["target"] = out["label"].map(index).astype("int32")
    return out.reset_index(drop=True)


def stratified_split(
    frame: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out `fraction` of every class (at least one image when fraction > 0)."""
    if fraction <= 0:
        return frame, frame.iloc[0:0]
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for _, group in frame.groupby("label", sort=True):
        n = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held.extend(rng.choice(group.index.to_numpy(), size=n, replace=False).tolist())
    mask = frame.index.isin(held)
    return frame[~mask].reset_index(drop=True), frame[mask].reset_index(drop=True)
