"""Settings of the local full stack (`cvops up`), read from the environment and `.env`.

The names are the ones `.env.example` documents and `docker/docker-compose.yml` uses, so one
`.env` describes both ways of running the stack. Every server binds to `CVOPS_BIND_HOST`
(loopback by default). Secrets left empty are generated once by `cvops up` and kept in
`<state_dir>/stack/secrets.env` (mode 0600), so a fresh checkout needs no editing.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cvops.records.images import ImageStore
from cvops.service.settings import ServiceSettings
from cvops.storage import StorageLocation


def _port(default: int, description: str) -> int:
    return Field(default=default, ge=1, le=65535, description=description)


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    state_dir: Path = Field(
        default=Path(".cvops"),
        validation_alias=AliasChoices("CVOPS_STATE_DIR", "state_dir"),
        description="Everything the stack writes: databases, logs, workspace, supervisor files.",
    )
    central_storage_path: StorageLocation = Field(
        default=Path("central_storage"),
        validation_alias=AliasChoices("CENTRAL_STORAGE_PATH", "central_storage_path"),
        description="a folder or s3://bucket/prefix; MLflow's artifacts go to its mlartifacts/",
    )
    bind_host: str = Field(
        default="127.0.0.1",
        validation_alias=AliasChoices("CVOPS_BIND_HOST", "bind_host"),
        description="Address every server listens on; loopback unless you mean otherwise.",
    )

    postgres_port: int = _port(5432, "Postgres 15 cluster of the stack")
    postgres_user: str = "cvops"
    postgres_password: SecretStr | None = None
    postgres_mlflow_db: str = "mlflow"
    postgres_prefect_db: str = "prefect"
    postgres_service_db: str = "cvops_service"

    mlflow_port: int = _port(5050, "MLflow tracking server")
    prefect_port: int = _port(4200, "Prefect server (API and UI)")
    service_port: int = _port(4242, "model service (gunicorn), reached through nginx")
    service_workers: int = Field(default=2, ge=1, le=32)
    service_max_body_bytes: int = Field(
        default=ServiceSettings.model_fields["max_body_bytes"].default,
        ge=1,
        validation_alias=AliasChoices("CVOPS_SERVICE_MAX_BODY_BYTES", "service_max_body_bytes"),
        description="Largest request body (bytes): the service's limit and nginx's, both ports",
    )
    service_store_images: ImageStore = Field(
        default=ServiceSettings.model_fields["store_images"].default,
        validation_alias=AliasChoices("CVOPS_SERVICE_STORE_IMAGES", "service_store_images"),
        description="Where the service keeps uploads and Grad-CAM overlays: db, "
        "central_storage (images/<model>/<yyyy-mm-dd>/ there) or none",
    )
    nginx_port: int = _port(8080, "nginx in front of the model service (the API)")
    webui_port: int = _port(4243, "web UI (served through nginx)")
    evidently_ui_port: int = _port(8000, "Evidently UI on the monitor's workspace")
    prometheus_port: int = _port(9090, "Prometheus")
    node_exporter_port: int = _port(9100, "Prometheus node exporter")
    jupyter_port: int = _port(8888, "Jupyter Lab")
    jupyter_password: SecretStr | None = None
    service_admin_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CVOPS_SERVICE_ADMIN_TOKEN", "service_admin_token"),
        description="Bearer token of PUT /update_model (deploy flow and rollback use it)",
    )
    monitor_pool_name: str = "production-model-pool"
    label_studio_port: int = _port(8090, "Label Studio (labelling, `cvops label`)")
    label_studio_username: str = Field(
        default="admin@cvops.local", description="Label Studio's admin user (an e-mail address)"
    )
    label_studio_password: SecretStr | None = None
    label_studio_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("CVOPS_LABEL_STUDIO_TOKEN", "label_studio_token"),
        description="API token (legacy) of the Label Studio admin; `cvops label` uses it",
    )
    postgres_label_studio_db: str = "label_studio"

    @field_validator(
        "postgres_password",
        "jupyter_password",
        "service_admin_token",
        "label_studio_password",
        "label_studio_token",
        mode="before",
    )
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("service_store_images", mode="before")
    @classmethod
    def _legacy_store_images(cls, value: object) -> object:
        return ImageStore.parse(value)

    @field_validator(
        "postgres_user",
        "postgres_mlflow_db",
        "postgres_prefect_db",
        "postgres_service_db",
        "postgres_label_studio_db",
    )
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not value.replace("_", "").isalnum() or not value[0].isalpha():
            raise ValueError("letters, digits and '_' only, starting with a letter")
        return value

    @property
    def stack_dir(self) -> Path:
        return self.state_dir.resolve() / "stack"

    @property
    def log_dir(self) -> Path:
        return self.stack_dir / "logs"

    @property
    def label_studio_dir(self) -> Path:
        """Label Studio's own virtual environment (`venv/`) and data folder (`data/`)."""
        return self.stack_dir / "label-studio"

    @property
    def evidently_workspace(self) -> Path:
        """The folder the monitor flow writes and the Evidently UI serves."""
        return self.state_dir.resolve() / "evidently"

    def ports(self) -> dict[str, int]:
        """Every port the stack binds, by the name of the server that binds it."""
        return {name: getattr(self, field) for name, field in PORT_FIELDS.items()}


# Server name -> its port field; the `.env` variable is the field name in upper case.
PORT_FIELDS = {
    "postgres": "postgres_port",
    "mlflow": "mlflow_port",
    "prefect-server": "prefect_port",
    "service": "service_port",
    "nginx": "nginx_port",
    "webui": "webui_port",
    "evidently-ui": "evidently_ui_port",
    "prometheus": "prometheus_port",
    "node-exporter": "node_exporter_port",
    "jupyter": "jupyter_port",
    "label-studio": "label_studio_port",
}
PORT_VARIABLES = {name: field.upper() for name, field in PORT_FIELDS.items()}


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines of the files the stack writes (secrets.env, client.env)."""
    values = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            key, sep, value = line.partition("=")
            if sep and not key.startswith("#"):
                values[key.strip()] = value.strip()
    return values
