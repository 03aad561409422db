"""User mistakes give one clear line naming the file or field, a non-zero exit and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from trainer.cli import main


def _run(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_config_value(capsys):
    err = _run(capsys, "train", "--config", "configs/tiny.yaml", "--set", "train.learning_rate=-1")
    assert "train.learning_rate must be > 0" in err


def test_missing_config_file(capsys):
    assert "config file not found: nope.yaml" in _run(capsys, "train", "--config", "nope.yaml")


def test_missing_image_folder(capsys, tmp_path):
    err = _run(
        capsys,
        "train",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "data.source=folder",
        "--set",
        f"data.path={tmp_path / 'missing'}",
        "--set",
        f"run.output_dir={tmp_path}",
    )
    assert "image folder not found" in err and "missing" in err


def test_unreadable_image(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    err = _run(
        capsys,
        "train",
        "--config",
        "configs/tiny.yaml",
        "--set",
        "data.source=folder",
        "--set",
        f"data.path={tmp_path}",
        "--set",
        f"run.output_dir={tmp_path / 'runs'}",
    )
    assert "cannot read image" in err and "broken.png" in err


def test_empty_instruction(capsys, tmp_path):
    err = _run(capsys, "train", "--config", "configs/tiny.yaml", "--set", "data.instructions=['  ']")
    assert "data.instructions: an instruction is empty" in err
    err = _run(
        capsys,
        "generate",
        "--checkpoint",
        str(tmp_path),
        "--images",
        str(tmp_path),
        "--instruction",
        " ",
        "--out",
        str(tmp_path / "o"),
    )
    assert "--instruction is empty" in err


def test_missing_checkpoint(capsys, tmp_path):
    err = _run(
        capsys,
        "generate",
        "--checkpoint",
        str(tmp_path / "no-run"),
        "--images",
        str(tmp_path),
        "--instruction",
        "x",
        "--out",
        str(tmp_path / "o"),
    )
    assert "not found (expected a run or checkpoint folder" in err
    err = _run(capsys, "train", "--resume", str(tmp_path))
    assert "not a run folder" in err


@pytest.mark.slow
def test_console_script_exit_code_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "train",
            "--config",
            "configs/tiny.yaml",
            "--set",
            "model.scheduler=pndm",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "model.scheduler: 'pndm' is not one of" in proc.stderr
