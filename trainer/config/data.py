"""The `data` section: where the inputs come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    # Where inputs come from (formats in trainer/data/inputs.py and the README):
    # "shapes": built-in seeded scenes edited with `instructions` (no ground truth);
    # "synthetic": seeded synthetic edits with ground-truth targets, masks and oracle metadata;
    # "folder": images in `path` edited with `instructions`;
    # "jsonl": `path` lists {"image", "instruction"[, "target", "mask", "exemplars", "metadata"]};
    # "spie": SPIE's layout, input images plus a folder of exemplar images for one concept;
    # "triplets": InstructPix2Pix (original, edit prompt, edited) triplets, a folder or a JSONL.
    source: Literal["shapes", "synthetic", "folder", "jsonl", "spie", "triplets"] = "shapes"
    # Image folder or JSONL file for the "folder", "jsonl", "spie" and "triplets" sources.
    path: str = ""
    # Instructions cycled over the inputs (the "shapes" and "folder" sources, and "spie" when
    # `input_name`/`style_name` are not given).
    instructions: tuple[str, ...] = ("make it brighter",)
    # Number of inputs drawn by the "shapes" and "synthetic" sources.
    num_items: int = 64
    # Seed of the "synthetic" data and of the "spie" source's instruction/exemplar draws; -1: run.seed.
    seed: int = -1
    # Split of the "synthetic" source: "train" or "heldout" (disjoint scenes, for evaluation).
    split: Literal["train", "heldout"] = "train"
    # Edit kinds of the "synthetic" source, cycled over the samples.
    kinds: tuple[Literal["recolor", "background", "remove", "brighten"], ...] = (
        "recolor",
        "background",
        "remove",
        "brighten",
    )
    # "spie" source: folder of exemplar images; empty: `<path>/exemplars`.
    exemplar_path: str = ""
    # "spie" source: name of what is edited (SPIE's input_name), filled into SPIE's templates
    # ("turn the {input_name} into {style_name}", ...). Empty: `instructions` are cycled instead.
    input_name: str = ""
    # "spie" source: name of the exemplars' concept (SPIE's style_name); set with `input_name`.
    style_name: str = ""
    # Report bad items (unreadable image, missing instruction, bad JSONL line) on stderr, one line
    # each, and load the good ones; false: the first bad item stops the run. `spie train --skip-bad`.
    skip_bad: bool = False
