"""Training inputs: (source image, instruction[, mask, exemplars, target, metadata]) for the sampler.

Sources (`data.source`):
- "shapes": seeded scenes of coloured rectangles and discs on a plain background (no files needed);
- "synthetic": seeded synthetic edits with ground truth (`sampler/synthetic.py`): targets, masks and
  the metadata the oracle scorer checks; `data.split` picks the train or the disjoint held-out split;
- "folder": every image in a folder, edited with the configured instructions (cycled);
- "jsonl": one JSON object per line, paths relative to the JSONL file:
  {"image": path, "instruction": str[, "target": path, "mask": path, "exemplars": [path, ...],
  "metadata": {...}]}. Aliases: "source"/"original"/"input_image" for image, "edit_prompt"/"edit"
  for instruction, "edited"/"edited_image" for target, "exemplar" (one path) for exemplars;
- "spie": SPIE's layout (ebenarous/SPIE `SamplingDataset`): input images in `<path>/inputs` (or in
  `path` itself) and exemplar images of one concept in `<path>/exemplars` (or `data.exemplar_path`),
  optional masks in `<path>/masks/<input stem>.png`. Each input gets one exemplar drawn from the
  pool (seeded) and an instruction from SPIE's templates ("turn the {input_name} into {style_name}").
- "triplets": InstructPix2Pix training data (original, edit prompt, edited): either the generated
  dataset's folder (timothybrooks/instruct-pix2pix `EditDataset`: `<name>/prompt.json` with an "edit"
  field, and `<seed>_0.jpg` original / `<seed>_1.jpg` edited; `seeds.json` lists [name, [seeds]] and
  is optional), or a JSONL file of the HF dataset's columns {"input_image", "edit_prompt",
  "edited_image"} (any "jsonl" keys work).

Every image is loaded and checked up front, so a broken file stops the run before any work is done,
with one line naming the file (and the JSONL line). With `data.skip_bad` each bad item is reported on
stderr, one line each, and skipped; it is an error if no good item is left.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sampler.scenes import shapes_batch
from sampler.synthetic import ALL_KINDS, synthetic_edits
from trainer.config import DataConfig
from trainer.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
# SPIE's instruction templates (ebenarous/SPIE, SPIE/data/dataset.py), {input_name} then {style_name}.
SPIE_TEMPLATES = (
    "turn the {} into {}",
    "replace the {} with {}",
    "transform the {} into {}",
    "convert the {} to {}",
    "change the {} to {}",
    "morph the {} into {}",
    "modify the {} into {}",
    "swap the {} for {}",
)
KEYS = {  # jsonl record field -> accepted names, first found wins
    "image": ("image", "source", "original", "input_image"),
    "instruction": ("instruction", "edit_prompt", "edit"),
    "target": ("target", "edited", "edited_image"),
}


@dataclass
class Inputs:
    """M inputs.

    Attributes:
        sources: (M, 3, R, R) float in [0, 1].
        instructions: M instructions.
        masks: (M, R, R) bool edit regions, or None.
        exemplars: (M, 3, R, R) float in [0, 1], the exemplar that conditions each input, or None.
        targets: (M, 3, R, R) float in [0, 1], ground-truth edits (supervised fine-tuning,
            evaluation), or None.
        metadata: M JSON-safe dicts (e.g. the synthetic ground truth for the oracle scorer), or None.
        exemplar_sets: M tensors (K_i, 3, R, R), every exemplar given for each input (the first
            `exemplars` row is one of them), or None.
    """

    sources: torch.Tensor
    instructions: list[str]
    masks: torch.Tensor | None = None
    exemplars: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    metadata: list[dict] | None = None
    exemplar_sets: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.sources.shape[0]

    def take(self, index: torch.Tensor) -> Inputs:
        """The sub-batch of inputs `index` ((K,) long tensor)."""
        idx = index.tolist()
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        choose = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        return Inputs(
            self.sources[index],
            [self.instructions[i] for i in idx],
            pick(self.masks),
            pick(self.exemplars),
            pick(self.targets),
            choose(self.metadata),
            choose(self.exemplar_sets),
        )


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Read an image file as (3, R, R) float in [0, 1]; a bad file raises `UserError` naming it."""
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def _load_mask(path: Path, resolution: int) -> torch.Tensor:
    return load_image(path, resolution).mean(0) > 0.5


@dataclass
class _Item:
    """One loaded input; `exemplars[pick]` is the one that conditions it."""

    source: torch.Tensor
    instruction: str
    mask: torch.Tensor | None = None
    target: torch.Tensor | None = None
    exemplars: torch.Tensor | None = None  # (K, 3, R, R)
    pick: int = 0
    metadata: dict | None = None


class _Collector:
    """Gathers items; a bad one raises, or with `skip_bad` is reported on stderr and skipped."""

    def __init__(self, where: Path, skip_bad: bool) -> None:
        self.where, self.skip_bad = where, skip_bad
        self.items: list[_Item] = []
        self.skipped = 0

    def add(self, make: Callable[[], _Item]) -> None:
        try:
            self.items.append(make())
        except UserError as err:
            if not self.skip_bad:
                raise
            self.skipped += 1
            print(f"[spie] skipping bad input: {err}", file=sys.stderr)

    def inputs(self) -> Inputs:
        items = self.items
        if not items:
            raise UserError(f"{self.where}: no usable items ({self.skipped} bad ones skipped)")
        if self.skipped:
            print(f"[spie] {self.where}: loaded {len(items)} items, skipped {self.skipped}", file=sys.stderr)

        def stack(name: str, values: list) -> torch.Tensor | None:
            if all(v is None for v in values):
                return None
            if any(v is None for v in values):
                raise UserError(f"{self.where}: give a {name} for every item or for none")
            return torch.stack(values)

        sets = [it.exemplars for it in items]
        exemplars = stack(
            "exemplar", [None if it.exemplars is None else it.exemplars[it.pick] for it in items]
        )
        metadata = [it.metadata for it in items]
        return Inputs(
            torch.stack([it.source for it in items]),
            [it.instruction for it in items],
            stack("mask", [it.mask for it in items]),
            exemplars,
            stack("target", [it.target for it in items]),
            None if all(m is None for m in metadata) else [m or {} for m in metadata],
            None if exemplars is None else sets,
        )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_inputs(config: DataConfig, resolution: int, seed: int = 0) -> Inputs:
    """Load (or draw) every training input described by `config`; `seed` is run.seed."""
    seed = config.seed if config.seed >= 0 else seed
    if config.source == "shapes":
        scenes = shapes_batch(seed, config.num_items, resolution)
        sources = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255.0
        instructions = [config.instructions[i % len(config.instructions)] for i in range(config.num_items)]
        return Inputs(sources, instructions)
    if config.source == "synthetic":
        return synthetic_inputs(seed, config.num_items, resolution, config.split, tuple(config.kinds))
    path = Path(config.path)
    if config.source == "folder":
        if not path.is_dir():
            raise UserError(f"data.path: image folder not found: {path}")
        files = _images_in(path)
        if not files:
            raise UserError(f"data.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        items = _Collector(path, config.skip_bad)
        for i, f in enumerate(files):
            instruction = config.instructions[i % len(config.instructions)]
            items.add(lambda f=f, ins=instruction: _Item(load_image(f, resolution), ins))
        return items.inputs()
    if config.source == "spie":
        return _load_spie(config, path, resolution, seed)
    if config.source == "triplets" and path.is_dir():
        return _load_ip2p_folder(path, resolution, config.skip_bad)
    return _load_jsonl(path, resolution, config.skip_bad, need_target=config.source == "triplets")


def synthetic_inputs(
    seed: int, count: int, resolution: int, split: str = "train", kinds: tuple[str, ...] = ALL_KINDS
) -> Inputs:
    """`count` synthetic edits as Inputs with targets, masks and metadata (see `synthetic_edits`)."""
    try:
        samples = synthetic_edits(seed, count, resolution, split, kinds)
    except ValueError as err:
        raise UserError(f"data: {err}") from err
    as_tensor = lambda key: torch.from_numpy(np.stack([getattr(s, key) for s in samples]))  # noqa: E731
    return Inputs(
        as_tensor("source").permute(0, 3, 1, 2).float() / 255.0,
        [s.instruction for s in samples],
        masks=as_tensor("mask"),
        targets=as_tensor("target").permute(0, 3, 1, 2).float() / 255.0,
        metadata=[dict(s.metadata) for s in samples],
    )


def first_field(record: dict[str, Any], field: str) -> Any:
    """The record's value for `field` under the first of its accepted names (`KEYS`), or None. The
    one alias table of every JSONL reader (training inputs and `spie evaluate`'s edits)."""
    return next((record[k] for k in KEYS[field] if record.get(k) not in (None, "")), None)


def jsonl_record(path: Path, n: int, line: str) -> dict[str, Any]:
    """Line `n` of a JSONL file as a dict, or a `UserError` naming `path:n`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    if not isinstance(record, dict):
        raise UserError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
    return record


def _jsonl_item(record: Any, base: Path, resolution: int, need_target: bool) -> _Item:
    """One parsed JSONL record as an _Item; raises `UserError` (without the file:line prefix)."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}")
    image = first_field(record, "image")
    if not isinstance(image, str):
        raise UserError(f"no image path (keys: {', '.join(KEYS['image'])})")
    instruction = str(first_field(record, "instruction") or "").strip()
    if not instruction:
        raise UserError(f"no instruction for image {image} (keys: {', '.join(KEYS['instruction'])})")
    target = first_field(record, "target")
    if need_target and target is None:
        raise UserError(f"no edited image for {image} (keys: {', '.join(KEYS['target'])})")
    exemplars = record.get("exemplars", [record["exemplar"]] if record.get("exemplar") else [])
    if not isinstance(exemplars, list) or not all(isinstance(e, str) for e in exemplars):
        raise UserError(f"exemplars: expected a list of image paths, got {exemplars!r}")
    metadata = record.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise UserError(f"metadata: expected a JSON object, got {metadata!r}")
    for name, value in (("target", target), ("mask", record.get("mask"))):
        if value is not None and not isinstance(value, str):
            raise UserError(f"{name}: expected an image path, got {value!r}")
    return _Item(
        load_image(base / image, resolution),
        instruction,
        _load_mask(base / record["mask"], resolution) if record.get("mask") else None,
        load_image(base / target, resolution) if target else None,
        torch.stack([load_image(base / e, resolution) for e in exemplars]) if exemplars else None,
        metadata=metadata,
    )


def _load_jsonl(path: Path, resolution: int, skip_bad: bool = False, need_target: bool = False) -> Inputs:
    if not path.is_file():
        raise UserError(f"data.path: JSONL file not found: {path}")
    items = _Collector(path, skip_bad)
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue

        def make(n: int = n, line: str = line) -> _Item:
            record = jsonl_record(path, n, line)
            try:
                return _jsonl_item(record, path.parent, resolution, need_target)
            except UserError as err:
                raise UserError(f"{path}:{n}: {err}") from err

        items.add(make)
    if not items.items and not items.skipped:
        raise UserError(f"{path}: no records")
    return items.inputs()


def _load_spie(config: DataConfig, path: Path, resolution: int, seed: int) -> Inputs:
    """SPIE's layout: input images, a pool of exemplar images, optional masks (see the module doc)."""
    if not path.is_dir():
        raise UserError(f"data.path: SPIE data folder not found: {path}")
    inputs_dir = path / "inputs" if (path / "inputs").is_dir() else path
    exemplar_dir = Path(config.exemplar_path) if config.exemplar_path else path / "exemplars"
    if not exemplar_dir.is_dir():
        raise UserError(f"data.exemplar_path: exemplar folder not found: {exemplar_dir}")
    files, exemplar_files = _images_in(inputs_dir), _images_in(exemplar_dir)
    for folder, found in ((inputs_dir, files), (exemplar_dir, exemplar_files)):
        if not found:
            raise UserError(f"data.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    pool = _Collector(exemplar_dir, config.skip_bad)
    for f in exemplar_files:
        pool.add(lambda f=f: _Item(load_image(f, resolution), ""))
    exemplars = pool.inputs().sources  # (K, 3, R, R)
    rng = np.random.default_rng(seed)
    items = _Collector(inputs_dir, config.skip_bad)
    for i, f in enumerate(files):
        if config.input_name:
            template = SPIE_TEMPLATES[int(rng.integers(len(SPIE_TEMPLATES)))]
            instruction = template.format(config.input_name, config.style_name)
        else:
            instruction = config.instructions[i % len(config.instructions)]
        pick = int(rng.integers(len(exemplars)))
        mask_file = path / "masks" / f"{f.stem}.png"

        def make(f: Path = f, ins: str = instruction, pick: int = pick, mask_file: Path = mask_file) -> _Item:
            mask = _load_mask(mask_file, resolution) if mask_file.is_file() else None
            return _Item(load_image(f, resolution), ins, mask, None, exemplars, pick)

        items.add(make)
    return items.inputs()


def _load_ip2p_folder(path: Path, resolution: int, skip_bad: bool) -> Inputs:
    """InstructPix2Pix's generated dataset: `<name>/prompt.json` and `<seed>_0.jpg`/`<seed>_1.jpg`."""
    listing = path / "seeds.json"
    if listing.is_file():
        try:
            entries = [
                (path / name, [str(s) for s in seeds]) for name, seeds in json.loads(listing.read_text())
            ]
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise UserError(f"{listing}: expected a JSON list of [name, [seeds]] ({err})") from err
    else:
        entries = []
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            pairs = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES]
            seeds = sorted({p.stem[:-2] for p in pairs if p.stem.endswith(("_0", "_1"))})
            entries.append((folder, seeds))
    if not entries:
        raise UserError(
            f"{path}: no InstructPix2Pix samples (<name>/prompt.json with <seed>_0.jpg, <seed>_1.jpg)"
        )
    items = _Collector(path, skip_bad)
    for folder, seeds in entries:
        for s in seeds or [None]:

            def make(folder: Path = folder, s: str | None = s) -> _Item:
                if s is None:
                    raise UserError(f"{folder}: no <seed>_0.jpg / <seed>_1.jpg image pair")
                prompt = folder / "prompt.json"
                if not prompt.is_file():
                    raise UserError(f"{folder / f'{s}_0.jpg'}: no instruction ({prompt} is missing)")
                try:
                    edit = json.loads(prompt.read_text()).get("edit")
                except (json.JSONDecodeError, AttributeError) as err:
                    raise UserError(f"{prompt}: not a JSON object with an 'edit' field") from err
                if not isinstance(edit, str) or not edit.strip():
                    raise UserError(f"{prompt}: no 'edit' instruction")
                source, target = (_pair_file(folder, s, k) for k in (0, 1))
                return _Item(
                    load_image(source, resolution), edit.strip(), None, load_image(target, resolution)
                )

            items.add(make)
    return items.inputs()


def _pair_file(folder: Path, seed: str, k: int) -> Path:
    """`<seed>_<k>` with any image suffix (.jpg in the released data)."""
    for suffix in (".jpg", *sorted(IMAGE_SUFFIXES - {".jpg"})):
        if (folder / f"{seed}_{k}{suffix}").is_file():
            return folder / f"{seed}_{k}{suffix}"
    return folder / f"{seed}_{k}.jpg"
