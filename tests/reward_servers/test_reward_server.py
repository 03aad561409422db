"""A real grpc.aio reward server on loopback: scoring, bad input, status codes, health, auth."""

from __future__ import annotations

import math
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from reward_helpers import GatedScorer, bad_images

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.images import encode_image, make_item

OK, INVALID = pb.Result.STATUS_OK, pb.Result.STATUS_INVALID_INPUT


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_structure_direction_over_grpc(serve, image, encoding):
    """An identical copy scores best; a mildly noisy copy beats an unrelated image."""
    st = serve("ssim_structure")
    source = image(48, 48)
    noisy = np.clip(source.astype(int) + np.random.default_rng(1).integers(-20, 21, source.shape), 0, 255)
    edits = {"same": source, "noisy": noisy.astype(np.uint8), "other": image(48, 48)}
    items = [make_item(k, v, source, "keep it", encoding=encoding) for k, v in edits.items()]
    with st.client() as client:
        response = client.score(items)
        info = client.info()
    scores = {r.id: r.score for r in response.results}
    assert [r.status for r in response.results] == [OK] * 3
    assert scores["same"] == pytest.approx(1.0) and scores["same"] > scores["noisy"] > scores["other"]
    assert response.scorer == "ssim_structure" and info.scorer == "ssim_structure"
    assert info.max_message_bytes == 64 * 1024 * 1024 and info.higher_is_better


def test_served_equals_in_process(serve, image):
    st = serve("brightness")
    edits = [image() for _ in range(5)]
    with st.client() as client:
        response = client.score([make_item(str(i), e, e, encoding="png") for i, e in enumerate(edits)])
    expected = (
        build_scorer("brightness")
        .score(__import__("reward_servers").ScoreBatch(edits, edits, [""] * 5))
        .scores
    )
    np.testing.assert_allclose([r.score for r in response.results], expected, rtol=0, atol=1e-12)


def test_every_bad_input_fails_alone_and_server_keeps_serving(serve, image, rng):
    st = serve("ssim_structure", max_pixels=1 << 20)
    good = image()
    items = [make_item("good0", good, good)]
    for kind, (bad, _) in sorted(bad_images(rng).items()):
        item = make_item(kind, good, good)
        item.edited.CopyFrom(bad)
        items.append(item)
    items.append(make_item("sizes_differ", image(32, 32), image(40, 32)))
    items.append(pb.Item(id="missing_source", edited=encode_image(good)))
    items.append(make_item("good1", good, image()))
    with st.client() as client:
        response = client.score(items)
        by_id = {r.id: r for r in response.results}
        assert [r.id for r in response.results] == [it.id for it in items]
        assert by_id["good0"].status == OK and by_id["good1"].status == OK
        for item in items[1:-1]:
            result = by_id[item.id]
            assert result.status == INVALID and math.isnan(result.score), item.id
            assert result.error and "\n" not in result.error, item.id
        assert "sizes differ" in by_id["sizes_differ"].error
        assert "pixel cap" in by_id["bomb_png"].error
        # The server still serves a good batch.
        again = client.score([make_item(str(i), good, good) for i in range(3)])
    assert [r.status for r in again.results] == [OK] * 3
    assert (
        st.server.metrics.registry.get_sample_value(
            "spie_reward_errors_total", {"scorer": "ssim_structure", "kind": "invalid_input"}
        )
        == len(items) - 2
    )


def test_malformed_requests_get_invalid_argument(serve, image):
    st = serve("brightness", max_items_per_request=4)
    good = image()
    with st.client() as client:
        raw = client.channel.unary_unary("/spie.reward.v1.RewardService/Score")
        assert code_of(lambda: raw(b"\xff\xff\xff\xff", timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: client.score([])) == grpc.StatusCode.INVALID_ARGUMENT
        dup = [make_item("a", good, good), make_item("a", good, good)]
        assert code_of(lambda: client.score(dup)) == grpc.StatusCode.INVALID_ARGUMENT
        many = [make_item(str(i), good, good) for i in range(5)]
        assert code_of(lambda: client.score(many)) == grpc.StatusCode.INVALID_ARGUMENT
        wrong = [make_item("a", good, good)]
        assert code_of(lambda: client.score(wrong, scorer="hpsv2")) == grpc.StatusCode.FAILED_PRECONDITION
        assert client.score(wrong, scorer="brightness").results[0].status == OK


def _hold(st, client, gated, image):
    """Send one item and wait until the scorer is busy with it (gated)."""
    good = image()
    busy = client.score_future(pb.ScoreRequest(items=[make_item("busy", good, good)]))
    assert gated.entered.wait(10)
    return busy, good


def test_full_queue_is_resource_exhausted(serve, image):
    gated = GatedScorer(build_scorer("brightness"))
    st = serve(lambda: gated, name="brightness", batching=BatcherConfig(4, 0.0, max_queue_size=3))
    with st.client() as client:
        busy, good = _hold(st, client, gated, image)
        waiting = client.score_future(
            pb.ScoreRequest(items=[make_item(str(i), good, good) for i in range(3)])
        )
        deadline = time.monotonic() + 10
        while st.server.batcher.queue_depth < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # let it reach the queue
        assert st.server.batcher.queue_depth == 3
        code = code_of(lambda: client.score([make_item("x", good, good)]))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        gated.gate.set()
        assert busy.result(10).results[0].status == OK
        assert [r.status for r in waiting.result(10).results] == [OK] * 3


def test_deadline_expired_in_queue(serve, image):
    gated = GatedScorer(build_scorer("brightness"))
    st = serve(lambda: gated, name="brightness", batching=BatcherConfig(4, 0.0))
    with st.client() as client:
        busy, good = _hold(st, client, gated, image)
        # A server-side deadline (as the Redis queue carries) 200 ms ahead; the call's own is 10 s.
        late = pb.ScoreRequest(
            items=[make_item("late", good, good)], deadline_unix_ms=int(time.time() * 1000) + 200
        )
        future = client.score_future(late, timeout_s=10)
        time.sleep(0.4)
        gated.gate.set()
        assert busy.result(10).results[0].status == OK
        with pytest.raises(grpc.RpcError) as err:
            future.result(10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # A gRPC deadline that expires while queued behind a busy scorer also fails.
        gated.gate.clear()
        gated.entered.clear()
        busy, good = _hold(st, client, gated, image)
        assert code_of(lambda: client.score([make_item("late2", good, good)], timeout_s=0.2)) == (
            grpc.StatusCode.DEADLINE_EXCEEDED
        )
        # The server's deadline starts when the call reaches it, a little after the client's: on a
        # loaded machine it may still be open when the client gives up, so let it pass first.
        time.sleep(0.3)
        gated.gate.set()
        busy.result(10)
    assert gated.sizes == [1, 1]  # neither late item reached the scorer


def test_auth_token(serve, image):
    st = serve("brightness", auth_token="s3cret")
    good = image()
    with st.client() as anonymous, st.client(token="wrong") as wrong, st.client(token="s3cret") as client:
        assert (
            code_of(lambda: anonymous.score([make_item("a", good, good)])) == grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(lambda: wrong.info()) == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == health_pb2.HealthCheckResponse.SERVING  # probes need no token
        assert client.score([make_item("a", good, good)]).results[0].status == OK


def test_health_not_serving_until_loaded_then_draining(serve, image):
    gated = GatedScorer(build_scorer("brightness"))
    release = __import__("threading").Event()

    def slow_factory():
        assert release.wait(30)
        return gated

    st = serve(slow_factory, name="brightness", load=False)
    loading = __import__("asyncio").run_coroutine_threadsafe(st.server.load(), st.loop)
    good = image()
    with st.client() as client:
        assert client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(lambda: client.score([make_item("a", good, good)])) == grpc.StatusCode.UNAVAILABLE
        release.set()
        loading.result(10)
        client.wait_ready(10)
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
        gated.gate.set()
        assert client.score([make_item("a", good, good)]).results[0].status == OK
        # Reflection lists the reward service.
        stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
        reply = next(
            stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
        )
        assert "spie.reward.v1.RewardService" in {s.name for s in reply.list_services_response.service}
        # Draining flips health before the port closes.
        import asyncio

        asyncio.run_coroutine_threadsafe(
            st.server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING), st.loop
        ).result(5)
        st.server._draining = True
        assert client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(lambda: client.score([make_item("a", good, good)])) == grpc.StatusCode.UNAVAILABLE


def test_metrics_endpoint(serve, image):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    st = serve("brightness", metrics_port=port)
    good = image()
    with st.client() as client:
        client.score([make_item(str(i), good, good) for i in range(3)])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'spie_reward_items_scored_total{scorer="brightness"} 3.0' in text
    for name in (
        "spie_reward_batch_size_bucket",
        "spie_reward_queue_depth",
        "spie_reward_request_seconds_count",
    ):
        assert name in text


def test_tls(serve, image, tmp_path):
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    cmd = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    cmd += ["-keyout", str(key), "-out", str(cert), "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"]
    __import__("subprocess").run(cmd, check=True, capture_output=True, timeout=60)
    st = serve("brightness", tls_cert=str(cert), tls_key=str(key))
    good = image()
    with st.client(tls_ca=str(cert)) as client:
        assert client.score([make_item("a", good, good)]).results[0].status == OK
    with st.client() as plaintext:  # a plaintext client cannot talk to a TLS server
        assert (
            code_of(lambda: plaintext.score([make_item("a", good, good)], timeout_s=3))
            == grpc.StatusCode.UNAVAILABLE
        )
