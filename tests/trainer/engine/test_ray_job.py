"""Job submission: `ray start --head` on loopback, the documented `ray job submit` command with
deploy/runtime_env.yaml, a tiny `spie train --ray` job that succeeds, and its logs read back."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trainer.run.log import read_metrics

REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, timeout: float, env: dict[str, str]) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).with_name("ray")
    return subprocess.run(
        [str(ray), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def loopback_head(tmp_path):
    """A Ray head whose GCS, dashboard and job API listen on 127.0.0.1 only; stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # Token authentication with a token of this test's own, not whatever ~/.ray holds: the job API
    # refuses callers without it.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    dashboard = free_port()
    log = tmp_path / "ray-start.log"
    temp = tempfile.mkdtemp(prefix="spie-ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
            "--num-cpus=3",
            f"--temp-dir={temp}",  # short: Ray's socket paths must stay under 108 bytes
            "--disable-usage-stats",
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, stopped as one below
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start --head exited with {head.returncode}: {log.read_text()[-1500:]}")
            up = ray_cli("job", "list", "--address", address, timeout=60, env=env)
            if up.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the job API did not come up: {up.stderr[-500:]}")
            time.sleep(1)
        yield address, env
    finally:
        # SIGTERM to `ray start` alone: it stops its GCS, raylet and workers in about a second
        # (a SIGTERM to the whole group leaves it waiting for children that are already gone).
        head.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)  # anything left in its group
        head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)


def test_submitted_job_trains_and_its_logs_are_readable(loopback_head, tiny_model_dir, tmp_path):
    address, env = loopback_head
    out = tmp_path / "runs"
    job = ray_cli(
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        "spie-tiny",
        "--working-dir",
        ".",
        "--runtime-env",
        "deploy/runtime_env.yaml",
        "--",
        "spie",
        "train",
        "--config",
        "configs/tiny.yaml",
        "--ray",
        "--quiet",
        "--set",
        "run.num_epochs=1",
        "--set",
        "run.name=job",
        "--set",
        f"run.output_dir={out}",
        "--set",
        f"model.tiny_dir={Path(tiny_model_dir).resolve()}",
        timeout=400,
        env=env,
    )
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    status = ray_cli("job", "status", "--address", address, "spie-tiny", timeout=60, env=env)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    logs = ray_cli("job", "logs", "--address", address, "spie-tiny", timeout=60, env=env)
    assert logs.returncode == 0
    # The job joined the head's cluster (no Ray of its own) and ran the epoch on actors there.
    assert "ray: 1 rollout worker(s) on 1 node(s), 1 learner" in logs.stdout
    assert "[spie] done" in logs.stdout
    metrics = read_metrics(out / "job")
    assert len(metrics) == 1 and metrics[0]["rollout_workers"] == 1
