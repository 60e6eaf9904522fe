"""Machine-level settings (where things live, which servers to use), read from env and `.env`.

Kept apart from the flow config so one YAML runs unchanged on embedded defaults and on the
full stack: only these settings differ. The reference's variable names (`CENTRAL_STORAGE_PATH`,
`MLFLOW_TRACKING_URI`) are kept as they are.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cvops.storage import StorageLocation, join_location


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_prefix="CVOPS_", extra="ignore")

    state_dir: Path = Field(
        default=Path(".cvops"),
        description="Local state of embedded defaults (MLflow SQLite store, Prefect home, logs).",
    )
    central_storage_path: StorageLocation = Field(
        default=Path("central_storage"),
        validation_alias=AliasChoices("CENTRAL_STORAGE_PATH", "CVOPS_CENTRAL_STORAGE_PATH"),
        description="Shared folder with models/ and ref_data/ (the reference's central storage),"
        " or s3://bucket/prefix on S3-compatible object storage (AWS_* variables).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "CVOPS_MLFLOW_TRACKING_URI"),
        description="MLflow server or store; None means a SQLite store under state_dir.",
    )

    background: bool = Field(
        default=True,
        description=(
            "Embedded mode: start the model service and the monitor scheduler as background "
            "processes when no service URL / Prefect server is configured."
        ),
    )
    service_port: int = Field(
        default=8080,
        ge=1,
        le=65535,
        description="Port of the embedded (background) service; a free one when another "
        "program holds it (the port in use is recorded in the state dir).",
    )
    service_workers: int = Field(default=1, ge=1, description="Workers of the embedded service.")
    weights_dir: Path | None = Field(
        default=None,
        description="Cache of downloaded pretrained backbone weights (model.weights: imagenet), "
        "laid out as ~/.keras (models/<file>); None means state_dir/weights.",
    )

    @property
    def resolved_weights_dir(self) -> Path:
        return (self.weights_dir or self.state_dir / "weights").expanduser().resolve()

    @property
    def mlflow_dir(self) -> Path:
        return self.state_dir.resolve() / "mlflow"

    @property
    def resolved_tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifact_root(self) -> str | None:
        """Artifact root for new experiments on the embedded store; a server decides its own.
        With central storage on object storage, `<central storage>/mlartifacts` (the stack's
        layout), so every host sees the runs' artifacts; else a folder in the state dir."""
        if self.mlflow_tracking_uri and not self.mlflow_tracking_uri.startswith(
            ("sqlite:", "file:")
        ):
            return None
        if isinstance(self.central_storage_path, str):
            return f"{self.central_storage_path}/mlartifacts"
        return (self.mlflow_dir / "artifacts").as_uri()

    @property
    def dvc_remote_root(self) -> Path | str:
        """The datasets' DVC remotes: a folder, or an s3:// URL."""
        return join_location(self.central_storage_path, "dvc_remote")

    def dvc_remote(self, dataset: str) -> Path | str:
        """The DVC remote of one dataset, `<central storage>/dvc_remote/<dataset>`."""
        return join_location(self.central_storage_path, "dvc_remote", dataset)


def get_settings() -> Settings:
    """Fresh settings each call: tests and flows change the environment between runs."""
    return Settings()
