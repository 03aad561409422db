"""What a run leaves behind: `metrics.jsonl`, TensorBoard events, and a grid of sample edits per epoch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


class RunLog:
    """Writes one JSON line per epoch to `metrics.jsonl`, mirrors numbers to TensorBoard, saves grids."""

    def __init__(self, run_dir: Path, tensorboard: bool = True) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "epoch" and math.isfinite(value):
                    self.writer.add_scalar(key.replace(".", "/"), value, record["epoch"])
            self.writer.flush()

    def save_grid(
        self, epoch: int, sources: torch.Tensor, edits: torch.Tensor, nb_gen: int, max_rows: int = 8
    ) -> Path:
        """Rows of [source, edit 1 .. edit nb_gen]. sources: (M, 3, H, W), edits: (M * nb_gen, 3, H, W), in [0, 1]."""
        rows = min(max_rows, sources.shape[0])
        tiles = []
        for r in range(rows):
            tiles.append(torch.cat([sources[r], *edits[r * nb_gen : (r + 1) * nb_gen]], dim=2))
        grid = torch.cat(tiles, dim=1)
        arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        path = self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
        Image.fromarray(np.ascontiguousarray(arr)).save(path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
