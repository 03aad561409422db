"""`spie evaluate` and the plots: known numbers on precomputed edits, bootstrap intervals, paired
comparison of two models on the same noise, bad input, CLIP metrics with a tiny seeded CLIP."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from trainer.cli import main
from trainer.config import load_config
from trainer.engine.models import load_policy, model_spec
from trainer.errors import UserError
from trainer.evaluate.compare import (
    evaluate_edits,
    evaluate_models,
    noise_seed,
    resolve_config,
    sample_edits,
)
from trainer.evaluate.metrics import bootstrap_ci, paired_difference, summarize
from trainer.run.plots import reward_curve

R = 16  # side of the precomputed test images
EDIT_SET = [f"model.resolution={R}", "reward.scorers=[{name: brightness}, {name: ssim_structure}]"]


def _png(path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return path.name


def _edits_jsonl(tmp_path, bad_lines: bool = False):
    """Four items with known L2 outside the mask: 0 (edit = source), 0 (change inside the mask
    only), (51/255)^2 (every pixel outside the mask off by 51), and no mask."""
    rng = np.random.default_rng(0)
    mask = np.zeros((R, R, 3), np.uint8)
    mask[:, : R // 2] = 255  # edit region: the left half
    _png(tmp_path / "mask.png", mask)
    lines = []
    for i in range(4):
        src = rng.integers(60, 180, (R, R, 3))
        edit = src.copy()
        if i == 1:
            edit[:, : R // 2] = 255 - edit[:, : R // 2]
        if i == 2:
            edit[:, R // 2 :] += 51
        rec = {
            "source": _png(tmp_path / f"s{i}.png", src),
            "output": _png(tmp_path / f"e{i}.png", edit),
            "instruction": "make the left half inverted",
            "target": _png(tmp_path / f"t{i}.png", edit),
            "metadata": {"item": i},
        }
        if i < 3:
            rec["mask"] = "mask.png"
        lines.append(json.dumps(rec))
    if bad_lines:
        lines.insert(1, "{not json")
        lines.insert(3, json.dumps({"source": "s0.png", "output": "broken.png", "instruction": "x"}))
        (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_precomputed_edits_known_numbers(tmp_path):
    edits = _edits_jsonl(tmp_path)
    out = tmp_path / "out"
    summary = evaluate_edits(edits, "configs/tiny.yaml", out, overrides=EDIT_SET, seed=3)
    l2 = [row["metrics"]["A"]["l2_outside_mask"] for row in summary["items"]]
    assert l2[:2] == [0.0, 0.0] and l2[3] is None
    assert l2[2] == pytest.approx((51 / 255) ** 2, rel=1e-6)  # images are float32
    agg = summary["metrics"]["A"]["l2_outside_mask"]
    assert agg["n"] == 3 and agg["mean"] == pytest.approx((51 / 255) ** 2 / 3, rel=1e-6)
    for stats in summary["metrics"]["A"].values():
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"]
    # Scores and details come from the configured scorers, on the same uint8 images.
    edit0 = np.asarray(Image.open(tmp_path / "e0.png"), dtype=np.float64) / 255
    assert summary["items"][0]["metrics"]["A"]["brightness"] == pytest.approx(edit0.mean())
    assert summary["items"][0]["metrics"]["A"]["ssim_structure"] == pytest.approx(1.0)
    assert "ssim_structure.ssim" in summary["metrics"]["A"]
    assert summary["metric_info"]["l2_outside_mask"]["higher_is_better"] is False
    assert summary["differences"] == {} and summary["skipped"] == []
    # The JSON on disk is the summary; the picture is next to it, with a target column.
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk == summary
    assert {"config", "metrics", "differences", "items", "models", "bootstrap", "files"} <= set(on_disk)
    with Image.open(out / "before_after.png") as im:
        assert im.size[0] > im.size[1] / 4 * 2  # 3 columns (source, edit, target) by 4 rows
    # Seeded: the same call gives the same numbers.
    again = evaluate_edits(edits, "configs/tiny.yaml", tmp_path / "again", overrides=EDIT_SET, seed=3)
    assert again["metrics"] == summary["metrics"]


def test_bootstrap_interval_and_paired_difference():
    x = np.random.default_rng(1).normal(1.0, 1.0, 400)
    low, high = bootstrap_ci(x, 2000, 0.95, seed=0)
    assert low < x.mean() < high
    # Close to the normal-theory interval, mean +- 1.96 sd / sqrt(n).
    assert (high - low) == pytest.approx(2 * 1.96 * x.std() / math.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(x, 2000, 0.95, seed=0) == (low, high)
    assert bootstrap_ci(x, 2000, 0.95, seed=1) != (low, high)
    assert bootstrap_ci(np.full(10, 0.25), 500, 0.95, 0) == (0.25, 0.25)
    stats = summarize(np.array([1.0, np.nan, 3.0]), 500, 0.9, 0)
    assert stats["n"] == 2 and stats["mean"] == 2.0
    same = paired_difference(x, x, 2000, 0.95, 0)
    assert (same["mean"], same["ci_low"], same["ci_high"], same["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    up = paired_difference(x, x + 0.1 + np.random.default_rng(2).normal(0, 0.05, x.size), 2000, 0.95, 0)
    assert up["excludes_zero"] and up["ci_low"] > 0
    partial = paired_difference(np.array([1.0, np.nan, 2.0]), np.array([2.0, 5.0, np.nan]), 100, 0.95, 0)
    assert partial["n"] == 1 and partial["mean"] == 1.0


def _cli_error(capsys, *argv: str) -> str:
    code = main(["evaluate", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # Model loading may draw transformers' progress bars first; the error itself is one line.
    lines = [line for line in err.splitlines() if "Loading weights" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("spie evaluate: error: "), err
    return lines[0]


def test_bad_input_names_file_and_line(tmp_path, capsys):
    edits = _edits_jsonl(tmp_path, bad_lines=True)
    base = ["--config", "configs/tiny.yaml", *sum((["--set", s] for s in EDIT_SET), [])]
    out = ["--out", str(tmp_path / "out" / "e.json")]
    assert f"{edits}:2: not valid JSON" in _cli_error(capsys, "--edits", str(edits), *base, *out)
    assert "edits not found" in _cli_error(capsys, "--edits", str(tmp_path / "nope.jsonl"), *base)
    # --skip-bad: the good items are processed, the bad ones listed.
    assert main(["evaluate", "--edits", str(edits), *base, *out, "--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "skipped" in printed and "broken.png" in printed
    summary = json.loads((tmp_path / "out" / "e.json").read_text())
    assert summary["num_items"] == 4
    assert [s["where"] for s in summary["skipped"]] == [f"{edits}:2", f"{edits}:4"]
    assert "cannot read image" in summary["skipped"][1]["error"]
    # The folder layout: no images, and an image without an instruction.
    folder = tmp_path / "folder"
    (folder / "source").mkdir(parents=True)
    (folder / "output").mkdir()
    assert "no images" in _cli_error(capsys, "--edits", str(folder), *base)
    shutil.copy(tmp_path / "s0.png", folder / "source" / "a.png")
    shutil.copy(tmp_path / "e0.png", folder / "output" / "a.png")
    shutil.copy(tmp_path / "e1.png", folder / "output" / "b.png")
    err = _cli_error(capsys, "--edits", str(folder), *base)
    assert "a.png" in err and "no instruction" in err
    (folder / "instruction").mkdir()
    (folder / "instruction" / "a.txt").write_text("make it brighter\n")
    (folder / "instruction" / "b.txt").write_text("make it darker\n")
    err = _cli_error(capsys, "--edits", str(folder), *base)  # b has no source
    assert "b.png" in err and "image not found" in err
    assert main(["evaluate", "--edits", str(folder), *base, *out, "--skip-bad", "--quiet"]) == 0
    summary = json.loads((tmp_path / "out" / "e.json").read_text())
    assert summary["num_items"] == 1 and summary["items"][0]["instruction"] == "make it brighter"


# --------------------------------------------------------------------------- models mode


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, previous_tiny):
    """A one-epoch tiny RL run (LoRA, brightness, the preset's earlier 32 px sizes): its run folder."""
    from trainer.loop import train

    root = tmp_path_factory.mktemp("evalrun")
    config = load_config(
        "configs/tiny.yaml",
        [
            *previous_tiny,
            f"run.output_dir={root}",
            "run.quiet=true",
            "run.num_epochs=1",
            "run.image_log_freq=0",
        ],
    )
    return train(config)


def test_models_compared_on_the_same_noise(tiny_run, tmp_path, capsys):
    models = ["tiny", str(tiny_run)]
    summary = evaluate_models(models, None, tmp_path / "ab", num_items=4, seed=0)
    assert [m["kind"] for m in summary["models"]] == ["base", "checkpoint"]
    assert summary["comparison"] == "B - A" and summary["num_items"] == 4
    assert [row["noise_seed"] for row in summary["items"]] == [noise_seed(0, i) for i in range(4)]
    assert set(summary["differences"]) == set(summary["metrics"]["A"]) >= {"brightness"}
    assert (tmp_path / "ab" / "before_after.png").is_file()
    # A model against itself, same inputs and same noise: every difference is exactly 0.
    self_cmp = evaluate_models([str(tiny_run)] * 2, None, tmp_path / "aa", num_items=4, seed=0)
    for d in self_cmp["differences"].values():
        assert (d["mean"], d["ci_low"], d["ci_high"], d["excludes_zero"]) == (0.0, 0.0, 0.0, False)
    # The CLI prints the table.
    argv = ["evaluate", "--model", "tiny", "--model", str(tiny_run), "--num-items", "2", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli" / "eval.json"), "--label", "sft", "--label", "rl"]) == 0
    out = capsys.readouterr().out
    assert "rl - sft" in out and "brightness" in out and (tmp_path / "cli" / "eval.json").is_file()


def test_an_items_edit_does_not_depend_on_its_batch(tiny_run):
    config = resolve_config([str(tiny_run)])
    policy = load_policy(model_spec(str(tiny_run), "A", config))
    sources = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    texts = ["make it brighter", "make it darker", "make it blue"]
    seeds = [noise_seed(5, i) for i in range(3)]
    batched = sample_edits(policy, sources, texts, seeds, batch_size=3)
    single = sample_edits(policy, sources, texts, seeds, batch_size=1)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=0)
    # With batch 1 the loop is exactly EditPolicy.rollout with that item's generator.
    ref = policy.rollout(sources[1:2], texts[1:2], generator=torch.Generator().manual_seed(seeds[1]))
    assert torch.equal(single[1:2], ref.images.cpu())


def test_a_checkpoint_that_does_not_fit_the_model(tiny_run, tmp_path, capsys):
    from trainer.run.checkpoint import find_checkpoint

    bad = tmp_path / "bad"
    shutil.copytree(find_checkpoint(tiny_run), bad)
    cfg = yaml.safe_load((bad / "config.yaml").read_text())
    cfg["model"]["lora_rank"] = 8  # the weights were trained with rank 4
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = _cli_error(capsys, "--model", str(bad), "--num-items", "1", "--out", str(tmp_path / "x.json"))
    assert f"{bad / 'trainable.safetensors'} does not fit the model" in err and "shape" in err
    cfg["model"].update(lora_rank=4, use_lora=False)  # full fine-tuning expects every UNet weight
    (bad / "config.yaml").write_text(yaml.safe_dump(cfg))
    err = _cli_error(capsys, "--model", str(bad), "--num-items", "1", "--out", str(tmp_path / "x.json"))
    assert "does not fit the model" in err and "lacks weight" in err
    assert "not found" in _cli_error(capsys, "--model", str(tmp_path / "nope"))


# --------------------------------------------------------------------------- CLIP and plots


def test_clip_metrics_with_a_tiny_clip(tmp_path):
    from transformers import CLIPModel

    from reward_servers.clip_score import save_tiny
    from trainer.evaluate.metrics import ClipMetric

    clip_dir = save_tiny(str(tmp_path / "clip"))  # seeded tiny CLIP with the byte-level tokenizer
    edits = _edits_jsonl(tmp_path)
    summary = evaluate_edits(
        edits, "configs/tiny.yaml", tmp_path / "out", overrides=EDIT_SET, clip_model=clip_dir
    )
    rows = [row["metrics"]["A"] for row in summary["items"]]
    assert rows[0]["clip_image"] == pytest.approx(1.0, abs=1e-5)  # the edit is the source
    assert rows[0]["clip_direction"] == 0.0  # no image change, no direction
    assert rows[1]["clip_image"] < 1.0 - 1e-4
    for row in rows:
        assert all(-1 <= row[k] <= 1 for k in ("clip_text_image", "clip_image", "clip_direction"))
    # The text-image score is the cosine CLIP's own forward gives (logits / logit scale).
    metric = ClipMetric(clip_dir)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    from reward_servers.vision import CLIP_MEAN, CLIP_STD, to_tensor

    edit = np.asarray(Image.open(tmp_path / "e1.png").convert("RGB").resize((32, 32), Image.BICUBIC))
    ids = metric.tokenizer(["make the left half inverted"], padding="max_length", return_tensors="pt")
    with torch.no_grad():
        scale = float(model.logit_scale.exp())
        logits = model(
            input_ids=ids.input_ids, pixel_values=to_tensor([edit], CLIP_MEAN, CLIP_STD)
        ).logits_per_image
    edit16 = torch.from_numpy(np.array(Image.open(tmp_path / "e1.png"))).permute(2, 0, 1)[None] / 255.0
    ours = metric(edit16, edit16, ["make the left half inverted"], [{}])["clip_text_image"][0]
    assert ours == pytest.approx(float(logits[0, 0]) / scale, abs=1e-5)
    # Captions in the metadata switch the text side to the captions.
    caps = [{"source_caption": "a photo", "target_caption": "an inverted photo"}]
    with_caps = metric(edit16, edit16, ["make the left half inverted"], caps)
    assert with_caps["clip_text_image"][0] != pytest.approx(ours)


def test_reward_curve(tmp_path, tiny_run):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"epoch": e, "brightness.mean": 0.4 + 0.01 * e, "brightness.std": 0.05, "oracle_edit.mean": 0.3 + 0.1 * e,
         "oracle_edit.std": 0.1, "oracle_edit.success": 0.2 * e, "loss": 0.1}
        for e in range(4)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    png = reward_curve(path, tmp_path / "curve.png")
    with Image.open(png) as im:
        assert im.size[0] > im.size[1]  # two panels side by side
    assert reward_curve(tiny_run / "metrics.jsonl", tmp_path / "run.png").is_file()
    (tmp_path / "empty.jsonl").write_text(json.dumps({"epoch": 0, "loss": 1.0}) + "\n")
    with pytest.raises(UserError, match="no '<scorer>.mean' keys"):
        reward_curve(tmp_path / "empty.jsonl", tmp_path / "x.png")
    assert main(["plot", str(tiny_run)]) == 0 and (tiny_run / "reward_curve.png").is_file()


# --------------------------------------------------------------------------- synthetic data and the oracle


def test_synthetic_heldout_judged_by_the_oracle(tiny_run, tmp_path, capsys):
    from sampler.synthetic import save_synthetic, synthetic_edits

    oracle = "reward.scorers=[{name: oracle_edit}]"
    sets = ["data.source=synthetic", "data.split=heldout", "data.num_items=4", oracle]
    summary = evaluate_models(["tiny", str(tiny_run)], None, tmp_path / "syn", num_items=4, overrides=sets)
    assert summary["items"][0]["name"] == "synthetic/heldout#0"
    names = set(summary["metrics"]["B"])
    assert {"l2_outside_mask", "oracle_edit", "oracle_edit.success", "oracle_edit.colour_error"} <= names
    assert {"oracle_edit", "oracle_edit.success"} <= set(summary["differences"])
    # The ground truth itself as the edit: every oracle success, nothing changed outside the masks.
    jsonl = save_synthetic(tmp_path / "gt", synthetic_edits(0, 4, 32, "heldout"))
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    (tmp_path / "gt" / "truth.jsonl").write_text(
        "".join(json.dumps({**r, "output": r["target"]}) + "\n" for r in lines)
    )
    truth = evaluate_edits(
        tmp_path / "gt" / "truth.jsonl",
        "configs/tiny.yaml",
        tmp_path / "t",
        overrides=[oracle, "model.resolution=32"],
    )  # the edits are 32 px: judged at the preset's 8 px they would be resized
    assert truth["metrics"]["A"]["oracle_edit.success"]["mean"] == 1.0
    assert truth["metrics"]["A"]["l2_outside_mask"]["mean"] == 0.0
    # The same inputs from a JSONL file (--inputs) through the CLI.
    argv = ["evaluate", "--model", str(tiny_run), "--inputs", str(jsonl), "--scorers", "oracle_edit"]
    assert main([*argv, "--num-items", "2", "--quiet", "--out", str(tmp_path / "cli" / "e.json")]) == 0
    assert "oracle_edit.success" in capsys.readouterr().out
    with Image.open(tmp_path / "cli" / "before_after.png") as im:
        assert im.size[0] > im.size[1]  # source, edit, target: 3 columns by 2 rows


def test_flips_count_fixed_and_broken_items_and_lead_the_grid():
    from trainer.evaluate.compare import flip_counts, grid_rows

    a = np.array([0.0, 1.0, 0.0, 1.0, 0.0])
    b = np.array([1.0, 0.0, 0.0, 1.0, 1.0])
    assert flip_counts(a, b) == {"fixed": 2, "broken": 1}
    assert flip_counts(np.array([0.2, 1.0]), np.array([1.0, 0.0])) is None  # not a 0/1 metric
    per_model = {"start": {"x.success": a}, "trained": {"x.success": b}}
    flips = {"x.success": flip_counts(a, b)}
    order, marks, title = grid_rows(per_model, ["start", "trained"], flips, 5)
    assert order == [0, 4, 1, 2, 3]
    assert (
        "2 fixed (failure -> success), 1 broken" in title and "Rows: 2 fixed, 1 broken, 2 unchanged" in title
    )
    # Two rows: one fixed and one broken, not the two fixed; a row that looks the same is marked.
    same = [True, False, False, False, False]
    order, marks, title = grid_rows(per_model, ["start", "trained"], flips, 5, k=2, looks_same=same)
    assert order == [0, 1] and marks == ["[fixed] [looks the same] ", "[broken] "]
    assert "Rows: 1 fixed, 1 broken; 1 marked [looks the same]" in title


def test_looks_the_same_on_real_images():
    from sampler.synthetic import synthetic_edits
    from trainer.evaluate.visible import unseen, visible_fraction

    edits = synthetic_edits(0, 4, 32, "heldout")
    src = torch.stack([torch.from_numpy(e.source).permute(2, 0, 1) / 255.0 for e in edits])
    tgt = torch.stack([torch.from_numpy(e.target).permute(2, 0, 1) / 255.0 for e in edits])
    assert unseen(src, src + 0.004) == [True] * 4  # one grey level: invisible
    assert not any(unseen(src, tgt))  # the asked edit: visible
    assert (visible_fraction(src, tgt) > 0.02).all()
