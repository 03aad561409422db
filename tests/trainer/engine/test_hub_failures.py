"""A model the hub cannot serve fails in one line within 10 s, before anything starts: the model, the
reason, and how to point at a local folder. The hub is unreachable here and on CI (then the failure
measured is the real one); a reachable hub answers 404 for the made-up id, also one line."""

from __future__ import annotations

import time
from pathlib import Path

from trainer.cli import main

REPO = Path(__file__).resolve().parents[3]


def _train(capsys, *sets: str) -> tuple[int, list[str], float]:
    start = time.monotonic()
    code = main(
        ["train", "--config", str(REPO / "configs/tiny.yaml"), *[a for s in sets for a in ("--set", s)]]
    )
    return code, capsys.readouterr().err.strip().splitlines(), time.monotonic() - start


def test_a_hub_id_that_cannot_be_served_fails_in_one_line_within_10_s(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    code, err, took = _train(
        capsys, "model.pretrained=spie-tests/no-such-editor", f"run.output_dir={tmp_path}"
    )
    assert code == 2 and len(err) == 1, err
    assert "spie-tests/no-such-editor" in err[0] and "the hub cannot serve it" in err[0]
    assert "--local-dir DIR" in err[0] and "model.pretrained to DIR" in err[0]
    assert took < 10, took


def test_hf_hub_offline_is_honoured_without_any_lookup(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    code = main(["train", "--config", str(REPO / "configs/spie-a100.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "timbrooks/instruct-pix2pix" in err[0] and "HF_HUB_OFFLINE is set" in err[0]
    assert time.monotonic() - start < 10


def test_a_mistyped_relative_folder_is_named_before_any_hub_lookup(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    code, err, took = _train(capsys, "model.pretrained=models/toy-editr", f"run.output_dir={tmp_path}")
    assert code == 2 and len(err) == 1, err
    assert "model folder not found: models/toy-editr" in err[0] and str(REPO) in err[0]
    assert "not looked up on the hub" in err[0]
