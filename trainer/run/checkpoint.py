"""Checkpoints: trained weights (safetensors), optimizer, epoch, RNG states and advantage statistics.

Layout of `runs/<run>/checkpoints/epoch_NNNN/`:
- `trainable.safetensors`: every trained tensor (LoRA weights, or the full UNet), by name;
- `state.pt`: optimizer state, epoch, RNG states, reward statistics, loaded with `weights_only=True`
  (no arbitrary code runs when a checkpoint is read);
- `config.yaml`: the run's configuration, so a checkpoint is usable on its own.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer.config import Config, dump_config
from trainer.errors import UserError

PREFIX = "epoch_"


def save_checkpoint(
    run_dir: Path,
    config: Config,
    epoch: int,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    extra: dict[str, Any],
) -> Path:
    """Write the checkpoint after `epoch` (0-based, completed) and prune old ones; returns its folder."""
    root = run_dir / "checkpoints"
    final = root / f"{PREFIX}{epoch:04d}"
    tmp = root / f".{PREFIX}{epoch:04d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    torch.save(
        {
            "epoch": epoch,
            "optimizer": optimizer_state,
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": _numpy_state(),
            "python_rng": list(random.getstate()[1]),
            **extra,
        },
        tmp / "state.pt",
    )
    dump_config(config, tmp / "config.yaml")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # a checkpoint folder exists only once complete
    limit = config.run.checkpoint_limit
    if limit > 0:
        for old in list_checkpoints(run_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the latest one of a run folder; `UserError` if there is none."""
    path = Path(path)
    if (path / "trainable.safetensors").is_file():
        return path
    if not path.exists():
        raise UserError(f"checkpoint or run folder not found: {path}")
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"no checkpoint in {path} (expected {path}/checkpoints/{PREFIX}NNNN/)")
    return found[-1]


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trained tensors, state dict) of a checkpoint folder."""
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot read checkpoint {folder}: {str(err).splitlines()[0]}") from err
    return trainable, state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    np_state = state["numpy_rng"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached"],
        )
    )
    random.setstate((3, tuple(state["python_rng"]), None))
