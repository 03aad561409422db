"""The score cache on a real gRPC server: identical edits are answered without calling the scorer,
whatever their wire encoding; any changed input, scorer version or failure is scored again; hits,
misses and the hit ratio are in the Prometheus metrics."""

from __future__ import annotations

import numpy as np
import pytest

from reward_servers.base import ScoreBatch, ScoreResult
from reward_servers.batcher import BatcherConfig
from reward_servers.cache import ScoreCache, item_key
from reward_servers.images import make_item


class CountingScorer:
    """Scores mean brightness and records every item it is asked to score."""

    name, version, model_id, higher_is_better, max_batch_size = "counting", "1", "", True, 32

    def __init__(self) -> None:
        self.seen: list[str] = []

    def score(self, batch: ScoreBatch) -> ScoreResult:
        self.seen += list(batch.instructions)
        scores = [float(im.mean()) / 255 for im in batch.edited]
        errors = ["refused" if ins == "refuse" else None for ins in batch.instructions]
        return ScoreResult(
            np.array([np.nan if e else s for s, e in zip(scores, errors, strict=True)]), [], errors
        )


def _metric(st, name: str) -> float:
    from prometheus_client import generate_latest

    for line in generate_latest(st.server.metrics.registry).decode().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exported")


def test_identical_edits_cost_nothing_over_grpc(serve, rng):
    scorer = CountingScorer()
    st = serve(
        lambda: scorer, name="counting", batching=BatcherConfig(max_queue_delay_ms=1.0, cache_items=64)
    )
    edits = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    source = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    first = [make_item(f"a{i}", edits[i], source, f"edit {i}") for i in range(3)]
    with st.client() as client:
        scored = client.score(first)
        assert len(scorer.seen) == 3
        # The same edits again, as PNG and with new ids: answered from the cache.
        again = [make_item(f"b{i}", edits[i], source, f"edit {i}", encoding="png") for i in range(3)]
        repeat = client.score(again)
        assert len(scorer.seen) == 3
        assert [r.score for r in repeat.results] == [r.score for r in scored.results]
        assert [r.id for r in repeat.results] == ["b0", "b1", "b2"]
        # A changed instruction, mask or metadata is a new item.
        changed = [
            make_item("c0", edits[0], source, "edit 0 differently"),
            make_item("c1", edits[1], source, "edit 1", mask=np.eye(24, dtype=bool)),
            make_item("c2", edits[2], source, "edit 2"),
        ]
        changed[2].metadata.update({"kind": "recolor"})
        client.score(changed)
        assert len(scorer.seen) == 6
        # Failures are not cached: a refused item is asked again.
        client.score([make_item("r", edits[0], source, "refuse")])
        client.score([make_item("r", edits[0], source, "refuse")])
        assert scorer.seen.count("refuse") == 2
    assert _metric(st, "spie_reward_cache_hits_total") == 3
    assert _metric(st, "spie_reward_cache_misses_total") == 8
    assert _metric(st, "spie_reward_cache_hit_ratio") == pytest.approx(3 / 11)


def test_cache_off_by_default_and_keys_carry_the_version(serve, rng):
    scorer = CountingScorer()
    st = serve(lambda: scorer, name="counting")
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    item = make_item("a", image, image, "x")
    with st.client() as client:
        client.score([item])
        client.score([item])
    assert len(scorer.seen) == 2
    fields = (np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 3), np.uint8), "x", None, [], {"a": 1})
    assert item_key("s/1/", fields) == item_key("s/1/", fields)
    assert item_key("s/1/", fields) != item_key("s/2/", fields)
    assert item_key("s/1/", fields) != item_key("s/1/", (*fields[:5], {"a": 2}))


def test_cache_is_bounded_lru():
    cache = ScoreCache(2)
    cache.put(b"a", 1)
    cache.put(b"b", 2)
    assert cache.get(b"a") == 1  # a is now the most recent
    cache.put(b"c", 3)
    assert cache.get(b"b") is None and cache.get(b"a") == 1 and len(cache) == 2
    assert cache.hit_ratio == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="max_items"):
        ScoreCache(0)
