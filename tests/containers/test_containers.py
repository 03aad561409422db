"""The images built and the compose file run for real: `deploy/containers/build.sh` builds the CPU
images with podman (a debootstrapped Debian base, no registry), then the CPU profile of
docker-compose.yml (`-f docker-compose.yml -f deploy/compose.cpu.yml`) starts Redis, the brightness
scorer and the Ray head, waits until each one's own healthcheck passes, runs the trainer (the tiny
config through the queue, on the head through Ray Client) and checks that its run folder lands in
the host's runs folder. `down -v` removes everything after.

Slow (minutes: building the images dominates) and needs root, podman and podman-compose: marked
`containers`, run with `make test-containers` or `pytest --run-containers tests/containers`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
PROJECT = "spie-ctest"
FILES = ["-f", "docker-compose.yml", "-f", "deploy/compose.cpu.yml", "-p", PROJECT]
IMAGE_UID = 1000  # the images' `spie` user
SERVICES = ["redis", "brightness", "ray-head"]


def _compose_cmd() -> list[str]:
    found = shutil.which("podman-compose") or str(Path(sys.executable).with_name("podman-compose"))
    if not Path(found).exists():
        pytest.skip("podman-compose is not installed (pip install podman-compose)")
    return [found]


def _log(msg: str) -> None:
    print(f"[containers {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    if os.geteuid() != 0:
        pytest.skip("the container test runs rootful podman (uid 1000 in the images is uid 1000 here)")
    runs = tmp_path_factory.mktemp("container-runs")
    os.chown(runs, IMAGE_UID, IMAGE_UID)  # as `mkdir runs` by the host's uid-1000 user would leave it
    return {
        **os.environ,
        "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(REPO / "deploy/containers/containers.conf")),
        "SPIE_REDIS_PASSWORD": secrets.token_hex(24),
        "SPIE_RAY_TOKEN": secrets.token_hex(32),
        "SPIE_REWARD_TOKEN": secrets.token_hex(32),
        "SPIE_BASE_IMAGE": "localhost/spie-base:bookworm",
        "SPIE_REDIS_IMAGE": "localhost/spie-redis:bookworm",
        "SPIE_REWARD_IMAGE": "localhost/spie-reward:cpu",
        "SPIE_TRAINER_IMAGE": "localhost/spie-trainer:cpu",
        "SPIE_RUNS_DIR": str(runs),
        "SPIE_RUN_NAME": "containers",
    }


def _run(cmd, env, timeout=600, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {res.returncode}\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        )
    return res


def _container(env, service: str) -> str:
    out = _run(
        [
            "podman",
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={PROJECT}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ],
        env,
    )
    names = out.stdout.split()
    assert len(names) == 1, f"{service}: containers {names}"
    return names[0]


def _wait_healthy(env, service: str, deadline_s: float) -> float:
    """Run the service's own compose healthcheck (`podman healthcheck run`) until it passes: podman
    4.3 has no `wait --condition=healthy` and, without systemd, no timer that runs healthchecks."""
    name, start = _container(env, service), time.monotonic()
    while True:
        res = _run(["podman", "healthcheck", "run", name], env, check=False)
        if res.returncode == 0:
            return time.monotonic() - start
        state = _run(["podman", "inspect", "--format", "{{.State.Status}}", name], env).stdout.strip()
        if state != "running" or time.monotonic() - start > deadline_s:
            logs = _run(["podman", "logs", "--tail", "60", name], env, check=False)
            raise AssertionError(
                f"{service} not healthy ({state}): {res.stdout}{res.stderr}\n"
                f"{logs.stdout[-6000:]}{logs.stderr[-6000:]}"
            )
        time.sleep(2)


SCORE = (
    'python -c \'from PIL import Image; Image.new("RGB", (8, 8), (200, 200, 200)).save("/tmp/a.png")\''
    " && spie score --server brightness:50051 --images /tmp/a.png --json --timeout 20"
)
RAY_CLIENT = (
    'timeout 120 python -c \'import ray\ntry:\n    ray.init("ray://ray-head:10001")\n'
    '    print("CONNECTED", ray.cluster_resources())\nexcept Exception as e:\n    print("refused", e)\''
)


def _one_off(env, extra: dict[str, str], script: str) -> subprocess.CompletedProcess:
    """`script` in a fresh trainer-image container on the project's network, with `extra` env."""
    flags = [a for k, v in extra.items() for a in ("-e", f"{k}={v}")]
    cmd = ["podman", "run", "--rm", "--network", f"{PROJECT}_default", *flags, env["SPIE_TRAINER_IMAGE"]]
    return _run([*cmd, "sh", "-c", script], env, timeout=180, check=False)


def test_the_cpu_profile_trains_through_the_queue_in_containers(env):
    compose = _compose_cmd()
    t0 = time.monotonic()
    # The build's output goes to the terminal with -s (make test-containers), else to pytest's capture.
    build = subprocess.run(["deploy/containers/build.sh"], cwd=REPO, env=env, timeout=3000)
    assert build.returncode == 0, f"deploy/containers/build.sh -> {build.returncode}"
    t_build = time.monotonic() - t0
    _log(f"images built in {t_build:.0f} s")
    _run([*compose, *FILES, "down", "-v"], env, check=False)  # a previous run's leftovers
    try:
        t1 = time.monotonic()
        _run([*compose, *FILES, "up", "-d", "--no-build", *SERVICES], env)
        for service in SERVICES:
            _log(f"{service} healthy after {_wait_healthy(env, service, 240):.0f} s")
        # Only the CPU services run: the GPU scorers sit in the inactive `gpu` profile.
        running = _run(
            [
                "podman",
                "ps",
                "--filter",
                f"label=com.docker.compose.project={PROJECT}",
                "--format",
                "{{.Labels}}",
            ],
            env,
        ).stdout
        assert "depth" not in running and "vlm-judge" not in running

        # Redis takes the password and nothing else; the named model cache, a fresh volume, is the
        # images' user's (it inherits the image folder's ownership), so the scorers can write to it.
        noauth = _run(["podman", "exec", _container(env, "redis"), "redis-cli", "ping"], env, check=False)
        assert "NOAUTH" in noauth.stdout + noauth.stderr, noauth
        for service in ("brightness", "ray-head"):
            _run(["podman", "exec", _container(env, service), "touch", "/cache/huggingface/.writable"], env)

        # The scorer's gRPC port and Ray Client take their token: with it a call goes through,
        # without it the call is refused (one-off containers on the project's network).
        for token in (env["SPIE_REWARD_TOKEN"], ""):
            res = _one_off(env, {"SPIE_REWARD_TOKEN": token}, SCORE)
            ok = res.returncode == 0 and '"score"' in res.stdout
            refused = res.returncode != 0 and "UNAUTHENTICATED" in res.stderr
            assert ok if token else refused, f"token={bool(token)}: {res.stdout}{res.stderr}"
        for token in (env["SPIE_RAY_TOKEN"], ""):
            for attempt in range(3):
                if attempt:
                    time.sleep(3)  # let the proxier reap the per-client server that failed
                res = _one_off(env, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, RAY_CLIENT)
                # Ray Client's proxier can fail to start the per-client server it spawns (as in
                # tests/trainer/cluster/test_ray_loopback.py): that says nothing of the token, so
                # only that failure is tried again.
                if "Starting Ray client server failed" not in res.stdout + res.stderr:
                    break
            assert ("CONNECTED" in res.stdout) == bool(token), (
                f"token={bool(token)}: {res.stdout}{res.stderr}"
            )

        _run([*compose, *FILES, "up", "-d", "--no-build", "--no-deps", "trainer"], env)
        trainer = _container(env, "trainer")
        code = int(_run(["podman", "wait", trainer], env, timeout=900).stdout.strip().splitlines()[-1])
        logs = _run(["podman", "logs", trainer], env, check=False)
        t_run = time.monotonic() - t1
        _log(f"trainer exited {code}; compose run {t_run:.0f} s")
        assert code == 0, f"trainer exited {code}\n{logs.stdout[-8000:]}\n{logs.stderr[-8000:]}"

        run = Path(env["SPIE_RUNS_DIR"]) / env["SPIE_RUN_NAME"]
        metrics = run / "metrics.jsonl"
        assert metrics.is_file(), sorted(p.name for p in run.parent.iterdir())
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        assert rows, "metrics.jsonl is empty"
        # Written by the images' user (uid 1000), readable here; nothing root-owned from the container.
        assert metrics.stat().st_uid == IMAGE_UID and os.access(metrics, os.R_OK)
        assert metrics.stat().st_mode & 0o044, oct(metrics.stat().st_mode)  # group/other can read too
        print(json.dumps({"build_s": round(t_build), "compose_run_s": round(t_run), "epochs": len(rows)}))
    finally:
        down = _run([*compose, *FILES, "down", "-v"], env, check=False)
        left = _run(
            ["podman", "ps", "-a", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}"],
            env,
            check=False,
        ).stdout.split()
        volumes = _run(["podman", "volume", "ls", "-q"], env, check=False).stdout.split()
        assert not left, f"containers left after down -v: {left}\n{down.stderr[-2000:]}"
        assert not [v for v in volumes if v.startswith(PROJECT)], volumes
