"""How hard is the demo dataset? Train the reference CNN on it and print the test accuracy.

Why: the demo dataset must be learnable but not trivial (target 80-97 % test accuracy after
~10 epochs at 50x50), so drift scenarios and retraining show visible effects. Run with `nice`:

    nice python benchmarks/demo_accuracy.py --epochs 10
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def build_reference_cnn(n_classes: int, size: int = 50):
    """The reference CNN, exactly as specified (kept local so this script is self-contained)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(size, size, 3))
    x = layers.Conv2D(128, 3, activation="relu")(inputs)
    x = layers.MaxPooling2D()(x)
    x = layers.Conv2D(128, 3, activation="relu")(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dense(32, activation="relu")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="classify_head")(x)
    return keras.Model(inputs, outputs)


def load_split(root: Path, frame: pd.DataFrame, size: int) -> tuple[np.ndarray, np.ndarray]:
    """All images of a split as float32 [0, 1] (N, size, size, 3), bilinear antialiased resize."""
    import tensorflow as tf

    images = []
    for rel in frame["path"]:
        with Image.open(root / rel) as im:
            arr = np.asarray(im.convert("RGB"), np.float32)
        images.append(tf.image.resize(arr, (size, size), antialias=True).numpy() / 255.0)
    return np.clip(np.stack(images), 0.0, 1.0), frame["target"].to_numpy(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=250, help="train images per class")
    parser.add_argument("--n-test", type=int, default=60, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--flip", action="store_true", help="random horizontal flip augmentation")
    parser.add_argument("--data-dir", type=Path, default=None, help="reuse/keep the dataset here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import keras
    import tensorflow as tf

    from cvops.data.demo import CLASSES, generate_demo_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp) / "demo"
        start = time.perf_counter()
        ann_path = generate_demo_dataset(
            root, n_train_per_class=args.n_train, n_test_per_class=args.n_test, seed=args.seed
        )
        print(f"generated dataset in {time.perf_counter() - start:.1f} s at {root}")
        ann = pd.read_csv(ann_path)
        ann["target"] = ann["class"].map({c: i for i, c in enumerate(CLASSES)})
        x_train, y_train = load_split(root, ann[ann["split"] == "train"], args.size)
        x_test, y_test = load_split(root, ann[ann["split"] == "test"], args.size)

    keras.utils.set_random_seed(args.seed)
    model = build_reference_cnn(len(CLASSES), args.size)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=args.lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    train = tf.data.Dataset.from_tensor_slices((x_train, y_train)).shuffle(
        len(x_train), seed=args.seed
    )
    if args.flip:
        train = train.map(lambda x, y: (tf.image.random_flip_left_right(x), y))
    train = train.batch(args.batch_size).prefetch(2)

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            _, acc = self.model.evaluate(x_test, y_test, verbose=0, batch_size=256)
            print(
                f"epoch {epoch + 1}: {time.perf_counter() - self.t0:.1f} s, "
                f"train acc {logs['accuracy']:.3f}, test acc {acc:.3f}",
                flush=True,
            )

    model.fit(train, epochs=args.epochs, verbose=0, callbacks=[EpochTimer()])
    _, acc = model.evaluate(x_test, y_test, verbose=0, batch_size=256)
    pred = model.predict(x_test, verbose=0, batch_size=256).argmax(axis=1)
    per_class = {c: float((pred[y_test == i] == i).mean()) for i, c in enumerate(CLASSES)}
    print("per-class test accuracy:", {k: round(v, 2) for k, v in per_class.items()})
    print(f"TEST ACCURACY after {args.epochs} epochs: {acc:.4f}")


if __name__ == "__main__":
    main()
