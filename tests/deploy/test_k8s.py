"""deploy/k8s: every overlay rendered by `kubectl kustomize`, every object validated offline
against the Kubernetes 1.30 and newest bundled schemas (kubernetes-validate, strict: an unknown
field is an error), and checked against the code it runs: probes on the service's real
routes, ports and images as the settings say, credentials only from Secrets, and the Prefect
work pool's job template rendered by Prefect's own code into a valid Job.

No cluster is needed; without `kubectl` (Kustomize) these tests are skipped.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import shutil
import subprocess
import uuid
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from cvops import cluster
from cvops.config import MonitorConfig
from cvops.service.settings import ServiceSettings
from cvops.stack.settings import StackSettings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBECTL = shutil.which("kubectl")
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())

pytestmark = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with Kustomize) is not installed: cannot render deploy/k8s"
)

# Pods that run the cvops image (docker/python/Dockerfile, target runtime); the web UI is nginx
# (docker/nginx/Dockerfile), the dev overlay adds third-party Postgres and MinIO.
CVOPS_WORKLOADS = {"cvops-service", "mlflow", "prefect-server", "prefect-worker", "evidently-ui"}
# Secrets the operator creates (never rendered outside the dev overlay) and what they hold.
SECRETS = {
    "cvops-db": {"CVOPS_SERVICE_DB_URL"},
    "cvops-mlflow-db": {"MLFLOW_BACKEND_STORE_URI"},
    "cvops-prefect-db": {"PREFECT_SERVER_DATABASE_CONNECTION_URL"},
    "cvops-s3": {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"},
    "cvops-admin": {"CVOPS_SERVICE_ADMIN_TOKEN"},
}
CREDENTIALS = set().union(*SECRETS.values()) | {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"}
CREDENTIAL_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|AUTH_STRING|API_KEY")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
# prefect-kubernetes refuses a job manifest without these two in the *pod* spec (its
# _get_base_job_manifest); Kubernetes drops the unknown fields there, strict validation does not.
PREFECT_POD_SPEC_EXTRAS = {"parallelism": 1, "completions": 1}


@cache
def render(target: str) -> tuple[dict[str, Any], ...]:
    path = K8S / target if target == "base" else K8S / "overlays" / target
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(objects: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def workloads(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    """Pod templates by workload name (Deployments, StatefulSets, Jobs)."""
    kinds = {"Deployment", "StatefulSet", "Job"}
    return {o["metadata"]["name"]: o["spec"]["template"] for o in objects if o["kind"] in kinds}


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def config(objects: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return find(objects, "ConfigMap", "cvops-config")["data"]


def assert_valid(obj: dict[str, Any], version: str) -> None:
    name = f"{obj['kind']}/{obj['metadata'].get('name') or obj['metadata'].get('generateName')}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        where = ".".join(str(p) for p in err.path)
        pytest.fail(f"{name} is not a valid {version} object: {where}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError:
        pytest.fail(f"{name}: no {version} schema for {obj['apiVersion']} {obj['kind']}")


@pytest.fixture(scope="module")
def service_routes() -> dict[str, set[str]]:
    """The model service's routes (path -> methods) from the FastAPI app itself."""
    from cvops.service.app import create_app

    paths = create_app(ServiceSettings()).openapi()["paths"]
    return {path: {m.upper() for m in ops} for path, ops in paths.items()}


def test_overlays_are_the_documented_ones() -> None:
    assert set(OVERLAYS) == {"production", "gpu", "dev"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("target", ["base", *OVERLAYS])
def test_every_object_is_valid(target: str, version: str) -> None:
    objects = render(target)
    assert objects
    for obj in objects:
        assert_valid(obj, version)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_hit_real_routes(overlay: str, service_routes: dict[str, set[str]]) -> None:
    pod = workloads(render(overlay))["cvops-service"]
    (service,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in service["ports"]}
    assert service["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert service["livenessProbe"]["httpGet"]["path"] == "/health_check"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = service[probe]["httpGet"]
        assert "GET" in service_routes.get(get["path"], set()), f"{probe}: no GET {get['path']}"
        assert ports[get["port"]] == StackSettings().service_port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == StackSettings().service_port
    assert "GET" in service_routes[annotations["prometheus.io/path"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graceful_drain(overlay: str) -> None:
    """Endpoints drop the pod during preStop, then gunicorn finishes requests in flight
    within its graceful_timeout: the grace period must cover both."""
    from cvops.service import server

    graceful = int(re.search(r'"graceful_timeout": (\d+)', inspect.getsource(server.serve))[1])
    spec = workloads(render(overlay))["cvops-service"]["spec"]
    (service,) = spec["containers"]
    command = service["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + graceful


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscaling_and_disruption_budget(overlay: str) -> None:
    objects = render(overlay)
    deployment = find(objects, "Deployment", "cvops-service")
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    hpa = find(objects, "HorizontalPodAutoscaler", "cvops-service")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "cvops-service",
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = find(objects, "PodDisruptionBudget", "cvops-service")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(objects, "Service", "cvops-service")
    assert service["spec"]["selector"].items() <= labels.items()
    # CPU utilisation needs requests; the worker count fits the CPU limit
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    threads = {e["name"]: e.get("value") for e in container["env"]}["CVOPS_SERVICE_TF_THREADS"]
    workers = int(args[args.index("--workers") + 1])
    assert workers * int(threads) <= int(container["resources"]["limits"]["cpu"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_a_memory_limit(overlay: str) -> None:
    for name, pod in workloads(render(overlay)).items():
        for container in containers(pod):
            resources = container.get("resources", {})
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), name
            assert "memory" in resources.get("limits", {}), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_and_addresses_agree_with_the_settings(overlay: str) -> None:
    """The ports of `cvops up` (StackSettings) and compose, in the containers, the commands,
    the Services and the URLs of cvops-config."""
    objects = render(overlay)
    stack = StackSettings()
    expected = {
        "cvops-service": stack.service_port,
        "mlflow": stack.mlflow_port,
        "prefect-server": stack.prefect_port,
        "evidently-ui": stack.evidently_ui_port,
        "webui": stack.webui_port,
    }
    pods = workloads(objects)
    for name, port in expected.items():
        container = pods[name]["spec"]["containers"][0]
        assert [p["containerPort"] for p in container["ports"]] == [port], name
        args = container.get("args", [])
        if "--port" in args:
            assert args[args.index("--port") + 1] == str(port), name
        service = find(objects, "Service", name)
        assert [p["port"] for p in service["spec"]["ports"]] == [port], name
    services = {
        o["metadata"]["name"]: {p["port"] for p in o["spec"]["ports"]}
        for o in objects
        if o["kind"] == "Service"
    }
    data = config(objects)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "CVOPS_SERVICE_URL"):
        url = urlsplit(data[key])
        assert url.port in services.get(url.hostname, set()), f"{key}={data[key]}"
    webui_env = {e["name"]: e for e in pods["webui"]["spec"]["containers"][0]["env"]}
    host, port = webui_env["SERVICE_UPSTREAM"]["value"].split(":")
    assert int(port) in services[host]
    assert webui_env["CVOPS_SERVICE_MAX_BODY_BYTES"]["valueFrom"]["configMapKeyRef"]["name"] == (
        "cvops-config"
    )
    assert int(data["CVOPS_SERVICE_MAX_BODY_BYTES"]) == ServiceSettings().max_body_bytes
    assert data["CVOPS_MONITOR_POOL"] == MonitorConfig().pool_name == stack.monitor_pool_name
    workspace = cluster.KubernetesJobSettings().evidently_workspace
    assert data["CVOPS_EVIDENTLY_WORKSPACE"] == workspace
    evidently = pods["evidently-ui"]["spec"]["containers"][0]["args"]
    assert evidently[evidently.index("--workspace") + 1] == workspace


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_cvops_image(overlay: str) -> None:
    """Every cvops pod runs the same tagged image, and the Jobs' default image is that one."""
    objects = render(overlay)
    pods = workloads(objects)
    images = {c["image"] for name in CVOPS_WORKLOADS for c in containers(pods[name])}
    assert len(images) == 1, images
    (image,) = images
    assert config(objects)["CVOPS_K8S_IMAGE"] == image
    (nginx,) = pods["webui"]["spec"]["containers"]
    assert nginx["image"].split("/")[-1].startswith("cvops-nginx:")
    for pod in pods.values():
        for container in containers(pod):
            tag = container["image"].rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{container['image']}: pin a tag"
    dockerfile = (REPO / "docker" / "python" / "Dockerfile").read_text()
    assert re.search(r"^FROM \S+ AS runtime$", dockerfile, re.M)


def _env_sources(container: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return {e["name"]: e for e in container.get("env", [])}, container.get("envFrom", [])


def _plain_values_hold_no_credentials(where: str, env: list[dict[str, Any]]) -> None:
    for entry in env:
        if "value" in entry:
            name, value = entry["name"], str(entry["value"])
            assert name not in CREDENTIALS, f"{where}: {name} as a plain value"
            assert not CREDENTIAL_NAME.search(name), f"{where}: {name} as a plain value"
            assert not URL_WITH_PASSWORD.search(value), f"{where}: {name} holds a password"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_credentials_only_from_secrets(overlay: str) -> None:
    objects = render(overlay)
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    config_maps = [o for o in objects if o["kind"] == "ConfigMap"]
    for config_map in config_maps:
        for key, value in config_map.get("data", {}).items():
            where = f"ConfigMap/{config_map['metadata']['name']}"
            assert key not in CREDENTIALS and not CREDENTIAL_NAME.search(key), f"{where}: {key}"
            assert not URL_WITH_PASSWORD.search(value), f"{where}: {key} holds a password"
    for name, pod in workloads(objects).items():
        for container in containers(pod):
            where = f"{name}/{container['name']}"
            _plain_values_hold_no_credentials(where, container.get("env", []))
            for arg in container.get("command", []) + container.get("args", []):
                assert not URL_WITH_PASSWORD.search(arg), f"{where}: a password in its command"
            env, env_from = _env_sources(container)
            refs = [e["valueFrom"].get("secretKeyRef") for e in env.values() if "valueFrom" in e]
            names = [r["name"] for r in refs if r] + [
                s["secretRef"]["name"] for s in env_from if "secretRef" in s
            ]
            for secret in names:
                if overlay == "dev":
                    assert secret in secrets, f"{where}: Secret {secret} is not rendered"
                else:
                    assert secret in SECRETS, f"{where}: undocumented Secret {secret}"
    if overlay != "dev":  # production credentials never live in the repository
        assert not secrets, sorted(secrets)
    # the model service gets its database URL and admin token from Secrets, not plain env
    service = workloads(objects)["cvops-service"]["spec"]["containers"][0]
    env, env_from = _env_sources(service)
    from_secrets = {s["secretRef"]["name"] for s in env_from if "secretRef" in s}
    assert {"cvops-db", "cvops-s3", "cvops-admin"} <= from_secrets
    assert not CREDENTIALS & env.keys()


def test_dev_secrets_hold_what_the_pods_read() -> None:
    """The dev overlay's Secrets carry the variables the pods take from them, and its
    database URLs name the databases the in-cluster Postgres creates."""
    import base64

    from sqlalchemy.engine import make_url

    objects = render("dev")
    secrets = {
        o["metadata"]["name"]: {
            k: base64.b64decode(v).decode() for k, v in o.get("data", {}).items()
        }
        for o in objects
        if o["kind"] == "Secret"
    }
    for name, keys in SECRETS.items():
        assert keys <= secrets[name].keys(), name
    stack = StackSettings()
    databases = {
        "CVOPS_SERVICE_DB_URL": stack.postgres_service_db,
        "MLFLOW_BACKEND_STORE_URI": stack.postgres_mlflow_db,
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": stack.postgres_prefect_db,
    }
    postgres = workloads(objects)["postgres"]["spec"]["containers"][0]
    pg_env = {e["name"]: e.get("value") for e in postgres["env"]}
    created = {pg_env["POSTGRES_MLFLOW_DB"], pg_env["POSTGRES_PREFECT_DB"]}
    created.add(pg_env["POSTGRES_SERVICE_DB"])
    admin = secrets["postgres-admin"]
    for key, database in databases.items():
        secret = next(s for s in secrets.values() if key in s)
        url = make_url(secret[key])
        assert url.database == database and database in created
        assert (url.host, url.port) == ("postgres", stack.postgres_port)
        assert (url.username, url.password) == (admin["POSTGRES_USER"], admin["POSTGRES_PASSWORD"])
    (init_volume,) = [
        v for v in workloads(objects)["postgres"]["spec"]["volumes"] if "configMap" in v
    ]
    init = find(objects, "ConfigMap", init_volume["configMap"]["name"])["data"]["init-databases.sh"]
    assert init == (REPO / "docker" / "postgres" / "init-databases.sh").read_text()
    s3 = secrets["cvops-s3"]
    minio = secrets["s3-admin"]
    assert (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]) == (
        minio["MINIO_ROOT_USER"],
        minio["MINIO_ROOT_PASSWORD"],
    )
    endpoint = urlsplit(s3["AWS_ENDPOINT_URL"])
    assert endpoint.port in {p["port"] for p in find(objects, "Service", "s3")["spec"]["ports"]}
    data = config(objects)
    buckets = {
        urlsplit(data[k]).netloc for k in ("CENTRAL_STORAGE_PATH", "MLFLOW_ARTIFACTS_DESTINATION")
    }
    bucket_job = workloads(objects)["s3-bucket"]["spec"]["containers"][0]["args"][0]
    assert buckets == set(re.findall(r"mc mb --ignore-existing local/(\S+)", bucket_job))


# --- the Prefect work pool's base job template -------------------------------------------


def pool_template(objects: tuple[dict[str, Any], ...], tmp_path: Path) -> dict[str, Any]:
    """The template as the worker's init container gives it to the pool: the ConfigMap's
    files through `cvops.cluster.job_template`, with the image of cvops-config and the
    worker's namespace."""
    worker = find(objects, "Deployment", "prefect-worker")
    pod = worker["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    args = init["args"]
    assert args[:4] == ["python", "-m", "cvops.cluster", "ensure-pool"]
    assert args[args.index("--pool") + 1] == "$(CVOPS_MONITOR_POOL)"
    env, env_from = _env_sources(init)
    assert {"configMapRef": {"name": "cvops-config"}} in env_from  # CVOPS_K8S_IMAGE
    assert env["CVOPS_K8S_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    (mount,) = [m for m in init["volumeMounts"] if m["name"] == "job-template"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "job-template"]
    files = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    prefix = mount["mountPath"].rstrip("/") + "/"
    template_file = args[args.index("--template") + 1].removeprefix(prefix)
    defaults_file = args[args.index("--defaults") + 1].removeprefix(prefix)
    return cluster.job_template(
        tmp_path / template_file,
        image=config(objects)["CVOPS_K8S_IMAGE"],
        namespace=worker["metadata"]["namespace"],
        defaults=json.loads(files[defaults_file]),
    )


def worker_job(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest the kubernetes worker would submit for a flow run with these job
    variables: prefect-kubernetes' own configuration class, from template to manifest."""
    from prefect.client.orchestration import PrefectClient
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import PlaceholderType, find_placeholders
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    kinds = {p.type for p in find_placeholders(template["job_configuration"])}
    assert kinds == {PlaceholderType.STANDARD}  # no block or Variable look-ups: no API call
    unused = PrefectClient(api="http://127.0.0.1:9/api")
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=unused)
    )
    flow_run = FlowRun(id=uuid.uuid4(), name="brave-otter", flow_id=uuid.uuid4())
    configuration.prepare_for_flow_run(flow_run)
    return configuration.job_manifest


def kubernetes_job(manifest: dict[str, Any]) -> dict[str, Any]:
    """The Job as Kubernetes keeps it: without prefect-kubernetes' pod-spec extras."""
    pod = manifest["spec"]["template"]["spec"]
    extras = {k: pod.pop(k) for k in PREFECT_POD_SPEC_EXTRAS if k in pod}
    assert extras == PREFECT_POD_SPEC_EXTRAS
    return manifest


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_template_defaults_render_to_a_valid_job(overlay: str, tmp_path: Path) -> None:
    """Prefect's templating with the variables' defaults gives a valid Job."""
    from prefect.utilities.templating import apply_values

    objects = render(overlay)
    template = pool_template(objects, tmp_path)
    properties = template["variables"]["properties"]
    defaults = {k: v["default"] for k, v in properties.items() if v.get("default") is not None}
    job = kubernetes_job(apply_values(template["job_configuration"], defaults)["job_manifest"])
    for version in VERSIONS:
        assert_valid(job, version)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["image"] == config(objects)["CVOPS_K8S_IMAGE"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_monitor_job_is_valid_and_reads_settings_from_secrets(overlay: str, tmp_path: Path) -> None:
    """The deploy step's job variables through the worker's own code: a valid Job on the
    cvops image, in the overlay's namespace, with settings from cvops-config and the Secrets,
    the Evidently volume mounted where the Evidently UI reads, and a GPU only in `gpu`."""
    objects = render(overlay)
    template = pool_template(objects, tmp_path)
    settings = cluster.KubernetesJobSettings()
    job = kubernetes_job(worker_job(template, cluster.job_variables(settings, template)))
    for version in VERSIONS:
        assert_valid(job, version)
    namespace = find(objects, "Deployment", "prefect-worker")["metadata"]["namespace"]
    assert job["metadata"]["namespace"] == namespace
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == config(objects)["CVOPS_K8S_IMAGE"]
    assert container["args"][:2] == ["prefect", "flow-run"]
    rendered = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for source in container["envFrom"]:
        if "configMapRef" in source:
            assert ("ConfigMap", source["configMapRef"]["name"]) in rendered
        else:
            name = source["secretRef"]["name"]
            assert name in SECRETS
            assert overlay != "dev" or ("Secret", name) in rendered
    assert {s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s} >= {
        "cvops-db",
        "cvops-s3",
    }
    _plain_values_hold_no_credentials("monitor Job", container["env"])
    assert ("ServiceAccount", pod["serviceAccountName"]) in rendered
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["evidently"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in rendered
    assert mounts["evidently"] == settings.evidently_workspace
    assert mounts["state"] == config(objects)["CVOPS_STATE_DIR"]
    limits = container["resources"]["limits"]
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys()
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == "1"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
            pod["tolerations"]
        )
    else:
        assert "nvidia.com/gpu" not in limits


def test_job_template_extends_prefect_kubernetes_defaults() -> None:
    """Every variable of prefect-kubernetes' own template is still there (the worker's UI and
    users' job variables keep working), and the job configuration has the same keys."""
    from prefect_kubernetes.worker import KubernetesWorker

    stock = KubernetesWorker.get_default_base_job_template()
    ours = json.loads((K8S / "base" / "base-job-template.json").read_text())
    assert stock["variables"]["properties"].keys() <= ours["variables"]["properties"].keys()
    assert stock["job_configuration"].keys() == ours["job_configuration"].keys()
