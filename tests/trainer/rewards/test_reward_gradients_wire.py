"""Reward gradients through the transports, trainer side: the queue (embedded Redis and `spie serve`
replicas the run launches) and gRPC give the in-process gradient; an old server is named."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from rollout_helpers import image_rollout

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import build_scorer
from reward_servers.client import ScorerClient
from reward_servers.config import ServerConfig
from reward_servers.server import SERVICE_NAME, RewardServer
from sampler.rollout import Rollout
from trainer.algo.alignprop import reward_loss
from trainer.loop import train
from trainer.rewards.differentiable import (
    InProcessGradients,
    RewardGradientError,
    grpc_gradients,
    make_gradient_rewards,
)
from trainer.rewards.services import make_rewards
from trainer.run.log import read_metrics

WEIGHTS = {"ssim_structure": 1.0, "brightness": 0.5}


def _gradient(reward, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d images, the weighted reward) for AlignProp's loss on `rollout.images`."""
    images = rollout.images.clone().requires_grad_(True)
    loss, total = reward_loss(reward(images, rollout), WEIGHTS)
    loss.backward()
    return images.grad, total.detach()


def _in_process(rollout: Rollout):
    return _gradient(InProcessGradients({n: build_scorer(n) for n in WEIGHTS}), rollout)


def test_queue_gradient_equals_the_in_process_gradient(tiny_config, redis_server, monkeypatch):
    """Two scorers served by replicas the run launches, through Redis: the backpropagated image
    gradient of the weighted loss equals the in-process one to 1e-5."""
    monkeypatch.setenv("REDIS_PASSWORD", redis_server.password)
    scorers = "reward.scorers=[{name: ssim_structure}, {name: brightness, weight: 0.5}]"
    config = tiny_config("reward.transport=queue", f"reward.redis_url={redis_server.url}", scorers)
    rewards = make_rewards(config, run_id="gradients")
    try:
        rollout = image_rollout(4, masked=True)
        grad, total = _gradient(make_gradient_rewards(rewards), rollout)
    finally:
        rewards.close()
    want_grad, want_total = _in_process(rollout)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, want_total, atol=1e-5, rtol=0)


class _Loop:
    """An asyncio loop on a thread, for the grpc.aio server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def test_grpc_gradient_equals_the_in_process_gradient():
    loop, servers, clients = _Loop(), [], {}
    try:
        for name in WEIGHTS:
            server = RewardServer(lambda name=name: build_scorer(name), name, ServerConfig(port=0))
            servers.append(server)
            port = loop.run(server.start())
            loop.run(server.load())
            clients[name] = ScorerClient(f"127.0.0.1:{port}")
        rollout = image_rollout(4, masked=True)
        reward = grpc_gradients(clients)
        grad, total = _gradient(reward, rollout)
        assert reward.bytes_sent > 4 * 3 * 16 * 16 * 4  # each item carries its float32 tensor
    finally:
        for c in clients.values():
            c.close()
        for s in servers:
            loop.run(s.stop(grace_s=1.0))
    want_grad, want_total = _in_process(rollout)
    torch.testing.assert_close(grad, want_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(total, want_total, atol=1e-5, rtol=0)


def _old_messages():
    """The v1 messages as they were before reward gradients: this file's descriptor without
    `Tensor`, `Item.edited_tensor`, `Item.want_gradient` and `Result.gradient` (same field numbers),
    in a package of its own."""
    from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2
    from google.protobuf.message_factory import GetMessageClass

    pool = descriptor_pool.DescriptorPool()
    struct = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct)
    pool.Add(struct)
    old = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(old)
    old.name, old.package = "old_reward.proto", "spie.reward.v1old"
    del old.service[:]
    kept = [m for m in old.message_type if m.name != "Tensor"]
    del old.message_type[:]
    old.message_type.extend(kept)
    for message in old.message_type:
        fields = [f for f in message.field if f.name not in ("edited_tensor", "want_gradient", "gradient")]
        del message.field[:]
        message.field.extend(fields)
        for f in [*message.field, *(g for n in message.nested_type for g in n.field)]:
            if f.HasField("type_name"):
                f.type_name = f.type_name.replace(".spie.reward.v1.", ".spie.reward.v1old.")
    pool.Add(old)
    return lambda name: GetMessageClass(pool.FindMessageTypeByName(f"spie.reward.v1old.{name}"))


def test_an_old_server_that_ignores_the_flag_is_named():
    """A server built on the old messages scores brightness and drops what it does not know: the
    trainer stops with one line naming the scorer and the missing gradient."""
    old = _old_messages()
    request_cls, response_cls, result_cls = old("ScoreRequest"), old("ScoreResponse"), old("Result")
    seen = []

    def score(request, context):
        from google.protobuf.unknown_fields import UnknownFieldSet

        seen.extend(sorted({f.field_number for f in UnknownFieldSet(item)}) for item in request.items)
        response = response_cls(scorer="brightness", version="1")
        for item in request.items:
            pixels = np.frombuffer(item.edited.data, np.uint8)
            response.results.append(result_cls(id=item.id, score=pixels.mean() / 255.0, status=1))
        return response

    def info(request, context):
        return old("InfoResponse")(scorer="brightness", higher_is_better=True)

    handlers = {
        "Score": grpc.unary_unary_rpc_method_handler(
            score, request_cls.FromString, response_cls.SerializeToString
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            info, old("InfoRequest").FromString, old("InfoResponse").SerializeToString
        ),
    }
    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with ScorerClient(f"127.0.0.1:{port}") as client:
            reward = grpc_gradients({"brightness": client})
            images = image_rollout(2, masked=True).images.clone().requires_grad_(True)
            with pytest.raises(RewardGradientError, match=r"scorer 'brightness' at 127\.0\.0\.1:\d+ returned no gradient for item 'i0': the server predates reward gradients"):  # fmt: skip
                reward(images, image_rollout(2, masked=True))
        assert seen == [[8, 9], [8, 9]]  # it received the tensor and the flag, and did not know them
    finally:
        server.stop(0)


@pytest.mark.slow
def test_alignprop_over_the_queue_trains_as_in_process(tiny_config):
    """Two epochs of AlignProp with brightness served by a replica the run launches: the same
    rewards and losses as in process (the gradients cross the wire as float32 tensors)."""
    common = ["train.objective=alignprop", "run.num_epochs=2", "run.image_log_freq=0", "sample.batch_size=8"]
    local = read_metrics(train(tiny_config(*common, "run.name=local")))
    queued = read_metrics(train(tiny_config(*common, "run.name=queued", "reward.transport=queue")))
    for a, b in zip(local, queued, strict=True):
        assert a["brightness.mean"] == pytest.approx(b["brightness.mean"], abs=1e-6)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
