"""`reward.transport: grpc`: the trainer scores through real reward servers on loopback (addresses
in config, the token from SPIE_REWARD_TOKEN), with deadlines, retries and one-line errors."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from rollout_helpers import image_rollout

from reward_servers.base import build_scorer
from reward_servers.config import ServerConfig
from reward_servers.server import RewardServer
from trainer.config import load_config
from trainer.errors import UserError
from trainer.loop import train
from trainer.rewards.inprocess import InProcessRewards
from trainer.rewards.services import make_rewards
from trainer.run.log import read_metrics

TOKEN = "test-token-0123"
REPO = Path(__file__).resolve().parents[3]


class Servers:
    """Real `RewardServer`s on 127.0.0.1 (free ports), on one event loop thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.servers: list[RewardServer] = []

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def start(self, name: str, token: str = TOKEN, server_fields: dict | None = None, **kwargs) -> str:
        config = ServerConfig(port=0, auth_token=token, **(server_fields or {}))
        server = RewardServer(lambda: build_scorer(name, **kwargs), name, config)
        self.servers.append(server)
        port = self.run(server.start())
        self.run(server.load())
        return f"127.0.0.1:{port}"

    def close(self) -> None:
        for s in self.servers:
            self.run(s.stop(grace_s=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def servers(monkeypatch):
    monkeypatch.setenv("SPIE_REWARD_TOKEN", TOKEN)
    s = Servers()
    yield s
    s.close()


def test_training_through_grpc_servers_equals_in_process(servers, tiny_config):
    """Two scorers, each on its own server, in requests of at most 4 items: the same scores as in
    process; one PPO epoch gives the in-process run's scores and loss; AlignProp's gradients come
    back through the same servers (also as a Ray learner rebuilds them from the spec)."""
    from trainer.algo.alignprop import reward_loss
    from trainer.rewards.differentiable import gradient_rewards_from_spec, make_gradient_rewards

    brightness, ssim = servers.start("brightness"), servers.start("ssim_structure")
    scorers = "reward.scorers=[{name: brightness}, {name: ssim_structure, role: structural, weight: 0.5}]"
    grpc = [
        "reward.transport=grpc",
        f"reward.grpc.servers={{brightness: '{brightness}', ssim_structure: '{ssim}'}}",
        "reward.grpc.max_items_per_request=4",
        "reward.deadline_s=30",
    ]
    config = tiny_config(scorers, *grpc)
    rewards, local = make_rewards(config, run_id="grpc"), InProcessRewards(config.reward)
    try:
        rollout = image_rollout(6)
        got, want = rewards.score(rollout), local.score(rollout)
        assert rewards.metrics() == {"grpc.requests": 4, "grpc.retries": 0}  # 2 scorers x 2 chunks
        for name in ("brightness", "ssim_structure"):
            assert got.values[name].tolist() == pytest.approx(want.values[name].tolist(), abs=1e-9)
            assert got.errors[name] == [None] * 6
        images = rollout.images.clone().requires_grad_(True)
        grads = []
        for reward in (make_gradient_rewards(rewards), gradient_rewards_from_spec(config, {"transport": "grpc", "token": TOKEN})):  # fmt: skip
            images.grad = None
            reward_loss(reward(images, rollout), {"brightness": 1.0, "ssim_structure": 0.5})[0].backward()
            grads.append(images.grad.clone())
            reward.close()
        assert grads[0].abs().sum() > 0 and torch.equal(grads[0], grads[1])
    finally:
        rewards.close()

    common = [
        scorers,
        "run.num_epochs=1",
        "run.image_log_freq=0",
        "sample.batch_size=4",
        "train.batch_size=8",
    ]
    a = read_metrics(train(tiny_config(*common, "run.name=local")))[0]
    b = read_metrics(train(tiny_config(*common, *grpc, "run.name=grpc")))[0]
    for key in ("brightness.mean", "ssim_structure.mean", "loss"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key
    assert b["grpc.requests"] == 2 * 2  # 8 edits in chunks of 4, per scorer


def test_same_host_servers_take_the_pixels_through_shared_memory(servers, tiny_config, tmp_path):
    """reward.grpc.shared_dir: the same scores as in process, the regions gone with the client."""
    folder = tmp_path / "shm"
    target = servers.start("brightness", server_fields={"shared_dir": str(folder)})
    config = tiny_config(
        "reward.scorers=[{name: brightness}]",
        "reward.transport=grpc",
        f"reward.grpc.servers={{brightness: '{target}'}}",
        f"reward.grpc.shared_dir={folder}",
    )
    rewards, local = make_rewards(config, run_id="shm"), InProcessRewards(config.reward)
    try:
        rollout = image_rollout(6)
        got, want = rewards.score(rollout), local.score(rollout)
        assert got.errors["brightness"] == [None] * 6
        assert got.values["brightness"].tolist() == pytest.approx(
            want.values["brightness"].tolist(), abs=1e-9
        )
        assert [p.suffix for p in folder.iterdir()] == [".region"]
    finally:
        rewards.close()
    assert list(folder.iterdir()) == []


def test_deadlines_tokens_and_addresses_fail_with_one_line(servers, tiny_config):
    slow = servers.start("sleep", batch_seconds=3.0)
    base = ["reward.scorers=[{name: sleep}]", "reward.transport=grpc", "reward.server_start_timeout_s=5"]
    config = tiny_config(*base, f"reward.grpc.servers={{sleep: '{slow}'}}", "reward.deadline_s=0.5")
    rewards = make_rewards(config, run_id="deadline")
    try:
        with pytest.raises(UserError, match=r"scorer 'sleep' at .*: DEADLINE_EXCEEDED: .*\(2 tries of reward.deadline_s=0.5s\)") as err:  # fmt: skip
            rewards.score(image_rollout(2))
        assert "\n" not in str(err.value)
        assert rewards.metrics()["grpc.retries"] == 1
    finally:
        rewards.close()
    wrong = servers.start("brightness", token="another-token")
    config = tiny_config(
        "reward.transport=grpc",
        "reward.server_start_timeout_s=5",
        f"reward.grpc.servers={{brightness: '{wrong}'}}",
    )
    with pytest.raises(UserError, match=r"reward.grpc.servers.brightness=127.0.0.1:\d+: UNAUTHENTICATED"):
        make_rewards(config, run_id="token")
    with pytest.raises(UserError, match=r"reward.grpc.servers has no address for brightness"):
        load_config("configs/tiny.yaml", ["reward.transport=grpc"])


def _serve_process(port: int, config: Path, env: dict) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "reward_servers",
        "serve",
        "sleep",
        "--port",
        str(port),
        "--config",
        str(config),
    ]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_server_killed_mid_request_and_restarted_on_its_port_is_survived(tiny_config, tmp_path):
    """Issue 26 #9: a `spie serve` process killed while it scores a request and started again on the
    same port 0.4 s later ended scoring with the default `reward.grpc.retries: 1` (the retry came
    before the server was back). UNAVAILABLE is now retried with backoff within reward.deadline_s."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    config.write_text("scorer:\n  batch_seconds: 1.0\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SPIE_REWARD_TOKEN", "REDIS_URL")}
    env["PYTHONPATH"] = str(REPO)
    first = _serve_process(port, config, env)
    second = None
    cfg = tiny_config(
        "reward.scorers=[{name: sleep}]",
        "reward.transport=grpc",
        f"reward.grpc.servers={{sleep: '127.0.0.1:{port}'}}",
        "reward.deadline_s=60",
        "reward.server_start_timeout_s=60",
    )
    assert cfg.reward.grpc.retries == 1  # the default
    rewards = make_rewards(cfg, run_id="restart")
    try:
        with ThreadPoolExecutor(1) as pool:
            scoring = pool.submit(rewards.score, image_rollout(2))
            time.sleep(0.5)  # the request is inside the scorer's 1 s sleep
            assert not scoring.done()
            first.kill()
            first.wait(10)
            time.sleep(0.4)
            second = _serve_process(port, config, env)
            scores = scoring.result(120)
        assert scores.errors["sleep"] == [None, None]
        assert all(0 <= v <= 1 for v in scores.values["sleep"].tolist())
        assert rewards.metrics()["grpc.retries"] >= 1
    finally:
        rewards.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)
