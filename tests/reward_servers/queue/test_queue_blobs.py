"""The blob path (reward_servers/queue/blobs.py): payloads in a shared folder, references in Redis,
through a real Redis and a real `spie serve` replica."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from queue_helpers import brightness_items

from reward_servers.queue.blobs import REF_PREFIX, BlobError, BlobFolder, BlobReader
from trainer.errors import UserError
from trainer.rewards.queue import QueueClientConfig, RewardClient


def _net_in(rdb) -> int:
    return int(rdb.info("stats")["total_net_input_bytes"])


def test_payloads_go_through_the_folder_not_redis_and_score_the_same(redis_server, rdb, replicas, tmp_path):
    folder = tmp_path / "blobs"
    replicas(scorer_kwargs={"batch_seconds": 0.0}, queue_cfg={"blob_dir": str(folder)})
    items, expected = brightness_items(16, size=64)  # 16 x 24 KiB of pixels
    payload = sum(len(it.SerializeToString()) for it in items)
    received = {}
    for name, blob_dir in (("inline", ""), ("blob", str(folder))):
        config = QueueClientConfig(url=redis_server.url, deadline_s=20, poll_s=0.2, blob_dir=blob_dir)
        with RewardClient(["sleep"], config, password=redis_server.password) as client:
            before = _net_in(rdb)
            scores = client.score_items(items)
            received[name] = _net_in(rdb) - before
        assert not scores.failed(), scores.errors
        np.testing.assert_allclose(scores.values["sleep"], expected)
    # Inline, Redis receives every payload (from the client); on the blob path only references.
    assert received["inline"] > payload
    assert received["blob"] < payload / 10, received
    assert list(folder.iterdir()) == []  # the client deleted its batch file once gathered


def test_a_replica_without_the_folder_fails_the_items_with_one_line(redis_server, replicas, tmp_path):
    replicas(scorer_kwargs={"batch_seconds": 0.0})  # no blob_dir, no SPIE_BLOB_DIR
    items, _ = brightness_items(3)
    config = QueueClientConfig(url=redis_server.url, deadline_s=20, poll_s=0.2, blob_dir=str(tmp_path / "b"))
    with RewardClient(["sleep"], config, password=redis_server.password) as client:
        scores = client.score_items(items)
    for error in scores.errors["sleep"]:
        assert "this replica has none: set queue.blob_dir or SPIE_BLOB_DIR" in error


def test_references_stay_inside_the_folder(tmp_path):
    folder = tmp_path / "blobs"
    refs = BlobFolder(folder).write("run.b1", [b"abc", b"", b"defgh"])
    reader = BlobReader(folder)
    assert reader.resolve([b"inline", *refs]) == [b"inline", b"abc", b"", b"defgh"]
    (tmp_path / "secret.items").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.items", folder / "link.items")
    bad = [
        REF_PREFIX + b"../secret.items 0 6",
        REF_PREFIX + b"/etc/passwd 0 6",
        REF_PREFIX + b".hidden.items 0 1",
        REF_PREFIX + b"link.items 0 6",  # a symlink is not followed
        REF_PREFIX + b"run.b1.items 5 99",  # past the end
        REF_PREFIX + b"run.b1.items x",
    ]
    out = reader.resolve(bad)
    assert all(isinstance(e, BlobError) for e in out), out
    assert reader.resolve([REF_PREFIX + b"gone.items 0 3"]) == [None]  # gathered: nothing to score
    assert isinstance(BlobReader("").resolve(refs[:1])[0], BlobError)


def test_the_client_sweeps_files_a_dead_client_left(redis_server, tmp_path):
    folder = tmp_path / "blobs"
    folder.mkdir()
    old, fresh, other = folder / "dead.b1.items", folder / "live.b1.items", folder / "notes.txt"
    for f in (old, fresh, other):
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    config = QueueClientConfig(url=redis_server.url, blob_dir=str(folder), blob_ttl_s=3600)
    RewardClient(["sleep"], config, password=redis_server.password).close()
    assert sorted(p.name for p in folder.iterdir()) == ["live.b1.items", "notes.txt"]


def test_an_unusable_folder_is_one_clear_line(redis_server, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = QueueClientConfig(url=redis_server.url, blob_dir=str(blocker / "sub"))
    with pytest.raises(UserError, match="reward.queue.blob_dir .*cannot create it"):
        RewardClient(["sleep"], config, password=redis_server.password)
