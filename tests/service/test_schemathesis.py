"""Schemathesis fuzzing: requests generated from the app's own OpenAPI schema, valid and
invalid, get no server error and only answers the schema documents.

The app runs in-process through schemathesis' ASGI transport with its lifespan, so a model is
loaded and the batcher, recorder and reload watcher run as they do in a worker. Every request
carries the admin bearer token (negative generation also drops it, which exercises the 401).

Generation is derandomized, so both tests would send the very same requests: they share one
fuzz run (a module fixture) in which every answer goes through both tests' checks, each test
asserting on its own checks' failures. Same requests, same checks, half the time.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from cvops.service.app import create_app
from cvops.service.recording import Recorder
from cvops.service.settings import ServiceSettings
from tests.service.conftest import image_bytes

# A feedback for an unknown prediction id (every generated one) is rechecked for 1 s before its
# 404, in case the prediction's record is still on its way to the spool: ~300 s of sleep in a
# run. No request here sends feedback for a prediction just made, so a short settle gives the
# same answers through the same code.
FEEDBACK_SETTLE_S = 0.05
# Per operation and generation mode. The parameterless GETs have a single possible request;
# POST /predict and PUT /update_model make up the count.
MAX_EXAMPLES = 140
MIN_REQUESTS = 500
AUTH = {"Authorization": "Bearer s3cret"}  # the `settings` fixture's admin token
PREDICT, UPDATE = "POST /predict", "PUT /update_model/{metadata_file}"
# What a schema cannot say: whether the bytes of a non-empty `file` are a usable image.
IMAGE_CONTENT_REJECTIONS = {413, 415, 422}


def schema_valid_requests_accepted(ctx: Any, response: Any, case: Any) -> bool | None:
    """Schemathesis' ST202 (a request the schema calls valid is rejected), except the one
    rejection no schema can express: a non-empty upload that is not a usable image. An empty
    file, a name that is not `<name>.yaml` or a label outside the model's classes are in the
    schema, so the generator never sends them as valid data and they cannot excuse a 4xx."""
    if (
        case.operation.label == PREDICT
        and response.status_code in IMAGE_CONTENT_REJECTIONS
        and "empty" not in response.json()["detail"]
    ):
        return None
    return positive_data_acceptance(ctx, response, case)


@dataclass
class FuzzRun:
    """Requests sent, statuses seen and, per group of checks, every distinct failed check
    (with a curl repro)."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[str, dict[tuple[str, str], str]] = field(default_factory=dict)

    def send(self, case: Any, checks: Mapping[str, list[Callable[..., Any]]]) -> Any:
        response = case.call(headers=AUTH)
        self.sent[case.operation.label] += 1
        self.statuses[(case.operation.label, response.status_code)] += 1
        for group, group_checks in checks.items():
            failures = self.failures.setdefault(group, {})
            try:
                case.validate_response(response, checks=group_checks, headers=AUTH)
            except BaseExceptionGroup as err:  # schemathesis' FailureGroup: report at the end
                text = str(err)
                kind = next((ln for ln in text.splitlines() if ln.startswith("- ")), text[:80])
                key = (case.operation.label, f"{kind} [{response.status_code}]")
                failures.setdefault(key, text[:2500])
        return response

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def summary(self) -> str:
        return f"{self.total} requests: {dict(self.sent)}; statuses: {dict(self.statuses)}"

    def failed(self, group: str) -> str:
        """The group's failures as a report; empty when every check passed."""
        found = self.failures.get(group)
        if not found:
            return ""
        return self.summary() + "\n\n" + "\n\n".join(found.values())


# The two tests' checks: every generated answer goes through both groups.
CHECKS = {
    "no_server_error": [not_a_server_error, status_code_conformance, content_type_conformance],
    "documented": [response_schema_conformance, schema_valid_requests_accepted],
}


def fuzz(app: FastAPI, checks: Mapping[str, list[Callable[..., Any]]]) -> FuzzRun:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    run = FuzzRun()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {PREDICT, UPDATE}

    def generated(case: Any) -> None:
        run.send(case, checks)

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            test = settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )(given(case=operation.as_strategy(generation_mode=mode))(generated))
            try:
                test()
            except Unsatisfiable:
                if mode is GenerationMode.POSITIVE:  # a parameterless GET has no invalid input
                    raise

    # Random bytes are never an image and random names never a model: also send the success
    # paths, so that their answers are checked against the schema too.
    predict, update = schema["/predict"]["POST"], schema["/update_model/{metadata_file}"]["PUT"]
    image = {"file": image_bytes("PNG", seed=5)}
    for name in ("shapes_b.yaml", "shapes_a.yaml"):
        response = run.send(update.Case(path_parameters={"metadata_file": name}), checks)
        assert response.status_code == 200, response.text
        response = run.send(predict.Case(body=image, media_type="multipart/form-data"), checks)
        assert response.status_code == 200, response.text
    return run


@pytest.fixture(scope="module")
def fuzzed(storage_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzRun]:
    """One fuzz run of the app (as the `settings` fixture configures it) through both groups
    of checks."""
    settings_ = ServiceSettings(
        central_storage_path=storage_root,
        state_dir=tmp_path_factory.mktemp("schemathesis") / "state",
        metadata_file="shapes_a.yaml",
        admin_token="s3cret",
        batch_max_wait_ms=2,
    )
    short_settle = functools.partialmethod(Recorder.prediction_known, settle_s=FEEDBACK_SETTLE_S)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Recorder, "prediction_known", short_settle)
            run = fuzz(create_app(settings_), CHECKS)
        yield run
    finally:
        # schemathesis starts the app's lifespan on first use and keeps it for the process.
        schemathesis_asgi.shutdown_lifespans()


def test_generated_requests_get_no_server_error(fuzzed: FuzzRun) -> None:
    run = fuzzed
    assert not run.failed("no_server_error"), run.failed("no_server_error")
    assert run.total >= MIN_REQUESTS, run.summary()
    assert run.sent[PREDICT] >= 100 and run.sent[UPDATE] >= 100, run.summary()
    assert run.statuses[(UPDATE, 401)] > 0  # negative cases without the token were refused


def test_generated_requests_get_documented_responses(fuzzed: FuzzRun) -> None:
    run = fuzzed
    assert not run.failed("documented"), run.failed("documented")
    assert run.total >= MIN_REQUESTS, run.summary()
