"""A generative judge's reasoning (`vlm_judge` in EditScore mode, on a tiny seeded Qwen2-VL) reaches
the trainer by every transport. One real replica process (`spie serve`, gRPC and the Redis queue)
returns, in `Result.texts`, the texts the same scorer gives in process; the queue client puts them
in `Scores.texts` beside the values; `spie evaluate` writes them into each item's row."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from reward_servers.__main__ import main as reward_main
from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.client import ScorerClient
from reward_servers.images import make_item
from reward_servers.vlm_judge import save_tiny
from trainer.evaluate.compare import evaluate_edits
from trainer.rewards.queue import QueueClientConfig, RewardClient
from trainer.rewards.scores import texts_lists

R = 32  # image side


@pytest.fixture(scope="module")
def judge_kwargs(tmp_path_factory) -> dict:
    folder = save_tiny(str(tmp_path_factory.mktemp("judge")), family="qwen2_vl")
    return {"model_id": folder, "mode": "editscore", "max_pixels": None, "max_new_tokens": 6}


def _pairs(n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (R, R, 3), dtype=np.uint8) for _ in range(n)]
    edits = [rng.integers(0, 256, (R, R, 3), dtype=np.uint8) for _ in range(n)]
    return edits, sources, ["add a red hat", "make it snowy", "remove the cup"][:n]


def test_reasoning_travels_over_grpc_and_the_queue(
    judge_kwargs, one_thread, redis_server, replicas, tmp_path, capsys
):
    edits, sources, instructions = _pairs(3)
    local = build_scorer("vlm_judge", **judge_kwargs).score(ScoreBatch(edits, sources, instructions))
    assert all(set(t) == {"sc_reasoning", "pq_reasoning"} for t in local.texts)
    items = [make_item(f"i{k}", edits[k], sources[k], instructions[k]) for k in range(3)]

    replica = replicas(scorer="vlm_judge", scorer_kwargs=judge_kwargs)
    port = re.search(r"listening on \S+:(\d+)", "\n".join(replica.lines)).group(1)
    with ScorerClient(f"127.0.0.1:{port}", timeout_s=120) as client:
        response = client.score(items)
    assert [dict(r.texts) for r in response.results] == local.texts
    assert [r.score for r in response.results] == pytest.approx(local.scores.tolist(), abs=1e-5)
    # `spie-reward score --json` prints them too.
    paths = []
    for k in range(3):
        paths += [tmp_path / f"e{k}.png", tmp_path / f"s{k}.png"]
        Image.fromarray(edits[k]).save(paths[-2])
        Image.fromarray(sources[k]).save(paths[-1])
    argv = ["score", "--server", f"127.0.0.1:{port}", "--json", "--instruction", instructions[0]]
    assert reward_main([*argv, "--images", str(paths[0]), "--sources", str(paths[1])]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == local.texts[0]

    config = QueueClientConfig(url=redis_server.url, poll_s=0.2, deadline_s=120)
    with RewardClient(["vlm_judge"], config, password=redis_server.password) as client:
        scores = client.score_items(items)
    assert scores.texts == texts_lists("vlm_judge", local.texts)
    assert set(scores.texts) == {"vlm_judge.sc_reasoning", "vlm_judge.pq_reasoning"}
    assert scores.values["vlm_judge"].tolist() == pytest.approx(local.scores.tolist(), abs=1e-5)
    # Selecting and joining batches keeps each item's text with its value.
    again = type(scores).concat([scores.select([2]), scores.select([0, 1])])
    assert again.texts["vlm_judge.sc_reasoning"] == [
        scores.texts["vlm_judge.sc_reasoning"][k] for k in (2, 0, 1)
    ]


def test_evaluate_writes_each_items_reasoning(judge_kwargs, one_thread, tmp_path):
    edits, sources, instructions = _pairs(2)
    lines = []
    for k in range(2):
        Image.fromarray(sources[k]).save(tmp_path / f"s{k}.png")
        Image.fromarray(edits[k]).save(tmp_path / f"e{k}.png")
        lines.append(
            json.dumps({"source": f"s{k}.png", "output": f"e{k}.png", "instruction": instructions[k]})
        )
    (tmp_path / "edits.jsonl").write_text("\n".join(lines) + "\n")
    scorer = json.dumps({"name": "vlm_judge", "kwargs": judge_kwargs})  # JSON is YAML
    summary = evaluate_edits(
        tmp_path / "edits.jsonl",
        "configs/tiny.yaml",
        tmp_path / "out",
        overrides=[f"model.resolution={R}", f"reward.scorers=[{scorer}]"],
        grid_items=0,
    )
    want = build_scorer("vlm_judge", **judge_kwargs).score(ScoreBatch(edits, sources, instructions)).texts
    for row, texts in zip(summary["items"], want, strict=True):
        assert row["texts"] == {"A": {f"vlm_judge.{k}": v for k, v in texts.items()}}
    on_disk = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [row["texts"] for row in on_disk["items"]] == [row["texts"] for row in summary["items"]]


def test_training_writes_the_judged_samples(judge_kwargs, one_thread, tiny_config):
    """A run's samples/epoch_N.jsonl holds, for each edit in that epoch's grid, its instruction,
    every scorer's value and details, and the judge's reasoning."""
    from trainer.loop import train

    scorers = json.dumps([{"name": "vlm_judge", "kwargs": judge_kwargs}, {"name": "brightness"}])
    run = train(
        tiny_config(
            f"reward.scorers={scorers}",
            "run.num_epochs=1",
            "sample.batch_size=4",
            "sample.nb_gen=2",
            "train.batch_size=8",
            "reward.transport=inprocess",
        )
    )
    lines = [json.loads(x) for x in (run / "samples" / "epoch_0000.jsonl").read_text().splitlines()]
    assert len(lines) == 8  # 4 rows of the grid x 2 edits
    for row in lines:
        assert row["instruction"]
        assert set(row["scores"]) == {"vlm_judge", "brightness"} and 0 <= row["scores"]["vlm_judge"] <= 10
        assert row["details"]["vlm_judge.prompt_version"] == 1.0
        assert set(row["texts"]) == {"vlm_judge.sc_reasoning", "vlm_judge.pq_reasoning"}
    assert (run / "samples" / "epoch_0000.png").is_file()


def test_joining_batches_where_one_lacks_a_detail_or_text():
    """A batch whose items all failed has no details or texts: joined with one that has them, its
    items read NaN and ""."""
    from trainer.rewards.scores import Scores

    said = Scores(
        {"j": np.array([1.0, 2.0])},
        {"j": [None, None]},
        {"j.sc": np.array([3.0, 4.0])},
        {"j.sc_reasoning": ["a", "b"]},
    )
    failed = Scores({"j": np.array([np.nan])}, {"j": ["scorer returned nan"]})
    joined = Scores.concat([failed, said])
    assert len(joined) == 3 and joined.errors["j"] == ["scorer returned nan", None, None]
    assert np.isnan(joined.details["j.sc"][0]) and joined.details["j.sc"][1:].tolist() == [3.0, 4.0]
    assert joined.texts == {"j.sc_reasoning": ["", "a", "b"]}
    assert joined.rows(1) == [{"scores": {"j": None}, "details": {"j.sc": None}}]
