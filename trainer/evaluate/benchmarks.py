"""GEdit-Bench-EN and ImgEdit-Bench (basic suite) read from a local folder in their published formats.

GEdit-Bench (stepfun-ai/GEdit-Bench on the Hugging Face hub, arXiv 2504.17761): the dataset's files
as downloaded, Parquet (`*.parquet`) or Arrow (`*.arrow`, the `datasets` library's own files), with
the columns listed in Step1X-Edit's `GEdit-Bench/generate_image_example.py`: `key`, `task_type`,
`instruction`, `instruction_language` ("en" / "cn"), `input_image` and `input_image_raw` (image
structs {bytes, path}) and `Intersection_exist` (the item is in the subset all compared models
handled). GEdit-Bench-EN is the rows with instruction_language "en"; its 11 task types are
`GEDIT_TASKS`. The edit is made from `input_image_raw`, as that script does.

ImgEdit-Bench (PKU-YuanGroup/ImgEdit, `Benchmark/Basic/`): `basic_edit.json` (key -> {"id": the
source image's path under the image root, "prompt": the instruction, "edit_type"}), `prompts.json`
(edit_type -> the judge's 1-5 rubric, with `<edit_prompt>` where the instruction goes) and the
source images (`<folder>/<id>`, or under `singleturn/` or `images/` as the benchmark archive unpacks).
Its 9 edit types are `IMGEDIT_TYPES`, in the leaderboard's column order ("compose" is its Hybrid).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.errors import UserError

GEDIT_TASKS = (
    "background_change",
    "color_alter",
    "material_alter",
    "motion_change",
    "ps_human",
    "style_change",
    "subject-add",
    "subject-remove",
    "subject-replace",
    "text_change",
    "tone_transfer",
)
IMGEDIT_TYPES = ("add", "adjust", "extract", "replace", "remove", "background", "style", "compose", "action")
IMGEDIT_COLUMNS = {"compose": "hybrid"}
BENCHMARKS = ("gedit-bench-en", "imgedit")

# Published figures (overall; GEdit-Bench-EN: VIEScore O with GPT-4.1 as the judge, full set;
# ImgEdit: 1-5 with GPT-4o as the judge), as quoted in issue 25 from the papers (Step1X-Edit,
# ImgEdit, Edit-R1). Only comparable with the same judge and settings.
PUBLISHED = {
    "InstructPix2Pix": (3.68, 1.88),
    "FLUX.1 Kontext [dev]": (6.00, 3.71),
    "FLUX.1 Kontext [dev] + Edit-R1": (6.74, 4.02),
    "Qwen-Image-Edit-2509": (7.54, 4.35),
    "Qwen-Image-Edit-2509 + Edit-R1": (7.76, 4.48),
}


@dataclass
class BenchItem:
    """One benchmark item: `source` is the image the editor gets (RGB)."""

    key: str
    task_type: str
    instruction: str
    source: Image.Image
    intersection: bool | None = None


def _image(cell, where: str) -> Image.Image:
    """An image cell of a `datasets` table ({"bytes", "path"}) as RGB."""
    data = cell.get("bytes") if isinstance(cell, dict) else cell
    if not data:
        raise UserError(f"{where}: no image bytes")
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except OSError as err:
        raise UserError(f"{where}: unreadable image ({err})") from None


def _arrow_rows(path: Path) -> list[dict]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError("reading GEdit-Bench needs pyarrow: pip install 'spie[benchmarks]'") from None
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all().to_pylist()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all().to_pylist()


def read_gedit(folder: str | Path, language: str = "en") -> list[BenchItem]:
    """The GEdit-Bench rows of `language` under `folder` (every *.parquet or *.arrow file, sorted)."""
    root = Path(folder)
    files = sorted([*root.rglob("*.parquet"), *root.rglob("*.arrow")])
    if not files:
        raise UserError(f"{root}: no GEdit-Bench *.parquet or *.arrow files")
    items = []
    for f in files:
        for n, row in enumerate(_arrow_rows(f)):
            missing = {"key", "task_type", "instruction", "instruction_language", "input_image_raw"} - set(
                row
            )
            if missing:
                raise UserError(f"{f}: not GEdit-Bench's columns (missing {sorted(missing)})")
            if row["instruction_language"] != language:
                continue
            if row["task_type"] not in GEDIT_TASKS:
                raise UserError(f"{f} row {n}: unknown task_type {row['task_type']!r}")
            image = _image(row["input_image_raw"] or row.get("input_image"), f"{f} row {n}")
            items.append(
                BenchItem(
                    str(row["key"]),
                    row["task_type"],
                    row["instruction"],
                    image,
                    row.get("Intersection_exist"),
                )
            )
    return items


def read_imgedit(folder: str | Path) -> tuple[list[BenchItem], dict[str, str]]:
    """ImgEdit's basic suite under `folder`: the items (sorted by key) and the rubric of each edit type."""
    root = Path(folder)
    meta = next((root / n for n in ("basic_edit.json", "singleturn.json") if (root / n).is_file()), None)
    if meta is None or not (root / "prompts.json").is_file():
        raise UserError(f"{root}: ImgEdit needs basic_edit.json and prompts.json (Benchmark/Basic/)")
    entries, prompts = json.loads(meta.read_text()), json.loads((root / "prompts.json").read_text())
    bases = [root, root / "singleturn", root / "images"]
    items = []
    for key in sorted(entries, key=lambda k: (len(k), k)):
        e = entries[key]
        if e.get("edit_type") not in IMGEDIT_TYPES:
            raise UserError(f"{meta}: {key}: unknown edit_type {e.get('edit_type')!r}")
        if e["edit_type"] not in prompts or "<edit_prompt>" not in prompts[e["edit_type"]]:
            raise UserError(f"{root / 'prompts.json'}: no rubric with <edit_prompt> for {e['edit_type']!r}")
        path = next((b / e["id"] for b in bases if (b / e["id"]).is_file()), None)
        if path is None:
            raise UserError(f"{meta}: {key}: image {e['id']} not found under {root}")
        with Image.open(path) as im:
            items.append(BenchItem(key, e["edit_type"], e["prompt"], im.convert("RGB")))
    return items, prompts


def rubric_aspects(rubric: str) -> list[str]:
    """The aspects an ImgEdit rubric asks for, from its response format ("<Aspect>: A number from 1
    to 5."), in order; the first is the instruction-following one."""
    aspects = []
    for line in rubric.splitlines():
        name, sep, rest = line.strip().partition(":")
        if sep and rest.strip().lower().startswith("a number from 1 to 5"):
            aspects.append(name.strip())
    if not aspects:
        raise UserError("an ImgEdit rubric without 'Aspect: A number from 1 to 5.' lines")
    return aspects
