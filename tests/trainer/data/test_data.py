"""Data loaders: synthetic edits, JSONL with targets/masks/exemplars/metadata, SPIE's layout,
InstructPix2Pix triplets, and bad input (one line naming the file and line; `skip_bad` keeps the rest)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.config import DataConfig
from trainer.data.inputs import SPIE_TEMPLATES, load_inputs
from trainer.errors import UserError

R = 32


def png(path, value=(200, 40, 40), size=24):
    """Write a flat-colour image (any size: loaders resize to R) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)
    return path


def mask_png(path):
    m = np.zeros((R, R), np.uint8)
    m[8:20, 8:20] = 255
    Image.fromarray(m).save(path)
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def load(source, path, **kw):
    return load_inputs(DataConfig(source=source, path=str(path), **kw), R, seed=0)


def one_line_error(fn) -> str:
    with pytest.raises(UserError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_synthetic_source_has_targets_masks_and_metadata():
    config = DataConfig(source="synthetic", num_items=8, kinds=("recolor", "brighten"))
    inputs = load_inputs(config, R, seed=1)
    assert inputs.sources.shape == inputs.targets.shape == (8, 3, R, R)
    assert inputs.masks.shape == (8, R, R) and inputs.masks.dtype == torch.bool
    assert [m["kind"] for m in inputs.metadata] == ["recolor", "brighten"] * 4
    assert inputs.metadata[0]["id"] == "train-1-0"
    # data.seed overrides run.seed; the held-out split gives other scenes.
    fixed = load_inputs(DataConfig(source="synthetic", num_items=8, seed=1), R, seed=99)
    assert fixed.metadata[0]["id"] == "train-1-0"
    held = load_inputs(DataConfig(source="synthetic", num_items=8, split="heldout"), R, seed=1)
    assert held.metadata[0]["split"] == "heldout" and not torch.equal(held.sources, inputs.sources)
    # take() carries every field.
    sub = inputs.take(torch.tensor([3, 1]))
    assert sub.metadata == [inputs.metadata[3], inputs.metadata[1]]
    assert torch.equal(sub.targets, inputs.targets[[3, 1]]) and torch.equal(sub.masks, inputs.masks[[3, 1]])


def test_jsonl_with_targets_masks_exemplars_and_metadata(tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "a_t.png", (10, 200, 10)), mask_png(tmp_path / "m.png")
    png(tmp_path / "e1.png", (0, 0, 255)), png(tmp_path / "e2.png", (255, 255, 0))
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "image": "a.png",
                "instruction": "make it green",
                "target": "a_t.png",
                "mask": "m.png",
                "exemplars": ["e1.png", "e2.png"],
                "metadata": {"kind": "recolor", "target_rgb": [10, 200, 10]},
            },
            "",
            # HF InstructPix2Pix column names, and the single `exemplar` key.
            {
                "input_image": "a.png",
                "edit_prompt": "make it green",
                "edited_image": "a_t.png",
                "mask": "m.png",
                "exemplar": "e2.png",
            },
        ],
    )
    inputs = load("jsonl", path)
    assert inputs.instructions == ["make it green"] * 2
    assert inputs.targets.shape == (2, 3, R, R) and inputs.targets[0, 1].mean() > 0.7
    assert inputs.masks[0, 10, 10] and not inputs.masks[0, 0, 0]
    assert inputs.exemplars.shape == (2, 3, R, R) and inputs.exemplars[0, 2].mean() > 0.9  # e1 (blue)
    assert [s.shape[0] for s in inputs.exemplar_sets] == [2, 1]
    assert inputs.metadata == [{"kind": "recolor", "target_rgb": [10, 200, 10]}, {}]
    # As "triplets", a JSONL record must name its edited image.
    write_jsonl(path, [{"image": "a.png", "instruction": "x"}])
    assert "no edited image for a.png" in one_line_error(lambda: load("triplets", path))


def test_spie_layout(tmp_path):
    for i in range(3):
        png(tmp_path / "inputs" / f"cat{i}.jpg", (40 * i, 80, 80))
    for i in range(2):
        png(tmp_path / "exemplars" / f"glass{i}.png", (0, 0, 100 + 100 * i))
    config = DataConfig(source="spie", path=str(tmp_path), input_name="cat", style_name="glass", seed=0)
    inputs = load_inputs(config, R)
    templates = {t.format("cat", "glass") for t in SPIE_TEMPLATES}
    assert len(inputs) == 3 and set(inputs.instructions) <= templates
    assert inputs.exemplars.shape == (3, 3, R, R) and inputs.masks is None
    assert all(s.shape == (2, 3, R, R) for s in inputs.exemplar_sets)
    for ex in inputs.exemplars:  # each input's exemplar is one of the pool
        assert any(torch.equal(ex, p) for p in inputs.exemplar_sets[0])
    assert load_inputs(config, R).instructions == inputs.instructions  # seeded
    # Inputs directly in `path`, exemplars elsewhere, masks by stem, instructions cycled.
    for i in range(2):
        png(tmp_path / "flat" / f"x{i}.png")
        (tmp_path / "flat" / "masks").mkdir(exist_ok=True)
        mask_png(tmp_path / "flat" / "masks" / f"x{i}.png")
    config = DataConfig(
        source="spie",
        path=str(tmp_path / "flat"),
        exemplar_path=str(tmp_path / "exemplars"),
        instructions=("a", "b"),
    )
    flat = load_inputs(config, R)
    assert flat.instructions == ["a", "b"] and flat.masks.shape == (2, R, R)
    empty = DataConfig(source="spie", path=str(tmp_path / "inputs"), exemplar_path=str(tmp_path / "nothing"))
    assert "exemplar folder not found" in one_line_error(lambda: load_inputs(empty, R))


def test_instructpix2pix_folder(tmp_path):
    for name, seeds in (("0001", ["11", "12"]), ("0002", ["7"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prompt.json").write_text(json.dumps({"input": "a", "edit": f"edit {name}"}))
        for s in seeds:
            (
                png(tmp_path / name / f"{s}_0.jpg", (100, 100, 100)),
                png(tmp_path / name / f"{s}_1.jpg", (250, 0, 0)),
            )
    inputs = load("triplets", tmp_path)
    assert inputs.instructions == ["edit 0001", "edit 0001", "edit 0002"]
    assert inputs.targets.shape == (3, 3, R, R) and inputs.targets[:, 0].mean() > 0.9
    # seeds.json, when present, lists what to load.
    (tmp_path / "seeds.json").write_text(json.dumps([["0002", [7]]]))
    assert load("triplets", tmp_path).instructions == ["edit 0002"]
    # A pair without a prompt.json is an image without an instruction.
    (tmp_path / "0002" / "prompt.json").unlink()
    message = one_line_error(lambda: load("triplets", tmp_path))
    assert "7_0.jpg" in message and "no instruction" in message


def bad_jsonl(tmp_path):
    """A JSONL with two good records and one of each bad kind; returns (path, {line: fragment})."""
    png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = {"image": "ok.png", "instruction": "make it red"}
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            good,
            '{"image": "ok.png", "instruction": ',  # line 2: not JSON
            {"image": "ok.png"},  # line 3: no instruction
            {"image": "missing.png", "instruction": "x"},  # line 4: missing file
            {"image": "broken.png", "instruction": "x"},  # line 5: broken file
            good,
        ],
    )
    return path, {2: "not valid JSON", 3: "no instruction", 4: "missing.png", 5: "broken.png"}


def test_each_bad_jsonl_line_stops_the_load_with_one_line(tmp_path):
    path, bad = bad_jsonl(tmp_path)
    lines = path.read_text().splitlines()
    for n, fragment in bad.items():
        write_jsonl(path, [lines[0], lines[n - 1]])
        message = one_line_error(lambda: load("jsonl", path))
        assert f"{path}:2:" in message and fragment in message, message


def test_skip_bad_reports_each_bad_item_and_keeps_the_good(tmp_path, capsys):
    path, bad = bad_jsonl(tmp_path)
    inputs = load("jsonl", path, skip_bad=True)
    assert len(inputs) == 2
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if "skipping bad input" in line]
    assert len(skipped) == len(bad)
    for (n, fragment), line in zip(sorted(bad.items()), skipped, strict=True):
        assert f"{path}:{n}:" in line and fragment in line
    # A folder: the broken image is skipped, the good one loads.
    folder = tmp_path / "imgs"
    png(folder / "a.png"), (folder / "b.png").write_bytes(b"junk")
    assert "b.png" in one_line_error(lambda: load("folder", folder))
    assert len(load("folder", folder, skip_bad=True)) == 1
    # Nothing good left is still an error.
    write_jsonl(path, ["not json", {"image": "missing.png", "instruction": "x"}])
    assert "no usable items (2 bad ones skipped)" in one_line_error(
        lambda: load("jsonl", path, skip_bad=True)
    )


def test_folder_with_no_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    for source in ("folder", "spie"):
        message = one_line_error(lambda s=source: load(s, tmp_path, skip_bad=True))
        assert "no images" in message or "exemplar folder not found" in message
    assert "no images" in one_line_error(lambda: load("folder", tmp_path))
    assert "no InstructPix2Pix samples" in one_line_error(lambda: load("triplets", tmp_path))


def test_train_cli_skip_bad(tmp_path, capsys):
    """`spie train --skip-bad` reports each bad item before stopping, as nothing good is left."""
    path = write_jsonl(tmp_path / "d.jsonl", ["{", {"image": "nope.png", "instruction": "x"}])
    argv = ["train", "--config", "configs/tiny.yaml", "--set", "data.source=jsonl"]
    argv += ["--set", f"data.path={path}", "--set", f"run.output_dir={tmp_path / 'runs'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:1: not valid JSON" in err[0]
    assert main([*argv, "--skip-bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert sum("skipping bad input" in line for line in err) == 2 and "no usable items" in err[-1]
    assert "Traceback" not in "\n".join(err)
