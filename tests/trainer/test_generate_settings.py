"""`spie generate` with a base model samples at the settings recorded with it, and says when it
resizes an image or changes its aspect ratio."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from trainer.cli import main

REPO = Path(__file__).resolve().parents[2]


def test_a_base_model_uses_its_recorded_settings_and_resizing_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    images = tmp_path / "in"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (128, 96), (200, 60 * i, 30)).save(images / f"{i}.png")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(images / "square.png")
    args = ["--images", str(images), "--instruction", "make it red", "--out", str(tmp_path / "o"), "--quiet"]
    assert main(["generate", "--checkpoint", "models/toy-editor", *args, "--set", "sample.num_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "recorded settings (sft_config.yaml): 32 px, 2 steps" in out
    assert "2 of 3 images resized from 128 x 96 to 32 x 32 px (the aspect ratio changes)" in out
    assert Image.open(tmp_path / "o" / "0.png").size == (32, 32)
