"""`spie cluster up`: Compose interpolation, the plan for docker-compose.yml, and real runs of
tests/data/compose-local.yml (embedded Redis, a `spie serve` scorer, a Ray head and a tiny training
run over the queue through Ray Client), stopped without leftovers."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from trainer.cluster.compose import interpolate, load_project
from trainer.cluster.launcher import Launcher
from trainer.errors import UserError
from trainer.run.log import read_metrics

REPO = Path(__file__).resolve().parents[3]
LOCAL = REPO / "tests" / "data" / "compose-local.yml"


def test_interpolation_follows_compose():
    env = {"A": "a", "EMPTY": ""}
    assert interpolate("x${A}y$A-$$A", env, "f") == "xaya-$A"
    assert interpolate("${EMPTY:-d} ${EMPTY-d} ${NOPE-d} ${NOPE:-${A}}", env, "f") == "d  d a"
    assert interpolate("${A:+alt}|${EMPTY:+alt}|${EMPTY+alt}", env, "f") == "alt||alt"
    assert interpolate("${EMPTY?x}", env, "f") == ""
    with pytest.raises(UserError, match="f: NOPE is required: set NOPE"):
        interpolate("${NOPE:?set NOPE}", env, "f")
    with pytest.raises(UserError, match="EMPTY is required"):
        interpolate("${EMPTY:?}", env, "f")


def test_the_compose_file_runs_on_loopback_with_the_same_commands(tmp_path):
    with pytest.raises(UserError, match="REDIS_PASSWORD: SPIE_REDIS_PASSWORD is required"):
        load_project([REPO / "docker-compose.yml"], [], {})
    env_file = tmp_path / "cluster.env"
    env_file.write_text(
        "# the secrets\nSPIE_REDIS_PASSWORD='s3cret'\nexport SPIE_RAY_TOKEN=tok\nSPIE_REWARD_TOKEN=rtok\n"
    )
    project = load_project([REPO / "docker-compose.yml"], [env_file], {"SPIE_RAY_TOKEN": "from-shell"})
    launcher = Launcher(project, ["trainer"], {"depth": 2}, {})
    assert launcher.order[-1] == "trainer" and set(launcher.order) == {
        "redis",
        "depth",
        "vlm-judge",
        "ray-head",
        "trainer",
    }
    redis_port = launcher.ports[("redis", 6379)]
    client_port = launcher.ports[("ray-head", 10001)]

    trainer = project.services["trainer"]
    env = launcher.environment(trainer)
    assert env["REDIS_URL"] == f"redis://127.0.0.1:{redis_port}/0" and env["REDIS_PASSWORD"] == "s3cret"
    assert env["RAY_AUTH_TOKEN"] == "from-shell"  # the shell wins over the env file
    assert "HF_HOME" not in env or env["HF_HOME"] == os.environ.get("HF_HOME")  # a named volume's path
    argv = launcher.command(trainer, 0, dry_run=True)
    assert argv[:3] == [sys.executable, "-m", "trainer.cli"]
    assert argv[3:] == [
        a.replace("ray://ray-head:10001", f"ray://127.0.0.1:{client_port}") for a in trainer.command[1:]
    ]

    head = launcher.command(project.services["ray-head"], 0, dry_run=True)
    for flag in (
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--ray-client-server-port={client_port}",
    ):
        assert flag in head
    assert "--block" in head
    depth = [launcher.command(project.services["depth"], i, dry_run=True) for i in range(2)]
    ports = {a[a.index("--port") + 1] for a in depth}
    assert len(ports) == 2 and all(a[a.index("--host") + 1] == "127.0.0.1" for a in depth)
    assert project.services["depth"].gpus == 1 and project.services["ray-head"].gpus == 1
    assert len([line for line in launcher.describe() if line.startswith("depth-")]) == 2
    assert "s3cret" not in "\n".join(launcher.describe())


def _sessions_alive(sids: set[int]) -> list[str]:
    """Processes (pid and name) whose session is one the launcher created."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) in sids and fields[0] != "Z":  # fields[3]: the session id
            alive.append(f"{stat.parent.name} {text[: text.rindex(')') + 1]}")
    return alive


class Up:
    """`spie cluster up ...` in a child process, its output collected line by line."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trainer.cli",
                "cluster",
                "up",
                "-f",
                str(LOCAL),
                "--project-directory",
                str(REPO),
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.thread.start()

    def wait_for(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                pytest.fail(f"no {text!r} in the output:\n{self.output[-3000:]}")
            time.sleep(0.2)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pids(self) -> set[int]:
        return {int(p) for p in re.findall(r"\(pid (\d+)\)", self.output)}


@pytest.fixture
def cluster_env(tmp_path, tiny_model_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "REDIS_URL", "REDIS_PASSWORD")}
    env.update(
        SPIE_REDIS_PASSWORD=secrets.token_hex(16),
        SPIE_RAY_TOKEN=secrets.token_hex(32),
        SPIE_TEST_RUNS=str(tmp_path / "runs"),
        SPIE_TINY_DIR=str(Path(tiny_model_dir).resolve()),
        OMP_NUM_THREADS="1",
    )
    return env


def test_cluster_up_runs_the_compose_services_and_stops_them(cluster_env, tmp_path):
    import jsonschema

    schema = json.loads((REPO / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.validate(yaml.safe_load(LOCAL.read_text()), schema)
    up = Up("--exit-code-from", "trainer", "--timeout", "240", "--health-timeout", "120", env=cluster_env)
    try:
        up.proc.wait(timeout=300)
    finally:
        if up.proc.poll() is None:
            up.proc.kill()
    up.thread.join(timeout=10)
    out = up.output
    assert up.proc.returncode == 0, out[-4000:]
    assert "brightness: healthy" in out and "ray-head: healthy" in out  # waited before the trainer
    assert re.search(
        r"trainer-1: started \(pid \d+\): spie train .* --ray-address ray://127\.0\.0\.1:\d+ ", out
    )
    assert "ray: 1 rollout worker(s) on 1 node(s), 1 learner" in out
    # The brightness server scored the rollouts through the embedded Redis.
    metrics = read_metrics(tmp_path / "runs" / "cluster")
    assert len(metrics) == 1 and 0 < metrics[0]["brightness.mean"] < 1 and metrics[0]["items_dropped"] == 0
    assert "[cluster] stopped 4 process(es)" in out
    pids = up.pids()
    assert len(pids) == 4
    assert _sessions_alive(pids) == []  # nothing left: not the Ray head's raylet, GCS or workers
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    temp = re.search(r"--temp-dir=(\S+)", out)[1]
    assert not Path(temp).exists()  # the head's private temp dir is removed


def test_sigterm_stops_every_replica(cluster_env):
    up = Up(
        "--services", "brightness", "--scale", "brightness=2", "--wait", "--timeout", "120", env=cluster_env
    )
    up.wait_for("[cluster] every service is up", 90)
    ports = re.findall(
        r"brightness-\d: started \(pid \d+\): spie-reward serve brightness --host 127\.0\.0\.1 --port (\d+)",
        up.output,
    )
    assert len(set(ports)) == 2  # two replicas on their own ports, one consumer group
    pids = up.pids()
    assert len(pids) == 3  # redis + 2 replicas
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=60) == 128 + signal.SIGTERM
    up.thread.join(timeout=10)
    assert "[cluster] SIGTERM: stopping" in up.output and "[cluster] stopped 3 process(es)" in up.output
    assert _sessions_alive(pids) == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
