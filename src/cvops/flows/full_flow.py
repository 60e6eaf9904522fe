"""Full flow: train -> evaluate -> (deploy, once the deploy flow exists)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from cvops.flows.common import as_config
from cvops.flows.eval_flow import eval_flow
from cvops.flows.train_flow import train_flow

log = logging.getLogger(__name__)

DEPLOY_NOT_CONFIGURED = (
    "deployment is not configured: the deploy flow (model service + monitoring) is not "
    "part of this release; the packaged model is in central storage"
)


@flow(name="full_flow", log_prints=True)
def full_flow(config: dict[str, Any]) -> dict[str, Any]:
    as_config(config, "model", "dataset", "train", "evaluate")
    results = dict(train_flow(config))
    results.update(eval_flow(config))
    log.warning("Full flow: %s", DEPLOY_NOT_CONFIGURED)
    results["deploy"] = DEPLOY_NOT_CONFIGURED
    return results


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: run data -> train -> evaluate -> package for a config dict."""
    as_config(config, "model", "dataset", "train", "evaluate")
    return full_flow(config)
