"""Static checks of docker/: compose file, Dockerfiles, Prometheus and Grafana provisioning.

Docker is not available where the tests run, so these read the files and check them against
the single sources of truth instead: `.env.example`, the pydantic settings the code reads, the
metrics the service registers, the nginx template it renders. Each check guards a way the stack
breaks only at `docker compose up` time (or silently: an empty Grafana panel, a dead scrape).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings
from sqlalchemy.engine import make_url

from cvops.labelling.settings import LabelStudioSettings
from cvops.service import nginx as service_nginx
from cvops.service.settings import ServiceSettings
from cvops.settings import Settings
from cvops.stack.settings import PORT_VARIABLES, StackSettings


def words(text: str) -> frozenset[str]:
    """A set from a whitespace-separated list (long name lists stay readable)."""
    return frozenset(text.split())


REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE_FILE = DOCKER / "docker-compose.yml"
PYTHON_DOCKERFILE = DOCKER / "python" / "Dockerfile"
NGINX_DOCKERFILE = DOCKER / "nginx" / "Dockerfile"
INIT_SCRIPT = DOCKER / "postgres" / "init-databases.sh"
LOCK_FOR_ARCH = DOCKER / "python" / "lock-for-arch.sh"
PROMETHEUS_FILE = DOCKER / "prometheus.yml"
GRAFANA = DOCKER / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

EXPECTED_SERVICES = {
    "postgres",
    "pgadmin",
    "mlflow",
    "prefect-server",
    "prefect-worker",
    "service",
    "nginx",
    "webui",
    "jupyter",
    "evidently-ui",
    "prometheus",
    "node-exporter",
    "cadvisor",
    "grafana",
    "label-studio",
}
# The .env variable of each published port. Keys of StackSettings.ports() are the compose
# service names; the rest exist only in docker (no Debian package for them).
PORT_VARS = dict(PORT_VARIABLES)
DOCKER_ONLY_PORT_VARS = {
    "grafana": "GRAFANA_PORT",
    "pgadmin": "PGADMIN_PORT",
    "cadvisor": "CADVISOR_PORT",
}
# .env.example entries that only docker reads (StackSettings has the rest).
DOCKER_ONLY_ENV = {*DOCKER_ONLY_PORT_VARS.values(), "GRAFANA_ADMIN_PASSWORD"}
DOCKER_ONLY_ENV |= {"PGADMIN_EMAIL", "PGADMIN_PASSWORD"}
BIND_HOST = "${CVOPS_BIND_HOST:-127.0.0.1}"
HEALTHCHECKED = {"postgres", "service", "mlflow", "prefect-server"}
# Service keys of the Compose Specification (compose-spec.json): a misspelt key is an error at
# `up` time that reading the file with .get() would never notice.
SPEC_SERVICE_KEYS = words(
    """annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs
    container_name cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime
    cpu_shares cpus cpuset credential_spec depends_on deploy develop device_cgroup_rules devices
    dns dns_opt dns_search domainname entrypoint env_file environment expose extends
    external_links extra_hosts gpus group_add healthcheck hostname image init ipc isolation
    label_file labels links logging mac_address mem_limit mem_reservation mem_swappiness
    memswap_limit models network_mode networks oom_kill_disable oom_score_adj pid pids_limit
    platform ports post_start pre_stop privileged profiles provider pull_policy
    pull_refresh_after read_only restart runtime scale secrets security_opt shm_size stdin_open
    stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits use_api_socket user
    userns_mode uts volumes volumes_from working_dir"""
)
SPEC_BUILD_KEYS = {"context", "dockerfile", "target", "args", "labels", "tags", "cache_from"}
SPEC_HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "start_interval"}
SPEC_PORT_KEYS = {"name", "mode", "host_ip", "target", "published", "protocol", "app_protocol"}
DEPENDS_ON_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
# Official images with multi-arch manifests (amd64 + arm64); a new image must be checked first.
MULTI_ARCH_IMAGES = {
    "postgres",
    "dpage/pgadmin4",
    "prom/prometheus",
    "prom/node-exporter",
    "gcr.io/cadvisor/cadvisor",
    "grafana/grafana",
    "heartexlabs/label-studio",
}
MULTI_ARCH_BASES = {"python", "nginx"}
# Host paths the exporters read (read-only); any other bind mount must be inside the repo.
HOST_MOUNTS = {"/proc", "/sys", "/", "/var/run", "/var/lib/docker/"}
# Third-party settings given to the cvops containers; test_third_party_env_names_exist checks
# that the installed Prefect and MLflow really read them.
PREFECT_ENV = {
    "PREFECT_API_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_ANALYTICS_ENABLED",
    "PREFECT_UI_API_URL",
}
MLFLOW_ENV = {"MLFLOW_TRACKING_URI", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"}
# URLs that must name a compose service (not a host address) for containers to reach it.
SERVICE_URL_ENV = {
    "MLFLOW_TRACKING_URI",
    "PREFECT_API_URL",
    "CVOPS_SERVICE_URL",
    "SERVICE_UPSTREAM",
    "CVOPS_LABEL_STUDIO_URL",
}
# Metrics not from cvops: node exporter, cAdvisor and Prometheus' own scrape status.
EXTERNAL_METRICS = {
    "up",
    "node_cpu_seconds_total",
    "node_memory_MemAvailable_bytes",
    "node_memory_MemTotal_bytes",
    "container_cpu_usage_seconds_total",
    "container_memory_working_set_bytes",
}
# The panels the issue asks for: a title keyword and a metric its queries must use.
REQUIRED_PANELS = {
    "request rate": {"cvops_requests_total"},
    "latency": {"cvops_request_seconds_bucket"},
    "predictions per class": {"cvops_predictions_total"},
    "drift score": {"cvops_drift_score", "cvops_drift_threshold"},
    "host cpu": {"node_cpu_seconds_total"},
    "host memory": {"node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes"},
}

VAR_RE = re.compile(
    r"\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)|(?P<escaped>\$))"
)


# ---------------------------------------------------------------- loading and interpolation


@cache
def env_example() -> dict[str, str]:
    values = {}
    for line in (REPO / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def filled_env() -> dict[str, str]:
    """`.env.example` with its empty secrets filled, as a user's `.env` must be."""
    return {key: value or f"test-{key.lower()}" for key, value in env_example().items()}


def references(text: str) -> list[tuple[str, str, str]]:
    """(name, operator, argument) of every compose interpolation; `$$` is a literal `$`."""
    found = []
    for match in VAR_RE.finditer(text):
        if match["escaped"] is None:
            found.append((match["braced"] or match["named"], match["op"] or "", match["arg"] or ""))
    return found


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution, for the forms the compose file may use."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"] is not None:
            return "$"
        name, op, arg = match["braced"] or match["named"], match["op"] or "", match["arg"] or ""
        current = env.get(name)
        present = current is not None and (current != "" or not op.startswith(":"))
        if op.endswith("-"):
            return current if present else arg
        if op.endswith("?"):
            if not present:
                raise KeyError(f"{name}: {arg}")
            return current
        if op.endswith("+"):
            return arg if present else ""
        return current or ""

    return VAR_RE.sub(substitute, value)


@cache
def compose_text() -> str:
    return COMPOSE_FILE.read_text()


@cache
def raw_compose() -> dict[str, Any]:
    return yaml.safe_load(compose_text())


def compose() -> dict[str, Any]:
    """The compose model as `docker compose config` would show it with .env.example values."""
    return interpolate(raw_compose(), filled_env())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: str(value) for key, value in env.items()}


def built_from(dockerfile: Path) -> dict[str, dict[str, Any]]:
    """Services whose image is built from `dockerfile`."""
    found = {}
    for name, service in services().items():
        build = service.get("build")
        if build and (DOCKER / build["context"] / build["dockerfile"]).resolve() == dockerfile:
            found[name] = service
    return found


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports the container listens on (published targets and `expose`)."""
    ports = {int(port["target"]) for port in service.get("ports", [])}
    return ports | {int(port) for port in service.get("expose", [])}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else command


def volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(source, target, mode) of each short-syntax volume."""
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        yield source, target, mode[0] if mode else "rw"


def env_names(settings: type[BaseSettings]) -> set[str]:
    """Environment variable names a pydantic-settings class reads (aliases or prefix + field)."""
    prefix = settings.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names |= {choice.upper() for choice in alias.choices if isinstance(choice, str)}
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def env_name_of(field: str) -> str:
    alias = StackSettings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return field.upper()


@cache
def names_read_by_code() -> frozenset[str]:
    """Every variable a cvops container reads: the settings classes of the package, its literal
    environ reads, its runtime defaults and the docker scripts' variables (not StackSettings:
    only `cvops up` on the host reads those)."""
    from cvops import runtime

    names = env_names(Settings) | env_names(ServiceSettings) | env_names(LabelStudioSettings)
    names |= set(runtime.DEFAULT_ENV)
    literal = re.compile(r"""(?:environ\.get\(|environ\[|getenv\()\s*["']([A-Z][A-Z0-9_]*)["']""")
    for path in (REPO / "src" / "cvops").rglob("*.py"):
        names |= set(literal.findall(path.read_text()))
    for script in (DOCKER / "python").glob("*.sh"):
        names |= {name for name, _, _ in references(script.read_text())}
    return frozenset(names)


def dockerfile_stages(path: Path) -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.M | re.I))


def dockerfile_lines(path: Path) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [
        line.strip()
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


# ---------------------------------------------------------------- compose: structure


def test_compose_parses_with_the_expected_services() -> None:
    assert set(raw_compose()["services"]) == EXPECTED_SERVICES
    assert raw_compose().get("name") == "cvops"
    assert set(PORT_VARS) == set(StackSettings.model_construct().ports()), (
        "compose names = StackSettings.ports()"
    )


def test_services_use_only_compose_spec_keys_and_string_values() -> None:
    for name, service in raw_compose()["services"].items():
        assert set(service) <= SPEC_SERVICE_KEYS, f"{name}: {set(service) - SPEC_SERVICE_KEYS}"
        assert set(service.get("build") or {}) <= SPEC_BUILD_KEYS, name
        assert set(service.get("healthcheck") or {}) <= SPEC_HEALTHCHECK_KEYS, name
        for port in service.get("ports", []):
            assert set(port) <= SPEC_PORT_KEYS, name
        depends = service.get("depends_on") or {}
        if isinstance(depends, dict):
            for spec in depends.values():
                assert spec["condition"] in DEPENDS_ON_CONDITIONS, name
        # compose rejects booleans in `environment` and non-strings in an exec-form command
        for key, value in (service.get("environment") or {}).items():
            assert isinstance(value, str), f"{name}: {key}: quote {value!r}"
        if isinstance(service.get("command"), list):
            assert all(isinstance(part, str) for part in service["command"]), name


def test_every_service_has_a_pinned_image_or_an_existing_build() -> None:
    for name, service in services().items():
        build = service.get("build")
        if build:
            context = DOCKER / build["context"]
            dockerfile = context / build["dockerfile"]
            assert context.is_dir() and dockerfile.is_file(), name
            if "target" in build:
                assert build["target"] in dockerfile_stages(dockerfile), (name, build["target"])
            assert service.get("image", "").endswith(":local"), f"{name}: name the built image"
        else:
            image, _, tag = service["image"].rpartition(":")
            assert image and tag and tag != "latest", (
                f"{name}: pin a version, not {service['image']}"
            )


def test_dockerfile_copies_exist_and_pass_the_dockerignore() -> None:
    """Every COPY source is in the repo and not filtered out by <Dockerfile>.dockerignore
    (a context of the whole repository would send .venv and the data sets otherwise)."""
    for dockerfile in (PYTHON_DOCKERFILE, NGINX_DOCKERFILE):
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        assert "*" in ignore, f"{dockerfile.name}.dockerignore must start from nothing"
        allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
        copies = [line for line in dockerfile_lines(dockerfile) if line.upper().startswith("COPY")]
        assert copies, dockerfile
        for line in copies:
            sources = [part for part in line.split()[1:-1] if not part.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}: not in the repo"
                assert any(source == a or source.startswith(f"{a}/") for a in allowed), (
                    f"{dockerfile}: COPY {source} is excluded by the .dockerignore"
                )


def test_no_platform_pins_and_only_multi_arch_images() -> None:
    arch = re.compile(r"amd64|x86_64|aarch64|arm64|armv7", re.I)
    for name, service in raw_compose()["services"].items():
        assert "platform" not in service, f"{name}: a platform pin breaks the other architecture"
        assert "platform" not in (service.get("build") or {}), name
        if "build" not in service:
            image = service["image"].rpartition(":")[0]
            assert image in MULTI_ARCH_IMAGES, f"{name}: {image} is not a known multi-arch image"
            assert not arch.search(service["image"]), f"{name}: arch-specific image"
    for dockerfile in (PYTHON_DOCKERFILE, NGINX_DOCKERFILE):
        for line in dockerfile_lines(dockerfile):
            assert not arch.search(line), f"{dockerfile}: architecture-specific: {line}"
            if line.upper().startswith("FROM"):
                assert "--platform" not in line, line
        bases = re.findall(r"^(?:ARG PYTHON_IMAGE=|FROM )([\w./-]+):", dockerfile.read_text(), re.M)
        assert bases and set(bases) <= MULTI_ARCH_BASES, (dockerfile, bases)


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs a POSIX shell")
def test_lock_is_adapted_to_the_build_architecture() -> None:
    """tensorflow-cpu has no aarch64 wheel; arm64 installs `tensorflow` at the same pin."""
    lock = (REPO / "requirements.lock").read_text()
    pin = re.search(r"^tensorflow-cpu==(\S+)$", lock, re.M)
    assert pin, "requirements.lock no longer pins tensorflow-cpu: revisit lock-for-arch.sh"

    def adapt(arch: str) -> subprocess.CompletedProcess[str]:
        command = ["sh", str(LOCK_FOR_ARCH), str(REPO / "requirements.lock"), arch]
        return subprocess.run(command, capture_output=True, text=True, check=False)

    assert adapt("amd64").stdout == lock
    arm = adapt("arm64").stdout
    assert "tensorflow-cpu==" not in arm and f"\ntensorflow=={pin[1]}\n" in arm
    assert arm.replace(f"\ntensorflow=={pin[1]}\n", f"\ntensorflow-cpu=={pin[1]}\n") == lock
    assert adapt("s390x").returncode != 0
    # The Dockerfile installs the adapted lock, for the architecture it is building.
    text = PYTHON_DOCKERFILE.read_text()
    adapted = re.search(r"lock-for-arch\.sh \S*requirements\.lock > (\S+)", text)
    assert adapted and f"-r {adapted[1]}" in text


# ---------------------------------------------------------------- compose: .env agreement


def test_every_compose_variable_is_in_env_example() -> None:
    missing = {name for name, _, _ in references(compose_text())} - set(env_example())
    assert not missing, f"used in docker-compose.yml but not in .env.example: {sorted(missing)}"


def test_every_env_example_variable_is_used_by_compose() -> None:
    unused = set(env_example()) - {name for name, _, _ in references(compose_text())}
    assert not unused, f"in .env.example but not used by docker-compose.yml: {sorted(unused)}"


def test_compose_defaults_match_env_example_and_secrets_are_required() -> None:
    env = env_example()
    for name, op, arg in references(compose_text()):
        if env[name] == "":  # a secret: compose must stop with a message, not run with ""
            assert op == ":?" and arg, f"${{{name}}}: use ${{{name}:?set {name} in .env}}"
        else:
            assert op == ":-", f"${{{name}}}: give the .env.example default, ${{{name}:-...}}"
            assert arg == env[name], f"${{{name}:-{arg}}} but .env.example has {env[name]!r}"


def test_env_example_agrees_with_stack_settings() -> None:
    env = env_example()
    stack_names = set()
    for field, info in StackSettings.model_fields.items():
        name = env_name_of(field)
        stack_names.add(name)
        assert name in env, f".env.example lacks {name} (StackSettings.{field})"
        default = info.default
        expected = "" if default is None else str(default)
        assert env[name] == expected, f"{name}: .env.example {env[name]!r}, code {expected!r}"
    assert set(env) - stack_names == DOCKER_ONLY_ENV


def test_published_ports_follow_env_and_bind_to_cvops_bind_host() -> None:
    env = env_example()
    port_vars = PORT_VARS | DOCKER_ONLY_PORT_VARS
    for name, service in raw_compose()["services"].items():
        ports = service.get("ports", [])
        if name not in port_vars:
            assert not ports, f"{name}: publishes a port with no .env variable"
            continue
        var = port_vars[name]
        assert len(ports) == 1 and isinstance(ports[0], dict), f"{name}: one long-syntax port"
        port = ports[0]
        assert port["host_ip"] == BIND_HOST, f"{name}: bind to {BIND_HOST}"
        assert port["published"] == f"${{{var}:-{env[var]}}}", name
        if name in PORT_VARS:
            # Inside the network the server listens on the default port of its setting.
            assert int(port["target"]) == StackSettings.model_fields[var.lower()].default, name
    published = [
        int(port["published"])
        for service in services().values()
        for port in service.get("ports", [])
    ]
    assert len(published) == len(set(published)), "two services publish the same host port"


def test_servers_listen_on_their_container_port_on_all_interfaces() -> None:
    listen = re.compile(r"--(?:port[= ]|web\.listen-address=\S*:|ServerApp\.port=)(\d+)")
    jupyter_script = (DOCKER / "python" / "start-jupyter.sh").read_text()
    for name, service in services().items():
        text = command_text(service)
        if name == "jupyter":
            text = jupyter_script
        ports = {int(port) for port in listen.findall(text)}
        for listen_port in ("NGINX_PORT", "WEBUI_PORT"):  # the nginx templates' listen ports
            if listen_port in environment(service):
                ports.add(int(environment(service)[listen_port]))
        assert ports <= container_ports(service), f"{name}: listens on {ports}"
        for host in re.findall(r"--(?:host[= ]|ServerApp\.ip=)(\S+)", text):
            assert host == "0.0.0.0", f"{name}: --host {host} is unreachable from other containers"
    assert services()["nginx"]["environment"]["NGINX_LISTEN_HOST"] == "0.0.0.0"


def test_cvops_containers_get_only_variables_the_code_reads() -> None:
    known = names_read_by_code() | PREFECT_ENV | MLFLOW_ENV
    cvops = built_from(PYTHON_DOCKERFILE.resolve())
    assert set(cvops) == {
        "mlflow",
        "prefect-server",
        "prefect-worker",
        "service",
        "jupyter",
        "evidently-ui",
    }
    for name, service in cvops.items():
        unknown = set(environment(service)) - known
        assert not unknown, f"{name}: nothing reads {sorted(unknown)}"
    script = (DOCKER / "python" / "start-jupyter.sh").read_text()
    required = {name for name, op, _ in references(script) if op.endswith("?")}
    assert required and required <= set(environment(cvops["jupyter"])), required


def test_third_party_env_names_exist() -> None:
    """The Prefect and MLflow variables the compose file sets are ones those versions read."""
    from prefect.settings import Settings as PrefectSettings
    from prefect.settings.base import PrefectBaseSettings

    def prefect_names(cls: type[BaseSettings]) -> set[str]:
        names = set()
        for name, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(
                field.annotation, PrefectBaseSettings
            ):
                names |= prefect_names(field.annotation)
            elif isinstance(field.validation_alias, AliasChoices):
                choices = field.validation_alias.choices
                names |= {choice.upper() for choice in choices if isinstance(choice, str)}
            else:
                names.add(f"{cls.model_config.get('env_prefix')}{name.upper()}")
        return names

    missing = PREFECT_ENV - prefect_names(PrefectSettings)
    assert not missing, f"Prefect reads no {sorted(missing)}"
    spec = importlib.util.find_spec("mlflow")
    assert spec and spec.submodule_search_locations
    mlflow_vars = Path(spec.submodule_search_locations[0], "environment_variables.py").read_text()
    for name in MLFLOW_ENV:
        assert re.search(rf'EnvironmentVariable\(\s*"{name}"', mlflow_vars), name


def test_cvops_containers_share_paths_with_the_repository() -> None:
    """Relative CVOPS_STATE_DIR / CENTRAL_STORAGE_PATH resolve under /workspace, the repo mount,
    as they do on the host; the worker mirrors jupyter so the monitor deployment's code path and
    the paths in its environment exist where it runs."""
    all_services = services()
    for name, service in all_services.items():
        env = environment(service)
        if "CVOPS_STATE_DIR" in env or "CENTRAL_STORAGE_PATH" in env or name == "evidently-ui":
            assert service.get("working_dir") == "/workspace", name
            assert ("..", "/workspace", "rw") in set(volume_mounts(service)), name
    jupyter, worker = all_services["jupyter"], all_services["prefect-worker"]
    assert jupyter["build"] == worker["build"] and jupyter["image"] == worker["image"]
    assert jupyter["volumes"] == worker["volumes"]
    shared = (
        "CVOPS_STATE_DIR",
        "CENTRAL_STORAGE_PATH",
        "CVOPS_SERVICE_DB_URL",
        "MLFLOW_TRACKING_URI",
    )
    for key in shared:
        assert environment(jupyter)[key] == environment(worker)[key], key
    assert environment(worker)["PREFECT_API_URL"] == environment(jupyter)["PREFECT_API_URL"]
    pool = filled_env()["MONITOR_POOL_NAME"]
    assert f"--pool {pool} " in command_text(worker)
    assert environment(jupyter)["CVOPS_MONITOR_POOL"] == pool


def test_database_urls_reach_the_three_postgres_databases() -> None:
    env = filled_env()
    databases = {env["POSTGRES_MLFLOW_DB"], env["POSTGRES_PREFECT_DB"], env["POSTGRES_SERVICE_DB"]}
    drivers = {"psycopg": "psycopg", "asyncpg": "asyncpg"}
    postgres_ports = container_ports(services()["postgres"])
    used = set()
    for name, service in services().items():
        values = [*environment(service).values(), command_text(service)]
        for value in values:
            for url in re.findall(r"postgresql\+\w+://\S+", value):
                parsed = make_url(url)
                assert parsed.drivername.split("+")[1] in drivers, (name, parsed.drivername)
                assert importlib.util.find_spec(drivers[parsed.drivername.split("+")[1]]), url
                assert parsed.host == "postgres" and parsed.port in postgres_ports, (name, url)
                assert parsed.username == env["POSTGRES_USER"], name
                assert parsed.password == env["POSTGRES_PASSWORD"], name
                assert parsed.database in databases, (name, parsed.database)
                used.add(parsed.database)
    assert used == databases
    mlflow_uri = command_text(services()["mlflow"]).split("--backend-store-uri ")[1].split()[0]
    assert make_url(mlflow_uri).database == env["POSTGRES_MLFLOW_DB"]
    prefect_url = environment(services()["prefect-server"])[
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ]
    assert make_url(prefect_url).database == env["POSTGRES_PREFECT_DB"]


def test_service_settings_accept_the_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = filled_env()
    for name in ("service", "jupyter"):
        for key, value in environment(services()[name]).items():
            monkeypatch.setenv(key, value)
        settings = ServiceSettings(_env_file=None)
        assert make_url(settings.resolved_db_url).database == env["POSTGRES_SERVICE_DB"]
        assert settings.admin_token is not None
        assert settings.admin_token.get_secret_value() == env["CVOPS_SERVICE_ADMIN_TOKEN"]
        assert str(settings.central_storage_path) == env["CENTRAL_STORAGE_PATH"]


def test_urls_between_containers_name_services_and_their_ports() -> None:
    all_services = services()
    url = re.compile(r"^(?:https?://)?([a-z][a-z0-9-]*):(\d+)")
    seen = set()
    for name, service in all_services.items():
        for key, value in environment(service).items():
            if key not in SERVICE_URL_ENV:
                continue
            match = url.match(value)
            assert match, f"{name}: {key}={value}"
            host, port = match[1], int(match[2])
            assert host in set(all_services), f"{name}: {key} names no service: {host}"
            assert port in container_ports(all_services[host]), f"{name}: {key}: {host} port {port}"
            seen.add(key)
    assert seen == SERVICE_URL_ENV
    service_url = environment(all_services["jupyter"])["CVOPS_SERVICE_URL"]
    assert service_url.startswith("http://nginx:"), "the deploy flow goes through nginx"


def test_volumes_are_declared_and_bind_mounts_exist() -> None:
    declared = set(raw_compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for source, target, mode in volume_mounts(service):
            assert target.startswith("/"), (name, target)
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} is not in the repository"
            elif source.startswith("/"):
                assert source in HOST_MOUNTS and mode == "ro", f"{name}: host path {source}"
                assert name in {"node-exporter", "cadvisor"}, f"{name}: mounts the host's {source}"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_depends_on_names_services_and_waits_for_health() -> None:
    all_services = services()
    graph = {}
    for name, service in all_services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        graph[name] = set(depends)
        for dep, spec in depends.items():
            assert dep in set(all_services) and dep != name, f"{name} depends on unknown {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in set(all_services[dep]), f"{name} waits for {dep}'s health"

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, f"depends_on cycle: {' -> '.join((*path, node))}"
        for dep in graph[node]:
            visit(dep, (*path, node))

    for name in graph:
        visit(name, ())
    for name in ("service", "mlflow", "prefect-server", "pgadmin"):
        assert all_services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("nginx", "webui"):  # nginx resolves its upstream once, at start
        assert all_services[name]["depends_on"]["service"]["condition"] == "service_healthy"


def test_healthchecks_probe_the_servers_own_port() -> None:
    all_services = services()
    for name in HEALTHCHECKED:
        assert "healthcheck" in set(all_services[name]), f"{name} needs a healthcheck"
    for name, service in all_services.items():
        if "healthcheck" not in service:
            continue
        test = " ".join(service["healthcheck"]["test"])
        for port in re.findall(r"127\.0\.0\.1:(\d+)", test):
            assert int(port) in container_ports(service), f"{name}: healthcheck on port {port}"
    assert "/health_check" in " ".join(all_services["service"]["healthcheck"]["test"])


# ---------------------------------------------------------------- nginx and web UI


def test_nginx_services_fill_every_template_variable() -> None:
    """The official image's envsubst leaves an unset ${NAME} as is: nginx would not start.
    nginx renders the API's site template, webui (its own template folder) the web UI's."""
    copies = {}
    for line in dockerfile_lines(NGINX_DOCKERFILE):
        if line.startswith("COPY"):
            source, target = line.split()[1:]
            copies[str(Path(target).parent)] = source
    assert copies == {
        "/etc/nginx/templates": f"src/cvops/service/nginx/{service_nginx.SITE_TEMPLATE}",
        "/etc/nginx/templates-webui": f"src/cvops/service/nginx/{service_nginx.WEBUI_TEMPLATE}",
    }
    nginx_services = built_from(NGINX_DOCKERFILE.resolve())
    assert set(nginx_services) == {"nginx", "webui"}
    listen = {"nginx": "NGINX_PORT", "webui": "WEBUI_PORT"}
    for name, service in nginx_services.items():
        env = environment(service)
        template_dir = env.pop("NGINX_ENVSUBST_TEMPLATE_DIR", "/etc/nginx/templates")
        template = (REPO / copies[template_dir]).read_text()
        needed = set(service_nginx.placeholders(template))
        assert set(env) == needed, f"{name}: environment must set exactly {sorted(needed)}"
        service_nginx.render(template, env, name)  # rejects empty or unsafe values
        for key, default in service_nginx.DEFAULTS.items():
            if key in env and key != "NGINX_LISTEN_HOST":
                assert env[key] == default, f"{name}: {key}={env[key]}, the service uses {default}"
        # nginx's limit is the service's, from the same .env variable
        limit = service_nginx.BODY_LIMIT
        assert env[limit] == environment(services()["service"])[limit] == env_example()[limit]
        assert int(env[listen[name]]) in container_ports(service)
    # webui listens on the web UI's default port; nginx on the API's.
    ports = {name: int(environment(s)[listen[name]]) for name, s in nginx_services.items()}
    assert ports == {
        "nginx": StackSettings.model_fields["nginx_port"].default,
        "webui": StackSettings.model_fields["webui_port"].default,
    }
    assert "NGINX_MAX_BODY_SIZE" not in compose_text(), (
        "one body limit: CVOPS_SERVICE_MAX_BODY_BYTES"
    )


# ---------------------------------------------------------------- Postgres init script


def test_init_script_creates_the_databases_named_in_env_example() -> None:
    script = INIT_SCRIPT.read_text()
    env_dbs = {key for key in env_example() if re.fullmatch(r"POSTGRES_\w+_DB", key)}
    assert set(re.findall(r"\$\{?(POSTGRES_\w+_DB)\b", script)) == env_dbs
    postgres = services()["postgres"]
    env = environment(postgres)
    assert {key for key in env if key in env_dbs} == env_dbs
    assert env["POSTGRES_DB"] in {env[key] for key in env_dbs}, "no stray default database"
    mounts = {target: source for source, target, _ in volume_mounts(postgres)}
    assert (
        mounts["/docker-entrypoint-initdb.d/10-init-databases.sh"] == "./postgres/init-databases.sh"
    )
    assert os.access(INIT_SCRIPT, os.X_OK), "the image runs executable .sh files, sources others"


def test_init_script_runs_on_postgres() -> None:
    """The script itself, on a throwaway PostgreSQL 15 cluster: the three databases, twice."""
    if shutil.which("psql") is None or shutil.which("bash") is None:
        pytest.skip("needs psql and bash")
    from sqlalchemy import create_engine, text

    from tests.pg import PostgresCluster

    try:
        cluster = PostgresCluster()
    except RuntimeError as err:
        pytest.skip(str(err))
    try:
        cluster.start()
        env = filled_env()
        run_env = {
            **os.environ,
            "PGHOST": "127.0.0.1",
            "PGPORT": str(cluster.port),
            "POSTGRES_USER": "postgres",
            **{key: env[key] for key in env if re.fullmatch(r"POSTGRES_\w+_DB", key)},
        }
        for _ in range(2):  # a second run (existing databases) must not fail
            done = subprocess.run(
                ["bash", str(INIT_SCRIPT)], env=run_env, capture_output=True, text=True, check=False
            )
            assert done.returncode == 0, done.stderr
        engine = create_engine(
            "postgresql+psycopg://" + cluster.url().removeprefix("postgresql://")
        )
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT datname FROM pg_database WHERE NOT datistemplate"))
            names = {row[0] for row in rows}
        engine.dispose()
        wanted = {env[key] for key in env if re.fullmatch(r"POSTGRES_\w+_DB", key)}
        assert len(wanted) == 4 and names == wanted | {"postgres"}
    finally:
        cluster.destroy()


# ---------------------------------------------------------------- Prometheus


@cache
def prometheus_config() -> dict[str, Any]:
    return yaml.safe_load(PROMETHEUS_FILE.read_text())


def test_prometheus_scrapes_compose_services_on_their_ports() -> None:
    all_services = services()
    prometheus = all_services["prometheus"]
    mounts = {source: target for source, target, _ in volume_mounts(prometheus)}
    config_path = re.search(r"--config\.file=(\S+)", command_text(prometheus))
    assert config_path and mounts["./prometheus.yml"] == config_path[1]
    scraped = {}
    for job in prometheus_config()["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                host = "prometheus" if host == "localhost" else host
                assert host in set(all_services), f"{job['job_name']}: {host} is no service"
                assert int(port) in container_ports(all_services[host]), target
                scraped[host] = job
    assert set(scraped) == {"prometheus", "service", "node-exporter", "cadvisor"}
    assert scraped["service"].get("metrics_path", "/metrics") == "/metrics"


# ---------------------------------------------------------------- Grafana


@cache
def grafana_datasources() -> list[dict[str, Any]]:
    path = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
    return yaml.safe_load(path.read_text())["datasources"]


def grafana_mounts() -> dict[str, str]:
    return {source: target for source, target, _ in volume_mounts(services()["grafana"])}


@cache
def dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(board: dict[str, Any]) -> Iterator[str]:
    """Every PromQL text of a dashboard: panel targets and template variable queries."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        yield query["query"] if isinstance(query, dict) else query or ""


@cache
def service_metric_labels() -> dict[str, frozenset[str]]:
    """Sample names the model service exports, with their label names."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase
    from prometheus_client.parser import text_string_to_metric_families

    from cvops.service.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase) and wrapper._labelnames:
            wrapper.labels(*("x" for _ in wrapper._labelnames))  # a child, so samples show
    found: dict[str, set[str]] = {}
    exposition = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in found.items()}


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_WORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, strings and calls removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,[^)]*\)", r" \1 ", text)
    tokens = re.findall(r"(?<![\w.$])([A-Za-z_:][\w:]*)\b(?!\s*\()", text)
    return {token for token in tokens if token.lower() not in PROMQL_WORDS}


def test_grafana_datasource_is_the_compose_prometheus() -> None:
    (source,) = grafana_datasources()
    assert source["type"] == "prometheus" and source["uid"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", source["url"]).groups()
    assert host == "prometheus", f"Grafana reaches Prometheus by its service name, not {host}"
    assert int(port) in container_ports(services()["prometheus"])
    assert grafana_mounts()["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_grafana_dashboard_provider_reads_the_mounted_folder() -> None:
    path = GRAFANA / "provisioning" / "dashboards" / "cvops.yml"
    (provider,) = yaml.safe_load(path.read_text())["providers"]
    assert provider["type"] == "file"
    assert grafana_mounts()["./grafana/dashboards"] == provider["options"]["path"]
    assert DASHBOARDS, "no dashboard JSON in docker/grafana/dashboards"
    home = environment(services()["grafana"])["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert Path(home).parent.as_posix() == provider["options"]["path"]
    assert (GRAFANA / "dashboards" / Path(home).name).is_file()


def test_every_dashboard_datasource_is_the_provisioned_uid() -> None:
    (source,) = grafana_datasources()

    def walk(node: Any, where: str) -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "datasource":
                    yield where, value
                yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                yield from walk(item, f"{where}[{index}]")

    for path in DASHBOARDS:
        board = dashboard(path)
        assert "__inputs" not in board and "${DS_" not in path.read_text(), (
            "exported, not provisioned"
        )
        references_ = list(walk(board, path.name))
        assert references_
        for where, value in references_:
            assert value == {"type": "prometheus", "uid": source["uid"]}, where
        for panel in panels(board):
            if panel["type"] != "row":
                assert "datasource" in panel, f"{path.name}: {panel['title']}: no datasource"
                assert all("datasource" in target for target in panel["targets"]), panel["title"]


def test_dashboard_panels_are_well_formed() -> None:
    for path in DASHBOARDS:
        board = dashboard(path)
        assert board["uid"] and board["title"]
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        boxes = []
        for panel in panels(board):
            grid = panel["gridPos"]
            assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
            for other, box in boxes:
                overlap_x = grid["x"] < box["x"] + box["w"] and box["x"] < grid["x"] + grid["w"]
                overlap_y = grid["y"] < box["y"] + box["h"] and box["y"] < grid["y"] + grid["h"]
                assert not (overlap_x and overlap_y), f"{panel['title']} overlaps {other}"
            boxes.append((panel["title"], grid))
            if panel["type"] == "row":
                continue
            targets = panel.get("targets", [])
            assert targets and all(target.get("expr") for target in targets), panel["title"]
            ref_ids = [target["refId"] for target in targets]
            assert len(ref_ids) == len(set(ref_ids)), f"{panel['title']}: duplicate refId"


def test_dashboard_queries_use_metrics_and_labels_that_exist() -> None:
    service = service_metric_labels()
    jobs = {job["job_name"] for job in prometheus_config()["scrape_configs"]}
    for path in DASHBOARDS:
        for expr in queries(dashboard(path)):
            names = metric_names(expr)
            assert names, f"no metric in {expr!r}"
            unknown = names - set(service) - EXTERNAL_METRICS
            assert not unknown, f"{path.name}: {sorted(unknown)} in {expr!r} exist nowhere"
            for metric, matchers in re.findall(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", expr):
                labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
                if metric in service:
                    assert labels <= service[metric], (
                        f"{metric} has no label {labels - service[metric]}"
                    )
            for job in re.findall(r'\bjob\s*=\s*"([^"]+)"', expr):
                assert job in jobs, f"{path.name}: job {job!r} is not scraped by prometheus.yml"
            cvops_names = names & set(service)
            if cvops_names == names:
                by_labels = {
                    label.strip()
                    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                    for label in group.split(",")
                }
                available = set().union(*(service[name] for name in names))
                assert by_labels <= available, f"{expr!r}: no label {by_labels - available}"
            if "histogram_quantile" in expr:
                assert re.search(r"by\s*\([^)]*\ble\b", expr), f"quantile needs `by (le)`: {expr}"


def test_dashboard_has_the_required_panels() -> None:
    boards = [dashboard(path) for path in DASHBOARDS]
    found = {
        panel["title"].lower(): {
            name for target in panel.get("targets", []) for name in metric_names(target["expr"])
        }
        for board in boards
        for panel in panels(board)
    }
    for keyword, metrics in REQUIRED_PANELS.items():
        matching = [title for title, used in found.items() if keyword in title and metrics <= used]
        assert matching, f"no panel titled '{keyword}...' querying {sorted(metrics)}"


def test_promql_metric_name_parser() -> None:
    """The parser the dashboard checks rely on: calls, matchers, ranges and groupings dropped."""
    expr = (
        "histogram_quantile(0.95, sum by (le, route) "
        '(rate(cvops_request_seconds_bucket{route=~"/p"}[$__rate_interval]))) '
        "/ on(route) group_left cvops_requests_total > 1e3"
    )
    assert metric_names(expr) == {"cvops_request_seconds_bucket", "cvops_requests_total"}
    assert metric_names("label_values(cvops_model_info, model)") == {"cvops_model_info"}
    assert metric_names("node_memory_MemTotal_bytes - node_memory_MemAvailable_bytes") == {
        "node_memory_MemTotal_bytes",
        "node_memory_MemAvailable_bytes",
    }
