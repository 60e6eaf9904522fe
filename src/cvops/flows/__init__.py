"""Prefect flows; every flow module exposes `start(config: dict)` as in the reference."""

from cvops.runtime import bootstrap_env

bootstrap_env()
