"""Issue 15 on the gRPC side: metadata NaN fails its item alone, a decoded-bytes budget per request,
error text without memory addresses, and `spie serve` refusing a public address without a token."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.__main__ import main
from reward_servers.base import TRUNCATED, ScoreResult, clean_texts
from reward_servers.batcher import BatcherConfig
from reward_servers.cli import TOKEN_ENV
from reward_servers.images import make_item

OK, INVALID = pb.Result.STATUS_OK, pb.Result.STATUS_INVALID_INPUT
ROOT = Path(__file__).resolve().parents[2]


def one_bit_png(width: int, height: int) -> pb.Image:
    """A 1-bit PNG: a few hundred bytes on the wire, width x height x 3 bytes once decoded to RGB."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG", optimize=True)
    return pb.Image(encoding=pb.Image.ENCODING_PNG, data=buffer.getvalue(), width=width, height=height)


def test_nan_or_inf_in_metadata_fails_only_its_item(serve, image):
    st = serve("brightness")
    good = image()
    items = [make_item(f"good{i}", good, good, metadata={"kind": "recolor"}) for i in range(2)]
    nan_item = make_item("nan", good, good, metadata={"amount": float("nan")})
    inf_item = make_item("inf", good, good, metadata={"nested": {"x": float("inf")}})
    items = [items[0], nan_item, inf_item, items[1]]
    with st.client() as client:
        response = client.score(items)
    by_id = {r.id: r for r in response.results}
    assert by_id["good0"].status == OK and by_id["good1"].status == OK
    for name in ("nan", "inf"):
        assert by_id[name].status == INVALID and math.isnan(by_id[name].score)
        assert "metadata" in by_id[name].error and "\n" not in by_id[name].error


def test_decoded_bytes_budget_per_request(serve, image):
    st = serve("brightness", max_decoded_mb=1)
    good = image()
    huge = make_item("huge", good, good)
    huge.edited.CopyFrom(one_bit_png(1024, 1024))  # 3 MiB decoded, a few hundred bytes sent
    huge.source.CopyFrom(one_bit_png(1024, 1024))
    assert huge.ByteSize() < 4096
    exemplars = make_item("exemplars", good, good)
    exemplars.exemplars.extend([one_bit_png(1024, 1024)])  # exemplars count too
    with st.client() as client:
        response = client.score([make_item("a", good, good), huge, exemplars, make_item("b", good, good)])
        by_id = {r.id: r for r in response.results}
        assert by_id["a"].status == OK and by_id["b"].status == OK
        for name in ("huge", "exemplars"):
            assert by_id[name].status == INVALID and "budget" in by_id[name].error, by_id[name].error
        # Each item fits alone, together they do not: the request is refused before any decoding.
        mid = image(300, 300)  # 2 x 270 KB decoded per item
        with pytest.raises(grpc.RpcError) as err:
            client.score([make_item(str(i), mid, mid) for i in range(4)])
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_decoded_mb" in err.value.details()
        # The server keeps serving.
        again = client.score([make_item(str(i), mid, mid) for i in range(1)])
    assert [r.status for r in again.results] == [OK]


def test_error_text_has_no_memory_addresses(serve, image):
    st = serve("brightness")
    good = image()
    bad = make_item("bad", good, good, encoding="png")
    bad.edited.data = bad.edited.data[:8] + b"not a png at all" * 4  # PNG signature, then garbage
    with st.client() as client:
        (result,) = client.score([bad]).results
    assert result.status == INVALID and "undecodable PNG" in result.error
    assert "0x" not in result.error and " object at " not in result.error, result.error


def test_serve_refuses_a_public_host_without_a_token(capsys, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["serve", "sleep", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "0.0.0.0" in err and TOKEN_ENV in err and "--insecure-no-token" in err


@pytest.mark.parametrize("how", ["token", "flag", "loopback"])
def test_serve_binds_a_public_host_with_a_token_or_the_explicit_flag(how):
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "REDIS_URL")}
    args = ["--host", "127.0.0.1"] if how == "loopback" else ["--host", "0.0.0.0"]
    if how == "token":
        env[TOKEN_ENV] = "s3cret"
    elif how == "flag":
        args.append("--insecure-no-token")
    cmd = [sys.executable, "-m", "reward_servers", "serve", "sleep", "--port", "0", *args]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line + proc.stdout.read() if proc.poll() is not None else line
    finally:
        proc.terminate()
        proc.wait(30)


class _TextScorer:
    """Scores 1.0; each item's texts come from its instruction: "huge" (8 MiB of reasoning),
    "surrogate" (a lone surrogate, which protobuf cannot encode) or anything else (a short text)."""

    name, version, model_id, higher_is_better, max_batch_size = "texts", "1", "", True, 8

    def score(self, batch):
        texts = {"huge": {"reasoning": "x" * (8 * 2**20)}, "surrogate": {"reasoning": "ok \ud800 then"}}
        return ScoreResult(
            np.ones(len(batch)),
            texts=[texts.get(t, {"reasoning": "fine"}) for t in batch.instructions],
        )


def test_texts_are_capped_and_a_bad_one_fails_no_other_item(serve, image):
    """Issue 26 #7: an 8 MiB (once 100 MiB) reasoning text passed through whole; a text holding a
    lone surrogate failed the whole request with UNKNOWN. Now texts are cut to batching.max_text_bytes
    with a marker, and the surrogate is sent escaped; every item keeps its score."""
    st = serve(_TextScorer, name="texts", batching=BatcherConfig(max_queue_delay_ms=2.0, max_text_bytes=4096))
    good = image()
    items = [make_item(name, good, good, name) for name in ("huge", "surrogate", "plain")]
    with st.client() as client:
        huge, surrogate, plain = client.score(items).results
    assert [r.status for r in (huge, surrogate, plain)] == [OK] * 3 and huge.score == 1.0
    text = huge.texts["reasoning"]
    assert len(text.encode()) + len("reasoning") <= 4096
    assert text.endswith(f"{TRUNCATED} {8 * 2**20} bytes, limit 4096 per item]") and text.startswith("xxx")
    assert surrogate.texts["reasoning"] == "ok \\ud800 then"
    assert plain.texts["reasoning"] == "fine"


def test_clean_texts_cuts_at_a_character_boundary():
    texts = clean_texts({"a": "é" * 1000, "b": "never sent"}, max_bytes=300)
    assert list(texts) == ["a"] and len(b"a") + len(texts["a"].encode()) <= 300
    texts["a"].encode("utf-8")  # whole characters only
    assert clean_texts({"k": "short", "\udcff": "v"}) == {"k": "short", "\\udcff": "v"}
