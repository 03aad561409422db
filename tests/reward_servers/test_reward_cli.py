"""`spie serve` as a real subprocess (SIGTERM drains) and `spie score` against it; shipped configs load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.__main__ import main
from reward_servers.cli import TOKEN_ENV
from reward_servers.client import ScorerClient
from reward_servers.config import load_serve_config
from reward_servers.images import make_item
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def start_serve(*args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start `spie serve` on a free port; return the process and its HOST:PORT once listening."""
    cmd = [sys.executable, "-m", "reward_servers", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            return proc, line.split("listening on ")[1].split()[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"spie serve did not start: {proc.stdout.read()}")


def test_sigterm_drains_in_flight_requests(tmp_path, image):
    config = tmp_path / "serve.yaml"
    config.write_text("batching:\n  max_queue_delay_ms: 6000\n  max_batch_size: 64\n")
    proc, target = start_serve("ssim_structure", "--config", str(config))
    try:
        with ScorerClient(target) as client:
            client.wait_ready(30)
            good = image()
            # Held in the queue for up to 6 s waiting for a fuller batch; SIGTERM must flush it.
            pending = client.score_future(pb.ScoreRequest(items=[make_item("a", good, good)]), timeout_s=30)
            time.sleep(1.0)  # let the request reach the queue
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            result = pending.result(30)
            assert result.results[0].status == pb.Result.STATUS_OK and result.results[
                0
            ].score == pytest.approx(1)
            assert time.monotonic() - start < 4.5  # flushed at once, not after the 6 s batching delay
            assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert "draining" in out and "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_spie_score_cli_and_token(tmp_path, capsys, rng, monkeypatch):
    source = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    paths = {}
    for name, array in {"same": source, "flip": source[::-1].copy(), "src": source}.items():
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(array).save(paths[name])
    proc, target = start_serve("ssim_structure", env={TOKEN_ENV: "tok"})
    try:
        with ScorerClient(target, token="tok") as client:
            client.wait_ready(30)
        monkeypatch.setenv(TOKEN_ENV, "tok")
        argv = ["score", "--server", target, "--images", str(paths["same"]), str(paths["flip"])]
        argv += ["--sources", str(paths["src"]), str(paths["src"]), "--json"]
        assert main(argv) == 0
        lines = [__import__("json").loads(x) for x in capsys.readouterr().out.splitlines()]
        assert lines[0]["score"] == pytest.approx(1.0) and lines[1]["score"] < 0.5
        monkeypatch.delenv(TOKEN_ENV)
        assert main(argv) == 2  # UNAUTHENTICATED is reported as one line
        assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_cli_user_errors(tmp_path, capsys):
    assert main(["serve", "no_such_scorer"]) == 2
    assert "unknown scorer 'no_such_scorer'" in capsys.readouterr().err
    assert main(["serve", "brightness", "--device", "cuda:0"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("batching:\n  max_batch_sizes: 3\n")
    with pytest.raises(UserError, match="unknown field"):
        load_serve_config(bad)
    missing = tmp_path / "missing.png"
    assert main(["score", "--server", "127.0.0.1:1", "--images", str(missing)]) == 2
    assert "no such image" in capsys.readouterr().err


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "reward_servers" / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_serve_config(path)


@pytest.mark.parametrize(
    ("scorer", "options", "says"),
    [
        ("hpsv2", {}, 'the hpsv2 scorer needs open_clip: pip install -e ".[hps]"'),
        ("depth_structure", {"model_id": "/nonexistent/depth-model"}, "no such folder"),
    ],
)
def test_a_scorer_that_cannot_load_says_why_in_one_line(tmp_path, scorer, options, says):
    """A failed load is one line on stderr naming the scorer and the fix, exit status 2: no traceback,
    no event-loop warning (the gRPC server is stopped before the loop closes)."""
    if scorer == "hpsv2":
        pytest.importorskip("torch")
        try:
            import open_clip  # noqa: F401

            pytest.skip("open_clip is installed: hpsv2 gets past the import")
        except ImportError:
            pass
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"scorer": options}))
    done = subprocess.run(
        [sys.executable, "-m", "reward_servers", "serve", scorer, "--port", "0", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"spie-reward serve: error: scorer {scorer} cannot load: ")
    assert says in lines[0]


@pytest.mark.parametrize("offline", [False, True])
def test_a_checkpoint_the_hub_cannot_serve_fails_in_seconds_in_one_line(tmp_path, offline):
    """`spie serve depth_structure` with its default hub id, an empty hub cache and a hub that refuses
    connections (HF_ENDPOINT on a closed port) or HF_HUB_OFFLINE: one line naming the model and the
    fix within 10 s (from_pretrained's retries took 50 s and printed a warning per retry)."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "reward_servers", "serve", "depth_structure", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    took = time.monotonic() - start
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("spie-reward serve: error: scorer depth_structure cannot load: ")
    assert "'depth-anything/Depth-Anything-V2-Small-hf'" in lines[0] and "hf download" in lines[0]
    assert ("HF_HUB_OFFLINE is set" in lines[0]) == offline
    assert took < 10, f"{took:.1f} s"
