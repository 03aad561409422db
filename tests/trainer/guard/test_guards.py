"""The guards' statistics and thresholds on real images (the synthetic edit set's sources)."""

from __future__ import annotations

import json

import torch

from sampler.synthetic import synthetic_edits
from trainer.config import load_config
from trainer.guard.check import Guards
from trainer.guard.stats import image_stats


def _images(n: int = 16, resolution: int = 32) -> torch.Tensor:
    edits = synthetic_edits(0, n, resolution, "heldout")
    return torch.stack([torch.from_numpy(e.source).permute(2, 0, 1) / 255.0 for e in edits])


def _checkerboard(images: torch.Tensor, amplitude: float) -> torch.Tensor:
    h, w = images.shape[-2:]
    sign = (torch.arange(h).view(h, 1) + torch.arange(w).view(1, w)) % 2 * 2 - 1
    return (images + amplitude * sign).clamp(0, 1)


def test_each_hack_moves_its_statistic_and_an_honest_edit_does_not():
    src = _images()
    base = image_stats(src, x0=torch.ones(16, 4, 4, 4))
    assert 0.2 < base["brightness"] < 0.8 and base["grid"] < 0.2 and base["x0_norm"] == 1.0
    # The asked edits (the ground truth) barely move the statistics.
    edits = synthetic_edits(0, 16, 32, "heldout")
    truth = image_stats(torch.stack([torch.from_numpy(e.target).permute(2, 0, 1) / 255.0 for e in edits]))
    assert all(abs(truth[k] - base[k]) < 0.1 for k in ("brightness", "saturation", "grid"))
    bright = image_stats(src * 0.2 + 0.8)  # brightened and washed out
    assert (
        bright["brightness"] - base["brightness"] > 0.15
        and bright["bright_fraction"] > base["bright_fraction"] + 0.3
    )
    assert bright["saturation"] < base["saturation"] - 0.1
    dark = image_stats(src * 0.1)  # background wiped to black
    assert dark["dark_fraction"] - base["dark_fraction"] > 0.5
    grid = image_stats(_checkerboard(src, 0.08))  # a faint checkerboard
    assert grid["grid"] - base["grid"] > 0.1 and grid["high_frequency"] > base["high_frequency"]
    assert abs(grid["brightness"] - base["brightness"]) < 0.02  # invisible to the mean


def test_guards_warn_or_stop_naming_the_statistic(tmp_path):
    config = load_config("configs/tiny.yaml", ["guard.action=stop"])
    guards = Guards(config, tmp_path)
    start = image_stats(_images())
    guards.start = {"stats": start, "probe": {"x.mean": [0.1, 0.2, 0.3]}}
    (tmp_path / "guard_start.json").write_text(json.dumps(guards.start))
    record = {"epoch": 3}
    for name, value in image_stats(_checkerboard(_images(), 0.08)).items():
        record[f"guard.{name}"] = value
        record[f"guard.{name}.change"] = value - start[name]
    lines, stop = guards.check(record)
    assert stop and any(line.startswith("[spie] guard: grid moved +") for line in lines)
    assert "stopping after epoch 3" in lines[-1]
    assert not any("brightness" in line for line in lines)
    # A resumed run reads the same reference; "warn" never stops; nothing moved: no line.
    again = Guards(load_config("configs/tiny.yaml", ["guard.action=warn"]), tmp_path)
    assert again.start == guards.start and again.check(record)[1] is False
    same = {f"guard.{k}.change": 0.0 for k in guards.start} | {
        f"guard.{k}": v for k, v in guards.start.items()
    }
    assert again.check(same) == ([], False)


def test_the_probe_interval_is_that_of_the_paired_change():
    import numpy as np

    from trainer.guard.check import probe_record

    start = {"s.mean": [0.2, 0.5, 0.8, 0.4]}
    now = {"s.mean": np.array([0.3, 0.6, 0.9, 0.5])}  # every item +0.1: no doubt about the change
    out = probe_record(now, start)
    assert out["probe.s.mean"] == 0.575 and out["probe_ci.s.mean"] < 1e-9 and out["probe_items"] == 4
    assert probe_record(now, None)["probe_ci.s.mean"] > 0.2  # the spread of the items themselves


def test_a_tripped_guard_stops_the_run_after_its_checkpoint(tiny_config, capsys):
    from trainer.loop import train
    from trainer.run.log import read_metrics

    sets = ["eval.probe_items=4", "eval.probe_every=1", "run.image_log_freq=0", "run.log_with=[]"]
    config = tiny_config(
        *sets, "run.num_epochs=3", "guard.action=stop", "guard.brightness=1e-9", "run.name=g"
    )
    run_dir = train(config)
    out = capsys.readouterr().out
    assert "[spie] guard: brightness moved" in out and "stopping after epoch 0" in out
    (record,) = read_metrics(run_dir)  # one epoch, then the stop
    assert "guard.brightness.change" in record and record["probe_items"] == 4
    assert (run_dir / "guard_start.json").is_file() and any((run_dir / "checkpoints").iterdir())
