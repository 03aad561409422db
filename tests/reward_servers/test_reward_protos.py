"""The proto API: committed generated code is fresh, and messages round-trip."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from protos.spie.reward.v1 import reward_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path):
    pytest.importorskip("grpc_tools")
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    generated = generate.generate(tmp_path)
    assert {p.name for p in generated} == {"reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py"}
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.exists(), f"{committed} missing: run `make protos`"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{committed} is stale: run `make protos`"


def test_request_round_trip():
    item = pb.Item(
        id="a/0",
        edited=pb.Image(encoding=pb.Image.ENCODING_RAW_UINT8, data=b"\x01\x02\x03", width=1, height=1, channels=3),
        source=pb.Image(encoding=pb.Image.ENCODING_PNG, data=b"\x89PNG..."),
        exemplars=[pb.Image(encoding=pb.Image.ENCODING_PNG, data=b"x")] * 2,
        instruction="add snow",
        mask=pb.Image(encoding=pb.Image.ENCODING_RAW_UINT8, data=b"\xff", width=1, height=1, channels=1),
    )
    item.metadata.update({"group": "g1", "step": 3, "flag": True})
    request = pb.ScoreRequest(items=[item], scorer="ssim_structure", deadline_unix_ms=1234)
    back = pb.ScoreRequest.FromString(request.SerializeToString())
    assert back == request
    assert back.items[0].metadata["step"] == 3 and back.items[0].metadata["group"] == "g1"
    assert len(back.items[0].exemplars) == 2 and back.items[0].HasField("mask")


def test_response_round_trip():
    response = pb.ScoreResponse(scorer="s", version="1")
    response.results.add(id="a", score=0.5, status=pb.Result.STATUS_OK).details.update({"ssim": 0.9})
    response.results.add(id="b", score=math.nan, status=pb.Result.STATUS_INVALID_INPUT, error="bad")
    back = pb.ScoreResponse.FromString(response.SerializeToString())
    assert back.results[0].details["ssim"] == 0.9
    assert math.isnan(back.results[1].score) and back.results[1].error == "bad"
