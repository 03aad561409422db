"""Raw pixels through shared memory to a server on the same machine (reward_servers/shm.py), over a
real gRPC server on loopback."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.images import make_item
from reward_servers.shm import SharedMemoryError, SharedReader, SharedRegions

OK = pb.Result.STATUS_OK


def _items(rng, n: int, size: int = 48, tag: str = "") -> tuple[list[pb.Item], list[np.ndarray]]:
    edits = [rng.integers(0, 256, (size, size, 3), np.uint8) for _ in range(n)]
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2] = 255
    return [make_item(f"{tag}{i}", e, e[::-1], "x", mask=mask) for i, e in enumerate(edits)], edits


def test_scores_equal_the_socket_path_and_the_request_carries_no_pixels(serve, rng, tmp_path):
    st = serve("brightness", shared_dir=str(tmp_path))
    expected_scorer = build_scorer("brightness")
    with st.client() as plain, st.client(shared_dir=tmp_path) as shm:
        for round_ in range(3):  # the region is reused: each round's pixels, not the last one's
            items, edits = _items(rng, 6, tag=f"r{round_}-")
            request = pb.ScoreRequest(items=items)
            region, moved = shm._shared(request)
            shm.regions.release(region)
            assert request.ByteSize() > 6 * 48 * 48 * 6 and moved.ByteSize() < 1500
            assert moved.items[0].mask.encoding == pb.Image.ENCODING_RAW_UINT8_SHARED
            via_shm, via_socket = shm.score(items), plain.score(items)
            assert [r.status for r in via_shm.results] == [OK] * 6, [r.error for r in via_shm.results]
            expected = expected_scorer.score(ScoreBatch(edits, [e[::-1] for e in edits], ["x"] * 6)).scores
            np.testing.assert_allclose([r.score for r in via_shm.results], expected, atol=1e-12)
            assert [r.score for r in via_shm.results] == [r.score for r in via_socket.results]
        futures = [shm.score_future(pb.ScoreRequest(items=_items(rng, 2, tag=f"f{k}-")[0])) for k in range(3)]
        assert all(r.status == OK for f in futures for r in f.result().results)
        assert len(shm.regions._all) <= 4  # one region per request in flight, then reused
    assert [p.name for p in tmp_path.iterdir()] == []  # close() deleted the regions


def test_a_server_without_the_folder_fails_each_item_with_one_line(serve, rng, tmp_path, monkeypatch):
    monkeypatch.delenv("SPIE_BLOB_DIR", raising=False)
    st = serve("brightness")
    with st.client(shared_dir=tmp_path) as client:
        response = client.score(_items(rng, 2)[0])
    for result in response.results:
        assert result.status == pb.Result.STATUS_INVALID_INPUT
        assert "no shared folder (server.shared_dir or SPIE_BLOB_DIR)" in result.error


def test_the_reader_maps_only_regions_inside_its_folder(tmp_path):
    folder = tmp_path / "shm"
    regions = SharedRegions(folder)
    items, edits = _items(np.random.default_rng(0), 2, size=8)
    region, moved = regions.pack(items)
    name, offset = moved[1].edited.data.decode().split()
    reader = SharedReader(folder)
    np.testing.assert_array_equal(
        reader.pixels(moved[1].edited.data, 8 * 8 * 3, "f").reshape(8, 8, 3), edits[1]
    )
    (tmp_path / "outside").write_bytes(b"x" * 4096)
    os.symlink(tmp_path / "outside", folder / "spie-shm-00000000-9.region")
    for data, why in [
        (b"../outside 0", "not a region"),
        (b"spie-shm-00000000-9.region 0", "Too many levels of symbolic links"),
        (f"{name} {1 << 30}".encode(), "past the end"),
        (b"\xff\xfe 0", "malformed"),
        (b"spie-shm-00000000-1.region 0", "No such file"),
    ]:
        with pytest.raises(SharedMemoryError, match=why):
            reader.pixels(data, 192, "f")
    with pytest.raises(SharedMemoryError, match="no shared folder"):
        SharedReader("").pixels(moved[0].edited.data, 192, "f")
    # The client grows its region for a larger request: the reader maps it again.
    regions.release(region)
    big, big_edits = _items(np.random.default_rng(1), 8, size=256)
    _, moved = regions.pack(big)
    np.testing.assert_array_equal(
        reader.pixels(moved[7].source.data, 256 * 256 * 3, "f").reshape(256, 256, 3), big_edits[7][::-1]
    )
    assert len(reader._maps) == 1
    regions.close()  # deletes the region: the reader lets go of it at its next prune
    reader._prune()
    assert reader._maps == {}


def test_regions_a_dead_client_left_are_swept(tmp_path):
    old, fresh = tmp_path / "spie-shm-0123456789ab-0.region", tmp_path / "spie-shm-0123456789ab-1.region"
    for f in (old, fresh):
        f.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    SharedRegions(tmp_path).close()
    assert [p.name for p in tmp_path.iterdir()] == [fresh.name]
