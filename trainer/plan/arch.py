"""Models at their real architecture on the meta device, from configuration files alone.

An architecture folder holds what `from_pretrained` reads before the weights: a diffusers pipeline's
`model_index.json` with each component's `config.json` (or `scheduler_config.json`), or one
transformers `config.json`. The released models' folders are kept in `configs/arch/<org>--<name>/`
(each file's `_source` says which released file it copies); a local model folder is its own
architecture folder; the tiny models are built (once, seeded, small) and read the same way. Building
on the meta device allocates no memory and reads no weights: parameters have shapes and dtypes only.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH_DIR = Path(__file__).resolve().parents[2] / "configs" / "arch"
SKIPPED = ("tokenizer", "tokenizer_2", "processor", "safety_checker", "feature_extractor", "image_encoder")


def arch_folder(model_id: str) -> Path | None:
    """The architecture folder of a hub id or local folder (None when there is none on file)."""
    local = Path(model_id).expanduser()
    if local.is_dir() and ((local / "model_index.json").is_file() or (local / "config.json").is_file()):
        return local
    kept = ARCH_DIR / model_id.replace("/", "--")
    return kept if kept.is_dir() else None


def _config_file(folder: Path) -> Path:
    for name in ("config.json", "scheduler_config.json"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no config.json")


def build_component(folder: Path, library: str, class_name: str, dtype: torch.dtype | None = None):
    """One component from its config file: a module on the meta device (in `dtype`), or a scheduler."""
    config = json.loads(_config_file(folder).read_text())
    config = {k: v for k, v in config.items() if k != "_source"}
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        if issubclass(cls, diffusers.SchedulerMixin):
            return cls.from_config(config)
        with torch.device("meta"):
            module = cls.from_config(config)
    else:
        import transformers

        cls = getattr(transformers, class_name)
        cfg = cls.config_class.from_dict(config)
        with torch.device("meta"):
            module = cls._from_config(cfg)
    module = module.to(dtype) if dtype is not None else module
    return module.requires_grad_(False).eval()


def build_pipeline_components(folder: Path, dtype: torch.dtype | None = None) -> tuple[str, dict]:
    """A diffusers pipeline folder's components (model_index.json) on meta; tokenizers and processors
    are left out (None). Returns (pipeline class name, {component name: module or scheduler})."""
    index = json.loads((folder / "model_index.json").read_text())
    parts: dict = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or name in SKIPPED or spec[0] is None:
            continue
        parts[name] = build_component(folder / name, spec[0], spec[1], dtype)
    return index["_class_name"], parts


def build_model(folder: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A transformers model folder (`config.json` naming its `architectures`) on meta."""
    config = json.loads((folder / "config.json").read_text())
    return build_component(folder, "transformers", config["architectures"][0], dtype)


def param_count(module: torch.nn.Module) -> int:
    """Parameters of a module (shared ones once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def param_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers by dtype name ("bfloat16": bytes)."""
    out: dict[str, int] = {}
    seen = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    for t in seen.values():
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out
