"""The proto API: committed generated code is fresh, and messages round-trip."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from protos.spie.reward.v1 import reward_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]


def _generate_into(tmp_path):
    pytest.importorskip("grpc_tools")
    sys.path.insert(0, str(ROOT / "protos"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    return generate, generate.generate(tmp_path)  # (module, generated paths relative to tmp_path)


def _drop_json_names(file_proto) -> None:
    def walk(message):
        for f in message.field:
            f.ClearField("json_name")
        for nested in message.nested_type:
            walk(nested)

    for message in file_proto.message_type:
        walk(message)


def test_committed_descriptor_matches_the_proto(tmp_path):
    """The committed code describes exactly what reward.proto says (independent of tool versions)."""
    from google.protobuf import descriptor_pb2

    pytest.importorskip("grpc_tools")
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{well_known}", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, "spie/reward/v1/reward.proto"]) == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(fresh)  # protoc adds json_name to descriptor sets, not to generated code
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "protos/spie/reward/v1/reward_pb2.py is stale: run `make protos`"


def test_generated_files_are_fresh(tmp_path):
    """With the grpcio-tools that generated them, regenerating changes nothing."""
    from importlib.metadata import version

    _, generated = _generate_into(tmp_path)
    assert {p.name for p in generated} == {"reward_pb2.py", "reward_pb2.pyi", "reward_pb2_grpc.py"}
    committed_grpc = (ROOT / "protos/spie/reward/v1/reward_pb2_grpc.py").read_text()
    if f"GRPC_GENERATED_VERSION = '{version('grpcio-tools')}'" not in committed_grpc:
        pytest.skip(f"installed grpcio-tools {version('grpcio-tools')} differs from the generator's")
    for rel in generated:
        committed = ROOT / "protos" / rel
        assert committed.exists(), f"{committed} missing: run `make protos`"
        assert committed.read_text() == (tmp_path / rel).read_text(), (
            f"{committed} is stale: run `make protos`"
        )


def test_request_round_trip():
    item = pb.Item(
        id="a/0",
        edited=pb.Image(
            encoding=pb.Image.ENCODING_RAW_UINT8, data=b"\x01\x02\x03", width=1, height=1, channels=3
        ),
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
