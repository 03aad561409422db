"""What a run leaves behind: `metrics.jsonl`, the configured trackers (TensorBoard by default, wandb or
MLflow through accelerate's trackers, as `run.log_with` names them), and a grid of sample edits per epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TRACKERS = ("tensorboard", "wandb", "mlflow")


def make_tracker(name: str, run_dir: Path, config: dict[str, Any] | None = None):
    """An accelerate tracker (`accelerate.tracking`), started, with the run's config stored."""
    from accelerate import tracking

    if name == "tensorboard":
        tracker = tracking.TensorBoardTracker("", run_dir / "tensorboard")
    elif name == "wandb":
        tracker = tracking.WandBTracker(run_dir.name, dir=str(run_dir))
    elif name == "mlflow":
        tracker = tracking.MLflowTracker("spie", logging_dir=str(run_dir / "mlruns"), run_name=run_dir.name)
    else:
        raise ValueError(f"unknown tracker {name!r} (expected one of {', '.join(TRACKERS)})")
    tracker.start()
    if config is not None and name != "tensorboard":  # TensorBoard's hparams want flat scalars
        tracker.store_init_configuration(config)
    return tracker


class RunLog:
    """Writes one JSON line per epoch to `metrics.jsonl`, mirrors numbers and sample grids to the
    trackers `log_with` names ("tensorboard", "wandb", "mlflow")."""

    def __init__(
        self,
        run_dir: Path,
        log_with: tuple[str, ...] = ("tensorboard",),
        config: dict[str, Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.trackers = [make_tracker(name, run_dir, config) for name in log_with]

    def truncate_after(self, epoch: int) -> None:
        """Drop metric lines of epochs after `epoch` (a resumed run rewrites them)."""
        if not self.metrics_path.is_file():
            return
        keep = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line and json.loads(line)["epoch"] <= epoch
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        numbers = {
            key.replace(".", "/"): value
            for key, value in record.items()
            if isinstance(value, int | float) and key != "epoch" and math.isfinite(value)
        }
        for tracker in self.trackers:
            tracker.log(numbers, step=record["epoch"])

    def save_grid(
        self,
        epoch: int,
        sources: torch.Tensor,
        edits: torch.Tensor,
        nb_gen: int,
        notes: list[dict[str, Any]] | None = None,
        max_rows: int = 8,
    ) -> Path:
        """`samples/epoch_<epoch>.png`: rows of [source, edit 1 .. edit nb_gen]; with `notes` (one
        JSON-ready dict per edit: instruction, scores, a judge's texts), `samples/epoch_<epoch>.jsonl`
        holds those of the edits drawn, one line each in the grid's order.

        Args:
            sources: (M, 3, H, W) in [0, 1]; edits: (M * nb_gen, 3, H, W) in [0, 1].
        """
        rows = min(max_rows, sources.shape[0])
        if notes is not None:
            lines = notes[: rows * nb_gen]
            (self.run_dir / "samples" / f"epoch_{epoch:04d}.jsonl").write_text(
                "".join(json.dumps(note) + "\n" for note in lines)
            )
        tiles = []
        for r in range(rows):
            tiles.append(torch.cat([sources[r], *edits[r * nb_gen : (r + 1) * nb_gen]], dim=2))
        grid = torch.cat(tiles, dim=1)
        arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": arr[None]}, step=epoch, dataformats="NHWC")
            else:
                tracker.log_images({"samples": [Image.fromarray(np.ascontiguousarray(arr))]}, step=epoch)
        return path

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
