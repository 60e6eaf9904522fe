"""Training throughput: the tf.data pipeline vs the same fit on in-memory tensors.

Same model, data and batch size in one process; prints images/s and ratios against the
in-memory baseline (absolute numbers vary with the machine, ratios much less).

    .venv/bin/python benchmarks/train_input.py [--per-class 100] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cvops.config import AugmentationConfig
from cvops.data.demo import generate_demo_dataset
from cvops.data.images import index_split, select_classes
from cvops.model.build import build_model
from cvops.model.pipeline import make_dataset
from cvops.model.preprocess import preprocess_image


def timed_fit(model_seed: int, data, epochs: int, n_images: int, batch: int | None) -> float:
    """Images/s over all epochs but the first (which pays tracing and the cache fill)."""
    keras.utils.set_random_seed(model_seed)
    model = build_model((50, 50), 10)
    model.compile("adam", "sparse_categorical_crossentropy")
    x, y = data if isinstance(data, tuple) else (data, None)
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(x, y, batch_size=batch, epochs=epochs, verbose=0, shuffle=False)
    return epochs * n_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_demo_dataset(root, n_train_per_class=args.per_class, n_test_per_class=1)
        frame = select_classes(
            index_split(root, "train"), sorted(set(index_split(root, "train")["label"]))
        )
        paths, targets = frame["path"].tolist(), frame["target"].to_numpy()
        n = len(paths)
        t0 = time.perf_counter()
        images = np.stack([preprocess_image(tf.io.read_file(p), (50, 50)).numpy() for p in paths])
        load_s = time.perf_counter() - t0

        results = {
            "in-memory tensors (baseline)": timed_fit(
                0, (images, targets), args.epochs, n, args.batch_size
            ),
            "tf.data, no augmentation": timed_fit(
                0,
                make_dataset(paths, targets, (50, 50), args.batch_size, shuffle=True),
                args.epochs,
                n,
                None,
            ),
            "tf.data + augmentation (default)": timed_fit(
                0,
                make_dataset(
                    paths,
                    targets,
                    (50, 50),
                    args.batch_size,
                    shuffle=True,
                    augment=AugmentationConfig(),
                    seed=0,
                ),
                args.epochs,
                n,
                None,
            ),
        }
    base = results["in-memory tensors (baseline)"]
    print(
        f"{n} training images, batch {args.batch_size}, {args.epochs} timed epochs; "
        f"eager preload of the in-memory baseline took {load_s:.1f} s"
    )
    print(f"{'variant':<36} {'images/s':>9} {'ratio':>7}")
    for name, rate in results.items():
        print(f"{name:<36} {rate:9.1f} {rate / base:7.2f}")


if __name__ == "__main__":
    main()
