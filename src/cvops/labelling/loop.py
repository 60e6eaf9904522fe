"""The labelling loop: push predictions worth a label to Label Studio, pull the labels back.

push: the current model's logged predictions (`predictions`) that still have their upload, in
the row or in central storage (`CVOPS_SERVICE_STORE_IMAGES`, :mod:`cvops.records.images`), were
never sent and have no feedback yet are ranked by
a strategy (:mod:`cvops.labelling.select`, with its random control share) and imported into the
model's Label Studio project as tasks, the model's answer as pre-annotation; `labelling_tasks`
records each one.

pull: every task's current answer (its newest annotation that was not skipped) that differs
from what was recorded becomes
- a `feedback` row through the service's own writer (`recording.write_batch`), so the monitor's
  live accuracy counts it;
- an image in the dataset's `images/train/<class>/` and a row of its annotation CSV (the unknown
  label is kept out, or filed under `labelling.unknown_class`), committed, tagged as the next
  version and pushed to the DVC remote (`cvops.data.versioning`);
and is then recorded, so pulling again adds nothing; an image labelled again later moves.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from sqlalchemy import and_, func, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from cvops.config import FlowConfig, LabellingConfig
from cvops.labelling.client import LabelStudio, choice_result, label_config
from cvops.labelling.select import Selection
from cvops.labelling.select import select as select_rows
from cvops.records.images import IMAGE_KEY
from cvops.records.schema import (
    Feedback,
    LabellingTask,
    Prediction,
    latest_drift_rows,
    upgrade_schema,
)
from cvops.service.recording import feedback_record, write_batch

if TYPE_CHECKING:
    from cvops.storage import CentralStorage

log = logging.getLogger(__name__)

ANNOTATIONS = "annotation_df.csv"
TRAIN = "train"
FILE_PREFIX = "ls_"  # images added from Label Studio: ls_<prediction id>.<ext>


# --------------------------------------------------------------------------- push


@dataclass
class Pool:
    """Candidate predictions: ids, class probabilities (model class order), features."""

    ids: list[str]
    probs: np.ndarray
    predicted: list[str]
    features: dict[str, np.ndarray] = field(default_factory=dict)
    without_image: int = 0  # never stored (CVOPS_SERVICE_STORE_IMAGES=none): not labellable


def candidate_pool(
    engine: Engine,
    model_name: str,
    model_version: str | None,
    classes: Sequence[str],
    limit: int,
) -> Pool:
    """The newest `limit` predictions of the model (its version, when known) that still have
    their image (in the row, or referenced in central storage), were never sent to Label Studio
    and have no feedback."""
    sent = select(LabellingTask.prediction_id)
    labelled = select(Feedback.prediction_id)
    where = [
        Prediction.model_name == model_name,
        Prediction.id.not_in(sent),
        Prediction.id.not_in(labelled),
    ]
    if model_version is not None:
        where.append(Prediction.model_version == model_version)
    storage_key = Prediction.prediction_json[IMAGE_KEY].as_string()
    stmt = (
        select(
            Prediction.id,
            Prediction.prediction_json,
            Prediction.uae_feats,
            Prediction.hidden_feats,
        )
        .where(*where, or_(Prediction.input_img.is_not(None), storage_key.is_not(None)))
        .order_by(Prediction.created_on.desc())
        .limit(limit)
    )
    ids, probs, predicted, uae, hidden = [], [], [], [], []
    with engine.connect() as conn:
        for row in conn.execute(stmt):
            scores = (row.prediction_json or {}).get("prediction") or {}
            if not all(c in scores for c in classes):
                continue  # logged by a model with other classes
            ids.append(row.id)
            probs.append([float(scores[c]) for c in classes])
            predicted.append(
                (row.prediction_json or {}).get("predicted_class") or max(scores, key=scores.get)
            )
            uae.append(row.uae_feats)
            hidden.append(row.hidden_feats)
        without = conn.execute(
            select(func.count())
            .select_from(Prediction)
            .where(*where, and_(Prediction.input_img.is_(None), storage_key.is_(None)))
        ).scalar_one()
    features: dict[str, np.ndarray] = {}
    if ids and all(u is not None for u in uae):
        features["uae"] = np.asarray(uae, dtype=np.float64)
    if ids and all(h is not None for h in hidden):
        features["hidden"] = np.asarray(hidden, dtype=np.float64)
    return Pool(
        ids, np.asarray(probs).reshape(len(ids), len(classes)), predicted, features, without
    )


def domain_scores(
    engine: Engine, pool: Pool, reference: dict[str, np.ndarray], model_name: str, seed: int
) -> np.ndarray | None:
    """How unlike the reference each pool image looks to the monitor's domain classifier
    (`DriftTester.window_scores`, on the hidden features like the monitor's cause examples,
    else UAE); None (and the caller falls back to uncertainty) without features to compare."""
    from cvops.monitor.stats import DriftTester

    rows = latest_drift_rows(engine, model_name)
    if rows:
        drifted = any(r.drifted for r in rows if r.embedding != "labels")
        log.info(
            "Latest drift report for %s: run %s (%s)",
            model_name,
            rows[0].run_id,
            "drift" if drifted else "no drift",
        )
    else:
        log.info("No drift report for %s yet; scoring the pool against the reference", model_name)
    for embedding in ("hidden", "uae"):
        ref, cur = reference.get(embedding), pool.features.get(embedding)
        if ref is None or cur is None or len(cur) < 2 or cur.shape[1] != ref.shape[1]:
            continue
        scores = DriftTester(ref, ("classifier",), seed=seed).window_scores(cur)
        log.info("drift_weighted: domain-classifier scores on the %s features", embedding)
        return scores
    return None


def stored_images(
    engine: Engine, ids: Sequence[str], storage: CentralStorage | None
) -> tuple[dict[str, str], dict[str, str]]:
    """The predictions' uploads as base64, wherever the service kept them: inline in the row,
    else the central-storage object the row references (read as the monitor's cause examples
    read theirs, `cvops.monitor.check.add_thumbnails`). (images, why not) per prediction id:
    an id the service stored no image for, or whose object is missing, is in the second."""
    images: dict[str, str] = {}
    missing: dict[str, str] = {}
    if not ids:
        return images, missing
    stmt = select(Prediction.id, Prediction.input_img, Prediction.prediction_json).where(
        Prediction.id.in_(list(ids))
    )
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    for row in rows:
        if row.input_img:
            images[row.id] = row.input_img
            continue
        keys = row.prediction_json if isinstance(row.prediction_json, dict) else {}
        key = keys.get(IMAGE_KEY)
        if not key:
            missing[row.id] = "no image stored (CVOPS_SERVICE_STORE_IMAGES=none)"
        elif storage is None:
            missing[row.id] = f"{key} is in central storage, and none was given to read it from"
        else:
            try:
                images[row.id] = base64.b64encode(storage.read_bytes(key)).decode("ascii")
            except Exception as err:  # noqa: BLE001 - one lost object skips one image
                log.warning("image %s not read from %s: %s", key, storage, err)
                missing[row.id] = f"{key} not read from central storage ({type(err).__name__})"
    for pid in set(ids) - images.keys() - missing.keys():
        missing[pid] = "no predictions row"
    return images, missing


def image_data_uri(b64: str) -> str:
    """A stored base64 upload as a data URI Label Studio shows (type from the bytes)."""
    raw = base64.b64decode(b64)
    try:
        with Image.open(io.BytesIO(raw)) as im:
            mime = Image.MIME.get(im.format or "", "image/jpeg")
    except Exception:  # noqa: BLE001 - an unreadable upload is still sent; the labeller decides
        mime = "application/octet-stream"
    return f"data:{mime};base64,{b64}"


def project_title(cfg: LabellingConfig, model_name: str) -> str:
    return cfg.project or f"cvops {model_name}"


@dataclass
class PushResult:
    project_id: int | None
    sent: int
    arms: dict[str, int]
    pool: int
    without_image: int
    strategy: str
    unreadable: int = 0  # picked, but the image in central storage could not be read

    def skipped(self) -> str:
        """Why predictions were left out, or ''."""
        notes = []
        if self.without_image:
            notes.append(
                f"{self.without_image} predictions skipped: no image stored (served with "
                "CVOPS_SERVICE_STORE_IMAGES=none; set it to db or central_storage to label them)"
            )
        if self.unreadable:
            notes.append(
                f"{self.unreadable} picked predictions skipped: their image in central storage "
                "could not be read (see the log)"
            )
        return "".join(f"; {n}" for n in notes)

    def describe(self) -> str:
        if self.sent == 0:
            return f"nothing to send: {self.pool} unlabelled predictions with images" + (
                self.skipped()
            )
        arms = ", ".join(f"{k} {v}" for k, v in sorted(self.arms.items()))
        return (
            f"sent {self.sent} of {self.pool} candidate predictions to Label Studio project "
            f"{self.project_id} ({arms})" + self.skipped()
        )


def push(
    engine: Engine,
    studio: LabelStudio,
    meta: Any,
    cfg: LabellingConfig,
    *,
    reference: dict[str, np.ndarray] | None = None,
    storage: CentralStorage | None = None,
) -> PushResult:
    """Select up to `cfg.n` predictions of the model `meta` and send them as tasks; `storage`
    is the central storage the service kept images in (CVOPS_SERVICE_STORE_IMAGES=
    central_storage)."""
    upgrade_schema(engine)
    classes = list(meta.classes)
    pool = candidate_pool(engine, meta.model_name, meta.version, classes, cfg.pool)
    if pool.without_image:
        log.warning(
            "%d predictions of %s skipped: no stored image, so they cannot be labelled "
            "(CVOPS_SERVICE_STORE_IMAGES=none when they were served)",
            pool.without_image,
            meta.model_name,
        )
    strategy = cfg.strategy
    scores = None
    if strategy == "drift_weighted" and pool.ids:
        scores = domain_scores(engine, pool, reference or {}, meta.model_name, cfg.seed)
        if scores is None:
            log.warning(
                "drift_weighted: no domain-classifier score for %s (no reference or prediction "
                "features to compare); falling back to entropy",
                meta.model_name,
            )
            strategy = "entropy"
    selection: Selection = select_rows(
        pool.probs,
        cfg.n,
        strategy,
        random_share=cfg.random_share,
        domain_scores=scores,
        seed=cfg.seed,
    )
    if len(selection) == 0:
        return PushResult(None, 0, {}, len(pool.ids), pool.without_image, strategy)
    picked = [pool.ids[i] for i in selection.indices]
    images, missing = stored_images(engine, picked, storage)
    if missing:
        log.warning(
            "%d of %d picked predictions of %s skipped, their image not read: %s",
            len(missing),
            len(picked),
            meta.model_name,
            next(iter(missing.values())),
        )
    if not images:
        return PushResult(None, 0, {}, len(pool.ids), pool.without_image, strategy, len(missing))
    project = studio.ensure_project(
        project_title(cfg, meta.model_name),
        label_config(classes, cfg.unknown_label),
        description=f"Predictions of {meta.model_name} picked by cvops label push",
    )
    version = f"{meta.model_name} v{meta.version}"
    now = dt.datetime.now(dt.UTC)
    tasks, rows = [], []
    for index, arm, score in zip(selection.indices, selection.arms, selection.scores, strict=True):
        pid = pool.ids[index]
        if pid not in images:
            continue  # not recorded as sent: tried again next push
        confidence = float(pool.probs[index].max())
        predicted = pool.predicted[index]
        tasks.append(
            {
                "data": {
                    "image": image_data_uri(images[pid]),
                    "prediction_id": pid,
                    "model": version,
                    "arm": arm,
                },
                "predictions": [
                    {
                        "model_version": version,
                        "score": confidence,
                        "result": choice_result(predicted),
                    }
                ],
            }
        )
        rows.append(
            {
                "prediction_id": pid,
                "model_name": meta.model_name,
                "model_version": meta.version,
                "project_id": int(project["id"]),
                "arm": arm,
                "priority": float(score),
                "predicted": predicted,
                "confidence": confidence,
                "sent_on": now,
            }
        )
    studio.import_tasks(int(project["id"]), tasks)
    with engine.begin() as conn:
        conn.execute(LabellingTask.__table__.insert(), rows)  # type: ignore[attr-defined]
    arms: dict[str, int] = {}
    for row in rows:
        arms[row["arm"]] = arms.get(row["arm"], 0) + 1
    result = PushResult(
        int(project["id"]),
        len(rows),
        arms,
        len(pool.ids),
        pool.without_image,
        strategy,
        len(missing),
    )
    log.info("Label push: %s", result.describe())
    return result


# --------------------------------------------------------------------------- pull


SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")


def next_tag(tag: str, bump: str = "minor") -> str:
    """v2.0.0 -> v2.1.0 (minor), v2.0.1 (patch) or v3.0.0 (major); the `v` is kept as given."""
    match = SEMVER.match(tag)
    if match is None:
        raise ValueError(
            f"dataset tag {tag!r} is not a version like v2.0.0: cannot number the next"
        )
    major, minor, patch = (int(g) for g in match.groups())
    if bump == "major":
        major, minor, patch = major + 1, 0, 0
    elif bump == "minor":
        minor, patch = minor + 1, 0
    elif bump == "patch":
        patch += 1
    else:
        raise ValueError(f"unknown version bump {bump!r}")
    prefix = "v" if tag.startswith("v") else ""
    return f"{prefix}{major}.{minor}.{patch}"


def newest_version_tag(tags: Sequence[str]) -> str | None:
    versions = [(tuple(int(g) for g in m.groups()), t) for t in tags if (m := SEMVER.match(t))]
    return max(versions)[1] if versions else None


@dataclass
class Change:
    """A task whose counted answer is new or different from the recorded one."""

    record: LabellingTask
    task_id: int
    annotation_id: int
    updated_at: str
    label: str
    image: str | None = None  # base64 upload
    target: str | None = None  # dataset path (relative to the repo), None: kept out
    label_class: str | None = None  # the class folder it is filed under


@dataclass
class PullResult:
    changes: int
    feedback: int
    added: int
    moved: int
    removed: int
    tag: str | None
    base_tag: str | None
    unknown: int = 0

    def describe(self) -> str:
        if self.changes == 0:
            return "nothing new: no task was labelled (or relabelled) since the last pull"
        dataset = (
            f"dataset version {self.tag} (from {self.base_tag}): {self.added} images added, "
            f"{self.moved} moved, {self.removed} removed"
            if self.tag
            else "dataset unchanged"
        )
        return f"{self.changes} labels pulled: {self.feedback} feedback rows, {dataset}" + (
            f", {self.unknown} labelled unknown" if self.unknown else ""
        )


def _extension(b64: str) -> str:
    try:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            fmt = (im.format or "").lower()
    except Exception:  # noqa: BLE001 - a file of unknown type keeps a neutral suffix
        return ".img"
    return {
        "jpeg": ".jpg",
        "png": ".png",
        "bmp": ".bmp",
        "gif": ".gif",
        "webp": ".webp",
        "tiff": ".tif",
    }.get(fmt, f".{fmt or 'img'}")


def images_root(repo: Path) -> Path:
    """`images/` of the reference layout, else the repo itself (`train/<class>/`)."""
    return repo / "images" if (repo / "images").is_dir() else repo


def _update_annotations(repo: Path, changes: list[Change]) -> None:
    """Annotation CSV rows for the labelled images: added, moved (class and path) or removed;
    columns the CSV has beyond path/class/split stay empty (box unknown), width and height
    are filled."""
    path = repo / ANNOTATIONS
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        rows = list(reader)
    if not {"path", "class"} <= set(header):
        log.warning("%s has no path/class columns: left as it is", path)
        return
    old = {c.record.dataset_path for c in changes if c.record.dataset_path}
    rows = [r for r in rows if r["path"] not in old]
    for change in changes:
        if change.target is None or change.image is None:
            continue
        row = dict.fromkeys(header, "")
        row.update({"path": change.target, "class": change.label_class or ""})
        if "split" in row:
            row["split"] = TRAIN
        try:
            with Image.open(io.BytesIO(base64.b64decode(change.image))) as im:
                size = im.size
            if "width" in row:
                row["width"], row["height"] = str(size[0]), str(size[1])
        except Exception:  # noqa: BLE001 - sizes are informative only
            pass
        rows.append(row)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def apply_to_dataset(
    repo: Path, changes: list[Change], classes: Sequence[str], cfg: LabellingConfig
) -> tuple[int, int, int]:
    """Write, move or remove the changed images in the workspace; (added, moved, removed)."""
    root = images_root(repo)
    added = moved = removed = 0
    effective = []
    for change in changes:
        label_class = change.label if change.label in classes else None
        if label_class is None and change.label == cfg.unknown_label:
            label_class = cfg.unknown_class
        change.label_class = label_class
        previous = change.record.dataset_path
        if label_class is None or change.image is None:
            change.target = None
        else:
            name = f"{FILE_PREFIX}{change.record.prediction_id}{_extension(change.image)}"
            change.target = (root / TRAIN / label_class / name).relative_to(repo).as_posix()
        if previous == change.target:
            continue
        effective.append(change)
        if previous and (repo / previous).is_file():
            (repo / previous).unlink()
            if change.target is None:
                removed += 1
        if change.target is not None:
            target = repo / change.target
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(change.image))  # type: ignore[arg-type]
            if previous:
                moved += 1
            else:
                added += 1
    _update_annotations(repo, effective)
    return added, moved, removed


def pending_changes(
    engine: Engine,
    studio: LabelStudio,
    model_name: str,
    cfg: LabellingConfig,
    storage: CentralStorage | None = None,
) -> list[Change]:
    """Answers in the model's Label Studio project that differ from the recorded ones, with
    their images (from the row or central storage, as push read them)."""
    project = studio.find_project(project_title(cfg, model_name))
    if project is None:
        log.info("No Label Studio project %r yet: push first", project_title(cfg, model_name))
        return []
    answers = studio.annotated(int(project["id"]))
    with Session(engine) as session:
        ids = [str(a.data.get("prediction_id")) for a in answers if a.data.get("prediction_id")]
        records = {
            r.prediction_id: r
            for r in session.scalars(
                select(LabellingTask).where(LabellingTask.prediction_id.in_(ids))
            )
        }
        for r in records.values():
            session.expunge(r)
    changes = []
    for answer in answers:
        record = records.get(str(answer.data.get("prediction_id")))
        if record is None:
            continue  # a task cvops did not send (or from another database)
        if (
            record.annotation_id == answer.annotation_id
            and record.annotation_updated == answer.updated_at
            and record.label == answer.label
        ):
            continue
        changes.append(
            Change(record, answer.task_id, answer.annotation_id, answer.updated_at, answer.label)
        )
    if changes:
        images, missing = stored_images(engine, [c.record.prediction_id for c in changes], storage)
        if missing:
            log.warning(
                "%d labelled images kept out of the dataset, not read: %s",
                len(missing),
                next(iter(missing.values())),
            )
        for change in changes:
            change.image = images.get(change.record.prediction_id)
    return changes


def pull(
    engine: Engine,
    studio: LabelStudio,
    flow: FlowConfig,
    cfg: LabellingConfig,
    storage: CentralStorage | None = None,
) -> PullResult:
    """Bring the labels back: feedback rows, the next dataset version, the records; `storage`
    as for `push`."""
    from cvops.data.versioning import commit_version, current_version, ensure_version, list_tags

    assert flow.model is not None and flow.dataset is not None
    upgrade_schema(engine)
    classes = flow.model.classes
    changes = pending_changes(engine, studio, flow.model.model_name, cfg, storage)
    if not changes:
        result = PullResult(0, 0, 0, 0, 0, None, None)
        log.info("Label pull: %s", result.describe())
        return result
    repo = flow.dataset.path
    base = newest_version_tag(list_tags(repo))
    if base is None:
        raise ValueError(f"dataset {repo} has no version tag like v1.0.0 to build on")
    if current_version(repo).dirty:
        raise ValueError(
            f"dataset {repo} has local changes: commit them as a version (or discard them) "
            "before pulling labels into it"
        )
    ensure_version(repo, base, checkout=True)
    added, moved, removed = apply_to_dataset(repo, changes, classes, cfg)
    tag = None
    if added or moved or removed:
        tag = next_tag(base, cfg.version_bump)
        commit_version(
            repo,
            tag,
            message=f"{added} images labelled in Label Studio added ({moved} moved, "
            f"{removed} removed) by cvops label pull",
        )
    now = dt.datetime.now(dt.UTC)
    write_batch(
        engine, [("feedback", feedback_record(c.record.prediction_id, c.label)) for c in changes]
    )
    with Session(engine) as session, session.begin():
        for change in changes:
            record = session.get(LabellingTask, change.record.prediction_id)
            assert record is not None
            record.task_id = change.task_id
            record.annotation_id = change.annotation_id
            record.annotation_updated = change.updated_at
            record.label = change.label
            record.labelled_on = now
            if change.target != change.record.dataset_path:
                record.dataset_path = change.target
                record.dataset_tag = tag
    unknown = sum(c.label == cfg.unknown_label for c in changes)
    result = PullResult(len(changes), len(changes), added, moved, removed, tag, base, unknown)
    log.info("Label pull: %s", result.describe())
    return result
