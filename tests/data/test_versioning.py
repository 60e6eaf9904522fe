"""Dataset versioning with git + DVC: real git/DVC on tiny image datasets, no prompts.

A two-version dataset repo is built once per module (DVC calls cost ~1.2 s each) and copied
into every test, nested inside a fresh "project" git repo like ``<project>/datasets/<name>``.
"""

from __future__ import annotations

import builtins
import io
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cvops.data.versioning import (
    DataVersion,
    DataVersionError,
    _dvc_hash,
    commit_version,
    current_version,
    ensure_version,
    init_dataset_repo,
    list_tags,
)

pytestmark = pytest.mark.timeout(180)

CLASSES = ("cat", "dog")
Snapshot = dict[str, bytes]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    ).stdout.strip()


def _write_image(path: Path, color: tuple[int, int, int], fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path, format=fmt)


def _write_annotations(ds: Path) -> None:
    rows = ["path,class,split"]
    for p in sorted((ds / "images").rglob("*")):
        if p.is_file():
            rel = p.relative_to(ds)
            rows.append(f"{rel.as_posix()},{rel.parts[2]},{rel.parts[1]}")
    (ds / "annotation_df.csv").write_text("\n".join(rows) + "\n")


def _snapshot(ds: Path) -> Snapshot:
    """Every image and the annotation CSV, by relative path."""
    files = {
        p.relative_to(ds).as_posix(): p.read_bytes()
        for p in (ds / "images").rglob("*")
        if p.is_file()
    }
    files["annotation_df.csv"] = (ds / "annotation_df.csv").read_bytes()
    return files


def _make_project(root: Path) -> Path:
    """An enclosing project git repo that ignores its datasets/ folder, like the real one."""
    root.mkdir(parents=True)
    _git(root, "init", "--quiet")
    (root / ".gitignore").write_text("/datasets/\n")
    return root


class Template:
    def __init__(self, root: Path, snapshots: dict[str, Snapshot], hashes: dict[str, str]):
        self.root = root  # holds project/ (with datasets/ds) and remote/
        self.snapshots = snapshots
        self.hashes = hashes


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    root = tmp_path_factory.mktemp("template")
    project = _make_project(root / "project")
    ds = project / "datasets" / "ds"
    for split, n in (("train", 3), ("test", 1)):
        for c, cls in enumerate(CLASSES):
            for i in range(n):
                _write_image(ds / "images" / split / cls / f"{i}.png", (40 * i, 100 * c, 7))
    _write_annotations(ds)

    init_dataset_repo(ds, root / "remote")
    v1 = commit_version(ds, "v1.0.0", "first version")
    snapshots = {"v1.0.0": _snapshot(ds)}

    _write_image(ds / "images" / "train" / "cat" / "new.jpg", (1, 2, 3), fmt="JPEG")
    _write_image(ds / "images" / "test" / "dog" / "new.png", (9, 9, 9))
    _write_image(ds / "images" / "train" / "dog" / "0.png", (255, 0, 255))  # changed
    (ds / "images" / "train" / "cat" / "2.png").unlink()  # removed
    _write_annotations(ds)
    v2 = commit_version(ds, "v2.0.0")
    snapshots["v2.0.0"] = _snapshot(ds)
    return Template(root, snapshots, {"v1.0.0": v1.dvc_hash, "v2.0.0": v2.dvc_hash})


@pytest.fixture
def ds(template: Template, tmp_path: Path) -> Path:
    """A private copy of the dataset repo (at v2.0.0) with its own copy of the remote.

    The copy's remote url goes to the git-ignored ``.dvc/config.local`` so the repo stays clean.
    """
    shutil.copytree(template.root, tmp_path, dirs_exist_ok=True, symlinks=True)
    repo = tmp_path / "project" / "datasets" / "ds"
    from dvc.config import Config

    with Config(dvc_dir=str(repo / ".dvc")).edit("local") as conf:
        conf["remote"]["central"] = {"url": str(tmp_path / "remote")}
    return repo


def _assert_at(repo: Path, template: Template, tag: str, version: DataVersion) -> None:
    assert version.tag == tag
    assert version.dvc_hash == template.hashes[tag]
    assert version.dirty is False
    assert version.git_rev == _git(repo, "rev-parse", f"{tag}^{{commit}}")
    assert _snapshot(repo) == template.snapshots[tag]


def test_versions_and_tags(ds: Path, template: Template) -> None:
    assert list_tags(ds) == ["v1.0.0", "v2.0.0"]
    v = current_version(ds)
    _assert_at(ds, template, "v2.0.0", v)
    assert v.dvc_hash.endswith(".dir")
    assert template.hashes["v1.0.0"] != template.hashes["v2.0.0"]
    assert len(template.snapshots["v1.0.0"]) == 8 + 1
    assert len(template.snapshots["v2.0.0"]) == 9 + 1
    assert v.as_dict() == {
        "tag": "v2.0.0",
        "git_rev": v.git_rev,
        "dvc_hash": v.dvc_hash,
        "dirty": False,
    }
    # Only images.dvc, .gitignore, the CSV and DVC's own files are in git; the data is not.
    files = set(_git(ds, "ls-files").split())
    assert {"images.dvc", ".gitignore", "annotation_df.csv", ".dvc/config"} <= files
    assert not any(f.startswith("images/") for f in files)


def test_ensure_version_round_trip(ds: Path, template: Template) -> None:
    _assert_at(ds, template, "v1.0.0", ensure_version(ds, "v1.0.0"))
    _assert_at(ds, template, "v2.0.0", ensure_version(ds, "v2.0.0"))
    # No-op when already there and clean.
    _assert_at(ds, template, "v2.0.0", ensure_version(ds, "v2.0.0"))


def test_checkout_discards_local_changes(ds: Path, template: Template) -> None:
    (ds / "images" / "train" / "cat" / "0.png").write_bytes(b"edited")
    _write_image(ds / "images" / "test" / "cat" / "extra.png", (5, 5, 5))
    (ds / "notes.txt").write_text("untracked\n")
    assert current_version(ds).dirty is True
    _assert_at(ds, template, "v2.0.0", ensure_version(ds, "v2.0.0"))
    assert not (ds / "notes.txt").exists()


def test_checkout_false_keeps_local_edits(
    ds: Path, template: Template, caplog: pytest.LogCaptureFixture
) -> None:
    edited = ds / "images" / "train" / "cat" / "0.png"
    edited.write_bytes(b"edited")
    caplog.set_level(logging.WARNING, logger="cvops.data.versioning")

    v = ensure_version(ds, "v1.0.0", checkout=False)
    assert (v.tag, v.dirty, v.dvc_hash) == ("v2.0.0", True, template.hashes["v2.0.0"])
    assert edited.read_bytes() == b"edited"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "v1.0.0" in warnings[0].getMessage()

    caplog.clear()
    v = ensure_version(ds, "v2.0.0", checkout=False)
    assert (v.tag, v.dirty) == ("v2.0.0", True)
    assert edited.read_bytes() == b"edited"
    assert any("local changes" in r.getMessage() for r in caplog.records)


def test_checkout_pulls_when_cache_is_gone(
    ds: Path, template: Template, caplog: pytest.LogCaptureFixture
) -> None:
    shutil.rmtree(ds / ".dvc" / "cache")
    caplog.set_level(logging.INFO, logger="cvops.data.versioning")
    _assert_at(ds, template, "v1.0.0", ensure_version(ds, "v1.0.0"))
    assert any("pulling from the remote" in r.getMessage() for r in caplog.records)


def test_missing_everywhere_raises(ds: Path) -> None:
    shutil.rmtree(ds / ".dvc" / "cache")
    shutil.rmtree(ds.parents[2] / "remote")
    (ds.parents[2] / "remote").mkdir()
    with pytest.raises(DataVersionError, match="neither in the local DVC cache nor in the remote"):
        ensure_version(ds, "v1.0.0")


def test_unknown_tag_lists_available(ds: Path) -> None:
    with pytest.raises(DataVersionError, match=r"'v9\.9\.9' not found.*v1\.0\.0, v2\.0\.0"):
        ensure_version(ds, "v9.9.9")


def test_never_reads_stdin(
    ds: Path,
    template: Template,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def no_input(*_: object) -> str:
        raise AssertionError("input() called")

    class NoStdin(io.StringIO):
        def read(self, *_: object) -> str:
            raise AssertionError("stdin read")

        readline = read

    monkeypatch.setattr(builtins, "input", no_input)
    monkeypatch.setattr(sys, "stdin", NoStdin())
    (ds / "images" / "train" / "dog" / "1.png").write_bytes(b"local edit")
    caplog.set_level(logging.INFO, logger="cvops.data.versioning")
    _assert_at(ds, template, "v1.0.0", ensure_version(ds, "v1.0.0"))
    messages = [r.getMessage() for r in caplog.records]
    assert any("discarding local changes" in m and "images" in m for m in messages)
    assert any("checked out v1.0.0" in m and "was v2.0.0" in m for m in messages)


def test_nested_repo_leaves_parent_alone(ds: Path, template: Template) -> None:
    project = ds.parents[1]
    assert _git(ds, "rev-parse", "--show-toplevel") == str(ds.resolve())

    ensure_version(ds, "v1.0.0")
    _write_image(ds / "images" / "test" / "cat" / "v3.png", (3, 3, 3))
    v3 = commit_version(ds, "v3.0.0")  # from a detached HEAD: reachable through its tag
    assert (v3.tag, v3.dirty) == ("v3.0.0", False)
    assert v3.dvc_hash not in template.hashes.values()
    assert list_tags(ds) == ["v1.0.0", "v2.0.0", "v3.0.0"]

    # The enclosing project repo saw nothing: no commits, no tags, only its own .gitignore.
    assert _git(project, "tag", "--list") == ""
    assert _git(project, "status", "--porcelain") == "?? .gitignore"


def test_init_is_idempotent_but_keeps_its_remote(ds: Path, tmp_path: Path) -> None:
    init_dataset_repo(ds, tmp_path / "remote")  # same remote: fine
    with pytest.raises(DataVersionError, match="already uses DVC remote"):
        init_dataset_repo(ds, tmp_path / "elsewhere")


def test_errors_are_clear(ds: Path, tmp_path: Path) -> None:
    with pytest.raises(DataVersionError, match="already exists"):
        commit_version(ds, "v1.0.0")
    with pytest.raises(DataVersionError, match="not a dataset repository"):
        current_version(tmp_path / "nowhere")
    plain = tmp_path / "plain"
    (plain / "images").mkdir(parents=True)
    with pytest.raises(DataVersionError, match="not a dataset repository"):
        ensure_version(plain, "v1.0.0")


def test_combined_hash_for_several_dvc_files(tmp_path: Path) -> None:
    _git(tmp_path, "init", "--quiet")
    out = "outs:\n- md5: {}\n  path: {}\n"
    (tmp_path / "images.dvc").write_text(out.format("a" * 32 + ".dir", "images"))
    assert _dvc_hash(tmp_path) == "a" * 32 + ".dir"
    (tmp_path / "masks.dvc").write_text(out.format("b" * 32 + ".dir", "masks"))
    combined = _dvc_hash(tmp_path)
    assert len(combined) == 32 and combined not in {"a" * 32, "b" * 32}
    (tmp_path / "masks.dvc").write_text(out.format("c" * 32 + ".dir", "masks"))
    assert _dvc_hash(tmp_path) != combined
