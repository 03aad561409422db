"""A run made in the repo finds its local base model from any folder; local names never go to a hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from trainer.cli import main
from trainer.config import load_config
from trainer.loop import train

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_generate_and_evaluate_a_run_from_another_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    config = load_config(
        "configs/tiny.yaml",
        [
            f"run.output_dir={tmp_path / 'runs'}",
            "run.name=toy",
            "run.num_epochs=1",
            "run.quiet=true",
            "model.pretrained=models/toy-editor",  # relative to the repo, as in configs/demo.yaml
            "model.resolution=32",
            "model.use_lora=true",
            "model.lora_rank=2",
            "model.lora_alpha=2",
            "sample.num_steps=3",
            "sample.batch_size=2",
            "sample.nb_gen=2",
            "train.batch_size=4",
        ],
    )
    run_dir = train(config)
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["pretrained"]
    assert Path(recorded).is_absolute() and Path(recorded) == (REPO / "models/toy-editor").resolve()

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "images").mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(elsewhere / "images" / "a.png")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub look-up would fail at once
    args = ["--checkpoint", str(run_dir), "--images", "images", "--instruction", "make it red"]
    assert main(["generate", *args, "--out", "out", "--set", "sample.num_steps=2"]) == 0
    assert (elsewhere / "out" / "a.png").is_file()
    code = main(
        ["evaluate", "--model", str(run_dir), "--num-items", "2", "--out", "eval/eval.json", "--quiet"]
        + ["--set", "sample.num_steps=2"]
    )
    assert code == 0, capsys.readouterr().err
    assert (elsewhere / "eval" / "eval.json").is_file()


def test_generate_accepts_a_base_model(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(tmp_path / "images" / "a.png")
    args = [
        "--images",
        str(tmp_path / "images"),
        "--instruction",
        "make it red",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(["generate", "--checkpoint", "models/toy-editor", *args, "--set", "sample.num_steps=2"]) == 0
    assert (tmp_path / "o" / "a.png").is_file()


def test_a_missing_local_model_folder_fails_at_once_with_one_line(tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "model"
    code = main(
        ["train", "--config", str(REPO / "configs/tiny.yaml"), "--no-ray"]
        + ["--set", f"model.pretrained={missing}", "--set", f"run.output_dir={tmp_path}"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "model folder not found" in err[0] and str(missing) in err[0]
