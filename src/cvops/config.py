"""The typed flow config: one YAML drives every flow (reference-compatible keys).

Every section is validated before any work starts; a wrong or missing field fails with one
message naming the file and the field (`ConfigError`). Unknown keys are rejected so that a typo
does not silently fall back to a default.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# keras.applications families (cvops.model.backbones.FAMILIES); they need inputs >= 32x32
APPLICATION_BACKBONES = (
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_v2_b0",
    "resnet50",
)
Backbone = Literal[
    "reference_cnn",
    "small_cnn",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_v2_b0",
    "resnet50",
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the offending field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSize(StrictModel):
    w: PositiveInt
    h: PositiveInt


class DriftDetectionConfig(StrictModel):
    uae_model_suffix: str = "_uae"
    uae_encoding_dims: PositiveInt = 32
    bbsd_model_suffix: str = "_bbsd"
    bbsd_layer_idx: int = -1
    # The classifier layer whose output is monitored as a third embedding ("hidden"; BBSD on a
    # hidden layer, "BBSDh" in Failing Loudly): blur and noise move the pooled conv features far
    # more than the softmax (benchmarks/hidden_layer_probe.py). None: not monitored.
    hidden_layer: str | None = "features"
    reference_data_suffix: str = "_ref_data"
    reference_data_n_sample: PositiveInt = 5000


class ModelConfig(StrictModel):
    model_name: str = Field(pattern=SAFE_NAME)
    input_size: InputSize
    classes: list[str] = Field(min_length=2)
    classifier_activation: Literal["softmax"] = "softmax"
    classifier_type: Literal["multi-class"] = "multi-class"
    classification_layer: str = "classify_head"
    save_dir: Path = Path("models")
    drift_detection: DriftDetectionConfig = DriftDetectionConfig()
    backbone: Backbone = Field(
        default="small_cnn",
        description="the network (cvops.model.backbones): small_cnn (default, chosen by "
        "benchmarks/results/accuracy.md), reference_cnn (the reference's CNN, layer for layer), "
        "or a keras.applications family",
    )
    weights: str = Field(
        default=None,  # type: ignore[assignment]  # resolved per backbone by _weights
        validate_default=True,
        description="imagenet (downloaded once into CVOPS_WEIGHTS_DIR), none (random init) or "
        "the path of the backbone's weights without its top; default imagenet for "
        "keras.applications families, none for reference_cnn and small_cnn",
    )

    @field_validator("backbone")
    @classmethod
    def _input_fits_backbone(cls, backbone: str, info: ValidationInfo) -> str:
        size = info.data.get("input_size")
        if backbone in APPLICATION_BACKBONES and size is not None and min(size.w, size.h) < 32:
            raise ValueError(
                f"{backbone} needs an input_size of at least 32x32, got {size.w}x{size.h}"
            )
        return backbone

    @field_validator("weights", mode="before")
    @classmethod
    def _weights(cls, weights: Any, info: ValidationInfo) -> str:
        """Resolve the default and check the file exists now, not after an hour of setup."""
        if "backbone" not in info.data:  # its own error says why; none here to add to it
            return "none" if weights is None else str(weights)
        backbone = info.data["backbone"]
        pretrainable = backbone in APPLICATION_BACKBONES
        if weights is None:
            return "imagenet" if pretrainable else "none"
        weights = str(weights)
        if weights == "none":
            return weights
        if backbone == "reference_cnn":
            raise ValueError("reference_cnn trains from scratch as the reference does: use none")
        if weights == "imagenet":
            if not pretrainable:
                raise ValueError(f"{backbone} has no imagenet weights: use none or a file path")
            return weights
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ValueError(
                f"weights file {path} not found (expected imagenet, none or the path of a "
                f"{backbone} backbone weights file without its top)"
            )
        return str(path)

    @field_validator("classes")
    @classmethod
    def _unique_classes(cls, classes: list[str]) -> list[str]:
        dupes = sorted({c for c in classes if classes.count(c) > 1})
        if dupes:
            raise ValueError(f"class names must be unique, repeated: {dupes}")
        return classes


class DatasetConfig(StrictModel):
    ds_root: Path
    ds_name: str = Field(pattern=SAFE_NAME)
    dvc_tag: str | None = None
    dvc_checkout: bool = True
    val_fraction: float = Field(default=0.1, ge=0.0, lt=0.5)

    @property
    def path(self) -> Path:
        return self.ds_root / self.ds_name


class Hparams(StrictModel):
    epochs: PositiveInt
    batch_size: PositiveInt
    init_lr: PositiveFloat
    optimizer: Literal["adam", "sgd", "rmsprop"] = "adam"


class AugmentationConfig(StrictModel):
    """Train-time augmentation; the reference used brightness, horizontal flip, rotation/scale."""

    enabled: bool = True
    brightness: float = Field(default=0.15, ge=0.0, le=1.0)
    horizontal_flip: bool = Field(
        default=True,
        description="turn off for classes a flip changes (digits, text, left/right signs)",
    )
    vertical_flip: bool = Field(
        default=False, description="only for images without an up (aerial, microscopy, texture)"
    )
    rotation: float = Field(default=0.05, ge=0.0, le=0.5, description="fraction of a full turn")
    zoom: float = Field(default=0.1, ge=0.0, lt=1.0)
    random_hue: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="share of training images whose hue is rotated by a random amount: makes "
        "the model learn shape where colour only correlates with the class (keep 0 where colour "
        "defines it: ripe vs unripe)",
    )


class MlflowExperiment(StrictModel):
    exp_name: str = Field(min_length=1)
    exp_desc: str = ""
    exp_tags: dict[str, str] = {}


class ValidationGateConfig(StrictModel):
    """Data validation before training (cvops.data.validation): one HTML report + gates.

    Each gate has a level: `fail` stops the flow before training, `warn` only reports, `off`
    skips it. Defaults fail on what silently ruins a model or its test score (corrupt files,
    train/test leakage, a class missing from a split, severe imbalance) and warn on the rest.
    """

    enabled: bool = True
    corrupt: Literal["fail", "warn", "off"] = "fail"
    leakage: Literal["fail", "warn", "off"] = "fail"
    missing_class: Literal["fail", "warn", "off"] = "fail"
    imbalance: Literal["fail", "warn", "off"] = "fail"
    duplicates: Literal["fail", "warn", "off"] = "warn"
    label_shift: Literal["fail", "warn", "off"] = "warn"
    property_drift: Literal["fail", "warn", "off"] = "warn"
    odd_mode: Literal["fail", "warn", "off"] = "warn"
    tiny_image: Literal["fail", "warn", "off"] = "warn"
    max_leakage_fraction: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="leakage fails above this fraction of test images with a train duplicate; "
        "any leakage below it is still a warning",
    )
    max_imbalance_ratio: float = Field(
        default=10.0, ge=1.0, description="largest / smallest class count within a split"
    )
    max_label_tv: float = Field(
        default=0.1, ge=0.0, le=1.0, description="total variation between class shares"
    )
    drift_ks_threshold: float = Field(
        default=0.15, gt=0.0, le=1.0, description="KS statistic above which a property drifts"
    )
    drift_p_value: float = Field(
        default=0.01, gt=0.0, lt=1.0, description="and the KS / chi-square p-value below this"
    )
    near_dup_max_hamming: int = Field(
        default=10, ge=0, le=32, description="perceptual-hash distance of a near-duplicate"
    )
    near_dup_min_similarity: float = Field(
        default=0.94,
        ge=0.0,
        le=1.0,
        description="thumbnail colour + texture correlation that confirms a hash candidate "
        "(copies score > 0.96, look-alike demo images < 0.93)",
    )
    min_image_side: PositiveInt = Field(default=16, description="smaller sides are tiny images")
    max_examples: PositiveInt = Field(default=12, description="thumbnails per issue in the report")


class EarlyStoppingConfig(StrictModel):
    """Stop when val_loss stops improving and keep the best epoch's weights, not the last.

    Without a validation split (dataset.val_fraction: 0) it is off, said once in the log: the
    training loss keeps falling while a model overfits, so it cannot pick the best epoch.
    """

    enabled: bool = True
    patience: int = Field(default=8, ge=0, description="epochs without improvement, then stop")
    min_delta: float = Field(default=0.0, ge=0.0, description="smaller val_loss gains don't count")


class LrScheduleConfig(StrictModel):
    """Learning rate per epoch: `plateau` divides it when val_loss (else loss) stalls,
    `cosine` decays it from hparams.init_lr over the planned epochs after a linear warm-up."""

    kind: Literal["plateau", "cosine", "none"] = "plateau"
    factor: float = Field(default=0.5, gt=0.0, lt=1.0, description="plateau: lr *= factor")
    patience: int = Field(default=4, ge=0, description="plateau: epochs without improvement")
    min_delta: float = Field(default=1e-4, ge=0.0, description="plateau: smaller gains don't count")
    min_lr: float = Field(default=1e-6, ge=0.0, description="plateau and cosine: the lowest lr")
    warmup_epochs: int = Field(default=0, ge=0, description="cosine: epochs rising to init_lr")


ClassWeight = Literal["none", "balanced"] | dict[str, PositiveFloat]


class FinetuneConfig(StrictModel):
    """Training a pretrained backbone (model.weights imagenet or a file) in two phases: a
    warm-up with the backbone frozen (its random head would otherwise push large gradients
    through it), then its top part unfrozen at a lower learning rate. BatchNorm stays frozen.
    With weights none the whole model trains from the start and this section is unused."""

    warmup_epochs: int = Field(
        default=3, ge=0, description="the first epochs of hparams.epochs, backbone frozen"
    )
    unfreeze_fraction: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="top share of the backbone's layers with weights trained after the warm-up",
    )
    lr_factor: float = Field(
        default=0.1, gt=0.0, le=1.0, description="fine-tune learning rate = init_lr * lr_factor"
    )


class TrainConfig(StrictModel):
    hparams: Hparams
    mlflow: MlflowExperiment
    finetune: FinetuneConfig = FinetuneConfig()
    augmentation: AugmentationConfig = AugmentationConfig()
    validation: ValidationGateConfig = ValidationGateConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    lr_schedule: LrScheduleConfig = LrScheduleConfig()
    class_weight: ClassWeight = Field(
        default="none",
        description="loss weight per class: none, balanced (n / (k * count) from the training "
        "split) or {class: weight} (unnamed classes 1.0)",
    )
    register_model: bool = True

    @field_validator("class_weight", mode="before")
    @classmethod
    def _class_weight_form(cls, value: Any) -> Any:
        """One clear message instead of one per member of the union."""
        if value is None:
            return "none"
        if isinstance(value, dict):
            bad = {k: v for k, v in value.items() if isinstance(v, bool) or not _positive(v)}
            if bad:
                raise ValueError(f"class weights must be positive numbers, got {bad}")
            return value
        if value not in ("none", "balanced"):
            raise ValueError("expected none, balanced or a mapping {class: weight}")
        return value


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


class EvaluateConfig(StrictModel):
    subset: Literal["train", "test"] = "test"
    mlflow: MlflowExperiment | None = None


class DeployPrefectConfig(StrictModel):
    git_repo_root: Path | None = None
    deployment_name: str = "drift_detection_evidently"


class PromotionConfig(StrictModel):
    """The new model must not be worse than the champion by more than `max_drop`."""

    metric: Literal["accuracy", "auc_macro_ovr"] = "accuracy"
    max_drop: float = Field(default=0.01, ge=0.0, le=1.0)


class DeployConfig(StrictModel):
    model_metadata_file_name: str | None = None
    service_url: str | None = Field(
        default=None, description="model service base URL; None: CVOPS_SERVICE_URL or skip"
    )
    promotion: PromotionConfig = PromotionConfig()
    prefect: DeployPrefectConfig = DeployPrefectConfig()


def default_evidently_workspace() -> Path:
    explicit = os.environ.get("CVOPS_EVIDENTLY_WORKSPACE")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("CVOPS_STATE_DIR", ".cvops")) / "evidently"


class MonitorConfig(StrictModel):
    """The drift-monitor flow (`drift_detection_evidently`): window, level, where results go."""

    last_days: float = Field(default=7, gt=0)
    last_n: PositiveInt = 500
    alpha: float = Field(default=0.05, gt=0, lt=1, description="false-alarm rate of one run")
    cause_alpha: float = Field(
        default=0.01,  # = cvops.monitor.causes.CAUSE_ALPHA (not imported: numpy/scipy)
        gt=0,
        lt=1,
        description="family-wise level for naming a cause (property and prediction-shift "
        "tests, Bonferroni over them): stricter than alpha, so un-shifted traffic gets 'no "
        "single cause' in >= 95% of runs whatever the one reference sample (see "
        "benchmarks/results/drift_cause.md); the drift verdict uses alpha",
    )
    evidently_project: str = "cvops-drift-monitoring"
    workspace: Path = Field(
        default_factory=lambda: default_evidently_workspace(),
        description="Evidently workspace folder; default CVOPS_EVIDENTLY_WORKSPACE, else "
        "<CVOPS_STATE_DIR>/evidently (the folder the stack's Evidently UI serves)",
    )
    evidently_mmd: bool = Field(
        default=False,
        description="also Evidently's own (uncalibrated) MMD with its t-SNE plot; slow",
    )
    cron: str = "0 6 * * 1"
    pool_name: str = "production-model-pool"
    webhook_url: str | None = Field(default=None, description="POSTed a JSON summary on drift")
    retrain_on_drift: bool = False


class LabellingConfig(StrictModel):
    """`cvops label push / pull` (cvops.labelling): which logged predictions go to Label
    Studio, and how the labels that come back become the next dataset version."""

    n: PositiveInt = Field(default=200, description="tasks per push")
    strategy: Literal["least_confidence", "margin", "entropy", "drift_weighted", "random"] = Field(
        default="random",
        description="random by default: on the demo's background shift it beat every "
        "uncertainty strategy (benchmarks/results/labelling.md); drift_weighted = entropy x "
        "the monitor's domain-classifier score",
    )
    random_share: float = Field(
        default=0.1,
        ge=0.0,
        le=1.0,
        description="share of each push drawn uniformly at random (the control arm that "
        "measures the strategy)",
    )
    pool: PositiveInt = Field(default=5000, description="newest predictions to choose from")
    project: str | None = Field(
        default=None, description="Label Studio project title; default 'cvops <model_name>'"
    )
    unknown_label: str = Field(default="other / unknown", min_length=1)
    unknown_class: str | None = Field(
        default=None,
        description="class the unknown label is filed under in the dataset (one of "
        "model.classes, e.g. a background class); None keeps those images out",
    )
    version_bump: Literal["major", "minor", "patch"] = Field(
        default="minor", description="next dataset tag: v2.0.0 -> v2.1.0 (minor)"
    )
    push_on_drift: bool = Field(
        default=False,
        description="with monitor.retrain_on_drift: on drift the monitor pushes to Label "
        "Studio instead of retraining on the old data (`cvops label pull --retrain` retrains)",
    )
    seed: int = 0


class FlowConfig(StrictModel):
    flow_module: str
    seed: int = 42
    model: ModelConfig | None = None
    dataset: DatasetConfig | None = None
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    deploy: DeployConfig | None = None
    monitor: MonitorConfig | None = None
    labelling: LabellingConfig | None = None
    source: str = Field(default="<dict>", exclude=True)

    def require(self, *sections: str) -> None:
        """Fail early, naming the section a flow needs but the config lacks."""
        for name in sections:
            if getattr(self, name) is None:
                raise ConfigError(
                    f"Invalid config {self.source}: {name}: section is required by "
                    f"flow_module {self.flow_module}"
                )

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def _format_errors(source: str, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        parts.append(f"{loc}: {e['msg']}{got}")
    return f"Invalid config {source}: " + "; ".join(parts)


def _check_class_weight(cfg: FlowConfig, source: str) -> None:
    """Class weights name classes of the model section, which one section cannot check."""
    weights = cfg.train.class_weight if cfg.train else "none"
    if not isinstance(weights, dict) or cfg.model is None:
        return
    unknown = sorted(set(weights) - set(cfg.model.classes))
    if unknown:
        raise ConfigError(
            f"Invalid config {source}: train.class_weight: classes {unknown} are not in "
            f"model.classes {cfg.model.classes}"
        )


def _check_unknown_class(cfg: FlowConfig, source: str) -> None:
    unknown = cfg.labelling.unknown_class if cfg.labelling else None
    if unknown is not None and cfg.model is not None and unknown not in cfg.model.classes:
        raise ConfigError(
            f"Invalid config {source}: labelling.unknown_class: {unknown!r} is not in "
            f"model.classes {cfg.model.classes}"
        )


def parse_config(
    data: dict[str, Any], source: str = "<dict>", *, check_flow_module: bool = True
) -> FlowConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"Invalid config {source}: <root>: expected a mapping of sections")
    try:
        cfg = FlowConfig.model_validate({**data, "source": source})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None
    _check_class_weight(cfg, source)
    _check_unknown_class(cfg, source)
    if check_flow_module:
        resolve_flow_module(cfg.flow_module, source)
    return cfg


def load_config(path: str | Path, *, check_flow_module: bool = True) -> FlowConfig:
    """Parse and validate a YAML config; `check_flow_module` imports the flow to check it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"Invalid config {path}: not valid YAML: {err}") from None
    return parse_config(data or {}, source=str(path), check_flow_module=check_flow_module)


def resolve_flow_module(name: str, source: str = "<dict>") -> str:
    """Map reference names (`flows.full_flow`) to ours and check the module has `start`."""
    module_name = f"cvops.{name}" if name.startswith("flows.") else name
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        raise ConfigError(
            f"Invalid config {source}: flow_module: no module named {name!r} "
            "(expected e.g. cvops.flows.full_flow or flows.train_flow)"
        ) from None
    if not callable(getattr(module, "start", None)):
        raise ConfigError(f"Invalid config {source}: flow_module: {name!r} has no start(config)")
    return module_name
