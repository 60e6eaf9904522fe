"""Train flow: data version -> validation report + gates -> fit -> detectors -> package."""

from __future__ import annotations

import logging
import time
from typing import Any

import keras
import mlflow
import mlflow.keras
import numpy as np
from mlflow.entities import Metric
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.artifacts import create_link_artifact

from cvops import tracking
from cvops.config import FlowConfig
from cvops.data.dataversion import resolve_data_version
from cvops.data.validation import DataValidationError, validate_dataset, write_html_report
from cvops.flows.common import as_config, step
from cvops.model.callbacks import OUTCOME_KEYS
from cvops.model.train import Splits, build_detectors, fit_model, load_splits, save_package
from cvops.settings import Settings, get_settings
from cvops.storage import CentralStorage, ModelMetadata, open_storage, utc_now, write_metadata

log = logging.getLogger(__name__)

MODEL_PIP_REQUIREMENTS = ["tensorflow-cpu>=2.21,<2.22", "keras>=3.10,<4"]


@step("prepare-data")
def prepare_data(cfg: FlowConfig) -> dict[str, Any]:
    assert cfg.dataset is not None
    return resolve_data_version(cfg.dataset)


@step("start-run")
def start_run(cfg: FlowConfig, settings: Settings, data_version: dict[str, Any]) -> str:
    assert cfg.train is not None and cfg.model is not None and cfg.dataset is not None
    experiment_id = tracking.ensure_experiment(cfg.train.mlflow, settings)
    tags = {
        "git_sha": tracking.git_sha() or "unknown",
        "model_name": cfg.model.model_name,
        "data.tag": str(data_version.get("tag")),
        "data.dvc_hash": str(data_version.get("dvc_hash")),
        "flow": "train_flow",
        **cfg.train.mlflow.exp_tags,
    }
    run = MlflowClient().create_run(experiment_id, tags=tags, run_name=cfg.model.model_name)
    params = {
        **tracking.flat_params("hparams", cfg.train.hparams.model_dump()),
        **tracking.flat_params("augmentation", cfg.train.augmentation.model_dump()),
        **tracking.flat_params("early_stopping", cfg.train.early_stopping.model_dump()),
        **tracking.flat_params("lr_schedule", cfg.train.lr_schedule.model_dump()),
        **tracking.flat_params("", {"class_weight": cfg.train.class_weight}),
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        **tracking.flat_params("finetune", cfg.train.finetune.model_dump()),
        "input_size": f"{cfg.model.input_size.w}x{cfg.model.input_size.h}",
        "n_classes": len(cfg.model.classes),
        "seed": cfg.seed,
        "dataset": cfg.dataset.ds_name,
        **{f"data.{k}": v for k, v in data_version.items()},
    }
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_params(params)
        mlflow.log_dict(cfg.to_dict(), "config/flow_config.yaml")
    return run.info.run_id


@step("validate-data")
def validate_data(cfg: FlowConfig, run_id: str) -> dict[str, Any]:
    """Check train/test before any training; the report goes to MLflow and beside the model.

    Raises DataValidationError (listing the offending files) when a gate set to `fail` fails,
    so a bad dataset costs seconds, not a training run.
    """
    assert cfg.train is not None and cfg.model is not None and cfg.dataset is not None
    client = MlflowClient()
    gates = cfg.train.validation
    if not gates.enabled:
        log.info("Data validation disabled (train.validation.enabled: false)")
        client.set_tag(run_id, "data_validation", "disabled")
        return {"status": "disabled"}
    result = validate_dataset(cfg.dataset.path, classes=cfg.model.classes, gates=gates)
    report = write_html_report(
        result, cfg.model.save_dir / f"{cfg.model.model_name}_validation_report.html"
    )
    client.log_artifact(run_id, str(report), "validation")
    summary = result.summary
    client.set_tag(run_id, "data_validation", result.status)
    failed = ",".join(g.name for g in result.gate_failures)
    warned = ",".join(g.name for g in result.warnings)
    client.set_tag(run_id, "data_validation.failed_gates", failed or "none")
    client.set_tag(run_id, "data_validation.warnings", warned or "none")
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"validation.{key}", float(value), now, 0)
        for key, value in summary.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    ]
    client.log_batch(run_id, metrics=metrics)
    for gate in result.warnings:
        log.warning("Data validation warning - %s: %s", gate.name, gate.message)
    log.info("Data validation %s; report: %s", result.status, report)
    if result.gate_failures:
        client.set_terminated(run_id, "FAILED")
        raise DataValidationError.from_result(result, report)
    return {"status": result.status, "report": str(report)}


@step("load-splits")
def load_data(cfg: FlowConfig) -> Splits:
    assert cfg.dataset is not None
    return load_splits(cfg, cfg.dataset.path)


class MlflowTrainEnd(keras.callbacks.Callback):
    """Logs what training reports at the end of a fit (early stopping's best and stopped
    epoch, see cvops.model.callbacks), one step per fit call of a phased training."""

    def __init__(self) -> None:
        super().__init__()
        self.fits = 0

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        outcome = {k: float(v) for k, v in (logs or {}).items() if k in OUTCOME_KEYS}
        if outcome:
            mlflow.log_metrics(outcome, step=self.fits)
        self.fits += 1


class PhasedMlflowCallback(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback for a training in several fit calls (a pretrained backbone's
    warm-up, then fine-tuning at a lower rate): MLflow refuses to change a logged param, so
    every later fit logs its optimizer settings as `phase<N>_optimizer_*`."""

    def __init__(self) -> None:
        super().__init__()
        self.fits = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.fits += 1
        if self.fits == 1:
            super().on_train_begin(logs)
            return
        config = self.model.optimizer.get_config()
        mlflow.log_params({f"phase{self.fits}_optimizer_{k}": v for k, v in config.items()})


@step("train-model")
def train_model(cfg: FlowConfig, splits: Splits, run_id: str) -> keras.Model:
    with mlflow.start_run(run_id=run_id):
        # per-epoch metrics, learning_rate included; MlflowTrainEnd: early stopping's outcome
        callbacks = [PhasedMlflowCallback(), MlflowTrainEnd()]
        model, history = fit_model(cfg, splits, callbacks=callbacks)
        final = {f"final_{k}": float(v[-1]) for k, v in history.items()}
        mlflow.log_metrics({**final, "epochs_run": len(history["loss"])})
    log.info("Training done: %s", {k: round(v, 4) for k, v in final.items()})
    return model


@step("package-model")
def package_model(
    cfg: FlowConfig,
    settings: Settings,
    model: keras.Model,
    splits: Splits,
    data_version: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Detectors + reference data, saved to save_dir, registered, published to storage."""
    assert cfg.model is not None and cfg.train is not None
    uae, bbsd, ref = build_detectors(cfg, model, splits)
    name = cfg.model.model_name
    names = CentralStorage.artifact_names(name, cfg.model.drift_detection)
    files = save_package(cfg.model.save_dir, name, names, model, uae, bbsd, ref)
    version = None
    with mlflow.start_run(run_id=run_id):
        if cfg.train.register_model:
            h, w = cfg.model.input_size.h, cfg.model.input_size.w
            example = np.zeros((1, h, w, 3), dtype="float32")
            info = mlflow.keras.log_model(
                model,
                name="model",
                signature=infer_signature(example, model(example).numpy()),
                registered_model_name=name,
                pip_requirements=MODEL_PIP_REQUIREMENTS,
            )
            version = str(info.registered_model_version)
        metadata = ModelMetadata(
            **cfg.model.model_dump(mode="json", exclude={"save_dir"}),
            **names,
            version=version,
            data_version=data_version,
            mlflow_run_id=run_id,
            created_on=utc_now(),
        )
        local_meta = cfg.model.save_dir / f"{name}.yaml"
        write_metadata(local_meta, metadata)
        mlflow.log_artifact(str(local_meta), "package")
        mlflow.log_artifact(str(files["reference_data_path"]), "package")
    meta_path = open_storage(settings).publish(files, metadata)
    return {
        "model_name": name,
        "model_version": version,
        "metadata_file": meta_path.name,
        "versioned_metadata_file": (
            CentralStorage.versioned_metadata_file(name, version, run_id) if version else None
        ),
        "metadata_path": str(meta_path),
        **names,
    }


@flow(name="train_flow", log_prints=True)
def train_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = as_config(config, "model", "dataset", "train")
    settings = get_settings()
    tracking.configure(settings)
    data_version = prepare_data(cfg)
    run_id = start_run(cfg, settings, data_version)
    validate_data(cfg, run_id)
    splits = load_data(cfg)
    model = train_model(cfg, splits, run_id)
    packaged = package_model(cfg, settings, model, splits, data_version, run_id)
    link = tracking.run_link(run_id, settings)
    if link.startswith("http"):
        create_link_artifact(link, link_text="MLflow training run", key="mlflow-train-run")
    return {**packaged, "run_id": run_id, "data_version": data_version, "train_run_link": link}


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: run the train flow for a config dict."""
    as_config(config, "model", "dataset", "train")
    return train_flow(config)
