"""`label push` and `label pull` from a flow config, with the machine's settings: what the CLI
and the monitor flow (`labelling.push_on_drift`) call."""

from __future__ import annotations

import logging
from typing import Any

from cvops.config import FlowConfig, LabellingConfig
from cvops.labelling.client import LabelStudio
from cvops.labelling.loop import PullResult, PushResult, pull, push
from cvops.labelling.settings import LabelStudioSettings

log = logging.getLogger(__name__)


def load_model_metadata(metadata_file: str) -> tuple[Any, Any]:
    """(central storage, the model's metadata), from a folder or object storage."""
    from cvops.settings import get_settings
    from cvops.storage import open_storage

    store = open_storage(get_settings())
    return store, store.load_metadata(metadata_file)


def _engine() -> Any:
    from cvops.records.schema import make_engine
    from cvops.service.settings import ServiceSettings

    return make_engine(ServiceSettings().resolved_db_url)


def run_push(cfg: FlowConfig, labelling: LabellingConfig) -> tuple[Any, PushResult]:
    """Push for the model the config names; (its metadata, the result). ValueError when Label
    Studio is not configured, LabelStudioError when it refuses."""
    from cvops.flows.eval_flow import metadata_file_name
    from cvops.monitor.check import load_reference

    url, token = LabelStudioSettings().require()
    storage, meta = load_model_metadata(metadata_file_name(cfg))
    reference = load_reference(storage, meta) if labelling.strategy == "drift_weighted" else None
    engine = _engine()
    try:
        with LabelStudio(url, token) as studio:
            return meta, push(engine, studio, meta, labelling, reference=reference, storage=storage)
    finally:
        engine.dispose()


def run_pull(cfg: FlowConfig, labelling: LabellingConfig) -> PullResult:
    from cvops.settings import get_settings
    from cvops.storage import open_storage

    url, token = LabelStudioSettings().require()
    storage = open_storage(get_settings())  # where the service kept images, if it used it
    engine = _engine()
    try:
        with LabelStudio(url, token) as studio:
            return pull(engine, studio, cfg, labelling, storage)
    finally:
        engine.dispose()


def push_on_drift(config: dict[str, Any]) -> str:
    """The monitor's action on drift when `labelling.push_on_drift` is set: send the window's
    most informative images to Label Studio (retraining follows `cvops label pull
    --retrain`, once they are labelled). Never raises: the monitor run must still finish."""
    from cvops.config import parse_config

    try:
        cfg = parse_config(config, check_flow_module=False)
        meta, result = run_push(cfg, cfg.labelling or LabellingConfig())
    except Exception as err:  # noqa: BLE001 - reported in the run's actions and the log
        log.error("Label push on drift failed: %s", err)
        return f"label push failed: {err}"
    log.warning("Drift: %s", result.describe())
    return f"label push: {result.describe()}"
