"""The demo dataset as the reference's DVC repo: images/ + annotation_df.csv, tags v1 and v2."""

from __future__ import annotations

import logging
from pathlib import Path

from cvops.data.demo import generate_demo_dataset
from cvops.data.versioning import commit_version, init_dataset_repo, list_tags

log = logging.getLogger(__name__)

VERSIONS = ("v1.0.0", "v2.0.0")


def build_demo_repo(
    repo_dir: Path,
    remote_dir: Path | str,
    *,
    seed: int = 0,
    v1_train_per_class: int = 200,
    v2_train_per_class: int = 250,
    test_per_class: int = 60,
    classes: list[str] | None = None,
) -> list[str]:
    """v1.0.0 with `v1_train_per_class` images per class; v2.0.0 adds images on top of it.

    Idempotent: a repo that already has both tags is left as it is.
    """
    if (repo_dir / ".dvc").is_dir() and set(VERSIONS) <= set(list_tags(repo_dir)):
        log.info("%s already has %s: nothing to do", repo_dir, ", ".join(VERSIONS))
        return list(VERSIONS)
    if repo_dir.exists() and any(repo_dir.iterdir()):
        raise FileExistsError(f"{repo_dir} exists and is not a complete demo repo: remove it first")
    repo_dir.mkdir(parents=True, exist_ok=True)
    for tag, per_class in zip(VERSIONS, (v1_train_per_class, v2_train_per_class), strict=True):
        generate_demo_dataset(
            repo_dir,
            n_train_per_class=per_class,
            n_test_per_class=test_per_class,
            seed=seed,
            images_subdir="images",
            annotations_name="annotation_df.csv",
            classes=classes,
        )
        if tag == VERSIONS[0]:
            init_dataset_repo(repo_dir, remote_dir)
        version = commit_version(repo_dir, tag, message=f"demo dataset {tag}")
        log.info("Committed %s: %s", tag, version.dvc_hash)
    return list(VERSIONS)
