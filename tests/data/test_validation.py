"""Data validation: every planted problem is found and named, gates obey the config, and a
clean dataset passes without false leakage."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from cvops.config import ValidationGateConfig, parse_config
from cvops.data.demo import generate_demo_dataset
from cvops.data.validation import (
    DataValidationError,
    ValidationResult,
    checks,
    render_html,
    validate_dataset,
    write_html_report,
)

CLASSES = ["circle", "square", "triangle"]


def _noise_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A random image unlike any other (no accidental duplicates)."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(low).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    generate_demo_dataset(out, n_train_per_class=15, n_test_per_class=6, classes=CLASSES)
    return out


@pytest.fixture(scope="module")
def planted(clean: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean dataset plus one of every file-level problem, each under a telling name."""
    root = tmp_path_factory.mktemp("planted") / "ds"
    shutil.copytree(clean, root)
    train, test = root / "train", root / "test"
    # train/test leakage: an exact copy and a resized + recompressed + brightened copy
    shutil.copy(train / "circle/circle_train_00000.jpg", test / "circle/leak_exact.jpg")
    with Image.open(train / "square/square_train_00001.jpg") as im:
        w, h = im.size
        near = ImageEnhance.Brightness(im.resize((w * 3 // 4, h * 3 // 4))).enhance(1.1)
        near.save(test / "square/leak_near.jpg", quality=75)
    # duplicates within a split: exact in train, near (resized) in test
    shutil.copy(train / "triangle/triangle_train_00002.jpg", train / "triangle/dup_copy.jpg")
    with Image.open(test / "circle/circle_test_00001.jpg") as im:
        im.resize((im.width * 4 // 5, im.height * 4 // 5)).save(test / "circle/near_copy.jpg")
    # corrupt files
    data = (train / "circle/circle_train_00003.jpg").read_bytes()
    (train / "circle/truncated.jpg").write_bytes(data[: len(data) // 2])
    (train / "circle/text.png").write_text("this is not an image\n")
    (train / "square/empty.jpg").write_bytes(b"")
    # odd but readable images
    Image.new("RGB", (1, 1), (200, 10, 10)).save(train / "square/tiny.png")
    _noise_image(1).convert("CMYK").save(train / "triangle/cmyk.jpg")
    _noise_image(2).convert("L").save(train / "triangle/grey.png")
    rgba = _noise_image(3).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(train / "circle/rgba.png")
    return root


@pytest.fixture(scope="module")
def planted_result(planted: Path) -> ValidationResult:
    return validate_dataset(planted, classes=CLASSES, gates=ValidationGateConfig(), workers=1)


def _by_path(result: ValidationResult, kind: str) -> dict[str, str]:
    return {i.path: i.message for i in result.issues if i.kind == kind and i.path}


def test_clean_dataset_passes(clean: Path) -> None:
    result = validate_dataset(clean, classes=CLASSES, gates=ValidationGateConfig(), workers=1)
    assert result.gate_failures == []
    assert result.warnings == []
    assert result.issues == []
    assert result.summary["n_train"] == 45 and result.summary["n_test"] == 18
    assert result.summary["leakage_fraction"] == 0.0
    assert result.status == "passed"


def test_every_bad_file_is_reported_by_name(planted_result: ValidationResult) -> None:
    corrupt = _by_path(planted_result, "corrupt")
    assert set(corrupt) == {
        "train/circle/truncated.jpg",
        "train/circle/text.png",
        "train/square/empty.jpg",
    }
    assert "truncated" in corrupt["train/circle/truncated.jpg"]
    assert "cannot identify image file (text)" in corrupt["train/circle/text.png"]
    assert "empty file (0 bytes)" in corrupt["train/square/empty.jpg"]
    modes = _by_path(planted_result, "odd_mode")
    assert "mode CMYK converted" in modes["train/triangle/cmyk.jpg"]
    assert "mode L converted" in modes["train/triangle/grey.png"]
    assert "mode RGBA converted" in modes["train/circle/rgba.png"]
    assert set(modes) == {
        "train/triangle/cmyk.jpg",
        "train/triangle/grey.png",
        "train/circle/rgba.png",
    }
    tiny = _by_path(planted_result, "tiny_image")
    assert (
        set(tiny) == {"train/square/tiny.png"} and "tiny image 1x1" in tiny["train/square/tiny.png"]
    )
    # odd images are still analysed: they count as readable
    assert planted_result.summary["n_train_readable"] == 45 + 1 + 4


def test_duplicates_and_leakage_found(planted_result: ValidationResult) -> None:
    leaks = {i.path: i for i in planted_result.issues if i.kind.startswith("leakage")}
    assert set(leaks) == {"test/circle/leak_exact.jpg", "test/square/leak_near.jpg"}  # no false
    assert leaks["test/circle/leak_exact.jpg"].kind == "leakage_exact"
    assert leaks["test/circle/leak_exact.jpg"].other == "train/circle/circle_train_00000.jpg"
    assert "identical file" in leaks["test/circle/leak_exact.jpg"].message
    assert leaks["test/square/leak_near.jpg"].kind == "leakage_near"
    assert leaks["test/square/leak_near.jpg"].other == "train/square/square_train_00001.jpg"
    exact = {i.path: i.other for i in planted_result.issues_of("exact_duplicate")}
    near = {i.path: i.other for i in planted_result.issues_of("near_duplicate")}
    assert exact == {"train/triangle/triangle_train_00002.jpg": "train/triangle/dup_copy.jpg"} or (
        exact == {"train/triangle/dup_copy.jpg": "train/triangle/triangle_train_00002.jpg"}
    )
    assert near == {"test/circle/near_copy.jpg": "test/circle/circle_test_00001.jpg"} or (
        near == {"test/circle/circle_test_00001.jpg": "test/circle/near_copy.jpg"}
    )
    assert planted_result.summary["leakage_fraction"] == pytest.approx(2 / 21)


def test_default_gates_fail_on_corrupt_and_leakage(planted_result: ValidationResult) -> None:
    assert {g.name for g in planted_result.gate_failures} == {"corrupt", "leakage"}
    assert {g.name for g in planted_result.warnings} == {"duplicates", "odd_mode", "tiny_image"}
    err = DataValidationError.from_result(planted_result, Path("report.html"))
    text = str(err)
    for name in ("truncated.jpg", "text.png", "empty.jpg", "leak_exact.jpg", "leak_near.jpg"):
        assert name in text
    assert "corrupt" in text and "leakage" in text and "report.html" in text
    assert "train.validation" in text
    counts = planted_result.summary
    assert counts["issues.corrupt"] == 3 and counts["issues.odd_mode"] == 3
    assert counts["gate_failures"] == 2 and counts["status"] == "failed"


def test_gates_can_be_relaxed(planted: Path) -> None:
    relaxed = ValidationGateConfig(corrupt="warn", leakage="off", tiny_image="off")
    result = validate_dataset(planted, classes=CLASSES, gates=relaxed, workers=1)
    assert result.gate_failures == []
    assert {g.name for g in result.warnings} == {"corrupt", "duplicates", "odd_mode"}
    assert not result.issues_of("leakage_exact", "leakage_near", "tiny_image")
    # leakage below the threshold only warns
    lenient = ValidationGateConfig(corrupt="off", max_leakage_fraction=0.5)
    result = validate_dataset(planted, classes=CLASSES, gates=lenient, workers=1)
    assert result.gate_failures == []
    assert "leakage" in {g.name for g in result.warnings}


def test_class_problems(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, n_train_per_class=15, n_test_per_class=24, classes=CLASSES)
    for p in sorted((tmp_path / "train/triangle").iterdir())[1:]:
        p.unlink()  # 15 : 15 : 1 in train -> severe imbalance
    shutil.rmtree(tmp_path / "test/triangle")  # class missing from test
    for p in sorted((tmp_path / "test/square").iterdir())[2:]:
        p.unlink()  # test 24 : 2 : 0 vs train 15 : 15 : 1 -> label shift
    result = validate_dataset(tmp_path, classes=CLASSES, gates=ValidationGateConfig(), workers=1)
    assert {g.name for g in result.gate_failures} == {"missing_class", "imbalance"}
    assert "label_shift" in {g.name for g in result.warnings}
    missing = result.issues_of("missing_class")
    assert [(i.split, i.label) for i in missing] == [("test", "triangle")]
    assert "train" in result.issues_of("imbalance")[0].message
    assert result.label_shift["tv"] > 0.3 and result.label_shift["chi2_p"] < 0.01
    assert "class 'triangle' has no readable images in test" in str(
        DataValidationError.from_result(result)
    )
    # configured classes without any folder, and folders outside the configuration
    result = validate_dataset(
        tmp_path, classes=["circle", "square"], gates=ValidationGateConfig(), workers=1
    )
    assert [i.path for i in result.issues_of("extra_class")] == ["train/triangle"]
    assert "extra_class" in {g.name for g in result.warnings}


def test_missing_test_split_is_reported(tmp_path: Path) -> None:
    (tmp_path / "images/train/circle").mkdir(parents=True)  # reference layout, no test/
    _noise_image(7).save(tmp_path / "images/train/circle/a.png")
    (tmp_path / "images/train/square").mkdir()
    result = validate_dataset(tmp_path, classes=["circle", "square"], workers=1)
    assert [(i.split, i.label) for i in result.issues_of("missing_class")] == [
        ("train", "square"),
        ("test", "circle"),
        ("test", "square"),
    ]
    assert {g.name for g in result.gate_failures} == {"missing_class"}
    assert "<svg" in render_html(result)


def test_brightness_shift_is_drift(tmp_path: Path) -> None:
    root = tmp_path / "bright"
    generate_demo_dataset(root, n_train_per_class=15, n_test_per_class=15, classes=CLASSES)
    result = validate_dataset(root, classes=CLASSES, gates=ValidationGateConfig(), workers=1)
    assert result.warnings == []  # same distribution before the shift
    for p in (root / "test").rglob("*.jpg"):
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.int16) + 70
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(p, quality=90)
    result = validate_dataset(root, classes=CLASSES, gates=ValidationGateConfig(), workers=1)
    drifted = {p.name for p in result.properties if p.drifted}
    assert "brightness" in drifted and not {"width", "height", "aspect"} & drifted
    assert result.gate_failures == [] and [g.name for g in result.warnings] == ["property_drift"]
    assert result.examples["drift:brightness:test"]
    strict = ValidationGateConfig(property_drift="fail")
    result = validate_dataset(root, classes=CLASSES, gates=strict, workers=1)
    assert [g.name for g in result.gate_failures] == ["property_drift"]


def test_report_is_self_contained(planted_result: ValidationResult, tmp_path: Path) -> None:
    path = write_html_report(planted_result, tmp_path / "sub" / "report.html")
    html = path.read_text(encoding="utf-8")
    assert html == render_html(planted_result)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "<link" not in html and "@import" not in html
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    for text in (
        "FAILED",
        "Class balance",
        "total variation",
        "Image property distributions",
        "Sharpness",
        "Train/test leakage",
        "Duplicates within a split",
        "Corrupt or unreadable files",
        "truncated.jpg",
        "mode CMYK converted",
        "tiny image 1x1",
        "unreadable<br>no preview",
        "Deepchecks",
    ):
        assert text in html, text
    assert html.count("<svg") == 10
    # every example image of an issue got a thumbnail, except the undecodable ones
    assert "train/square/square_train_00001.jpg" in planted_result.thumbnails
    assert "train/square/tiny.png" in planted_result.thumbnails
    assert "train/circle/text.png" not in planted_result.thumbnails


def test_worker_pool_gives_the_same_findings(
    planted: Path, planted_result: ValidationResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checks, "MIN_FILES_FOR_POOL", 0)
    pooled = validate_dataset(planted, classes=CLASSES, gates=ValidationGateConfig(), workers=2)
    key = [(i.kind, i.path, i.other) for i in planted_result.issues]
    assert [(i.kind, i.path, i.other) for i in pooled.issues] == key
    assert pooled.records.drop(columns=[]).equals(planted_result.records)


def test_hamming_search_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "_HAMMING_BLOCK_ELEMENTS", 500)  # many blocks
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=300, dtype=np.uint64)
    flips = (np.uint64(1) << rng.integers(0, 64, size=(40, 3)).astype(np.uint64)).sum(axis=1)
    hashes[:40] = hashes[40:80] ^ flips.astype(np.uint64)
    found = set()
    for i, j, d in checks.hamming_pairs(np.arange(300), hashes, 4):
        found |= {(int(a), int(b), int(c)) for a, b, c in zip(i, j, d, strict=True)}
    brute = {
        (a, b, bin(int(hashes[a]) ^ int(hashes[b])).count("1"))
        for a in range(300)
        for b in range(300)
        if bin(int(hashes[a]) ^ int(hashes[b])).count("1") <= 4
    }
    assert found == brute and len(brute) > 300


def test_gate_config_defaults_and_strictness() -> None:
    cfg = ValidationGateConfig()
    assert (cfg.corrupt, cfg.leakage, cfg.missing_class, cfg.imbalance) == ("fail",) * 4
    assert (cfg.duplicates, cfg.label_shift, cfg.property_drift) == ("warn",) * 3
    with pytest.raises(ValueError):
        ValidationGateConfig(leakage="maybe")
    with pytest.raises(ValueError):
        ValidationGateConfig(max_leakage_fraction=2)
    with pytest.raises(ValueError):
        ValidationGateConfig(typo_gate="warn")


def test_cli_validate(clean: Path, planted: Path, tmp_path: Path) -> None:
    from cvops.cli import app

    runner = CliRunner()
    out = tmp_path / "clean.html"
    res = runner.invoke(app, ["data", "validate", str(clean), "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "passed" in res.output and str(out.resolve()) in res.output
    bad = tmp_path / "bad.html"
    args = ["data", "validate", str(planted), "--out", str(bad), "--classes", "circle,square"]
    res = runner.invoke(app, [*args, "--classes", "triangle", "--workers", "1"])
    assert res.exit_code == 1 and bad.is_file()
    assert "leak_exact.jpg" in res.output and "truncated.jpg" in res.output
    res = runner.invoke(app, ["data", "validate", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no train/ split found" in " ".join(res.output.split())


@pytest.mark.filterwarnings("ignore:Logger .* attempted to send logs")
def test_train_flow_step_logs_report_and_fails(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from cvops.flows.train_flow import validate_data

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = MlflowClient()
        exp = client.create_experiment("validation-test", artifact_location=str(tmp_path / "art"))
        cfg = parse_config(
            {
                "flow_module": "cvops.flows.train_flow",
                "model": {
                    "model_name": "shapes",
                    "input_size": {"w": 32, "h": 32},
                    "classes": CLASSES,
                    "save_dir": str(tmp_path / "models"),
                },
                "dataset": {"ds_root": str(planted.parent), "ds_name": planted.name},
                "train": {
                    "hparams": {"epochs": 1, "batch_size": 8, "init_lr": 0.001},
                    "mlflow": {"exp_name": "validation-test"},
                },
            }
        )
        run_id = client.create_run(exp).info.run_id
        with pytest.raises(DataValidationError, match="leak_exact.jpg"):
            validate_data.fn(cfg, run_id)
        run = client.get_run(run_id)
        assert run.data.tags["data_validation"] == "failed"
        assert run.data.tags["data_validation.failed_gates"] == "corrupt,leakage"
        assert run.data.metrics["validation.issues.corrupt"] == 3
        assert run.info.status == "FAILED"
        assert [a.path for a in client.list_artifacts(run_id, "validation")] == [
            "validation/shapes_validation_report.html"
        ]
        assert (tmp_path / "models/shapes_validation_report.html").is_file()

        relaxed = cfg.model_copy(deep=True)
        assert relaxed.train is not None
        relaxed.train.validation = ValidationGateConfig(corrupt="warn", leakage="warn")
        run_id = client.create_run(exp).info.run_id
        assert validate_data.fn(relaxed, run_id)["status"] == "passed_with_warnings"
        assert client.get_run(run_id).data.tags["data_validation"] == "passed_with_warnings"
    finally:
        mlflow.set_tracking_uri(None)


def test_never_raises_on_unreadable_paths(tmp_path: Path) -> None:
    from cvops.data.validation.features import analyse_image

    rec = analyse_image(str(tmp_path / "missing.jpg"))
    assert not rec.ok and "cannot read file" in rec.error
    buf = io.BytesIO()
    Image.new("RGB", (20, 20)).save(buf, format="PNG")
    (tmp_path / "bad.png").write_bytes(buf.getvalue()[:-30])
    rec = analyse_image(str(tmp_path / "bad.png"))
    assert not rec.ok and rec.error
