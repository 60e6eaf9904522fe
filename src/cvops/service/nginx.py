"""nginx in front of the model service: render the config templates and run nginx without /etc.

The templates use `${NAME}` placeholders filled from the environment, as the reference's
`default.conf.template` is with docker's envsubst, so `default.conf.template` still works in the
official nginx image. Only upper-case braced names are placeholders: nginx's own variables
(`$host`, `$remote_addr`, `${request_uri}`) stay untouched.

`write_config(prefix, ...)` writes a complete config for `nginx -p PREFIX/ -c CONF -e LOG`
(`daemon off;`, pid file, logs and every temp path under PREFIX), so nginx runs in the
foreground under a supervisor or a test, with no root-owned files touched. Logs (client
addresses, paths) and the temp folders (buffered upload bodies) are private, like the rest of
the state: folders 0700, log files 0600.

The body limit is the service's own setting, `CVOPS_SERVICE_MAX_BODY_BYTES` (the template's
placeholder has that name, so docker's envsubst fills it from the same variable): nginx refuses
what the service would refuse, before buffering it. `NGINX_MAX_BODY_SIZE`, the former separate
setting, is still read but must say the same: two limits that differ are an error, because
either the nginx one is larger (uploads buffered to disk only to be refused) or smaller (nginx
refuses what the service accepts), and silently preferring one hides the mistake.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import string
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cvops.service.settings import ServiceSettings

log = logging.getLogger(__name__)

MAIN_TEMPLATE = "nginx.conf.template"
SITE_TEMPLATE = "default.conf.template"
WEBUI_TEMPLATE = "webui.conf.template"
USER_DIRECTIVE = "NGINX_USER_DIRECTIVE"  # set by write_config, never by the environment
UPSTREAM = "SERVICE_UPSTREAM"  # host:port of the service, or several, comma-separated
DEFAULTS: dict[str, str] = {
    "NGINX_LISTEN_HOST": "127.0.0.1",
    "NGINX_PROXY_CONNECT_TIMEOUT": "5s",
    "NGINX_PROXY_TIMEOUT": "300s",
    "NGINX_WORKER_PROCESSES": "auto",
}
FORBIDDEN_CHARS = frozenset(";{}'\"\\\n\r\t ")
BODY_LIMIT = "CVOPS_SERVICE_MAX_BODY_BYTES"  # the service's setting, also nginx's limit
LEGACY_BODY_SIZE = "NGINX_MAX_BODY_SIZE"  # accepted only when it equals BODY_LIMIT
NGINX_SIZE = re.compile(r"(\d+)([kKmMgG]?)")
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


class NginxConfigError(ValueError):
    """A template that cannot be rendered (missing or unsafe variable) or a config nginx rejects."""


class EnvTemplate(string.Template):
    """`${UPPER_CASE}` placeholders only; every other `$` is left for nginx."""

    flags = 0
    pattern = r"""
        \$\{(?P<braced>[A-Z_][A-Z0-9_]*)\}
        | (?P<escaped>(?!))
        | (?P<named>(?!))
        | (?P<invalid>(?!))
    """


def template_text(name: str) -> str:
    return resources.files("cvops.service").joinpath(f"nginx/{name}").read_text("utf-8")


def placeholders(text: str) -> list[str]:
    return EnvTemplate(text).get_identifiers()


def render(text: str, variables: Mapping[str, str], name: str = "template") -> str:
    """Fill every placeholder; a missing or unsafe value is a clear error, not a broken config."""
    template = EnvTemplate(text)
    names = template.get_identifiers()
    missing = [key for key in names if key not in variables]
    if missing:
        raise NginxConfigError(
            f"{name}: missing variable(s) {', '.join(missing)}; set them in the environment "
            "or pass them explicitly"
        )
    values = dict(variables)
    for key in names:
        parts = values[key].split(",") if key == UPSTREAM else [values[key]]
        if key != USER_DIRECTIVE and any(
            not part or FORBIDDEN_CHARS.intersection(part) for part in parts
        ):
            raise NginxConfigError(
                f"{name}: {key}={values[key]!r} is empty or contains whitespace, quotes, "
                "';', '{' or '}'"
            )
        if key == UPSTREAM:  # several replicas: one `server` line each
            values[key] = ";\n    server ".join(parts)
    return template.substitute(values)


def nginx_size_bytes(size: str) -> int | None:
    """An nginx size (`1048576`, `512k`, `20M`, `1g`) in bytes; None if it is not one."""
    match = NGINX_SIZE.fullmatch(size.strip())
    if match is None:
        return None
    return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")


def _body_limit(values: dict[str, str], legacy: str | None) -> str:
    """The validated byte limit; an explicit nginx size must agree with it (see module doc)."""
    raw = values[BODY_LIMIT]
    if not raw.isdigit() or int(raw) < 1:
        raise NginxConfigError(f"{BODY_LIMIT}={raw!r} must be a positive whole number of bytes")
    if legacy is not None and nginx_size_bytes(legacy) != int(raw):
        raise NginxConfigError(
            f"{LEGACY_BODY_SIZE}={legacy} differs from {BODY_LIMIT}={raw}: nginx's limit is the "
            f"service's; unset {LEGACY_BODY_SIZE} (or make it equal)"
        )
    return str(int(raw))


def nginx_variables(
    overrides: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Template values: defaults, then the environment, then explicit overrides.

    The body limit, when neither gives it, is the service's as the service resolves it: from
    the environment and `.env` when `env` is None, else the setting's default.
    """
    overrides = overrides or {}
    use_environ = env is None
    env = os.environ if env is None else env
    known = {
        name
        for template in (MAIN_TEMPLATE, SITE_TEMPLATE, WEBUI_TEMPLATE)
        for name in placeholders(template_text(template))
    }
    known.discard(USER_DIRECTIVE)
    values = dict(DEFAULTS)
    values.update({key: env[key] for key in known if key in env})
    values.update({key: value for key, value in overrides.items() if key != LEGACY_BODY_SIZE})
    if BODY_LIMIT not in values:
        limit = (
            ServiceSettings().max_body_bytes
            if use_environ
            else ServiceSettings.model_fields["max_body_bytes"].default
        )
        values[BODY_LIMIT] = str(limit)
    values[BODY_LIMIT] = _body_limit(
        values, overrides.get(LEGACY_BODY_SIZE, env.get(LEGACY_BODY_SIZE))
    )
    return values


@dataclass(frozen=True)
class NginxConfig:
    """A rendered config under `prefix` and the commands that run and stop it."""

    prefix: Path
    conf: Path
    nginx: str = "nginx"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def error_log(self) -> Path:
        return self.prefix / "logs" / "error.log"

    @property
    def access_log(self) -> Path:
        return self.prefix / "logs" / "access.log"

    def command(self, *extra: str) -> list[str]:
        # -e: the log nginx writes before it has read the config (else the built-in default).
        return [
            self.nginx,
            "-p",
            f"{self.prefix}/",
            "-c",
            str(self.conf),
            "-e",
            str(self.error_log),
            *extra,
        ]

    @property
    def stop_command(self) -> list[str]:
        """Graceful stop: finish the requests in flight, then exit."""
        return self.command("-s", "quit")

    def check(self) -> str:
        """`nginx -t` on this config; returns nginx's report, raises NginxConfigError if bad."""
        done = subprocess.run(self.command("-t"), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NginxConfigError(f"nginx rejected {self.conf}:\n{done.stderr.strip()}")
        return done.stderr


def _traversable_by_others(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in (path, *path.parents))


def _private_dir(path: Path, owner: int = -1) -> None:
    path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    path.chmod(PRIVATE_DIR)  # also when an older config left it open
    if owner != -1:
        os.chown(path, owner, -1)


def _private_file(path: Path) -> None:
    """Created 0600 before nginx opens it: nginx creates its logs 0644 and keeps an existing
    file's mode (it opens them for append)."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, PRIVATE_FILE))
    path.chmod(PRIVATE_FILE)


def _worker_uid(user: str | None) -> int:
    """Who a root master's workers run as (the `user` directive, else nginx's `nobody`); -1 if
    the master is not root (workers are the same user) or the name is unknown."""
    if os.geteuid() != 0:
        return -1
    name = (user or "nobody").split()[0]
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        log.warning("nginx worker user %r does not exist: tmp/ stays the master's", name)
        return -1


def write_config(
    prefix: Path,
    variables: Mapping[str, str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    nginx: str = "nginx",
) -> NginxConfig:
    """Write `conf/nginx.conf` + `conf/default.conf` under `prefix` and create logs/ and tmp/.

    `user`: the `user` directive, only meaningful when the master runs as root. Left out, the
    workers of a root master run as nginx's built-in default (`nobody`), which then needs to
    reach `prefix/tmp` (large uploads are buffered there): tmp/ (0700) is handed to the worker
    user and every parent folder must be traversable by others. logs/ stays the master's: it
    opens the logs and the workers inherit them.
    """
    prefix = Path(prefix).resolve()
    values = nginx_variables(variables, env)
    values[USER_DIRECTIVE] = f"user {user};" if user else "# no user directive (see write_config)"
    conf_dir = prefix / "conf"
    conf_dir.mkdir(parents=True, exist_ok=True)
    _private_dir(prefix / "logs")
    _private_dir(prefix / "tmp", owner=_worker_uid(user))
    for log_file in ("error.log", "access.log"):
        _private_file(prefix / "logs" / log_file)
    site = render(template_text(SITE_TEMPLATE), values, SITE_TEMPLATE)
    main = render(template_text(MAIN_TEMPLATE), values, MAIN_TEMPLATE)
    (conf_dir / "default.conf").write_text(site, encoding="utf-8")
    conf = conf_dir / "nginx.conf"
    conf.write_text(main, encoding="utf-8")
    if os.geteuid() == 0 and user is None and not _traversable_by_others(prefix):
        log.warning(
            "nginx workers will run as 'nobody' but cannot reach %s: uploads larger than the "
            "client body buffer will fail; use a prefix others can traverse or pass user=",
            prefix / "tmp",
        )
    log.info("nginx config for %s written to %s", values.get("SERVICE_UPSTREAM"), conf)
    return NginxConfig(prefix=prefix, conf=conf, nginx=nginx)
