"""What `spie evaluate` judges: items of (source, instruction[, edit, mask, target, metadata]).

Precomputed edits come as a JSONL file or a folder:

- JSONL, one object per line, paths relative to the file:
  `{"source": "a.png", "output": "a_edit.png", "instruction": "make the circle red",
    "mask": "a_mask.png", "target": "a_target.png", "metadata": {...}}`
  `output` is the edit to judge; `mask` (white inside the edit region), `target` (the ground-truth
  edit), `exemplar` and `metadata` are optional. The names of the training data's JSONL are accepted
  too (`image`/`original`/`input_image` for source, `edit_prompt` for instruction, `edited_image`
  for target), so a data file with an `output` added to each line is an edits file. (In those
  formats `edited` names the ground-truth target, so it is not read as the output.)
- a folder with subfolders `source/` and `output/` holding images paired by file stem, optional
  `mask/` and `target/` likewise, and each item's instruction in `instruction/<stem>.txt` (or one
  instruction for all given by `--instruction`).

Inputs to generate from come from the config's `data` section (`trainer.data.inputs`, any of its sources),
see `items_from_config`.

Every image is loaded and resized to resolution x resolution as in `trainer.data.inputs`. A bad item (a
line that is not JSON, a missing or broken image, no instruction) stops with one line naming the
file and line, or, with `skip_bad`, is recorded in `EvalItems.skipped` and left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.config import Config
from trainer.data.inputs import IMAGE_SUFFIXES, first_field, jsonl_record, load_image, load_inputs
from trainer.errors import UserError


@dataclass
class EvalItems:
    """M items to evaluate.

    Attributes:
        sources: (M, 3, R, R) in [0, 1].
        instructions: M instructions.
        masks: M entries, (R, R) bool (True inside the edit region) or None.
        targets: M entries, (3, R, R) ground-truth edits in [0, 1] or None.
        metadata: M dicts of per-item facts for the scorers (empty when unknown).
        names: M labels saying where each item came from (file and line, or data source and index).
        exemplars: (M, 3, R, R) exemplar images, or None.
        edited: (M, 3, R, R) precomputed edits, or None when the edits are to be generated.
        skipped: {"where", "error"} of each bad item left out (with skip_bad).
    """

    sources: torch.Tensor
    instructions: list[str]
    masks: list[torch.Tensor | None]
    targets: list[torch.Tensor | None]
    metadata: list[dict[str, Any]]
    names: list[str]
    exemplars: torch.Tensor | None = None
    edited: torch.Tensor | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.instructions)

    def head(self, n: int | None) -> EvalItems:
        """The first n items (all of them when n is None)."""
        if n is None or n >= len(self):
            return self
        cut = lambda t: None if t is None else t[:n]  # noqa: E731
        return EvalItems(
            self.sources[:n],
            self.instructions[:n],
            self.masks[:n],
            self.targets[:n],
            self.metadata[:n],
            self.names[:n],
            cut(self.exemplars),
            cut(self.edited),
            self.skipped,
        )


def _mask(path: Path, resolution: int) -> torch.Tensor:
    return load_image(path, resolution).mean(0) > 0.5


def _record_item(
    record: dict[str, Any], base: Path, resolution: int, instruction: str | None
) -> dict[str, Any]:
    """Load one record's images; raises `UserError` naming what is wrong."""
    source = first_field(record, "image")
    if not source:
        raise UserError("expected a 'source' (or 'image') field")
    text = str(first_field(record, "instruction") or instruction or "").strip()
    if not text:
        raise UserError(f"no instruction for {source}")
    if not record.get("output"):
        raise UserError(
            f"no 'output' image (the edit to judge) for {source}"
            + (" ('edited' names the ground-truth target)" if record.get("edited") else "")
        )
    meta = record.get("metadata") or {}
    if not isinstance(meta, dict):
        raise UserError("'metadata' must be an object")
    target = first_field(record, "target")
    return {
        "source": load_image(base / source, resolution),
        "instruction": text,
        "output": load_image(base / record["output"], resolution),
        "mask": _mask(base / record["mask"], resolution) if record.get("mask") else None,
        "target": load_image(base / target, resolution) if target else None,
        "exemplar": load_image(base / record["exemplar"], resolution) if record.get("exemplar") else None,
        "metadata": meta,
    }


def _jsonl_records(path: Path, skipped: list, skip_bad: bool):
    """(where, record) per non-empty line; a bad line raises or is recorded in `skipped`."""
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = jsonl_record(path, n, line)
        except UserError as err:
            if not skip_bad:
                raise
            skipped.append({"where": where, "error": str(err).removeprefix(f"{where}: ")})
            continue
        yield where, record


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in sorted(IMAGE_SUFFIXES):
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _folder_records(root: Path, instruction: str | None):
    """(where, record) per image of `output/`, with its source, mask, target and instruction."""
    outputs = root / "output"
    if not outputs.is_dir() or not (root / "source").is_dir():
        raise UserError(f"{root}: expected subfolders source/ and output/ (see `spie evaluate --help`)")
    files = sorted(p for p in outputs.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{outputs}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for f in files:
        text = root / "instruction" / f"{f.stem}.txt"
        source = _find(root / "source", f.stem) or root / "source" / f"{f.stem}.png"
        record: dict[str, Any] = {
            "source": str(source),
            "output": str(f),
            "instruction": text.read_text().strip() if text.is_file() else instruction,
        }
        for key in ("mask", "target"):
            found = _find(root / key, f.stem)
            if found:
                record[key] = str(found)
        if not record["instruction"]:
            record["error"] = f"no instruction ({text} is missing; or pass --instruction)"
        yield str(f), record


def read_edits(
    path: str | Path, resolution: int, instruction: str | None = None, skip_bad: bool = False
) -> EvalItems:
    """Load a JSONL file or a folder of precomputed edits (see the module docstring)."""
    path = Path(path)
    skipped: list[dict[str, str]] = []
    if path.is_dir():
        records, base = _folder_records(path, instruction), Path()
    elif path.is_file():
        records, base = _jsonl_records(path, skipped, skip_bad), path.parent
    else:
        raise UserError(f"edits not found: {path} (a JSONL file or a folder)")
    loaded, names = [], []
    for where, record in records:
        try:
            if record.get("error"):
                raise UserError(record["error"])
            loaded.append(_record_item(record, base, resolution, instruction))
            names.append(where)
        except UserError as err:
            if not skip_bad:
                raise UserError(f"{where}: {err}") from err
            skipped.append({"where": where, "error": str(err)})
    if not loaded:
        first = (
            f" ({len(skipped)} bad, first: {skipped[0]['where']}: {skipped[0]['error']})" if skipped else ""
        )
        raise UserError(f"{path}: no usable items{first}")
    exemplars = [x["exemplar"] for x in loaded]
    if any(e is None for e in exemplars) and any(e is not None for e in exemplars):
        raise UserError(f"{path}: give an exemplar for every item or for none")
    return EvalItems(
        sources=torch.stack([x["source"] for x in loaded]),
        instructions=[x["instruction"] for x in loaded],
        masks=[x["mask"] for x in loaded],
        targets=[x["target"] for x in loaded],
        metadata=[x["metadata"] for x in loaded],
        names=names,
        exemplars=None if exemplars[0] is None else torch.stack(exemplars),
        edited=torch.stack([x["output"] for x in loaded]),
        skipped=skipped,
    )


def items_from_config(config: Config) -> EvalItems:
    """The inputs `config.data` describes (as training loads them), as evaluation items."""
    data = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    m = len(data)
    masks = getattr(data, "masks", None)
    targets = getattr(data, "targets", None)
    metadata = getattr(data, "metadata", None)
    split = getattr(config.data, "split", None)
    tag = config.data.source + (f"/{split}" if split and config.data.source == "synthetic" else "")
    return EvalItems(
        sources=data.sources,
        instructions=list(data.instructions),
        masks=[None if masks is None else masks[i] for i in range(m)],
        targets=[None if targets is None else targets[i] for i in range(m)],
        metadata=[dict(x) for x in metadata] if metadata is not None else [{} for _ in range(m)],
        names=[f"{tag}#{i}" for i in range(m)],
        exemplars=getattr(data, "exemplars", None),
    )
