from pathlib import Path

import pytest
import yaml

from cvops.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))

REFERENCE_CONFIG = """
flow_module: flows.full_flow
model:
  model_name: animals10_classifier_50px_demo
  input_size: {w: 50, h: 50}
  classes: [butterfly, cat, chicken, cow, dog, elephant, horse, sheep, spider, squirrel]
  classifier_activation: softmax
  classifier_type: multi-class
  classification_layer: classify_head
  save_dir: /tmp/models
  drift_detection:
    uae_model_suffix: _uae
    uae_encoding_dims: 32
    bbsd_model_suffix: _bbsd
    bbsd_layer_idx: -1
    reference_data_suffix: _ref_data
    reference_data_n_sample: 5000
dataset:
  ds_root: /tmp/datasets
  ds_name: animals10-dvc
  dvc_tag: v2.0.0
  dvc_checkout: false
train:
  hparams: {epochs: 5, batch_size: 64, init_lr: 0.001}
  mlflow: {exp_name: animals-train, exp_desc: demo, exp_tags: {dataset: Animals10}}
evaluate:
  subset: test
  mlflow: {exp_name: animals-eval, exp_desc: demo, exp_tags: {dataset: Animals10}}
deploy:
  model_metadata_file_name: animals10_classifier_50px_demo.yaml
  prefect:
    git_repo_root: /tmp/repo
    deployment_name: drift_detection_evidently
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.flow_module.startswith("cvops.flows.")


def test_reference_config_loads_and_maps_flow_module(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, REFERENCE_CONFIG))
    assert cfg.model.classes[0] == "butterfly"
    assert cfg.dataset.dvc_checkout is False
    assert cfg.deploy.prefect.deployment_name == "drift_detection_evidently"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["model"]["input_size"].update(w="wide"), "model.input_size.w"),
        (lambda d: d["model"].pop("classes"), "model.classes"),
        (lambda d: d["train"]["hparams"].update(epochs=0), "train.hparams.epochs"),
        (lambda d: d["train"]["hparams"].update(batch_szie=32), "train.hparams.batch_szie"),
        (lambda d: d["model"].update(classes=["a", "a"]), "model.classes"),
        (lambda d: d["dataset"].update(ds_name="../escape"), "dataset.ds_name"),
        (lambda d: d.update(flow_module="flows.nope"), "flow_module"),
        (lambda d: d["evaluate"].update(subset="validation"), "evaluate.subset"),
    ],
)
def test_bad_field_is_named_with_file(tmp_path: Path, mutate, field: str) -> None:
    data = yaml.safe_load(REFERENCE_CONFIG)
    mutate(data)
    path = write(tmp_path, yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert f"{field}:" in message
    assert "\n" not in message


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed"))


def test_flow_requires_its_sections() -> None:
    data = yaml.safe_load(REFERENCE_CONFIG)
    del data["train"]
    cfg = parse_config(data, source="x.yaml")
    with pytest.raises(ConfigError, match=r"x.yaml: train: section is required"):
        cfg.require("model", "train")
