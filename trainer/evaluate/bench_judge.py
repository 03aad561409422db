"""The benchmarks' judging protocols through our VLM judge (`reward_servers.vlm_judge`), and the pin.

GEdit-Bench-EN: VIEScore (TIGER-AI-Lab/VIEScore, as Step1X-Edit's GEdit-Bench evaluation uses it):
semantic consistency SC = min of the 0-10 ratings "did the edit succeed" and "no over-editing",
perceptual quality PQ = min of "natural" and "no artifacts", overall O = sqrt(SC * PQ); the judge's
`viescore` mode with its shipped, versioned prompts.

ImgEdit-Bench: the edit type's rubric from the benchmark's prompts.json (`<edit_prompt>` replaced by
the instruction), each of its three 1-5 aspects read in turn (the judge's `rating` mode on a 0-5
scale, the rubric and the aspect asked for as the question); as the rubrics say, the second and
third may be no higher than the first; the item's score is their mean (ImgEdit's
`step1_get_avgscore.py`), each type's score the mean of its items (`step2_typescore.py`).

Every rating is the expected value over the rating tokens at the answer slot of one forward pass (no
sampling): the judge is deterministic for a given batch, so `--judge-repeats` measures what is left,
the spread from batch composition and padding (items re-judged one at a time, in reverse order).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from trainer.evaluate.benchmarks import rubric_aspects

ASPECT_QUESTION = "\n\nGive only the {aspect} score, a number from 1 to 5."
IMGEDIT_PROMPT_VERSION = 1  # of ASPECT_QUESTION and the prompt file below


def folder_revision(model: str) -> str:
    """A revision for the judge: the hub snapshot's commit in a cached path, else a hash of a local
    folder's file names and sizes (and its config.json), else "unpinned" (a hub id: give --judge-revision)."""
    path = Path(model)
    if not path.is_dir():
        return "unpinned"
    if "snapshots" in path.parts[:-1]:
        return path.parts[path.parts.index("snapshots") + 1]
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    if (path / "config.json").is_file():
        h.update((path / "config.json").read_bytes())
    return "local-" + h.hexdigest()[:12]


def make_judge(benchmark: str, model: str, out_dir: Path, **kwargs: Any):
    """The `vlm_judge` scorer of `benchmark`'s protocol (kwargs: device, dtype, max_pixels...)."""
    from reward_servers.base import build_scorer

    if benchmark == "imgedit":
        prompts = out_dir / "imgedit_judge_prompts.yaml"
        prompts.parent.mkdir(parents=True, exist_ok=True)
        rating = {"images": ["source", "edit"], "text": "{instruction}"}
        prompts.write_text(yaml.safe_dump({"version": IMGEDIT_PROMPT_VERSION, "rating": rating}))
        # A rubric is ~500 tokens: lift the instruction limits for it.
        limits = {"max_instruction_bytes": 1 << 16, "max_instruction_tokens": 4096}
        return build_scorer(
            "vlm_judge",
            model_id=model,
            mode="rating",
            max_rating=5,
            prompts_path=str(prompts),
            **limits,
            **kwargs,
        )
    return build_scorer("vlm_judge", model_id=model, mode="viescore", **kwargs)


def pin(benchmark: str, judge, model: str, revision: str, seed: int, rubrics: dict | None) -> dict[str, Any]:
    """What the scores depend on besides the edits: written into the output."""
    version = judge.version
    if rubrics is not None:
        digest = hashlib.sha256(repr(sorted(rubrics.items())).encode()).hexdigest()[:12]
        version += f"-imgedit-prompts.json-{digest}"
    return {
        "model": model,
        "revision": revision or folder_revision(model),
        "prompt_version": version,
        "protocol": "VIEScore (SC, PQ, O = sqrt(SC*PQ), 0-10)" if benchmark != "imgedit" else "ImgEdit 1-5",
        "decoding": "expected rating over the rating tokens at the answer slot (one forward pass, no sampling)",
        "dtype": getattr(judge.model, "dtype", None).__str__(),
        "seed": seed,
    }


def _uint8(images) -> list[np.ndarray]:
    """(M, 3, R, R) in [0, 1] -> M (R, R, 3) uint8."""
    return [(x.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for x in images]


def judge_items(benchmark: str, judge, sources, edits, items, rubrics: dict | None) -> dict[str, np.ndarray]:
    """Per-item scores of one model's edits: GEdit {"sc", "pq", "o"}, ImgEdit {"score", each aspect}.

    Args:
        sources, edits: (M, 3, R, R) in [0, 1].
        items: the M `BenchItem`s (instructions and task types).
    """
    from reward_servers.base import ScoreBatch

    src, out = _uint8(sources), _uint8(edits)
    if benchmark != "imgedit":
        res = judge.score(ScoreBatch(out, src, [it.instruction for it in items]))
        get = lambda k: np.array([d.get(k, np.nan) for d in res.details], dtype=float)  # noqa: E731
        return {"sc": get("sc"), "pq": get("pq"), "o": res.scores}
    aspects = {t: rubric_aspects(r) for t, r in rubrics.items()}
    rows, index = [], []
    for i, it in enumerate(items):
        rubric = rubrics[it.task_type].replace("<edit_prompt>", it.instruction)
        for a, aspect in enumerate(aspects[it.task_type]):
            rows.append(rubric + ASPECT_QUESTION.format(aspect=aspect))
            index.append((i, a))
    res = judge.score(ScoreBatch([out[i] for i, _ in index], [src[i] for i, _ in index], rows))
    per = np.full((len(items), 3), np.nan)
    for (i, a), d in zip(index, res.details, strict=True):
        if a < 3:
            per[i, a] = d.get("rating", np.nan)
    per[:, 1:] = np.minimum(per[:, 1:], per[:, :1])  # "no higher than the first score"
    return {"score": per.mean(axis=1), "aspect1": per[:, 0], "aspect2": per[:, 1], "aspect3": per[:, 2]}


def judge_spread(benchmark: str, judge, sources, edits, items, rubrics, first: dict, n: int) -> dict:
    """Re-judge the first `n` items one at a time in reverse order: the largest and mean absolute
    change of the overall score from the first judging (the judge's own spread)."""
    key = "score" if benchmark == "imgedit" else "o"
    again = np.full(n, np.nan)
    for i in reversed(range(n)):
        again[i] = judge_items(
            benchmark, judge, sources[i : i + 1], edits[i : i + 1], items[i : i + 1], rubrics
        )[key][0]
    diff = np.abs(again - first[key][:n])
    return {
        "items": n,
        "metric": key,
        "max_abs_change": float(np.nanmax(diff)),
        "mean_abs_change": float(np.nanmean(diff)),
    }
