"""How `cvops serve` shares the cores among workers and their TensorFlow threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cvops.cli import app
from cvops.service import server
from cvops.service.server import (
    cgroup_cpu_limit,
    resolve_workers,
    tf_threads_per_worker,
    usable_cores,
)


def test_auto_workers_is_one_per_usable_core() -> None:
    assert resolve_workers("auto") == usable_cores() <= len(os.sched_getaffinity(0))
    assert resolve_workers("3") == 3 and resolve_workers(1) == 1
    with pytest.raises(ValueError):
        resolve_workers(0)


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [
        ("max 100000", None),
        ("200000 100000", 2),
        ("150000 100000", 2),
        ("50000 100000", 1),
        ("", None),
    ],
)
def test_cgroup_quota_is_read_as_whole_cpus(
    tmp_path: Path, cpu_max: str, limit: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max + "\n")
    assert cgroup_cpu_limit(path) == limit
    assert cgroup_cpu_limit(tmp_path / "absent") is None


def test_a_cpu_quota_caps_auto_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod limited to 1 CPU runs one worker, whatever the node's core count."""
    path = tmp_path / "cpu.max"
    path.write_text("100000 100000\n")
    monkeypatch.setattr(server, "CGROUP_CPU_MAX", path)
    assert resolve_workers("auto") == 1
    assert tf_threads_per_worker(1) == 1


def test_tensorflow_threads_share_the_cores_out() -> None:
    cores = usable_cores()
    assert tf_threads_per_worker(1) == cores
    assert tf_threads_per_worker(cores) == 1
    assert tf_threads_per_worker(cores * 4) == 1  # never zero


def test_inter_op_threads_are_two_where_two_cores_exist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cores = usable_cores()
    assert server.inter_op_threads(1) == min(cores, 2)
    assert server.inter_op_threads(cores) == cores
    path = tmp_path / "cpu.max"
    path.write_text("100000 100000\n")  # a 1-CPU pod: one thread, never more than its quota
    monkeypatch.setattr(server, "CGROUP_CPU_MAX", path)
    assert server.inter_op_threads(1) == 1


@pytest.mark.parametrize("workers", ["0", "many", "-2"])
def test_bad_worker_count_is_one_clear_error(workers: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--workers", workers])
    assert result.exit_code != 0
    assert "--workers must be a whole number of at least 1 or auto" in result.output
