"""`spie train` with `reward.transport: queue`: embedded Redis, local `spie serve` replicas, RewardClient."""

from __future__ import annotations

import pytest

from trainer.loop import train
from trainer.run.log import read_metrics


@pytest.mark.slow
def test_queue_transport_gives_the_in_process_scores(tiny_config, capsys):
    common = ["run.num_epochs=2", "run.image_log_freq=0"]
    local = read_metrics(train(tiny_config(*common, "run.name=local")))
    queued_dir = train(tiny_config(*common, "run.name=queued", "reward.transport=queue"))
    out = capsys.readouterr().out
    assert "started an embedded Redis" in out and "started 1 reward server(s): brightness" in out
    queued = read_metrics(queued_dir)
    # Same seeds, same weights: the scores that travelled through Redis and a separate server process
    # are exactly the ones computed in process, and training followed the same path.
    for a, b in zip(local, queued, strict=True):
        assert a["brightness.mean"] == pytest.approx(b["brightness.mean"], abs=1e-12)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-9)
        assert b["items_dropped"] == 0
