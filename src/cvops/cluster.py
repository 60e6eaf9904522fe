"""Kubernetes: the Prefect work pool whose Jobs run cvops flows, and the job variables a
monitor deployment on such a pool needs.

The pool's base job template is `deploy/k8s/base/base-job-template.json` (prefect-kubernetes'
own template plus `env_from`, GPU, node selector and tolerations). In the cluster the worker's
init container runs `python -m cvops.cluster ensure-pool`, which fills in the image and
namespace the manifests were rendered with, so the template never names a stale image.
Settings reach the Jobs only through `envFrom` (ConfigMaps and Secrets named here), never as
plain values in job variables, which Prefect stores in its database and shows in its UI.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from tenacity import (
    before_sleep_log,
    retry,
    retry_if_exception_type,
    stop_after_delay,
    wait_fixed,
)

log = logging.getLogger(__name__)

POOL_TYPE = "kubernetes"
# RFC 1123: Secret and ConfigMap names are subdomains, namespaces are labels.
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ClusterSettingsError(ValueError):
    """A Kubernetes setting is missing or malformed; the message names the variable."""


def _names(value: object) -> object:
    """`a,b` as well as a JSON list, so the variables read like the manifests' names."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class KubernetesJobSettings(BaseSettings):
    """What the Jobs of a kubernetes work pool run and read (env `CVOPS_K8S_*` or `.env`)."""

    model_config = SettingsConfigDict(env_file=".env", env_prefix="CVOPS_K8S_", extra="ignore")

    image: str | None = Field(
        default=None,
        description="The cvops image the Jobs run (the image of the cluster's cvops pods); "
        "None: the pool's base job template default",
    )
    namespace: str | None = Field(
        default=None, description="Namespace of the Jobs; None: the pool's default"
    )
    env_from_config_maps: Annotated[list[str], NoDecode] = Field(
        default=["cvops-config"], description="ConfigMaps whose keys become the Jobs' env"
    )
    env_from_secrets: Annotated[list[str], NoDecode] = Field(
        default=["cvops-db", "cvops-s3", "cvops-admin"],
        description="Secrets whose keys become the Jobs' env (database URL, S3, admin token)",
    )
    evidently_workspace: str = Field(
        default="/var/lib/cvops/evidently",
        description="The Evidently workspace inside a Job (the volume the Evidently UI serves)",
    )

    @field_validator("env_from_config_maps", "env_from_secrets", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _names(value)

    @field_validator("env_from_config_maps", "env_from_secrets")
    @classmethod
    def _object_names(cls, value: list[str]) -> list[str]:
        bad = [name for name in value if len(name) > 253 or not _SUBDOMAIN.match(name)]
        if bad:
            raise ValueError(f"not Kubernetes object names (RFC 1123 subdomains): {bad}")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _LABEL.match(value)):
            raise ValueError(f"{value!r} is not a namespace name (RFC 1123 label)")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str | None) -> str | None:
        if value is not None and (not value or any(c.isspace() for c in value)):
            raise ValueError(f"{value!r} is not an image reference")
        return value or None


def load_settings() -> KubernetesJobSettings:
    """The settings, or one error naming the variable that is wrong."""
    try:
        return KubernetesJobSettings()
    except ValidationError as err:
        problems = "; ".join(
            f"CVOPS_K8S_{'_'.join(str(p) for p in e['loc']).upper()}: {e['msg']}"
            for e in err.errors()
        )
        raise ClusterSettingsError(f"invalid Kubernetes settings: {problems}") from None


def env_from(settings: KubernetesJobSettings) -> list[dict[str, Any]]:
    """The Jobs' `envFrom`: ConfigMaps first, so a Secret's key wins a clash."""
    return [{"configMapRef": {"name": name}} for name in settings.env_from_config_maps] + [
        {"secretRef": {"name": name}} for name in settings.env_from_secrets
    ]


def job_template(
    path: Path,
    *,
    image: str | None = None,
    namespace: str | None = None,
    defaults: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The base job template at `path` with its variables' defaults replaced: `image`,
    `namespace`, then `defaults` (an overlay's GPU request, say). A default for a variable the
    template does not have is an error, not silently ignored."""
    template = json.loads(Path(path).read_text(encoding="utf-8"))
    properties = template["variables"]["properties"]
    values = dict(defaults or {})
    if image:
        values["image"] = image
    if namespace:
        values["namespace"] = namespace
    unknown = sorted(set(values) - set(properties))
    if unknown:
        raise ClusterSettingsError(f"{path}: no job variable(s) {unknown} to set a default for")
    result = copy.deepcopy(template)
    for name, value in values.items():
        result["variables"]["properties"][name]["default"] = value
    return result


def ensure_pool(name: str, template: dict[str, Any]) -> None:
    """Create the kubernetes work pool `name` with `template`, or give an existing one this
    template (Prefect keeps an existing pool's template otherwise). A pool of another type
    under that name is an error: Prefect cannot change a pool's type."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(
                WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template)
            )
            log.info("Created kubernetes work pool %s", name)
            return
        except ObjectAlreadyExists:
            pass
        pool = client.read_work_pool(name)
        if pool.type != POOL_TYPE:
            raise ClusterSettingsError(
                f"work pool {name!r} exists with type {pool.type!r}, not {POOL_TYPE!r}: "
                "delete it (prefect work-pool delete) or choose another pool name"
            )
        client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
        log.info("Updated the base job template of kubernetes work pool %s", name)


def job_variables(settings: KubernetesJobSettings, pool_template: dict[str, Any]) -> dict[str, Any]:
    """Job variables of a monitor deployment on a kubernetes pool: the image and `envFrom`
    (plus the namespace when set). Errors say what to set when the pool cannot carry them."""
    properties = pool_template.get("variables", {}).get("properties", {})
    if "env_from" not in properties:
        raise ClusterSettingsError(
            "the kubernetes work pool's base job template has no `env_from` variable, so its "
            "Jobs could not read the database and S3 settings from Secrets: give the pool "
            "deploy/k8s/base/base-job-template.json (python -m cvops.cluster ensure-pool)"
        )
    image = settings.image or properties.get("image", {}).get("default")
    if not image:
        raise ClusterSettingsError(
            "set CVOPS_K8S_IMAGE to the cvops image the Jobs run: the kubernetes work pool's "
            "base job template names no default image"
        )
    variables: dict[str, Any] = {"image": image, "env_from": env_from(settings)}
    if settings.namespace:
        variables["namespace"] = settings.namespace
    return variables


def main(argv: list[str] | None = None) -> int:
    """`python -m cvops.cluster ensure-pool --pool NAME --template FILE [--defaults FILE]`."""
    parser = argparse.ArgumentParser(prog="python -m cvops.cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser(
        "ensure-pool",
        help="create or update the kubernetes work pool; image and namespace from "
        "CVOPS_K8S_IMAGE and CVOPS_K8S_NAMESPACE",
    )
    ensure.add_argument("--pool", required=True)
    ensure.add_argument("--template", type=Path, required=True)
    ensure.add_argument("--defaults", type=Path, help="JSON object: more variable defaults")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        defaults = json.loads(args.defaults.read_text(encoding="utf-8")) if args.defaults else {}
        if not isinstance(defaults, dict):
            raise ClusterSettingsError(f"{args.defaults}: a JSON object of variable defaults")
        template = job_template(
            args.template, image=settings.image, namespace=settings.namespace, defaults=defaults
        )
        _until_the_server_answers(ensure_pool)(args.pool, template)
    except ClusterSettingsError as err:
        log.error("%s", err)
        return 1
    return 0


def _until_the_server_answers(fn: Callable[..., None]) -> Callable[..., None]:
    """The worker's init container may start before the Prefect server answers: retry for
    a few minutes (quietly, unlike a crash-looping container) before giving up."""
    return retry(
        retry=retry_if_exception_type(httpx.TransportError),
        wait=wait_fixed(3),
        stop=stop_after_delay(300),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )(fn)


if __name__ == "__main__":
    sys.exit(main())
