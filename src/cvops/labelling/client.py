"""A small Label Studio REST client (httpx; checked against Label Studio 1.23).

Plain REST rather than `label-studio-sdk`: the SDK's API changed with its 2.0 release and its
pins would have to agree with cvops' lock; the handful of endpoints used here are stable:
projects (`/api/projects`, filtered by title), task import with predictions
(`/api/projects/{id}/import`), tasks with their annotations (`/api/tasks?project=...&fields=all`,
paged) and, for a labeller or a test, `/api/tasks/{id}/annotations`. Authentication is the
legacy token (`Authorization: Token ...`), which never expires and is what
`LABEL_STUDIO_USER_TOKEN` sets at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

import httpx

log = logging.getLogger(__name__)

FROM_NAME = "label"  # the <Choices> control
TO_NAME = "image"  # the <Image> object; task data key of the image too
UNKNOWN = "other / unknown"


class LabelStudioError(RuntimeError):
    """Label Studio refused a request or cannot be reached; the message says which and why."""


def label_config(classes: Sequence[str], unknown: str = UNKNOWN) -> str:
    """Image classification labelling config: the image, one choice per class + unknown."""
    choices = [*classes, *([unknown] if unknown not in classes else [])]
    lines = "\n".join(f"    <Choice value={quoteattr(c)}/>" for c in choices)
    return (
        "<View>\n"
        f'  <Image name="{TO_NAME}" value="${TO_NAME}" zoom="true"/>\n'
        f'  <Choices name="{FROM_NAME}" toName="{TO_NAME}" choice="single-radio" '
        'showInline="true" required="true">\n'
        f"{lines}\n"
        "  </Choices>\n"
        "</View>"
    )


def choice_result(label: str) -> list[dict[str, Any]]:
    """An annotation or prediction `result` choosing `label` in :func:`label_config`."""
    return [
        {
            "from_name": FROM_NAME,
            "to_name": TO_NAME,
            "type": "choices",
            "value": {"choices": [label]},
        }
    ]


@dataclass(frozen=True)
class Annotation:
    """The answer a task counts with: its newest annotation that was not skipped."""

    task_id: int
    annotation_id: int
    label: str
    updated_at: str
    data: dict[str, Any]


def chosen_label(result: list[dict[str, Any]]) -> str | None:
    for item in result or []:
        if item.get("from_name") == FROM_NAME and item.get("type") == "choices":
            choices = (item.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


class LabelStudio:
    """One Label Studio server: `url` (e.g. http://127.0.0.1:8090) and a legacy API token."""

    def __init__(self, url: str, token: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Token {token}"},
            timeout=timeout,
            trust_env=False,  # loopback or a named server: never through a proxy from the env
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> LabelStudio:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise LabelStudioError(f"Label Studio at {self.url} unreachable: {err}") from err
        if response.status_code == 401:
            raise LabelStudioError(
                f"Label Studio at {self.url} refused the API token (401): check "
                "CVOPS_LABEL_STUDIO_TOKEN (a legacy token of a user in its organisation)"
            )
        if response.status_code >= 400:
            raise LabelStudioError(
                f"Label Studio {method} {path} failed ({response.status_code}): "
                f"{response.text[:500]}"
            )
        return response.json() if response.content else None

    def version(self) -> str:
        return str(self._request("GET", "/api/version").get("release", "unknown"))

    def find_project(self, title: str) -> dict[str, Any] | None:
        page = self._request("GET", "/api/projects", params={"title": title, "page_size": 100})
        found = [p for p in page.get("results", []) if p.get("title") == title]
        return min(found, key=lambda p: p["id"]) if found else None

    def ensure_project(self, title: str, config: str, description: str = "") -> dict[str, Any]:
        """The project called `title` (created when missing); its labelling config is brought
        up to date when the model's classes changed."""
        project = self.find_project(title)
        if project is None:
            project = self._request(
                "POST",
                "/api/projects",
                json={"title": title, "label_config": config, "description": description},
            )
            log.info("Label Studio project %r created (id %s)", title, project["id"])
        elif project.get("label_config", "").strip() != config.strip():
            project = self._request(
                "PATCH", f"/api/projects/{project['id']}", json={"label_config": config}
            )
            log.info("Label Studio project %r: labelling config updated", title)
        return project

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]], chunk: int = 100) -> int:
        """Create tasks (each `{"data": ..., "predictions": [...]}`); returns how many."""
        created = 0
        for start in range(0, len(tasks), chunk):
            body = tasks[start : start + chunk]
            answer = self._request("POST", f"/api/projects/{project_id}/import", json=body)
            created += int(answer.get("task_count", len(body)))
        return created

    def tasks(self, project_id: int, page_size: int = 100) -> list[dict[str, Any]]:
        """All tasks of a project with data, predictions and annotations (paged through;
        the export endpoint would also leave a file in Label Studio's data folder per call)."""
        found: list[dict[str, Any]] = []
        page = 1
        while True:
            answer = self._request(
                "GET",
                "/api/tasks",
                params={
                    "project": project_id,
                    "fields": "all",
                    "page": page,
                    "page_size": page_size,
                },
            )
            batch = answer.get("tasks", [])
            found += batch
            if not batch or len(found) >= int(answer.get("total", 0)):
                return found
            page += 1

    def annotated(self, project_id: int) -> list[Annotation]:
        """Every task's current answer: its newest annotation that was not skipped."""
        answers = []
        for task in self.tasks(project_id):
            done = [a for a in task.get("annotations", []) if not a.get("was_cancelled")]
            labelled = [(a, chosen_label(a.get("result", []))) for a in done]
            labelled = [(a, label) for a, label in labelled if label is not None]
            if not labelled:
                continue
            newest, label = max(
                labelled, key=lambda al: (al[0].get("updated_at") or "", al[0]["id"])
            )
            answers.append(
                Annotation(
                    task_id=int(task["id"]),
                    annotation_id=int(newest["id"]),
                    label=str(label),
                    updated_at=str(newest.get("updated_at") or ""),
                    data=task.get("data") or {},
                )
            )
        return answers

    # -- what a labeller does in the UI (tests, scripted reviews) --------------------------

    def annotate(self, task_id: int, label: str) -> int:
        answer = self._request(
            "POST", f"/api/tasks/{task_id}/annotations", json={"result": choice_result(label)}
        )
        return int(answer["id"])

    def update_annotation(self, annotation_id: int, label: str) -> None:
        self._request(
            "PATCH", f"/api/annotations/{annotation_id}", json={"result": choice_result(label)}
        )
