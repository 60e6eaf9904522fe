"""Grad-CAM localisation of a packaged model on the demo dataset's bounding boxes.

Runs the service's own inference step (`cvops.service.model_store.load_model`) on the test
split and prints the share of correctly classified images whose heatmap peak is inside the box.

    .venv/bin/python benchmarks/gradcam_localisation.py \
        --storage central_storage --metadata demo_shapes_classifier_50px.yaml \
        --dataset datasets/demo-shapes
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cvops.data.images import images_root, index_split, select_classes
from cvops.model.gradcam import localisation_hit_rate
from cvops.model.pipeline import make_dataset
from cvops.service.model_store import load_model
from cvops.storage import CentralStorage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--storage", type=Path, default=Path("central_storage"))
    parser.add_argument("--metadata", default="demo_shapes_classifier_50px.yaml")
    parser.add_argument("--dataset", type=Path, default=Path("datasets/demo-shapes"))
    args = parser.parse_args()

    loaded = load_model(CentralStorage(args.storage), args.metadata)
    test = select_classes(index_split(args.dataset, "test"), loaded.classes)
    csv = next(
        p
        for p in (args.dataset / "annotation_df.csv", args.dataset / "annotations.csv")
        if p.is_file()
    )
    ann = pd.read_csv(csv)
    base = csv.parent
    ann.index = [str((base / p).resolve()) for p in ann["path"]]
    ds = make_dataset(test["path"].tolist(), test["target"].tolist(), loaded.size, 64)
    heatmaps, sizes, boxes, correct, offset = [], [], [], 0, 0
    for images, targets in ds:
        probs, _, _, _, cams = loaded.infer(images.numpy())
        hits = probs.argmax(1) == targets.numpy()
        for k in np.flatnonzero(hits):
            row = ann.loc[test["path"].iloc[offset + k]]
            heatmaps.append(cams[k])
            sizes.append((int(row["width"]), int(row["height"])))
            boxes.append((int(row.x_min), int(row.y_min), int(row.x_max), int(row.y_max)))
        correct += int(hits.sum())
        offset += len(targets)
    rate = localisation_hit_rate(heatmaps, sizes, boxes)
    print(f"images root {images_root(args.dataset)}; model {loaded.name} v{loaded.version}")
    print(f"test accuracy {correct / len(test):.3f} ({correct}/{len(test)})")
    print(f"Grad-CAM peak inside the object box: {rate:.3f} of {len(heatmaps)} correct predictions")


if __name__ == "__main__":
    main()
