"""How `cvops serve` shares the cores among workers and their TensorFlow threads."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from cvops.cli import app
from cvops.service.server import resolve_workers, tf_threads_per_worker


def test_auto_workers_is_one_per_usable_core() -> None:
    assert resolve_workers("auto") == len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3 and resolve_workers(1) == 1
    with pytest.raises(ValueError):
        resolve_workers(0)


def test_tensorflow_threads_share_the_cores_out() -> None:
    cores = len(os.sched_getaffinity(0))
    assert tf_threads_per_worker(1) == cores
    assert tf_threads_per_worker(cores) == 1
    assert tf_threads_per_worker(cores * 4) == 1  # never zero


@pytest.mark.parametrize("workers", ["0", "many", "-2"])
def test_bad_worker_count_is_one_clear_error(workers: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--workers", workers])
    assert result.exit_code != 0
    assert "--workers must be a whole number of at least 1 or auto" in result.output
