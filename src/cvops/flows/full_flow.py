"""Full flow: train -> evaluate -> deploy (when the config has a deploy section)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow

from cvops.flows.common import as_config
from cvops.flows.deploy_flow import deploy_flow
from cvops.flows.eval_flow import eval_flow
from cvops.flows.train_flow import train_flow

log = logging.getLogger(__name__)

DEPLOY_NOT_CONFIGURED = "deployment is not configured (no deploy section in the config)"


@flow(name="full_flow", log_prints=True)
def full_flow(config: dict[str, Any]) -> dict[str, Any]:
    cfg = as_config(config, "model", "dataset", "train", "evaluate")
    results = dict(train_flow(config))
    results.update(eval_flow(config))
    if cfg.deploy is None:
        log.warning("Full flow: %s", DEPLOY_NOT_CONFIGURED)
        results["deploy"] = DEPLOY_NOT_CONFIGURED
    else:
        results.update(deploy_flow(config))
    return results


def start(config: dict[str, Any]) -> dict[str, Any]:
    """Reference entry point: run data -> train -> evaluate -> package for a config dict."""
    as_config(config, "model", "dataset", "train", "evaluate")
    return full_flow(config)
