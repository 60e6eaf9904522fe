"""Eval flow: the packaged model on the configured split -> metrics and figures in MLflow."""

from __future__ import annotations

import logging
from typing import Any

import keras
import mlflow
from mlflow.tracking import MlflowClient
from prefect import flow
from prefect.artifacts import create_link_artifact

from cvops import tracking
from cvops.config import FlowConfig
from cvops.flows.common import as_config, step
from cvops.model.evaluate import (
    Evaluation,
    classification_report_figure,
    confusion_matrix_figure,
    evaluate_on_split,
)
from cvops.settings import Settings, get_settings
from cvops.storage import CentralStorage, ModelMetadata, open_storage

log = logging.getLogger(__name__)


def metadata_file_name(cfg: FlowConfig) -> str:
    if cfg.deploy and cfg.deploy.model_metadata_file_name:
        return cfg.deploy.model_metadata_file_name
    assert cfg.model is not None
    return f"{cfg.model.model_name}.yaml"


@step("evaluate-model")
def evaluate_model(cfg: FlowConfig, storage: CentralStorage, meta: ModelMetadata) -> Evaluation:
    assert cfg.dataset is not None and cfg.evaluate is not None
    path = storage.local_copy(meta.model_path, meta.sha256.get("model_path"))
    model = keras.models.load_model(path, compile=False)
    size = (meta.input_size.h, meta.input_size.w)
    return evaluate_on_split(model, cfg.dataset.path, cfg.evaluate.subset, meta.classes, size)


@step("log-evaluation")
def log_evaluation(
    cfg: FlowConfig, settings: Settings, meta: ModelMetadata, result: Evaluation
) -> str:
    """Log to an eval run (evaluate.mlflow experiment) and copy the headline to the train run."""
    assert cfg.evaluate is not None
    experiment = cfg.evaluate.mlflow or (cfg.train.mlflow if cfg.train else None)
    if experiment is None:
        raise ValueError("evaluate.mlflow (or train.mlflow) is needed to log the evaluation")
    experiment_id = tracking.ensure_experiment(experiment, settings)
    subset = cfg.evaluate.subset
    metrics = {
        f"{subset}_accuracy": result.accuracy,
        f"{subset}_auc_macro_ovr": result.auc_macro_ovr,
    }
    tags = {
        "flow": "eval_flow",
        "model_name": meta.model_name,
        "model_version": str(meta.version),
        "train_run_id": str(meta.mlflow_run_id),
        "git_sha": tracking.git_sha() or "unknown",
        **experiment.exp_tags,
    }
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=f"eval-{meta.model_name}", tags=tags
    ) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_figure(confusion_matrix_figure(result), "evaluation/confusion_matrix.png")
        mlflow.log_figure(
            classification_report_figure(result), "evaluation/classification_report.png"
        )
        mlflow.log_table(result.report_table(), "evaluation/classification_report.json")
        mlflow.log_dict(
            {"confusion_matrix": result.confusion.tolist(), "classes": result.classes},
            "evaluation/confusion_matrix.json",
        )
    if meta.mlflow_run_id:
        client = MlflowClient()
        for key, value in metrics.items():
            client.log_metric(meta.mlflow_run_id, key, value)
        client.set_tag(meta.mlflow_run_id, "eval_run_id", run.info.run_id)
    return run.info.run_id


@flow(name="eval_flow", log_prints=True)
def eval_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = as_config(config, "model", "dataset", "evaluate")
    settings = get_settings()
    tracking.configure(settings)
    storage = open_storage(settings)
    metadata_file = metadata_file_name(cfg)
    try:
        meta = storage.load_metadata(metadata_file)
    except FileNotFoundError:
        where = storage.location_of(f"models/{metadata_file}")
        raise FileNotFoundError(f"no packaged model at {where}: run the train flow first") from None
    result = evaluate_model(cfg, storage, meta)
    run_id = log_evaluation(cfg, settings, meta, result)
    assert cfg.evaluate is not None
    meta.metrics = {
        **meta.metrics,
        f"{cfg.evaluate.subset}_accuracy": result.accuracy,
        f"{cfg.evaluate.subset}_auc_macro_ovr": result.auc_macro_ovr,
    }
    storage.save_metadata(metadata_file, meta)
    if meta.version:  # keep the immutable copy's metrics in step (used by rollbacks)
        pinned = CentralStorage.versioned_metadata_file(
            meta.model_name, meta.version, meta.mlflow_run_id
        )
        try:
            copy = storage.load_metadata(pinned)
        except FileNotFoundError:
            copy = None
        if copy is not None and copy.mlflow_run_id == meta.mlflow_run_id:
            storage.save_metadata(pinned, copy.model_copy(update={"metrics": meta.metrics}))
    link = tracking.run_link(run_id, settings)
    if link.startswith("http"):
        create_link_artifact(link, link_text="MLflow evaluation run", key="mlflow-eval-run")
    return {
        "eval_run_id": run_id,
        "eval_run_link": link,
        "test_accuracy": result.accuracy,
        "test_auc": result.auc_macro_ovr,
    }


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: run the eval flow for a config dict."""
    as_config(config, "model", "dataset", "evaluate")
    return eval_flow(config)
