"""The pieces `make demo` shows a new user: the shipped toy editor, the oracle's per-epoch success in
metrics.jsonl, the reward curve, and the held-out comparison written at the end of `spie train`."""

from __future__ import annotations

import json

from trainer.evaluate.compare import evaluate_models
from trainer.loop import train
from trainer.run.log import read_metrics

ORACLE = [
    "data.source=synthetic",
    "data.num_items=32",
    'reward.scorers=[{"name": "oracle_edit", "role": "semantic"}, '
    '{"name": "oracle_structure", "role": "structural", "weight": 0.5}]',
]


def test_the_shipped_toy_editor_edits_far_better_than_the_untrained_tiny_model(tiny_config, tmp_path):
    """models/toy-editor is the SFT result: on held-out synthetic edits it beats the seeded tiny model."""
    config = tiny_config(
        *ORACLE, "data.split=heldout", "sample.num_steps=10", "model.use_lora=false", previous=True
    )
    summary = evaluate_models(
        ["tiny", "models/toy-editor"], config, tmp_path / "eval", num_items=24, seed=0, resamples=200
    )
    success = summary["metrics"]
    tiny, toy = success["A"]["oracle_edit.success"]["mean"], success["B"]["oracle_edit.success"]["mean"]
    print(f"held-out oracle success: tiny {tiny:.2f}, toy editor {toy:.2f}")
    assert tiny < 0.25 and toy > 0.45
    assert summary["differences"]["oracle_edit.success"]["excludes_zero"]


def test_train_logs_oracle_success_and_writes_the_final_report(tiny_config):
    config = tiny_config(
        *ORACLE,
        "model.pretrained=models/toy-editor",
        "run.num_epochs=1",
        "run.name=report",
        "train.objective=spie_ranking",
        "eval.after_training=true",
        "eval.num_items=4",
        "eval.resamples=50",
        previous=True,
    )
    run_dir = train(config)
    (record,) = read_metrics(run_dir)
    assert 0 <= record["oracle_edit.success"] <= 1 and "oracle_edit.colour_error" in record
    for name in ("reward_curve.png", "before_after.png", "eval.json"):
        assert (run_dir / name).stat().st_size > 0, name
    summary = json.loads((run_dir / "eval.json").read_text())
    assert [m["label"] for m in summary["models"]] == ["start", "trained"]
    assert summary["num_items"] == 4
    assert all(item["instruction"] for item in summary["items"])
