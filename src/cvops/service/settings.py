"""Service settings (env `CVOPS_SERVICE_*` or `.env`); every worker reads the same values."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cvops.records.images import ImageStore
from cvops.storage import StorageLocation


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_prefix="CVOPS_SERVICE_", extra="ignore")

    central_storage_path: StorageLocation = Field(
        default=Path("central_storage"),
        validation_alias=AliasChoices("CENTRAL_STORAGE_PATH", "CVOPS_CENTRAL_STORAGE_PATH"),
        description="a folder or s3://bucket/prefix (models are downloaded once per version "
        "into state_dir/cache)",
    )
    state_dir: Path = Field(
        default=Path(".cvops"), validation_alias=AliasChoices("CVOPS_STATE_DIR", "state_dir")
    )
    metadata_file: str | None = Field(
        default=None, description="Model to load at start (name inside models/); None: newest."
    )
    db_url: str | None = Field(
        default=None, description="SQLAlchemy URL of the prediction DB; None: SQLite in state_dir"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for PUT /update_model"
    )
    instance_id: str | None = Field(
        default=None,
        description="Set by cvops on its background service: /health_check returns it, so a "
        "deploy recognises that service and leaves another program on the port alone",
    )
    allow_unauthenticated_admin: bool = Field(
        default=False, description="Explicitly allow admin calls without a token (not for prod)"
    )
    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    heatmap_max_side: int = Field(
        default=1024,
        ge=16,
        description="Longest side of the returned heatmap images (aspect kept); larger uploads"
        " are also decoded reduced, so time and memory per request stay bounded",
    )
    tf_threads: int | None = Field(
        default=None,
        ge=1,
        description="TensorFlow threads per worker (intra-op); None: the cores divided among "
        "the workers (`cvops serve` sets it), so workers do not fight over cores",
    )
    tf_inter_op_threads: int | None = Field(
        default=None,
        ge=1,
        description="TensorFlow inter-op threads per worker (independent ops of the step at "
        "once: the Grad-CAM gradient beside the UAE and BBSD heads); None: `tf_threads`",
    )
    png_compression: int = Field(
        default=1,
        ge=0,
        le=9,
        description="deflate level of the heatmap PNGs (0: stored; 1-3: ISA-L, fast; 4-9: "
        "zlib, smaller and slower)",
    )
    batch_max_size: int = Field(default=32, ge=1, description="most images in one model call")
    batch_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="how long a lone request waits for company; 0: never (a batch is whatever "
        "queued while the model was busy, so batches grow with load and cost nothing at rest)",
    )
    reload_poll_s: float = Field(
        default=0.25,
        gt=0,
        description="how often a replica reads the desired model from the prediction DB "
        "(one primary-key SELECT; docs/scaling.md has its cost and the propagation times)",
    )
    deployment: str = Field(
        default="default",
        min_length=1,
        max_length=100,
        description="the replicas that serve one model together (every host of one service); "
        "another name on the same database follows its own model",
    )
    replica_host: str = Field(
        default_factory=socket.gethostname,
        min_length=1,
        max_length=200,
        description="host part of this process's replica id `<host>:<pid>` (the pod name on "
        "Kubernetes); set it when several simulated hosts share one machine",
    )
    heartbeat_s: float = Field(default=2.0, gt=0, description="replica heartbeat period")
    heartbeat_lapse_s: float = Field(
        default=6.0,
        gt=0,
        description="a replica silent for longer no longer counts (PUT /update_model stops "
        "waiting for it)",
    )
    replica_prune_s: float = Field(
        default=3600.0, gt=0, description="rows of replicas silent for longer are deleted"
    )
    update_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="how long PUT /update_model waits for every live replica to serve the model",
    )
    drift_refresh_s: float = Field(default=30.0, gt=0, description="drift gauges refresh period")
    store_images: ImageStore = Field(
        default=ImageStore.DB,
        description="where uploads are kept: db (base64 in the predictions row, with the "
        "heatmaps), central_storage (objects under images/<model>/<yyyy-mm-dd>/ written by the "
        "spool flusher, the row referencing them), none; true/false still mean db/none",
    )
    property_buffer_mb: float = Field(
        default=64.0,
        ge=0,
        description="memory per worker for model inputs waiting for their image properties "
        "(measured by the spool flusher, off the request path); beyond it, rows are stored "
        "without properties (only during a long database outage); 0: no properties",
    )
    spool_fsync: bool = Field(
        default=True,
        description="fsync each spool commit (survives power loss); false: a commit survives "
        "the worker being killed but not the machine losing power, and answers sooner",
    )

    @field_validator("store_images", mode="before")
    @classmethod
    def _legacy_store_images(cls, value: object) -> object:
        return ImageStore.parse(value)

    @property
    def keeps_images(self) -> bool:
        """Whether a prediction record carries its images (to the DB or central storage)."""
        return self.store_images is not ImageStore.NONE

    @property
    def service_dir(self) -> Path:
        return self.state_dir.resolve() / "service"

    @property
    def resolved_db_url(self) -> str:
        return self.db_url or f"sqlite:///{self.service_dir / 'service.db'}"

    @property
    def spool_dir(self) -> Path:
        return self.service_dir / "spool"
