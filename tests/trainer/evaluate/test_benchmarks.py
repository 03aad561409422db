"""GEdit-Bench-EN and ImgEdit-Bench on synthetic mini-benchmarks written in each one's published
format (GEdit: the hub dataset's Parquet / Arrow columns; ImgEdit: Benchmark/Basic's JSON files and
image folder), edited by the tiny model and the toy editor and judged by a tiny seeded Qwen2-VL."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from reward_servers.vlm_judge import save_tiny
from sampler.synthetic import synthetic_edits
from trainer.cli import main
from trainer.evaluate.bench_run import run_benchmark
from trainer.evaluate.benchmarks import read_gedit, read_imgedit, rubric_aspects

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SETS = ["model.resolution=32", "sample.num_steps=3"]
RUBRIC = """
You rate {what} edits. Given the images before and after editing and the instruction, rate:
Prompt Compliance: 1 nothing done ... 5 exactly as asked
Visual Naturalness: 1 broken ... 5 seamless
Physical & Detail Coherence: 1 wrong ... 5 perfect
Example Response Format:
Brief reasoning: no more than 20 words.
Prompt Compliance: A number from 1 to 5.
Visual Naturalness: A number from 1 to 5.
Physical & Detail Coherence: A number from 1 to 5.
editing instruction is : <edit_prompt>.
"""


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def judge(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("judge")), family="qwen2_vl")


@pytest.fixture(scope="module")
def gedit(tmp_path_factory):
    """6 rows: 4 English over 2 task types (one outside the intersection), 2 Chinese."""
    edits = synthetic_edits(0, 6, 48, "heldout")
    rows = {k: [] for k in ("task_type", "key", "instruction", "instruction_language", "input_image", "input_image_raw", "Intersection_exist")}  # fmt: skip
    for i, e in enumerate(edits):
        rows["task_type"].append(["color_alter", "subject-remove"][i % 2])
        rows["key"].append(f"{i:032x}")
        rows["instruction"].append(e.instruction)
        rows["instruction_language"].append("en" if i < 4 else "cn")
        image = {"bytes": _png(e.source), "path": f"{i}.png"}
        rows["input_image"].append(image)
        rows["input_image_raw"].append(image)
        rows["Intersection_exist"].append(i != 3)
    root = tmp_path_factory.mktemp("gedit")
    (root / "data").mkdir()
    pq.write_table(pa.table(rows), root / "data" / "train-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def imgedit(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgedit")
    edits = synthetic_edits(1, 5, 48, "heldout")
    entries = {}
    for i, e in enumerate(edits):
        kind = ["adjust", "remove"][i % 2]
        (root / "singleturn" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(e.source).save(root / "singleturn" / kind / f"{i:09d}.jpg")
        entries[str(100 + i)] = {"id": f"{kind}/{i:09d}.jpg", "prompt": e.instruction, "edit_type": kind}
    (root / "basic_edit.json").write_text(json.dumps(entries))
    rubrics = {t: RUBRIC.format(what=t) for t in ("adjust", "remove", "add")}
    (root / "prompts.json").write_text(json.dumps(rubrics))
    return root


def test_readers_take_the_published_formats(gedit, imgedit, tmp_path):
    items = read_gedit(gedit)
    assert [it.task_type for it in items] == ["color_alter", "subject-remove"] * 2
    assert [it.intersection for it in items] == [True, True, True, False] and items[0].source.size == (48, 48)
    # The same table as the `datasets` library's Arrow file reads the same.
    table = pq.read_table(next(gedit.rglob("*.parquet")))
    with (
        pa.OSFile(str(tmp_path / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as w,
    ):
        w.write_table(table)
    assert [it.key for it in read_gedit(tmp_path)] == [it.key for it in items]
    items, rubrics = read_imgedit(imgedit)
    assert [it.key for it in items] == ["100", "101", "102", "103", "104"] and items[1].task_type == "remove"
    assert rubric_aspects(rubrics["add"]) == [
        "Prompt Compliance",
        "Visual Naturalness",
        "Physical & Detail Coherence",
    ]


def test_gedit_two_models_paired_with_a_pinned_judge(gedit, judge, tmp_path):
    summary = run_benchmark(
        "gedit-bench-en", gedit, ["tiny", "models/toy-editor"], judge, "configs/tiny.yaml", tmp_path,
        overrides=SETS, judge_repeats=2, judge_kwargs={"max_pixels": None}, resamples=200,
    )  # fmt: skip
    assert summary["num_items"] == 4
    o = summary["table"]["B"]["o"]
    assert set(o) == {"color_alter", "subject-remove", "overall", "overall_intersection"}
    assert 0 <= o["overall"] <= 10 and o["overall"] == pytest.approx(
        (o["color_alter"] + o["subject-remove"]) / 2
    )
    item = summary["items"][0]["scores"]["A"]
    assert item["o"] == pytest.approx(np.sqrt(item["sc"] * item["pq"]))
    d = summary["differences"]["o"]["overall"]
    per = summary["differences"]["o"]
    assert d["mean"] == pytest.approx((per["color_alter"]["mean"] + per["subject-remove"]["mean"]) / 2)
    assert d["mean"] == pytest.approx(o["overall"] - summary["table"]["A"]["o"]["overall"])
    j = summary["judge"]
    assert j["model"] == judge and j["revision"].startswith("local-") and "viescore" in j["prompt_version"]
    assert j["seed"] == 0 and "no sampling" in j["decoding"]
    assert summary["judge_spread"]["items"] == 2 and summary["judge_spread"]["max_abs_change"] < 0.05
    md = (tmp_path / "benchmark.md").read_text()
    assert "| model | color_alter | subject-remove | Avg |" in md and "InstructPix2Pix 3.68" in md


def test_imgedit_through_the_cli(imgedit, judge, tmp_path, capsys):
    argv = [
        "evaluate",
        "--benchmark",
        "imgedit",
        "--benchmark-dir",
        str(imgedit),
        "--model",
        "models/toy-editor",
    ]
    argv += ["--config", "configs/tiny.yaml", "--judge", judge, "--judge-revision", "test", "--quiet"]
    argv += [*sum((["--set", s] for s in SETS), []), "--out", str(tmp_path / "x.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| model | adjust | remove | Overall |" in out and "judge: " in out and "@ test" in out
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    scores = [it["scores"]["A"] for it in summary["items"]]
    assert all(max(s["aspect2"], s["aspect3"]) <= s["aspect1"] + 1e-9 for s in scores)
    assert all(0 <= s["score"] <= 5 for s in scores) and "InstructPix2Pix 1.88" in out
