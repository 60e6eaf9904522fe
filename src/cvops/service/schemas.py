"""Response models: they make the OpenAPI docs accurate and the contract explicit."""

from __future__ import annotations

from pydantic import BaseModel, Field


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    prediction: dict[str, float] = Field(description="class -> probability (reference key)")
    predicted_class: str
    uae_feats: list[float] = Field(description="UAE embedding (32 floats)")
    bbsd_feats: list[float] = Field(description="BBSD features (one per class)")
    hidden_feats: list[float] | None = Field(
        None, description="pooled conv features of the classifier (None: model without the layer)"
    )
    raw_hm_img: str | None = Field(
        description="Grad-CAM heatmap, base64 PNG (null when asked with heatmaps=false)"
    )
    overlaid_img: str | None = Field(
        description="heatmap over the input, base64 PNG (null when asked with heatmaps=false)"
    )
    prediction_id: str
    message: str = "Success"
    timings_ms: dict[str, float] = {}


class UpdateModelResponse(BaseModel):
    message: str
    model_name: str
    model_version: str
    metadata_file: str
    mlflow_run_id: str | None = Field(None, description="MLflow run of the loaded model")
    generation: int
    workers: int = Field(description="live replicas (worker processes on every host)")
    workers_pending: list[int] = Field(description="pids of replicas not serving it in time")
    workers_failed: dict[int, str] = Field(description="pid: why that replica cannot load it")
    replicas: list[str] = Field([], description="ids (`<host>:<pid>`) of the live replicas")
    replicas_pending: list[str] = Field([], description="ids of those not serving it in time")
    replicas_failed: dict[str, str] = Field({}, description="id: why it cannot load it")


class Health(BaseModel):
    status: str
    model_loaded: bool
    model_name: str | None = None
    model_version: str | None = None
    metadata_file: str | None = Field(None, description="central storage models/ file served")
    mlflow_run_id: str | None = Field(None, description="MLflow run of the served model")
    instance_id: str | None = Field(
        None, description="which cvops background service this is (None: not one)"
    )
    replica: str | None = Field(None, description="this process's replica id `<host>:<pid>`")
    generation: int | None = Field(None, description="generation of the model state served")


class ErrorResponse(BaseModel):
    detail: str


class FeedbackRequest(BaseModel):
    label: str = Field(min_length=1, max_length=200, description="the true class")


class FeedbackResponse(BaseModel):
    message: str
    prediction_id: str
    label: str
