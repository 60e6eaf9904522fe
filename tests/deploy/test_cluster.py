"""cvops.cluster: the Kubernetes settings of flow Jobs, the pool template and the job variables
the deploy step stores; each way to get them wrong fails with one message naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvops import cluster

TEMPLATE = (
    Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "base" / "base-job-template.json"
)


@pytest.fixture(autouse=True)
def _no_k8s_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env of the working tree
    for name in (
        "CVOPS_K8S_IMAGE",
        "CVOPS_K8S_NAMESPACE",
        "CVOPS_K8S_ENV_FROM_SECRETS",
        "CVOPS_K8S_ENV_FROM_CONFIG_MAPS",
    ):
        monkeypatch.delenv(name, raising=False)


def test_names_as_a_comma_list_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVOPS_K8S_ENV_FROM_SECRETS", "cvops-db, cvops-s3")
    monkeypatch.setenv("CVOPS_K8S_ENV_FROM_CONFIG_MAPS", '["cvops-config", "extra"]')
    settings = cluster.load_settings()
    assert cluster.env_from(settings) == [
        {"configMapRef": {"name": "cvops-config"}},
        {"configMapRef": {"name": "extra"}},
        {"secretRef": {"name": "cvops-db"}},
        {"secretRef": {"name": "cvops-s3"}},
    ]


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("CVOPS_K8S_ENV_FROM_SECRETS", "cvops_db", "CVOPS_K8S_ENV_FROM_SECRETS"),
        ("CVOPS_K8S_NAMESPACE", "ML", "CVOPS_K8S_NAMESPACE"),
        ("CVOPS_K8S_IMAGE", "cvops 1.0", "CVOPS_K8S_IMAGE"),
    ],
)
def test_bad_settings_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(cluster.ClusterSettingsError, match=message):
        cluster.load_settings()


def test_job_template_sets_defaults_and_refuses_unknown_variables(tmp_path: Path) -> None:
    template = cluster.job_template(
        TEMPLATE, image="r/cvops:1", namespace="ml", defaults={"gpu_limit": "1"}
    )
    properties = template["variables"]["properties"]
    assert properties["image"]["default"] == "r/cvops:1"
    assert properties["namespace"]["default"] == "ml"
    assert properties["gpu_limit"]["default"] == "1"
    assert (
        json.loads(TEMPLATE.read_text())["variables"]["properties"]["gpu_limit"]["default"] is None
    )
    with pytest.raises(cluster.ClusterSettingsError, match="gpus"):
        cluster.job_template(TEMPLATE, defaults={"gpus": 1})


def test_job_variables_image_from_settings_else_the_pool() -> None:
    pool = cluster.job_template(TEMPLATE, image="r/cvops:1")
    settings = cluster.load_settings()
    assert cluster.job_variables(settings, pool) == {
        "image": "r/cvops:1",
        "env_from": cluster.env_from(settings),
    }
    explicit = cluster.KubernetesJobSettings(image="r/cvops:2", namespace="ml")
    variables = cluster.job_variables(explicit, pool)
    assert (variables["image"], variables["namespace"]) == ("r/cvops:2", "ml")


def test_a_pool_without_env_from_or_image_is_a_clear_error() -> None:
    from prefect_kubernetes.worker import KubernetesWorker

    stock = KubernetesWorker.get_default_base_job_template()
    settings = cluster.load_settings()
    with pytest.raises(cluster.ClusterSettingsError, match="no `env_from` variable"):
        cluster.job_variables(settings, stock)
    no_image = json.loads(TEMPLATE.read_text())
    no_image["variables"]["properties"]["image"]["default"] = None
    with pytest.raises(cluster.ClusterSettingsError, match="set CVOPS_K8S_IMAGE"):
        cluster.job_variables(settings, no_image)


def test_ensure_pool_command_reports_bad_settings(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CVOPS_K8S_NAMESPACE", "Not_A_Namespace")
    code = cluster.main(["ensure-pool", "--pool", "p", "--template", str(TEMPLATE)])
    assert code == 1
    assert "CVOPS_K8S_NAMESPACE" in caplog.text
