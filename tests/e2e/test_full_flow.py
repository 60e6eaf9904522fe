"""The whole loop on embedded defaults: DVC demo repo -> full flow via the CLI -> outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cvops.data.demo import CLASSES
from cvops.data.demo_repo import build_demo_repo
from cvops.data.versioning import current_version
from cvops.storage import read_metadata

REPO = Path(__file__).resolve().parents[2]
CLASSES_3 = CLASSES[:3]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("project")
    storage = root / "central_storage"
    build_demo_repo(
        root / "datasets" / "demo-shapes",
        storage / "dvc_remote" / "demo-shapes",
        v1_train_per_class=8,
        v2_train_per_class=10,
        test_per_class=4,
        classes=CLASSES_3,
    )
    cfg = yaml.safe_load((REPO / "configs" / "full_flow.yaml").read_text())
    cfg["model"]["classes"] = CLASSES_3
    cfg["model"]["drift_detection"]["reference_data_n_sample"] = 20
    cfg["dataset"]["dvc_tag"] = "v1.0.0"  # the repo is at v2.0.0: the flow must check out v1
    cfg["train"]["hparams"].update(epochs=2, batch_size=8)
    config = root / "configs" / "full_flow.yaml"
    config.parent.mkdir()
    config.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "CENTRAL_STORAGE_PATH": str(storage),
        "CVOPS_STATE_DIR": str(root / ".cvops"),
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "run_flow.py"), "--config", str(config)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return {"root": root, "storage": storage, "cfg": cfg, "stdout": result.stdout}


pytestmark = pytest.mark.slow


def test_dataset_checked_out_to_configured_tag(project: dict) -> None:
    version = current_version(project["root"] / "datasets" / "demo-shapes")
    assert version.tag == "v1.0.0" and not version.dirty
    train_files = list((project["root"] / "datasets/demo-shapes/images/train").rglob("*.jpg"))
    assert len(train_files) == 8 * 3


def test_package_in_central_storage_loads_with_right_shapes(project: dict) -> None:
    storage, name = project["storage"], project["cfg"]["model"]["model_name"]
    meta = read_metadata(storage / "models" / f"{name}.yaml")
    assert meta.classes == CLASSES_3 and (meta.input_size.w, meta.input_size.h) == (50, 50)
    assert meta.data_version["tag"] == "v1.0.0"
    assert meta.data_version["dvc_hash"].endswith(".dir")
    assert meta.mlflow_run_id and meta.version == "1" and meta.created_on
    assert set(meta.metrics) == {"test_accuracy", "test_auc_macro_ovr"}

    model = keras.models.load_model(storage / meta.model_path)
    assert model.input_shape == (None, 50, 50, 3) and model.output_shape == (None, 3)
    assert model.layers[-1].name == "classify_head"
    uae = keras.models.load_model(storage / meta.uae_model_path)
    bbsd = keras.models.load_model(storage / meta.bbsd_model_path)
    assert uae.output_shape == (None, 32) and bbsd.output_shape == (None, 3)
    assert meta.uae_model_path == f"models/{name}_uae.keras"
    assert meta.bbsd_model_path == f"models/{name}_bbsd.keras"

    ref = pd.read_parquet(storage / "ref_data" / f"{name}_ref_data.parquet")
    from cvops.data.properties import IMAGE_PROPERTIES

    props = [f"prop_{name}" for name in IMAGE_PROPERTIES]  # the drift-cause properties
    assert list(ref.columns) == ["uae_feats", "bbsd_feats", "label", "hidden_feats", *props]
    assert ref[props].notna().all().all()
    assert len(ref) == 20
    assert {len(v) for v in ref["uae_feats"]} == {32}
    assert {len(v) for v in ref["bbsd_feats"]} == {3}
    # the pooled conv features of the default backbone (small_cnn: 128 channels)
    assert meta.backbone == "small_cnn" and meta.weights == "none"
    assert model.get_layer("features").output.shape[-1] == 128
    assert {len(v) for v in ref["hidden_feats"]} == {128}
    assert set(ref["label"]) <= set(CLASSES_3)


def test_mlflow_run_holds_metrics_figures_and_registry(project: dict) -> None:
    db = project["root"] / ".cvops" / "mlflow" / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}", registry_uri=f"sqlite:///{db}")
    name = project["cfg"]["model"]["model_name"]
    meta = read_metadata(project["storage"] / "models" / f"{name}.yaml")
    run = client.get_run(meta.mlflow_run_id)
    assert len(client.get_metric_history(run.info.run_id, "accuracy")) == 2  # per epoch
    assert {"val_accuracy", "test_accuracy", "test_auc_macro_ovr"} <= set(run.data.metrics)
    assert run.data.params["hparams.epochs"] == "2"
    assert run.data.tags["data.tag"] == "v1.0.0" and run.data.tags["git_sha"]
    eval_run = client.get_run(run.data.tags["eval_run_id"])
    artifacts = {a.path for a in client.list_artifacts(eval_run.info.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/classification_report.png",
        "evaluation/classification_report.json",
    } <= artifacts
    versions = client.search_model_versions(f"name='{name}'")
    assert [str(v.version) for v in versions] == ["1"] and versions[0].run_id == run.info.run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert run.data.tags["promotion.decision"] == "promote"


def test_summary_says_where_results_are(project: dict) -> None:
    out = project["stdout"]
    assert str(project["storage"].resolve() / "models") in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert "no model service configured" in out
    assert "is champion" in out


def test_invalid_config_fails_fast_naming_the_field(tmp_path: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "full_flow.yaml").read_text())
    cfg["train"]["hparams"]["epochs"] = "many"
    # A path longer than any terminal: the error must still be one line, path and field intact.
    path = tmp_path / ("configs-" + "x" * 90) / "bad.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run(
        [sys.executable, "-m", "cvops.cli", "run", str(path)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert f"{path}: train.hparams.epochs: Input should be a valid integer" in line
    assert not (tmp_path / ".cvops" / "mlflow").exists()
